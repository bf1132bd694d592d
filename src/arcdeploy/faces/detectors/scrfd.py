"""SCRFD (insightface) with 5 keypoints, run by ONNX Runtime or OpenVINO.

What the detector expects and gives (facts of insightface's SCRFD): an RGB image resized
keeping its aspect ratio into a 640 x 640 canvas at the top-left (insightface's rounding and
its one scale for both axes: :func:`~.base.letterbox_geometry`), normalised
``(x - 127.5) / 128``, NCHW. Per stride s (8, 16, 32; or 8..128 for the 5-level models) and
per cell of the ``H/s x W/s`` feature map, ``A`` anchors (2 for 3 strides, 1 for 5) centred on
the cell's top-left corner ``(col * s, row * s)``, in row-major order with the anchors of
one cell next to each other. Each anchor gives a score, box distances (left, top, right,
bottom) and 5 keypoint offsets (x, y), all in stride units from the anchor centre.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ArcdeployError
from ..types import DecodedImage
from .base import DEFAULT_DECODE, NMS_IOU, PAD_RETRY, FaceDetector, GraphIO, letterbox, letterbox_geometry, nms

if TYPE_CHECKING:
    from ...manifest import DetectorManifest
    from .registry import DetectorSpec

DEFAULT_SIZE = (640, 640)
DEFAULT_ENGINE = "onnxruntime"
# canvases per network call when the graph has a batch axis and nobody says: one. Measured with
# benchmarks/bench_photos.py --grid (2 cores, OpenVINO int8 SCRFD-500M at 640): 8 canvases per call
# ran at 0.87-0.96x of one per call in the pipeline over three runs (0.88x alone): a 640x640 canvas already
# fills the cores, so on a CPU a batch buys nothing; DetectorSpec(batch=N) asks for one
DEFAULT_BATCH = 1
# a reduced JPEG decode keeps at least this many of its pixels per canvas pixel on each side, so
# that the canvas is still a bilinear shrink of it (as of the full image) and faces that fill a
# good part of the photo can be aligned from it without a full decode (faces/prepare.py)
REDUCED_OVERSAMPLE = 2
# a JPEG shrunk at least this much into the canvas is decoded to its planes (faces/jpeg_planes.py): there
# the canvas samples a small part of its pixels; a smaller photo is decoded in full, insightface's pixels
PLANES_MIN_SHRINK = 2


@functools.lru_cache(maxsize=32)
def anchor_centres(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Anchor centres (x, y) in canvas pixels, [height * width * anchors, 2] float32."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    if anchors > 1:
        centres = np.repeat(centres, anchors, axis=0)
    centres.setflags(write=False)
    return centres


def _layout(io: GraphIO) -> bool | None:
    """True: SCRFD with keypoints, False: SCRFD without, None: not SCRFD. SCRFD has one image
    input and, per stride (3 or 5), scores [K, 1], boxes [K, 4] and optionally keypoints [K, 10]
    (a leading batch axis allowed)."""
    if len(io.inputs) != 1 or len(io.inputs[0][1]) != 4 or io.inputs[0][1][1] not in (3, None, "?"):
        return None
    if len(io.outputs) not in (6, 9, 10, 15):
        return None
    shapes = [shape for _, shape in io.outputs]
    if any(shape and len(shape) not in (2, 3) for shape in shapes):
        return None
    lasts = [shape[-1] for shape in shapes if shape and isinstance(shape[-1], int) and shape[-1] > 0]
    if len(lasts) != len(shapes):
        # shapes unknown: insightface's output order (scores, boxes[, keypoints]) is all there is to go on
        return len(io.outputs) in (9, 15)
    fmc = 5 if len(io.outputs) in (10, 15) else 3
    if sorted(lasts) != sorted([1] * fmc + [4] * fmc + ([10] * fmc if len(io.outputs) in (9, 15) else [])):
        return None
    return len(io.outputs) in (9, 15)


class ScrfdDetector(FaceDetector):
    kind = "scrfd"
    default_threshold = 0.5  # insightface's

    @classmethod
    def recognise(cls, graph: GraphIO) -> bool:
        found = _layout(graph)
        if found is False:
            raise ArcdeployError(
                f"{graph.path}: an SCRFD detector without keypoints ({len(graph.outputs)} outputs: scores "
                "and boxes only); the 5 alignment points need a *_kps model (e.g. det_500m, "
                "det_10g, scrfd_*_kps)"
            )
        return bool(found)

    @classmethod
    def from_spec(cls, graph: GraphIO, spec: DetectorSpec) -> ScrfdDetector:
        return cls(
            graph,
            engine=spec.engine,
            threshold=spec.threshold,
            min_face=spec.min_face,
            threads=spec.threads,
            input_size=spec.input_size,
            pad_retry=spec.pad_retry,
            decode=spec.decode,
            batch=spec.batch,
        )

    def __init__(
        self,
        graph: GraphIO,
        engine: str = DEFAULT_ENGINE,
        threshold: float | None = None,
        min_face: float = 0.0,
        threads: int | None = None,
        input_size: tuple[int, int] | None = None,
        nms_iou: float = NMS_IOU,
        pad_retry: float = PAD_RETRY,
        decode: str = DEFAULT_DECODE,
        batch: int | None = None,
        session=None,
        layout: str = "NCHW",
    ):
        from ...engines import open_graph

        super().__init__(graph.path, threshold, min_face, pad_retry, decode)
        self.engine = engine
        self.nms_iou = float(nms_iou)
        self.levels = 5 if len(graph.outputs) == 15 else 3
        self.strides = (8, 16, 32, 64, 128)[: self.levels]
        shape = graph.inputs[0][1]
        spatial = shape[1:3] if layout == "NHWC" else shape[2:]
        fixed = [d for d in spatial if isinstance(d, int) and d > 0]
        size: tuple[int, int]
        if len(fixed) == 2:
            size = (fixed[1], fixed[0])
            if input_size is not None and tuple(input_size) != size:
                raise ArcdeployError(
                    f"{self.path}: its input is fixed at {size[0]}x{size[1]}; "
                    f"cannot run it at {input_size[0]}x{input_size[1]}"
                )
        else:
            w, h = input_size or DEFAULT_SIZE
            size = (int(w), int(h))
        if any(v % self.strides[-1] for v in size):
            raise ArcdeployError(
                f"{self.path}: input size {size[0]}x{size[1]} is not a multiple of its largest "
                f"stride {self.strides[-1]}"
            )
        self.size: tuple[int, int] = size  # (width, height)
        self.session = session if session is not None else open_graph(self.path, engine=engine, threads=threads)
        self.input_name = self.session.inputs[0].name
        # a detector package takes the canvases as they are (uint8 NHWC) and normalises inside
        self.takes_pixels = layout == "NHWC" and self.session.inputs[0].dtype in ("uint8", "u8")
        self.package: DetectorManifest | None = None  # the manifest, when opened from a detector package
        leading = shape[0] if shape else 1
        # a graph with a batch axis takes several canvases per call; insightface's files take one
        self.batch = 1 if isinstance(leading, int) and leading > 0 else int(batch or DEFAULT_BATCH)

    def describe(self) -> str:
        if self.package is not None:
            return (
                f"SCRFD {self.path.name} ({self.size[0]}x{self.size[1]}, {self.engine} "
                f"{self.package.precision} detector package)"
            )
        return f"SCRFD {self.path.name} ({self.size[0]}x{self.size[1]}, {self.engine})"

    def identity(self) -> str:
        # faces found before arcdeploy followed insightface's letterbox differ: saved work of then is not reused
        return super().identity() + " letterbox=insightface"

    def reduced_decode_size(self, width: int, height: int) -> tuple[int, int] | None:
        if self.decode != "reduced":
            return None
        nw, nh, _ = letterbox_geometry(width, height, self.size)
        return REDUCED_OVERSAMPLE * nw, REDUCED_OVERSAMPLE * nh

    def decodes_planes(self, width: int, height: int) -> bool:
        if self.decode != "planes":
            return False
        _, nh, _ = letterbox_geometry(width, height, self.size)
        return nh * PLANES_MIN_SHRINK <= height

    def canvas(self, img: DecodedImage) -> tuple[np.ndarray, float]:
        """The letterboxed canvas of a decoded image (uint8 RGB, ``size``) and the scale from full
        image pixels to canvas pixels. The placement is always the full image's (insightface's
        rule); a full decode is resized as insightface resizes it, a reduced one or planes are
        sampled (bilinear) where that resize samples the full image."""
        canvas, (scale, _) = letterbox(img, self.size)
        return canvas, scale

    def _detect(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._detect_many([DecodedImage.full(rgb)], threshold)[0]

    def _detect_many(
        self, images: Sequence[DecodedImage], threshold: float
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Canvases in batches of ``batch`` per network call; detections in full-image pixels."""
        placed = [self.canvas(img) for img in images]
        out = []
        for start in range(0, len(placed), self.batch):
            chunk = placed[start : start + self.batch]
            blob = np.stack([c for c, _ in chunk])
            if not self.takes_pixels:
                blob = blob.transpose(0, 3, 1, 2).astype(np.float32)
                blob -= 127.5
                blob *= 1.0 / 128.0
            outs = self.session.run({self.input_name: blob})
            for b, (_, scale) in enumerate(chunk):
                mine = [o[b] if o.ndim == 3 else o for o in outs]
                out.append(self._to_image(*self._decode(mine, threshold), scale))
        return out

    def _to_image(
        self, scores: np.ndarray, boxes: np.ndarray, points: np.ndarray, scale: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canvas detections -> image pixels, then NMS there, in insightface's order of steps
        (sorted by score, divided by the scale, suppressed in float32 image pixels)."""
        order = scores.argsort()[::-1]
        scores, boxes, points = scores[order], boxes[order] / scale, points[order] / scale
        keep = nms(boxes.astype(np.float32, copy=False), scores, self.nms_iou)
        return boxes[keep], points[keep].reshape(-1, 5, 2), scores[keep]

    def _decode(self, outs: list[np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores [n], boxes [n, 4] and points [n, 10] in canvas pixels, for anchors over ``threshold``."""
        outs = [o[0] if o.ndim == 3 and o.shape[0] == 1 else o for o in outs]  # one image's, batch axis kept
        groups: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for o in outs:
            if o.ndim != 2 or o.shape[-1] not in groups:
                raise ArcdeployError(f"{self.path}: unexpected SCRFD output shape {list(o.shape)}")
            groups[o.shape[-1]].append(o)
        if not all(len(groups[c]) == self.levels for c in groups):
            raise ArcdeployError(
                f"{self.path}: expected {self.levels} score, box and keypoint outputs, got "
                f"{', '.join(str(len(groups[c])) for c in groups)}"
            )
        # one output per stride: the finer the stride, the more anchors
        for group in groups.values():
            group.sort(key=lambda o: -o.shape[0])
        h, w = self.size[1], self.size[0]
        all_scores, all_boxes, all_points = [], [], []
        for level, stride in enumerate(self.strides):
            s, d, k = groups[1][level], groups[4][level], groups[10][level]
            fh, fw = h // stride, w // stride
            anchors, rem = divmod(s.shape[0], fh * fw)
            if rem or anchors < 1 or d.shape[0] != s.shape[0] or k.shape[0] != s.shape[0]:
                raise ArcdeployError(
                    f"{self.path}: stride {stride} outputs ({s.shape[0]}, {d.shape[0]}, "
                    f"{k.shape[0]} rows) do not fit a {fw}x{fh} feature map"
                )
            hit = np.flatnonzero(s[:, 0] >= threshold)
            if hit.size == 0:
                continue
            centres = anchor_centres(fh, fw, stride, anchors)[hit]
            dist = d[hit].astype(np.float32) * stride
            box = np.concatenate([centres - dist[:, :2], centres + dist[:, 2:]], axis=1)
            pts = (k[hit].astype(np.float32) * stride).reshape(-1, 5, 2) + centres[:, None, :]
            all_scores.append(s[hit, 0].astype(np.float32))
            all_boxes.append(box)
            all_points.append(pts.reshape(-1, 10))
        if not all_scores:
            return np.zeros(0, np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 10), np.float32)
        return np.concatenate(all_scores), np.concatenate(all_boxes), np.concatenate(all_points)
