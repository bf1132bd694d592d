"""The detect stage: image files -> faces, and the 12-field landmark rows.

``detect_files`` runs a :class:`~arcdeploy.faces.detectors.FaceDetector` over image files
(several at once, results in input order); ``write_faces`` writes the landmark rows
(``name x1 y1 ... x5 y5 score``) that :func:`arcdeploy.faces.landmarks.read_landmarks` and
``embed --landmarks`` read, with the boxes and failures beside them. The detectors themselves
are in :mod:`arcdeploy.faces.detectors`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError, first_line
from .detectors import FaceDetector
from .io import read_image
from .types import Face, Failure, ImageError

# ------------------------------------------------------------------ files of images


@dataclass
class DetectResult:
    """Per input image (input order): its name and its faces, best first (empty when it failed)."""

    names: list[str]
    faces: list[list[Face]]
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def image_name(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """The name a landmark row gives an image: its path relative to ``root`` with ``/``, else the path."""
    path = Path(path)
    if root is not None:
        try:
            return path.relative_to(Path(root)).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def detect_files(
    detector: FaceDetector,
    paths: Sequence[str | os.PathLike],
    root: str | os.PathLike | None = None,
    all_faces: bool = False,
    workers: int | None = None,
    on_image: Callable[[int, list[Face] | Failure], None] | None = None,
) -> DetectResult:
    """Detect faces in image files, several at once (``workers`` threads), results in input order.

    Without ``all_faces`` each image keeps its best face. An unreadable image, or one without a
    face, is a :class:`Failure` (the others go on). ``on_image(index, faces | failure)``
    is called in input order as results come in.
    """
    paths = list(paths)
    names = [image_name(p, root) for p in paths]
    thr_text = f"score {detector.threshold:g}"
    size_text = f", at least {detector.min_face:g} px" if detector.min_face else ""

    def one(i: int) -> tuple[int, list[Face] | Failure]:
        return i, detect_one(i)

    def detect_one(i: int) -> list[Face] | Failure:
        if any(c.isspace() for c in names[i]):
            return Failure(i, str(paths[i]), "the name has white space, which a landmark row cannot hold")
        try:
            faces = detector.detect(read_image(paths[i]))
        except ImageError as exc:
            return Failure(i, str(paths[i]), exc.reason)
        except ArcdeployError as exc:
            return Failure(i, str(paths[i]), first_line(exc))
        if not faces:
            return Failure(i, str(paths[i]), f"no face found ({thr_text}{size_text})")
        return faces if all_faces else faces[:1]

    result = DetectResult(names, [[] for _ in paths])
    n_workers = max(1, int(workers) if workers else min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_workers, thread_name_prefix="detect") as pool:
        pending: deque = deque()
        for i in range(len(paths)):
            pending.append(pool.submit(one, i))
            if len(pending) >= 4 * n_workers:
                _collect(pending.popleft(), result, on_image)
        while pending:
            _collect(pending.popleft(), result, on_image)
    return result


def _collect(future, result: DetectResult, on_image) -> None:
    index, out = future.result()
    if isinstance(out, Failure):
        result.failures.append(out)
    else:
        result.faces[index] = out
    if on_image is not None:
        on_image(index, out)


# ------------------------------------------------------------------ the 12-field rows


def face_row(name: str, face: Face) -> str:
    """``name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score`` (points with 2 decimals, score with 4)."""
    pts = " ".join(f"{v:.2f}" for v in np.asarray(face.points, np.float64).ravel())
    return f"{name} {pts} {face.score:.4f}"


def side_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """``FACES.txt`` -> (``FACES.boxes.tsv``, ``FACES.failures.tsv``), same folder."""
    output = Path(output)
    stem = output.name[:-4] if output.name.lower().endswith(".txt") else output.name
    return output.with_name(f"{stem}.boxes.tsv"), output.with_name(f"{stem}.failures.tsv")


def write_faces(output: str | os.PathLike, result: DetectResult, force: bool = False) -> dict[str, Path]:
    """Write the landmark rows (``output``), ``*.boxes.tsv`` (name, face index, box, score) and,
    when images failed, ``*.failures.tsv`` (index, path, reason, as the embed command writes
    it); each atomically. Names are written as the file system's bytes (a name that is not UTF-8
    keeps its bytes), so the rows find their images again. The rows file is written last, so its
    presence means the set is complete. Returns the paths written."""
    from ..files import atomic_file, refuse_existing, write_bytes_atomic
    from .chunks import tsv_field, write_failures

    output = Path(output)
    refuse_existing(output, force)
    boxes_path, failures_path = side_paths(output)
    rows, boxes = [], [b"name\tface\tx1\ty1\tx2\ty2\tscore"]
    for name, faces in zip(result.names, result.faces):
        for k, f in enumerate(faces):
            rows.append(os.fsencode(face_row(name, f)))
            x1, y1, x2, y2 = (float(v) for v in f.box)
            cells = [name, str(k), f"{x1:.2f}", f"{y1:.2f}", f"{x2:.2f}", f"{y2:.2f}", f"{f.score:.4f}"]
            boxes.append(b"\t".join(tsv_field(c) for c in cells))
    written = {}
    write_bytes_atomic(boxes_path, b"\n".join(boxes) + b"\n")
    written["boxes"] = boxes_path
    if result.failures:
        with atomic_file(failures_path, "wb") as fh:
            write_failures(fh, sorted(result.failures, key=lambda x: x.index))
        written["failures"] = failures_path
    elif failures_path.exists():
        failures_path.unlink()  # from an earlier run of the same output; no longer true
    write_bytes_atomic(output, b"".join(r + b"\n" for r in rows), force=force)
    written["faces"] = output
    return written
