"""The resumable chunk store of an embed job, and the final assembly of its outputs.

Work is saved as it goes in ``OUTPUT.parts/`` beside the output: one
``chunk_NNNNNN.npy`` (+ ``.json`` with its failures) per chunk of rows, and
``state.json``, the job's identity: the package (hash of its manifest and model
files), the images (hash of their paths, sizes, modification times and
landmarks), flip, raw, batch and chunk size, and with a face detector its file's
hash, its settings and whether every face is kept. Rerunning the same job continues
after the last saved chunk; a parts folder of another job (other settings, or
an image changed on disk since) is refused, so rows of a changed image are
never reused. A parts folder that holds no chunk yet has nothing to lose and is
replaced silently, so a failed start never blocks the corrected rerun.

The parts folder is created whole with its ``state.json`` (:func:`atomic_dir`);
each chunk's record (its failures and the sha256 of its ``.npy``) is written
before the ``.npy``, which marks it done; a chunk whose ``.npy`` no longer has
that checksum is computed again, never trusted.

Outputs: ``FEATS.npy`` is streamed from the chunks (no memory map, so a full
disk is an error naming the file, not a crash) into a temporary file that
replaces the output only when complete. ``FEATS.failures.tsv`` (a header line
``index<TAB>path<TAB>reason``, one line per failed image) is written before the
output is replaced. Its fields are the names' bytes as the file system has them
(a name need not be UTF-8), with backslash, tab, newline and carriage return
written as ``\\\\``, ``\\t``, ``\\n`` and ``\\r``.

One row per detected face (``all_faces``): a chunk still covers a fixed run of images, but
holds as many rows as faces were found in them, so its record also carries its row index
(per row: image index, path, face number, box and score; see :class:`FaceRow`). The output
is assembled from the chunks' rows in order, and ``FEATS.faces.tsv`` (``row<TAB>image<TAB>
path<TAB>face<TAB>x1<TAB>y1<TAB>x2<TAB>y2<TAB>score``) is written from their indexes, like
the failures file, before the output is replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError
from ..files import (
    atomic_dir,
    atomic_file,
    remove_path,
    write_bytes_atomic,
    write_json_atomic,
    write_npy_blocks_atomic,
)
from .types import Failure, Missing

STATE_FORMAT = "arcdeploy-embed-parts/2"
STATE_NAME = "state.json"
# what the "different job" message says for keys whose values are hashes
_HASHED_KEYS = {
    "package": "package differs (manifest or model files changed)",
    "images": "images differ (names, sizes, modification times or landmarks changed)",
}


def failures_path_for(output: str | os.PathLike) -> Path:
    """``FEATS.npy`` -> ``FEATS.failures.tsv`` (same folder)."""
    output = Path(output)
    stem = output.name[:-4] if output.name.endswith(".npy") else output.name
    return output.with_name(f"{stem}.failures.tsv")


def faces_path_for(output: str | os.PathLike) -> Path:
    """``FEATS.npy`` -> ``FEATS.faces.tsv`` (same folder): which face each row is."""
    output = Path(output)
    stem = output.name[:-4] if output.name.endswith(".npy") else output.name
    return output.with_name(f"{stem}.faces.tsv")


@dataclass(frozen=True)
class FaceRow:
    """Where one output row comes from: image ``image`` (its input index and path), its
    face number ``face`` in the detector's best-first order, the face's box and score."""

    image: int
    path: str
    face: int
    box: tuple[float, float, float, float]
    score: float

    def to_json(self) -> list:
        return [self.image, self.path, self.face, [float(v) for v in self.box], float(self.score)]

    @classmethod
    def from_json(cls, value) -> FaceRow:
        image, path, face, box, score = value
        x1, y1, x2, y2 = (float(v) for v in box)
        return cls(int(image), str(path), int(face), (x1, y1, x2, y2), float(score))


@dataclass
class SavedChunk:
    features: np.ndarray
    failures: list[Failure]
    faces: list[FaceRow] | None = None  # the row index of a chunk of detected faces


def parts_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def images_identity(items: Sequence, lmks) -> str:
    """sha256 over each input (absolute path, size and modification time; or an array's
    shape and bytes) and its landmarks: equal only for the same images with the same content
    as far as the file system can tell."""
    h = hashlib.sha256()
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            h.update(b"A")
            h.update(str(item.shape).encode())
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            h.update(b"P")
            h.update(os.fsencode(os.path.abspath(item)))  # the same files from another working folder
            try:
                st = os.stat(item)
                h.update(f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"\0-")  # missing now: a failed row that a later rerun must not reuse if it appears
        h.update(b"\0")
        lmk = None if lmks is None else lmks[i]
        if lmk is None:
            h.update(b"-")
        elif isinstance(lmk, Missing):
            h.update(b"?")
        else:
            h.update(np.ascontiguousarray(lmk, dtype=np.float32).tobytes())
        h.update(b"\n")
    return h.hexdigest()


def _has_chunks(parts: Path) -> bool:
    return parts.is_dir() and any(parts.glob("chunk_*.npy"))


class ChunkStore:
    """The parts folder of one embed job (see the module doc)."""

    def __init__(self, parts: Path, state: dict):
        self.parts = parts
        self.state = state

    @classmethod
    def open(cls, output: str | os.PathLike, state: dict, resume: bool = True) -> ChunkStore:
        """The parts folder for ``output``: the existing one when it belongs to this job,
        a new one otherwise. Raises when it holds saved chunks of a different job."""
        parts = parts_dir_for(output)
        state = {"format": STATE_FORMAT, **state}
        if os.path.lexists(parts) and (not resume or not _has_chunks(parts)):
            remove_path(parts)
        if os.path.lexists(parts):
            try:
                old = json.loads((parts / STATE_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if not isinstance(old, dict):
                raise ArcdeployError(
                    f"{parts}: a parts folder without a readable {STATE_NAME}; "
                    "remove it or run again without resuming (--restart)"
                )
            diff = [k for k in state if old.get(k) != state[k]]
            if diff:
                what = ", ".join(_HASHED_KEYS.get(k) or f"{k} {old.get(k)!r} -> {state[k]!r}" for k in diff)
                raise ArcdeployError(
                    f"{parts}: partial results of a different job ({what}); "
                    "remove it or run again without resuming (--restart)"
                )
        else:
            with atomic_dir(parts) as tmp:
                write_json_atomic(tmp / STATE_NAME, state)
        return cls(parts, state)

    def _files(self, c: int) -> tuple[Path, Path]:
        return self.parts / f"chunk_{c:06d}.npy", self.parts / f"chunk_{c:06d}.json"

    def load(self, c: int, rows: int | None) -> SavedChunk | None:
        """Chunk ``c`` when it is saved whole with ``rows`` rows (None: as many as its row
        index lists) and still has the checksum recorded when it was saved, else None (it is
        then computed again)."""
        npy, js = self._files(c)
        if not npy.exists() or not js.exists():
            return None
        try:
            record = json.loads(js.read_text(encoding="utf-8"))
            data = npy.read_bytes()
            if not isinstance(record, dict) or hashlib.sha256(data).hexdigest() != record.get("sha256"):
                return None
            feats = np.load(io.BytesIO(data), allow_pickle=False)
            fails = [Failure(int(i), str(p), str(r)) for i, p, r in record["failures"]]
            faces = None if record.get("faces") is None else [FaceRow.from_json(v) for v in record["faces"]]
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if rows is None:
            if faces is None:
                return None
            rows = len(faces)
        if feats.ndim < 2 or feats.shape[0] != rows or feats.dtype != np.float32:
            return None
        if faces is not None and len(faces) != rows:
            return None
        return SavedChunk(feats, fails, faces)

    def save(self, c: int, feats: np.ndarray, failures: list[Failure], faces: list[FaceRow] | None = None) -> None:
        """Save chunk ``c``: its rows, its failures and, for detected faces, its row index."""
        npy, js = self._files(c)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(feats, np.float32), allow_pickle=False)
        data = buf.getvalue()
        # the record (failures, checksum) first: the .npy is what marks the chunk as done
        record: dict = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "failures": [[f.index, f.path, f.reason] for f in failures],
        }
        if faces is not None:
            if len(faces) != len(feats):
                raise ValueError(f"chunk {c}: {len(feats)} rows but {len(faces)} entries in its row index")
            record["faces"] = [f.to_json() for f in faces]
        write_json_atomic(js, record)
        write_bytes_atomic(npy, data)

    def _blocks(self, bounds: list[tuple[int, int]], row_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        for c, (s, e) in enumerate(bounds):
            npy, _ = self._files(c)
            try:
                chunk = np.load(npy, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ArcdeployError(f"{npy}: saved chunk unreadable ({exc}); run again with --restart") from None
            if chunk.shape != (e - s, *row_shape):
                raise ArcdeployError(
                    f"{npy}: saved chunk has shape {list(chunk.shape)}, expected "
                    f"{[e - s, *row_shape]}; run again with --restart"
                )
            yield chunk

    def assemble(
        self,
        output: str | os.PathLike,
        bounds: list[tuple[int, int]],
        row_shape: tuple[int, ...],
        failures: list[Failure],
        force: bool = False,
        faces: list[FaceRow] | None = None,
    ) -> Path | None:
        """Write the output from the saved chunks (``bounds``: each chunk's rows in the output),
        the failures file (or remove a stale one) and, given the row index ``faces``, the faces
        file; returns the failures file's path when there were failures."""
        output = Path(output)
        fpath, facepath = failures_path_for(output), faces_path_for(output)
        n = bounds[-1][1] if bounds else 0
        with contextlib.ExitStack() as side_files:
            # the side files' contents are complete before the output is touched; each replaces
            # the old one right after the output does
            if failures:
                f = side_files.enter_context(atomic_file(fpath, "wb", force=force))
                write_failures(f, failures)
            if faces is not None:
                f = side_files.enter_context(atomic_file(facepath, "wb", force=force))
                write_faces_index(f, faces)
            write_npy_blocks_atomic(output, (n, *row_shape), np.float32, self._blocks(bounds, row_shape), force=force)
        if force:
            # stale lists from an earlier run would describe rows that are now different
            for stale, written in ((fpath, bool(failures)), (facepath, faces is not None)):
                if not written:
                    with contextlib.suppress(FileNotFoundError):
                        stale.unlink()
        return fpath if failures else None

    def remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)


