"""What every face detector shares: the :class:`FaceDetector` interface, the order faces come
in, non-maximum suppression, the letterbox canvas, and reading a detector file's graph.

A detector kind is one module beside this one (``scrfd.py``, ``yunet.py``) with a
:class:`FaceDetector` subclass that says from a file's graph whether the file is its kind
(:meth:`FaceDetector.recognise`); :mod:`.registry` lists the kinds.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ...errors import ArcdeployError, first_line
from ...utils import hash_file_into
from ..types import DecodedImage, Face, as_rgb

if TYPE_CHECKING:
    from .registry import DetectorSpec

NMS_IOU = 0.4  # insightface SCRFD's NMS threshold
PAD_RETRY = 0.4  # border, as a fraction of the larger side, for a second try on tight crops
# how photos are decoded for detection: "full" (insightface's exact pixels), or "reduced": a kind
# may decode large JPEGs at 1/2, 1/4, 1/8 with libjpeg's DCT scaling (see reduced_decode_size), which
# is faster but moves landmarks a little (measured in faces/prepare.py), so it is asked for, not default;
# or "planes": large JPEGs held as their Y, Cb, Cr planes and sampled in colour where needed
# (faces/jpeg_planes.py), close to the full decode's pixels but not the same
DECODES = ("full", "planes", "reduced")
DEFAULT_DECODE = "full"
RECOGNITION_DIMS = (128, 256, 512, 1024)


def best_first(faces: Sequence[Face]) -> list[Face]:
    """``faces`` ordered best first: largest box area first, ties by score.

    The largest face is the subject of a portrait or a loose crop, and it is what the landmark
    files made with SCRFD use. insightface's own rule for keeping one face (``max_num``: area
    minus twice the squared distance of the box centre from the image centre) weighs that
    distance so heavily that in a group photo a small face near the centre beats the main
    subject standing off-centre, so it is not used here.
    """
    if not faces:
        return []
    boxes = np.stack([f.box for f in faces]).astype(np.float64)
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    order = np.lexsort((-np.array([f.score for f in faces]), -area))
    return [faces[i] for i in order]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression as insightface's SCRFD does it: indices kept, highest score
    first (``argsort()[::-1]``), overlap with the ``+ 1`` pixel convention (a box from x1 to x2
    covers ``x2 - x1 + 1`` pixels). Boxes in image pixels, as insightface compares them."""
    boxes = np.asarray(boxes)
    order = np.argsort(np.asarray(scores))[::-1]
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)


def letterbox_geometry(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, float]:
    """Where an image of ``width`` x ``height`` goes in a ``size`` = (width, height) canvas, by
    insightface's SCRFD rule: (new width, new height, scale). The side that fills the canvas is
    the canvas's; the other is ``int(new_height / (h / w))`` or ``int(new_width * (h / w))``, and
    the one scale that maps canvas pixels back to the image, for both axes, is ``new_height / h``.
    (That scale is the height's: the width was rounded down on its own, so in x it can be up to
    one canvas pixel's worth off the true one; faces found with insightface's own code carry the
    same offset, and following it keeps arcdeploy's landmarks on insightface's.)"""
    cw, ch = size
    im_ratio = float(height) / width
    if im_ratio > float(ch) / cw:
        nh = ch
        nw = int(nh / im_ratio)
    else:
        nw = cw
        nh = int(nw * im_ratio)
    nw, nh = max(1, nw), max(1, nh)
    return nw, nh, float(nh) / height


