"""The one way from an input image to the aligned 112x112 crop a model sees.

Embedding, benchmarking, calibration and the fidelity check all prepare faces
through :func:`prepare_face`, so an int8 model is calibrated on exactly what it
will be run on, and every caller applies the same checks:

- files: decoded by :func:`arcdeploy.faces.io.read_image` (header read first;
  only JPEG, PNG, BMP, WebP; at most the pixel limit); an :class:`EncodedImage`
  (a file's bytes read elsewhere, e.g. on the machine that holds it) is decoded
  the same way, under the file's name;
- arrays: uint8 RGB (grayscale expanded, alpha dropped);
- landmarks: plausible for the image (:func:`arcdeploy.faces.align.landmarks_problem`);
- without landmarks: an aligned crop of at least 32x32 pixels, resized to 112x112;
- with a detector (:class:`Detection`) instead of landmarks: the faces it finds in the
  decoded image, each aligned with its own 5 points (the best, i.e. largest, face, or
  every face). Detection runs here, in whichever thread prepares the image, so in the
  embed pipeline it runs in the decode/align workers beside inference; several photos are
  found at once (:func:`find_faces`, :func:`prepare_detected`), in batches when the
  detector's graph has a batch axis. ``arcdeploy detect``, ``embed``, ``compare``, the
  calibration of ``build --calib-detector`` and the Ray actors all come through here.

Photos are decoded in full by default: exactly insightface's pixels, so its detection
geometry (which SCRFD follows) gives its landmarks. With the detector's ``decode="reduced"``
a JPEG at least twice the detector's canvas on each side is decoded at 1/2, 1/4 or 1/8 with
libjpeg's DCT scaling (:func:`arcdeploy.faces.io.decode_reduced`) and its faces found there;
a face is aligned from that decode only when it is large in it (:data:`MAX_REDUCED_CROP_SCALE`),
otherwise the photo is decoded again in full and its faces found again there, so a photo with
small faces (a group photo) gets exactly a full decode's result. What "reduced" costs is a
little of the landmarks' agreement with insightface: the canvas made from a reduced decode is
the same picture filtered otherwise, and SCRFD's points move by a few tenths of a canvas pixel
(measured by ``benchmarks/bench_photos.py``; the figures are in the README). With
``decode="planes"`` such a JPEG is held as its Y, Cb, Cr planes instead
(:mod:`arcdeploy.faces.jpeg_planes`), and its canvas and crops are sampled from them: within a grey
level or two of the full decode's pixels, not the same, so SCRFD's points move by hundredths to
tenths of a percent of the eye distance (the README has the figures).

A failure is an :class:`ImageError` naming the input and the reason; the embed
pipeline turns it into a :class:`Failure` row instead of stopping the job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ArcdeployError, first_line
from .align import aligned_from, estimate_transform, landmarks_problem, to_aligned
from .detectors import FaceDetector, as_detector
from .io import decode_image, decode_reduced, read_image, read_image_bytes
from .landmarks import Landmarks, read_landmarks
from .types import DecodedImage, EncodedImage, Face, Failure, ImageError, Missing, Prepared, as_rgb, input_name

log = logging.getLogger(__name__)

# A face is aligned from a reduced decode only when the crop takes at most this many of its pixels
# per decoded pixel (the face spans at least 5 decoded pixels per crop pixel). Measured on the real
# photos made 12 MP, with the same landmarks: crops at 0.2 and below embed at cosine >= 0.999 to
# crops of the full decode, at 0.25-0.4 at 0.993 (insightface's bilinear warp of the full image
# samples it sparsely; a reduced decode has averaged its pixels), so smaller faces get a full decode
MAX_REDUCED_CROP_SCALE = 0.2


@dataclass(frozen=True)
class Detection:
    """Faces found by a detector instead of given landmarks: each image's best (largest) face,
    or with ``all_faces`` every face it finds (best first). The detector is shared by the
    threads that prepare images (its ``detect`` is thread-safe)."""

    detector: FaceDetector
    all_faces: bool = False

    def no_face(self) -> str:
        return self.detector.no_face()

    def describe(self) -> str:
        which = "every face" if self.all_faces else "the largest face"
        return f"{self.detector.describe()}, {which}, 5-point similarity alignment"

    def identity(self) -> str:
        """What the detected faces depend on: the detector file's content and its settings."""
        return f"{self.detector.identity()} all_faces={self.all_faces}"


