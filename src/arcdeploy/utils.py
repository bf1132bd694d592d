"""Small shared helpers: hashing, shapes as text and library versions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from importlib import metadata
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, hex."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def hash_file_into(h: Any, path: str | os.PathLike, chunk: int = 1 << 20) -> Any:
    """Feed a file's content to the hash object ``h`` (read in chunks); returns ``h``."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def shape_text(dims: list) -> str:
    """A tensor shape as text: ``[1, ?, 112, 112]`` (unknown dimensions as ``?``, named ones by name)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are skipped)."""
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
