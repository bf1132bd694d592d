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

from .detectors import FaceDetector
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
    """Detect faces in image files, several at once (``workers`` threads, each taking a few images
    at a time: the detector runs them in batches), results in input order.

    Images are decoded and their faces found by the preparation path the embed pipeline uses
    (:func:`arcdeploy.faces.prepare.find_faces`), so the rows are the points embed aligns with.
    Without ``all_faces`` each image keeps its best face. An unreadable image, or one without a
    face, is a :class:`Failure` (the others go on). ``on_image(index, faces | failure)``
    is called in input order as results come in.
    """
    from .prepare import Detection, find_faces

    paths = list(paths)
    names = [image_name(p, root) for p in paths]
    detection = Detection(detector, all_faces)
    per_task = max(1, int(getattr(detector, "batch", 1)))

    def detect_some(start: int, end: int) -> list[tuple[int, list[Face] | Failure]]:
        out: list[tuple[int, list[Face] | Failure]] = []
        todo = []
        for i in range(start, end):
            if any(c.isspace() for c in names[i]):
                out.append((i, Failure(i, str(paths[i]), "the name has white space, which a landmark row cannot hold")))
            else:
                todo.append(i)
        found = find_faces([(paths[i], str(paths[i])) for i in todo], detection)
        for i, got in zip(todo, found):
            if isinstance(got, ImageError):
                out.append((i, Failure(i, str(paths[i]), got.reason)))
            else:
                out.append((i, got.faces if all_faces else got.faces[:1]))
        return sorted(out, key=lambda x: x[0])

    result = DetectResult(names, [[] for _ in paths])
    n_workers = max(1, int(workers) if workers else min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_workers, thread_name_prefix="detect") as pool:
        pending: deque = deque()
        for start in range(0, len(paths), per_task):
            pending.append(pool.submit(detect_some, start, min(start + per_task, len(paths))))
            if len(pending) >= 2 * n_workers:
                _collect(pending.popleft(), result, on_image)
        while pending:
            _collect(pending.popleft(), result, on_image)
    return result


def _collect(future, result: DetectResult, on_image) -> None:
    for index, out in future.result():
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