def as_detection(detector, all_faces: bool = False, **settings) -> Detection | None:
    """``detector`` (None, a :class:`Detection`, an opened detector, a
    :class:`~arcdeploy.faces.detectors.DetectorSpec` or a detector file, opened with
    ``settings``) as a :class:`Detection`."""
    if isinstance(detector, Detection):
        return detector if detector.all_faces == bool(all_faces) else Detection(detector.detector, bool(all_faces))
    found = as_detector(detector, **settings)
    if found is None:
        if all_faces:
            raise ArcdeployError("all faces: give a face detector to find them")
        return None
    return Detection(found if isinstance(found, FaceDetector) else found.open(), bool(all_faces))


def exclusive_landmarks_detector(landmarks, detector, landmarks_flag="--landmarks", detector_flag="--detector") -> None:
    """Landmarks say where the face is, a detector finds it: one or the other."""
    if landmarks is not None and detector is not None:
        raise ArcdeployError(
            f"{landmarks_flag} and {detector_flag} exclude each other: give landmarks for faces "
            "whose points are known, or a detector to find them"
        )


def decode_input(item, name: str, max_pixels: int | None = None) -> np.ndarray:
    """An input as an RGB uint8 image: a file read and decoded, an :class:`EncodedImage`
    decoded, an array checked."""
    if isinstance(item, EncodedImage):
        if item.data is None:
            raise ImageError(name, item.error or "unreadable")
        return decode_image(item.data, name, max_pixels)
    if isinstance(item, np.ndarray):
        return as_rgb(item, name)
    return read_image(item, max_pixels)


def resolve_landmarks(items: Sequence, landmarks, root=None) -> list | None:
    """Per-image landmarks: None (images are aligned crops) or a list with, per
    image, float32 [5, 2], None (this one is an aligned crop) or a :class:`Missing`.

    ``landmarks``: None; a landmark file path or :class:`Landmarks` (looked up
    by name, see :meth:`Landmarks.find`; ``root`` is the folder names are
    relative to); or a sequence / array [N, 5, 2] with one entry per image
    (None entries allowed).
    """
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = read_landmarks(landmarks)
    if isinstance(landmarks, Landmarks):
        missing = Missing(landmarks.source)
        out: list = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                raise ArcdeployError(
                    f"image {i} is an array: landmarks by name need file paths "
                    "(pass one [5, 2] array per image instead)"
                )
            pts = landmarks.find(item, root)
            out.append(missing if pts is None else pts)
        return out
    if len(landmarks) != len(items):
        raise ArcdeployError(f"{len(landmarks)} landmark entries for {len(items)} images")
    out = []
    for i, pts in enumerate(landmarks):
        if pts is None:
            out.append(None)
            continue
        pts = np.asarray(pts, dtype=np.float32)
        if pts.size != 10:
            raise ArcdeployError(f"landmarks of image {i}: expected 5 points [5, 2], got shape {list(pts.shape)}")
        out.append(pts.reshape(5, 2))
    return out


def prepare_face(
    item, lmk=None, index: int = 0, max_pixels: int | None = None, detection: Detection | None = None
) -> np.ndarray:
    """One input (path, :class:`EncodedImage` or RGB array) -> its aligned uint8 [112, 112, 3] crop;
    raises :class:`ImageError`.

    ``lmk``: float32 [5, 2] (align), None (the input is an aligned crop) or a
    :class:`Missing`. ``max_pixels``: the decoding limit for files (see
    :func:`arcdeploy.faces.io.max_pixels_limit`). ``detection``: find the face with
    a detector instead (``lmk`` must then be None); its best face.
    """
    if detection is not None:
        return prepare_image(item, lmk, index, max_pixels, Detection(detection.detector)).crops[0]
    name = input_name(item, index)
    if isinstance(lmk, Missing):
        where = os.path.basename(lmk.source) if lmk.source else "the landmark file"
        raise ImageError(name, f"no landmarks for this image in {where}")
    img = decode_input(item, name, max_pixels)
    if lmk is not None:
        problem = landmarks_problem(lmk, img.shape)
        if problem:
            raise ImageError(name, problem)
    try:
        return to_aligned(img, lmk)
    except ImageError:
        raise
    except ArcdeployError as exc:
        raise ImageError(name, str(exc)) from None