def letterbox(image: np.ndarray | DecodedImage, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize ``image`` (pixels, or a :class:`DecodedImage`: its full image, see
    :meth:`DecodedImage.resized`) keeping its aspect ratio to fit a ``size`` = (width, height) canvas
    (bilinear, ``cv2.resize``'s default), placed at the top-left, zeros elsewhere: insightface's
    SCRFD input (:func:`letterbox_geometry`). Returns the canvas and the (x, y) scale from image
    pixels to canvas pixels (insightface's one scale, for both axes)."""
    img = image if isinstance(image, DecodedImage) else DecodedImage.full(image)
    cw, ch = size
    nw, nh, scale = letterbox_geometry(*img.full_size, size)
    placed = img.resized(nw, nh)
    canvas = np.zeros((ch, cw, *placed.shape[2:]), dtype=placed.dtype)
    canvas[:nh, :nw] = placed
    return canvas, (scale, scale)


# ------------------------------------------------------------------ the interface


class FaceDetector(ABC):
    """A face detector; ``detect`` may be called from several threads at once.

    Subclasses set ``kind`` and ``default_threshold``, say which graphs are theirs
    (:meth:`recognise`) and find faces in one RGB image (:meth:`_detect`)."""

    kind: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5
    engine: str = "opencv"  # what runs the graph (recorded in a job's identity)

    def __init__(
        self,
        path: Path,
        threshold: float | None = None,
        min_face: float = 0.0,
        pad_retry: float = PAD_RETRY,
        decode: str = DEFAULT_DECODE,
    ):
        self.path = Path(path)
        if decode not in DECODES:
            raise ArcdeployError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        self.decode = decode
        self.pad_retry = float(pad_retry or 0.0)
        self.threshold = float(self.default_threshold if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ArcdeployError(f"detection threshold must be between 0 and 1, got {self.threshold}")
        self.min_face = float(min_face or 0.0)
        if not self.min_face >= 0:  # NaN too: it would drop every face
            raise ArcdeployError(f"minimum face size must be a number of pixels, 0 or more, got {self.min_face}")
        self.spec: DetectorSpec | None = None  # how it was opened (set by the registry), so it can be again
        self.files: list[Path] = []  # what it is made of, when more than the file at ``path`` (a package)

    @classmethod
    def recognise(cls, graph: GraphIO) -> bool:
        """Whether ``graph`` is this kind of detector (a one-line error for a near miss). A kind
        in the registry says; a detector made in code for one job need not."""
        return False

    @classmethod
    def from_spec(cls, graph: GraphIO, spec: DetectorSpec) -> FaceDetector:
        """The detector of ``graph`` (a file of this kind) opened with ``spec``'s settings."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a file")

    @abstractmethod
    def _detect(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes [n, 4], points [n, 5, 2] (image pixels) and scores [n] after NMS."""

    def _detect_many(
        self, images: Sequence[DecodedImage], threshold: float
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`_detect` of several decoded images, in full-image pixels; a kind that can run
        several images in one call of its network overrides this."""
        out = []
        for img in images:
            boxes, points, scores = self._detect(img.rgb(), threshold)
            out.append((img.to_full(boxes), img.to_full(points), scores))
        return out

    def reduced_decode_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest decode of a ``width`` x ``height`` photo that loses nothing this detector
        sees (a JPEG can be decoded at 1/2, 1/4, 1/8 down to it), or None: decode in full."""
        return None

    def decodes_planes(self, width: int, height: int) -> bool:
        """Whether a JPEG of ``width`` x ``height`` (upright) may be held as its Y, Cb, Cr planes
        (:mod:`arcdeploy.faces.jpeg_planes`): for a detector whose input samples a large photo
        sparsely (its canvas made with :meth:`DecodedImage.resized`)."""
        return False

    def detect(self, image: np.ndarray, threshold: float | None = None, min_face: float | None = None) -> list[Face]:
        """Faces in an RGB uint8 ``H x W x 3`` image, best first (see :func:`best_first`);
        faces whose box's shorter side is under ``min_face`` pixels are left out. When nothing is
        found, the image is tried once more inside a black border of ``pad_retry`` times its
        larger side (tight face crops); points may then lie a little outside the image."""
        return self.detect_decoded([DecodedImage.full(as_rgb(image))], threshold, min_face)[0]

    def detect_decoded(
        self, images: Sequence[DecodedImage], threshold: float | None = None, min_face: float | None = None
    ) -> list[list[Face]]:
        """:meth:`detect` for several decoded images at once (a kind with a batch axis runs them
        in batches), each possibly decoded reduced: faces in full-image pixels, best first."""
        thr = self.threshold if threshold is None else float(threshold)
        low = self.min_face if min_face is None else float(min_face)
        found = self._detect_many(images, thr) if images else []
        out = []
        for img, (boxes, points, scores) in zip(images, found):
            if len(scores) == 0 and self.pad_retry > 0:
                boxes, points, scores = self._detect_padded(img.rgb(), thr)
                boxes, points = img.to_full(boxes), img.to_full(points)
            faces = [
                Face(np.asarray(b, np.float32), np.asarray(p, np.float32).reshape(5, 2), float(s))
                for b, p, s in zip(boxes, points, scores)
            ]
            out.append(best_first([f for f in faces if f.size >= low]))
        return out

    def _detect_padded(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # a face that fills the frame (a tight crop) is larger than the detector's largest
        # anchors; with a black border around it, it is an ordinary face again
        import cv2

        pad = max(1, round(self.pad_retry * max(rgb.shape[:2])))
        padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        boxes, points, scores = self._detect(padded, threshold)
        return boxes - pad, points - pad, scores

    def best(self, image: np.ndarray, **kwargs) -> Face | None:
        """The best face of an image (see :func:`best_first`), or None."""
        faces = self.detect(image, **kwargs)
        return faces[0] if faces else None

    def describe(self) -> str:
        return f"{self.kind} {self.path.name}"

    def no_face(self) -> str:
        """Why an image gave no face, with the settings that decided it."""
        small = f", faces under {self.min_face:g} px left out" if self.min_face else ""
        return f"no face found (detector {self.path.name}, threshold {self.threshold:g}{small})"

    def identity(self) -> str:
        """What the faces found depend on: the file's content and the settings that change them."""
        h = hashlib.sha256()
        for path in self.files or [self.path]:
            if self.files:
                h.update(path.name.encode())
            hash_file_into(h, path)
        settings = [
            self.kind,
            f"threshold={self.threshold!r}",
            f"min_face={self.min_face!r}",
            f"pad={self.pad_retry!r}",
            f"engine={self.engine}",
            f"size={getattr(self, 'size', None)}",
        ]
        if self.decode != DEFAULT_DECODE:
            settings.append(f"decode={self.decode}")
        return h.hexdigest() + " " + " ".join(settings)


# ------------------------------------------------------------------ a detector file's graph


def shape_text(shape: Sequence) -> str:
    """``[1,3,?,?]``: a tensor shape with unknown dimensions as their name or ``?``."""
    return "[" + ",".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


@dataclass
class GraphIO:
    """What a detector file's graph declares: inputs and outputs (name, shape)."""

    path: Path
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]

    @property
    def output_names(self) -> set[str]:
        return {n for n, _ in self.outputs}

    def summary(self) -> str:
        def shapes(items):
            return ", ".join(shape_text(s) for _, s in items)

        ni, no = len(self.inputs), len(self.outputs)
        text = (
            f"{ni} input{'s' if ni != 1 else ''} {shapes(self.inputs)}, "
            f"{no} output{'s' if no != 1 else ''} {shapes(self.outputs[:4])}"
        )
        return text + (", ..." if no > 4 else "")

    def looks_like(self) -> str:
        """A hint for a file that is no detector kind: what it seems to be, or what each kind has."""
        if len(self.inputs) == 1 and len(self.outputs) == 1:
            ishape, oshape = self.inputs[0][1], self.outputs[0][1]
            if (
                len(ishape) == 4
                and len(oshape) == 2
                and (oshape[-1] in RECOGNITION_DIMS or ishape[-1] == 112 or ishape[1] == 112)
            ):
                return " (looks like a recognition model)"
        return (
            " (SCRFD has one image input and per stride score [K,1], box [K,4] and keypoint [K,10] outputs; "
            "YuNet has cls_8/obj_8/bbox_8/kps_8 outputs)"
        )


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def read_graph_io(path: str | os.PathLike) -> GraphIO:
    """The inputs and outputs a detector file's ONNX graph declares; a one-line error for a file
    that is missing, empty, an archive or not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise ArcdeployError(f"{path}: no such detector file")
    if path.is_dir():
        raise ArcdeployError(f"{path}: is a folder, not a detector file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ArcdeployError(f"{path}: cannot read detector file ({exc.strerror or exc})") from None
    if not head:
        raise ArcdeployError(f"{path}: empty file, not a face detector")
    if head[:2] == b"PK":
        raise ArcdeployError(f"{path}: a zip archive (e.g. a PyTorch checkpoint), not an ONNX face detector")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ArcdeployError(f"{path}: not an ONNX model ({first_line(exc)})") from None
    g = model.graph
    if not g.node or not g.output:
        raise ArcdeployError(f"{path}: not an ONNX model (no graph)")
    init = {i.name for i in g.initializer}
    return GraphIO(
        path, [(v.name, _dims(v)) for v in g.input if v.name not in init], [(v.name, _dims(v)) for v in g.output]
    )