def tsv_field(value) -> bytes:
    """One cell of a tab-separated file: a name as its own bytes, backslash, tab and newlines escaped."""
    text = str(value)
    try:
        data = text.encode("utf-8", "surrogateescape")  # a file name's own bytes
    except UnicodeEncodeError:
        data = text.encode("utf-8", "backslashreplace")
    return data.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def write_failures(f, failures: list[Failure]) -> None:
    """The failures list (see the module doc) into a binary file."""
    f.write(b"index\tpath\treason\n")
    for fl in failures:
        f.write(b"\t".join(tsv_field(x) for x in (fl.index, fl.path, fl.reason)) + b"\n")


def write_faces_index(f, faces: list[FaceRow]) -> None:
    """The faces file (see the module doc) into a binary file: row ``r`` of the output is face
    ``face`` of image ``image``."""
    f.write(b"row\timage\tpath\tface\tx1\ty1\tx2\ty2\tscore\n")
    for r, fr in enumerate(faces):
        cells = [str(r), str(fr.image), fr.path, str(fr.face), *(f"{v:.2f}" for v in fr.box), f"{fr.score:.4f}"]
        f.write(b"\t".join(tsv_field(x) for x in cells) + b"\n")


def _unescape(field: bytes) -> str:
    out, i = bytearray(), 0
    table = {ord("\\"): b"\\", ord("t"): b"\t", ord("n"): b"\n", ord("r"): b"\r"}
    while i < len(field):
        if field[i] == 0x5C and i + 1 < len(field) and field[i + 1] in table:
            out += table[field[i + 1]]
            i += 2
        else:
            out.append(field[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def read_faces_index(path: str | os.PathLike) -> list[FaceRow]:
    """The rows of a ``FEATS.faces.tsv`` in order (boxes and scores as written, rounded)."""
    out = []
    for line in Path(path).read_bytes().split(b"\n")[1:]:
        if line:
            _, image, p, face, x1, y1, x2, y2, score = line.split(b"\t")
            out.append(
                FaceRow(int(image), _unescape(p), int(face), (float(x1), float(y1), float(x2), float(y2)), float(score))
            )
    return out


def read_failures(path: str | os.PathLike) -> list[Failure]:
    """The failures of a ``FEATS.failures.tsv``, names as ``str`` (undecodable bytes as surrogate escapes)."""
    lines = Path(path).read_bytes().split(b"\n")
    out = []
    for line in lines[1:]:
        if line:
            i, p, r = line.split(b"\t")
            out.append(Failure(int(i), _unescape(p), _unescape(r)))
    return out