def prepare_image(
    item, lmk=None, index: int = 0, max_pixels: int | None = None, detection: Detection | None = None
) -> Prepared:
    """One input -> its aligned crops: one (:func:`prepare_face`), or with ``detection`` one per
    detected face kept (the best face, or every face whose points can align a crop); raises
    :class:`ImageError` (no face found is one)."""
    if detection is None:
        return Prepared(prepare_face(item, lmk, index, max_pixels)[None])
    if lmk is not None:
        raise ArcdeployError("landmarks and a detector exclude each other")
    got = prepare_detected([(item, index)], detection, max_pixels)[0]
    if isinstance(got, Failure):
        raise ImageError(got.path, got.reason)
    return got


def prepare_image_or_failure(
    item, lmk, index: int, max_pixels: int | None = None, detection: Detection | None = None
) -> Prepared | Failure:
    """:func:`prepare_image`, with any failure returned as a :class:`Failure` (never raised)."""
    try:
        return prepare_image(item, lmk, index, max_pixels, detection)
    except ImageError as exc:
        return Failure(index, exc.path, exc.reason)
    except Exception as exc:  # an OpenCV or OS surprise on one image must not stop the job
        return Failure(index, input_name(item, index), f"{type(exc).__name__}: {first_line(exc)}")


# ---------------------------------------------------------------- photos: decode, detect, align


@dataclass
class Found:
    """The faces a detector found in one photo (full-image pixels, best first) and the decode they
    were found in (and are aligned from)."""

    image: DecodedImage
    faces: list[Face]


def decode_for_detection(item, name: str, max_pixels: int | None, detector: FaceDetector) -> DecodedImage:
    """An input decoded for ``detector``: a large JPEG reduced as far as the detector allows
    (:meth:`FaceDetector.reduced_decode_size`), anything else in full; an array as it is."""
    if isinstance(item, np.ndarray):
        return DecodedImage.full(as_rgb(item, name), None, name)
    if isinstance(item, EncodedImage):
        if item.data is None:
            raise ImageError(name, item.error or "unreadable")
        data = item.data
    else:
        data = read_image_bytes(item)
    return decode_reduced(data, name, max_pixels, detector.reduced_decode_size, detector.decodes_planes)


def faces_to_align(found: Found, all_faces: bool) -> list[tuple[int, Face]]:
    """The faces of a photo that give crops, with their numbers in the best-first list: the best
    one, or every face whose points can align a crop."""
    if not all_faces:
        return list(enumerate(found.faces[:1]))
    return [(k, f) for k, f in enumerate(found.faces) if landmarks_problem(f.points, found.image.full_shape) is None]


def crop_scale(points: np.ndarray) -> float:
    """Aligned-crop pixels per image pixel for a face with these 5 points (nan when degenerate)."""
    m = estimate_transform(np.asarray(points, np.float32))
    return float(np.sqrt(abs(np.linalg.det(m[:, :2])))) if np.all(np.isfinite(m)) else float("nan")


def needs_full_decode(found: Found, all_faces: bool) -> bool:
    """Whether a face to align is too small for the reduced decode it was found in: it would
    take more than :data:`MAX_REDUCED_CROP_SCALE` crop pixels per decoded pixel."""
    r = found.image.reduction
    return r > 1 and any(crop_scale(f.points) * r > MAX_REDUCED_CROP_SCALE for _, f in faces_to_align(found, all_faces))


