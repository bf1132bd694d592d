"""Writing the user's files safely: every output of arcdeploy goes through here.

- Outputs appear whole or not at all: data goes to a temporary file beside the
  target, is flushed and fsynced, then renamed over it (and the folder is
  fsynced, so the rename survives a crash).
- Nothing that exists is replaced unless the caller says so (``--force``).
- Files and folders get the usual permissions (0666 / 0777 less the umask), not
  the private 0600 / 0700 of ``mkstemp`` / ``mkdtemp``.
- A full disk, a read-only file system or a permission problem is one line
  naming the path (``ArcdeployError``), and the temporary file is removed.
- Temporary names carry the writer's process id (``.NAME.tmp-PID-XXXX``), so
  litter left by a killed process is recognised and removed by the next run.
- :class:`FileLock` keeps two processes from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ArcdeployError

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
SCRATCH_PREFIX = "arcdeploy-"

_DISK_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a parent is not a folder",
}


def disk_error(exc: OSError, path: str | os.PathLike) -> ArcdeployError:
    """A one-line error for an OSError met while writing ``path``."""
    reason = _DISK_REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
    return ArcdeployError(f"{path}: cannot write ({reason})")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(path: str | os.PathLike, force: bool, hint: str = "use --force to replace it") -> None:
    """Raise when ``path`` exists and ``force`` is not set."""
    if not force and os.path.lexists(path):
        raise ArcdeployError(f"{path}: already exists; {hint}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, tag: str) -> int | None:
    """The pid in ``.NAME.tmp-PID-XXXX`` / ``.NAME.old-PID`` (None when not one of ours)."""
    _, _, rest = name.partition(tag)
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temporary files and folders that a dead arcdeploy process left in ``folder``
    (for outputs named ``name`` only, or all of them). Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    prefix = f".{name}" if name else "."
    for entry in folder.iterdir():
        n = entry.name
        if not n.startswith(prefix):
            continue
        for tag in (TMP_TAG, OLD_TAG):
            if tag in n:
                pid = _owner_pid(n, tag)
                if pid is not None and not _pid_alive(pid):
                    remove_path(entry)
                    removed.append(entry)
                break
    return removed


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree; a missing one is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _tmp_path(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path.parent) from None


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, mode: str = "wb", force: bool = True, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a file opened for writing; on success it replaces ``path`` whole.

    The temporary file is fsynced before the rename and given the umask's
    permissions. On any failure ``path`` is left as it was and the temporary file
    is removed; an OSError becomes a one-line :class:`ArcdeployError`.
    """
    path = Path(path)
    refuse_existing(path, force)
    _make_parent(path)
    clean_stale(path.parent, path.name)
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with open(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not force and os.path.lexists(path):  # appeared while we wrote
            raise ArcdeployError(f"{path}: already exists; use --force to replace it")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise disk_error(exc, path) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, force: bool = True) -> None:
    with atomic_file(path, "wb", force=force) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, force: bool = True) -> None:
    with atomic_file(path, "w", force=force, encoding="utf-8") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    to_json = getattr(obj, "to_json", None)
    if callable(to_json):
        return to_json()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, data: Any, force: bool = True) -> None:
    """Write JSON so a reader never sees a half-written file."""
    write_text_atomic(path, json_text(data), force=force)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray, force: bool = True) -> None:
    with atomic_file(path, "wb", force=force) as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def write_npy_blocks_atomic(
    path: str | os.PathLike, shape: tuple[int, ...], dtype, blocks: Iterable[np.ndarray], force: bool = True
) -> None:
    """Write a .npy of ``shape`` from row blocks given in order, streaming (no memory map,
    so a full disk is an error, not a SIGBUS). The rows must add up to ``shape[0]``."""
    dtype = np.dtype(dtype)
    with atomic_file(path, "wb", force=force) as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(f, header)
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.shape[1:] != tuple(shape[1:]):
                raise ArcdeployError(f"{path}: a block of rows {list(block.shape[1:])}, expected {list(shape[1:])}")
            f.write(block.tobytes())
            rows += block.shape[0]
        if rows != shape[0]:
            raise ArcdeployError(f"{path}: {rows} rows written, expected {shape[0]}")


def _chmod_umask(path: Path, mode: int = 0o777) -> None:
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, force: bool = False, empty_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``.

    A failure leaves ``final`` as it was (absent, or the old contents) and removes
    the temporary folder. Folders left by killed runs are cleaned first. Without ``force`` an
    existing ``final`` is refused, before and after the work; with ``empty_ok`` an empty folder
    is taken over, but only if it is still empty when the work is done (what someone put there
    meanwhile is never removed: the result is refused instead).
    """
    final = Path(final)
    if not (empty_ok and _is_empty_dir(final)):
        refuse_existing(final, force)
    _make_parent(final)
    clean_stale(final.parent, final.name)
    tmp = _tmp_path(final)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise disk_error(exc, final) from None
    _chmod_umask(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(final) and not force:
            _take_over_empty(final, empty_ok)
        if os.path.lexists(final):
            old = final.with_name(f".{final.name}{OLD_TAG}{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise disk_error(exc, final) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _take_over_empty(final: Path, empty_ok: bool) -> None:
    """Remove ``final`` if it is an empty folder (``empty_ok``); anything else there is refused.
    ``os.rmdir`` fails on a folder that is not empty, so a file that arrived a moment ago stays."""
    if empty_ok and final.is_dir() and not final.is_symlink():
        try:
            os.rmdir(final)
            return
        except OSError:
            pass
    raise ArcdeployError(
        f"{final}: already exists (something was written there while this ran); use --force to replace it"
    )


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(root))


@contextlib.contextmanager
def scratch_dir(what: str, base: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private working folder in ``base`` (default: the system temp folder), removed afterwards;
    folders of earlier runs that were killed (their process is gone) are removed first."""
    base = Path(base or tempfile.gettempdir())
    prefix = f"{SCRATCH_PREFIX}{what}-"
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix) :].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FileLock:
    """An exclusive, non-blocking lock on ``target`` (a ``.NAME.lock`` file beside it).

    A second process that asks for the same lock gets a clear refusal instead of
    waiting or writing over the first one's work. The lock file is removed on release.
    """

    def __init__(self, target: str | os.PathLike, what: str = "written"):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        _make_parent(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise disk_error(exc, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ArcdeployError(f"{self.target}: is being {self.what} by another arcdeploy process") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
