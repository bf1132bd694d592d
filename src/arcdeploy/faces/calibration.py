"""Calibration and held-out images for int8 builds and fidelity checks.

Calibration uses exactly the inference preprocessing: each image goes through
:func:`arcdeploy.faces.prepare.prepare_face`, the function the embed pipeline
uses (decoded as RGB with the same size limit, the same landmark checks, aligned
with its 5 landmarks when a landmark file is given, otherwise taken as an
aligned crop and resized to 112x112), then turned into the model input by the
package's own :func:`to_model_input`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError
from .align import crop_span
from .prepare import (
    Detection,
    as_detection,
    exclusive_landmarks_detector,
    prepare_face,
    prepare_image,
    resolve_landmarks,
)
from .types import ImageError

log = logging.getLogger(__name__)

DEFAULT_CALIB_COUNT = 300
DEFAULT_HOLDOUT = 64
# fewer held-out real images than this and the fidelity check uses generated faces
MIN_HOLDOUT = 8


@dataclass
class ImageSet:
    """Aligned uint8 RGB crops [N, 112, 112, 3] and where they came from."""

    faces: np.ndarray
    source: str
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of unreadable files
    # per face: source pixels its crop spans (about the face's width; None: not known, e.g. arrays)
    spans: list[float | None] = field(default_factory=list)
    root: Path | None = None  # the folder ``names`` are relative to (user groups are its subfolders)

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` faces (all for None), with their names and spans."""
        return replace(self, faces=self.faces[:n], names=self.names[:n], spans=self.spans[:n])


@dataclass
class CalibrationSplit:
    calib: ImageSet
    holdout: ImageSet | None  # the listed images not used for calibration (None: too few)


def _check_array(arr, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (112, 112, 3):
        raise ArcdeployError(f"{what}: expected aligned uint8 RGB crops [N, 112, 112, 3], got shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ArcdeployError(f"{what}: expected dtype uint8 (0..255 RGB), got {arr.dtype}")
    if arr.shape[0] == 0:
        raise ArcdeployError(f"{what}: empty image set (0 images)")
    return np.ascontiguousarray(arr)


def read_aligned(
    paths: list[Path],
    landmarks=None,
    root: Path | None = None,
    limit: int | None = None,
    warn: bool = True,
    detection: Detection | None = None,
) -> ImageSet:
    """Prepare ``paths`` in order (:func:`prepare_face`) until ``limit`` usable crops; unusable
    files (unreadable, without landmarks when a landmark file is given, implausible landmarks,
    no face found by the detector) are skipped and listed in ``skipped``."""
    lmks = resolve_landmarks(paths, landmarks, root)
    faces: list[np.ndarray] = []
    names: list[str] = []
    skipped: list[str] = []
    spans: list[float | None] = []

    def one(i: int) -> tuple[np.ndarray, float | None] | ImageError:
        try:
            if detection is not None:  # the best face, as prepare_face takes it, and where it was
                got = prepare_image(paths[i], None, i, detection=Detection(detection.detector))
                return got.crops[0], crop_span(got.faces[0].points) if got.faces else None
            lmk = None if lmks is None else lmks[i]
            crop = prepare_face(paths[i], lmk, i)
            return crop, crop_span(lmk) if isinstance(lmk, np.ndarray) else _file_side(paths[i])
        except ImageError as exc:
            return exc

    # a few images at a time in threads (decoding, and detection when asked, release the GIL),
    # taken in order until enough are usable
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="arcdeploy-calib") as pool:
        for start in range(0, len(paths), 4 * workers):
            if limit is not None and len(faces) >= limit:
                break
            block = range(start, min(start + 4 * workers, len(paths)))
            for i, got in zip(block, pool.map(one, block)):
                if limit is not None and len(faces) >= limit:
                    break
                if isinstance(got, ImageError):
                    skipped.append(str(got))
                    continue
                faces.append(got[0])
                spans.append(got[1])
                names.append(str(paths[i]))
    if warn and skipped:
        log.warning("skipped %d unusable image(s), first: %s", len(skipped), skipped[0])
    arr = np.stack(faces) if faces else np.empty((0, 112, 112, 3), np.uint8)
    return ImageSet(arr, source="", names=names, skipped=skipped, spans=spans, root=root)


def _file_side(path) -> float | None:
    """The larger side of an image file taken as an aligned crop (read from its header)."""
    from .io import image_size

    try:
        with open(path, "rb") as f:
            found = image_size(f.read(1 << 16))
    except OSError:
        return None
    return float(max(found[1])) if found and found[1] else None


def load_images(spec, landmarks=None, limit: int | None = None, what: str = "images", detector=None) -> ImageSet:
    """An image set from an array, a folder, a list file or a list of paths; ``detector`` (a
    detector file, an opened detector or a :class:`Detection`) finds each photo's face."""
    exclusive_landmarks_detector(landmarks, detector, "landmarks", "a detector")
    if isinstance(spec, np.ndarray):
        arr = _check_array(spec, f"{what} array")
        if limit is not None:
            arr = arr[:limit]
        return ImageSet(arr, source="array")
    from .io import images_root, list_images

    if isinstance(spec, (list, tuple)):
        paths, root, source = [Path(p) for p in spec], None, f"{len(spec)} listed paths"
    else:
        paths, root, source = list_images(spec), images_root(spec), str(Path(spec))
    lmk = _read_landmarks(landmarks)
    got = read_aligned(paths, lmk, root, limit=limit, warn=False, detection=as_detection(detector))
    got.root = root or _common_folder(paths)
    if len(got.faces) == 0:
        first = f" (first: {got.skipped[0]})" if got.skipped else ""
        raise ArcdeployError(f"{source}: no usable {what}: all {len(got.skipped)} unreadable{first}")
    if got.skipped:
        log.warning("%s: skipped %d unusable image(s), first: %s", source, len(got.skipped), got.skipped[0])
    got.source = source
    return got


def _common_folder(paths) -> Path | None:
    """The deepest folder holding every listed path (None when there is none)."""
    try:
        return Path(os.path.commonpath([str(Path(p).parent) for p in paths])) if paths else None
    except ValueError:  # relative and absolute paths mixed
        return None


def _read_landmarks(landmarks):
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, os.PathLike)):
        from .landmarks import read_landmarks

        return read_landmarks(landmarks)
    return landmarks  # an already read Landmarks object


def calibration_split(
    calib, landmarks=None, count: int = DEFAULT_CALIB_COUNT, holdout: int = DEFAULT_HOLDOUT, detector=None
) -> CalibrationSplit:
    """The first ``count`` usable images for calibration and up to ``holdout``
    further ones for the fidelity check (None when fewer than MIN_HOLDOUT); ``detector``
    finds the face in photos instead of ``landmarks``."""
    if calib is None:
        raise ArcdeployError(
            "int8 needs calibration images: pass --calib LIST|DIR "
            "(a few hundred aligned faces, or photos with --calib-landmarks or --calib-detector)"
        )
    if count < 1:
        raise ArcdeployError(f"--calib-count must be at least 1, got {count}")
    images = load_images(calib, landmarks, limit=count + holdout, what="calibration images", detector=detector)
    faces = images.faces
    n_cal = min(count, len(faces))
    cal = ImageSet(
        faces[:n_cal], images.source, images.names[:n_cal], images.skipped, images.spans[:n_cal], images.root
    )
    rest = faces[n_cal:]
    hold = (
        ImageSet(rest, images.source, images.names[n_cal:], spans=images.spans[n_cal:], root=images.root)
        if len(rest) >= MIN_HOLDOUT
        else None
    )
    return CalibrationSplit(cal, hold)