def find_faces(
    entries: Sequence[tuple[object, str]], detection: Detection, max_pixels: int | None = None
) -> list[Found | ImageError]:
    """Faces in several inputs (``(item, name)``: path, :class:`EncodedImage` or RGB array), found
    in batches: a :class:`Found` or the :class:`ImageError` per input, in order (module doc: a
    large JPEG is decoded reduced, and decoded again in full where a face to align is small)."""
    results: list[Found | ImageError | None] = [None] * len(entries)
    decoded: dict[int, DecodedImage] = {}
    for k, (item, name) in enumerate(entries):
        try:
            decoded[k] = decode_for_detection(item, name, max_pixels, detection.detector)
        except ImageError as exc:
            results[k] = exc
    _detect_into(results, decoded, detection)
    again: dict[int, DecodedImage] = {}
    for k, got in enumerate(results):
        if isinstance(got, Found) and needs_full_decode(got, detection.all_faces):
            data, name = got.image.data, got.image.name
            assert data is not None  # only files and bytes are decoded reduced
            try:
                # no reduction asked: in full (or as planes)
                again[k] = decode_reduced(data, name, max_pixels, as_planes=detection.detector.decodes_planes)
            except ImageError as exc:
                results[k] = exc
    # found again in the full decode: where a photo needs it, its faces are exactly a full decode's
    _detect_into(results, again, detection)
    return [r if r is not None else ImageError(entries[k][1], "not prepared") for k, r in enumerate(results)]


def _detect_into(results: list, decoded: dict[int, DecodedImage], detection: Detection) -> None:
    keys = list(decoded)
    if not keys:
        return
    try:
        found = detection.detector.detect_decoded([decoded[k] for k in keys])
    except ArcdeployError:
        if len(keys) == 1:
            k = keys[0]
            try:
                found = [detection.detector.detect_decoded([decoded[k]])[0]]
            except ArcdeployError as exc:
                results[k] = ImageError(decoded[k].name, f"face detection failed: {first_line(exc)}")
                return
        else:  # one image's trouble must not fail the others of its batch: each on its own
            for k in keys:
                _detect_into(results, {k: decoded[k]}, detection)
            return
    for k, faces in zip(keys, found):
        results[k] = Found(decoded[k], faces) if faces else ImageError(decoded[k].name, detection.no_face())


def prepare_detected(
    entries: Sequence[tuple[object, int]], detection: Detection, max_pixels: int | None = None
) -> list[Prepared | Failure]:
    """Several inputs (``(item, index)``) -> each one's aligned crops of the faces found
    (:func:`find_faces`: detected in batches), or its :class:`Failure`; never raises for one input."""
    names = [input_name(item, index) for item, index in entries]
    try:
        found = find_faces([(item, name) for (item, _), name in zip(entries, names)], detection, max_pixels)
    except Exception as exc:  # a surprise in the batch: each input on its own says whose it was
        if len(entries) == 1:
            return [Failure(entries[0][1], names[0], f"{type(exc).__name__}: {first_line(exc)}")]
        return [p for e in entries for p in prepare_detected([e], detection, max_pixels)]
    out: list[Prepared | Failure] = []
    for (_, index), name, got in zip(entries, names, found):
        if isinstance(got, ImageError):
            out.append(Failure(index, got.path, got.reason))
            continue
        try:
            out.append(_align_found(got, name, detection))
        except ImageError as exc:
            out.append(Failure(index, exc.path, exc.reason))
        except Exception as exc:
            out.append(Failure(index, name, f"{type(exc).__name__}: {first_line(exc)}"))
    return out


def _align_found(found: Found, name: str, detection: Detection) -> Prepared:
    img = found.image
    if not detection.all_faces:
        problem = landmarks_problem(found.faces[0].points, img.full_shape)
        if problem:
            raise ImageError(name, f"the detected face cannot be aligned: {problem}")
    chosen = faces_to_align(found, detection.all_faces)
    if not chosen:
        raise ImageError(name, f"no face that can be aligned among the {len(found.faces)} found")
    crops = [aligned_from(img, f.points) for _, f in chosen]
    # a tiny or degenerate face in a crowd is left out, as --min-face would
    return Prepared(np.stack(crops), [f for _, f in chosen], [k for k, _ in chosen])
