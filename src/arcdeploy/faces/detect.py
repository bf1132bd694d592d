"""Face detection: boxes and the 5 alignment points from a real detector.

``open_detector(FILE)`` recognises what the file is from its graph and returns a
:class:`FaceDetector`:

- **SCRFD** (insightface, ONNX with keypoints: det_500m / det_2.5g / det_10g): one image
  input, and per stride a score [K, 1], a box [K, 4] and a keypoint [K, 10] output (9
  outputs for strides 8/16/32, 15 for 8..128; a leading batch axis is accepted). Run by
  ONNX Runtime or OpenVINO through :func:`arcdeploy.engines.open_graph`.
- **YuNet** (OpenCV Zoo, 2023mar and later): outputs named ``cls_8``, ``obj_8``, ``bbox_8``,
  ``kps_8``, ...; run by ``cv2.FaceDetectorYN``.

``detector.detect(rgb)`` gives a list of :class:`Face` (box, 5 points in original pixels
in the order left eye, right eye, nose, left mouth corner, right mouth corner, as seen in
the image, score), best first: "best" is the largest box (see :func:`best_first`).
It may be called from several threads at once.

The rest writes the 12-field landmark rows (``name x1 y1 ... x5 y5 score``) that
:func:`arcdeploy.faces.landmarks.read_landmarks` and ``embed --landmarks`` read.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError, first_line
from .prepare import Failure

log = logging.getLogger(__name__)

NMS_IOU = 0.4  # insightface SCRFD's NMS threshold
DEFAULT_THRESHOLDS = {"scrfd": 0.5, "yunet": 0.6}
RECOGNITION_DIMS = (128, 256, 512, 1024)
PAD_RETRY = 0.4  # border, as a fraction of the larger side, for a second try on tight crops


# ------------------------------------------------------------------ faces


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixels of the image given to ``detect``."""

    box: np.ndarray  # float32 [4]: x1, y1, x2, y2
    points: np.ndarray  # float32 [5, 2]: left eye, right eye, nose, left mouth, right mouth (image left/right)
    score: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """The box's shorter side (what ``min_face`` compares against)."""
        return min(self.width, self.height)


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
    """Greedy non-maximum suppression: indices kept, highest score first."""
    boxes = np.asarray(boxes, np.float64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = boxes.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = iw * ih
        union = area[i] + area[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize ``image`` keeping its aspect ratio to fit a ``size`` = (width, height) canvas,
    placed at the top-left, zeros elsewhere (insightface's SCRFD input). Returns the canvas
    and the (x, y) scale from image pixels to canvas pixels."""
    import cv2

    cw, ch = size
    h, w = image.shape[:2]
    if h / w > ch / cw:
        nh, nw = ch, max(1, int(ch * w / h))
    else:
        nw, nh = cw, max(1, int(cw * h / w))
    canvas = np.zeros((ch, cw, image.shape[2]), dtype=image.dtype)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas, (nw / w, nh / h)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 image as ``H x W x 3`` (grayscale expanded, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ArcdeployError(f"detect expects a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ArcdeployError(f"detect expects an H x W x 3 RGB image, got shape {list(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


# ------------------------------------------------------------------ detectors


class FaceDetector(ABC):
    """A face detector; ``detect`` may be called from several threads at once."""

    kind: str = ""

    def __init__(self, path: Path, threshold: float | None = None, min_face: float = 0.0, pad_retry: float = PAD_RETRY):
        self.path = Path(path)
        self.pad_retry = float(pad_retry or 0.0)
        self.threshold = float(DEFAULT_THRESHOLDS[self.kind] if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ArcdeployError(f"detection threshold must be between 0 and 1, got {self.threshold}")
        self.min_face = float(min_face or 0.0)
        if self.min_face < 0:
            raise ArcdeployError(f"minimum face size must not be negative, got {self.min_face}")

    @abstractmethod
    def _detect(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes [n, 4], points [n, 5, 2] (image pixels) and scores [n] after NMS."""

    def detect(self, image: np.ndarray, threshold: float | None = None, min_face: float | None = None) -> list[Face]:
        """Faces in an RGB uint8 ``H x W x 3`` image, best first (see :func:`best_first`);
        faces whose box's shorter side is under ``min_face`` pixels are left out. When nothing is
        found, the image is tried once more inside a black border of ``pad_retry`` times its
        larger side (tight face crops); points may then lie a little outside the image."""
        rgb = as_rgb(image)
        thr = self.threshold if threshold is None else float(threshold)
        low = self.min_face if min_face is None else float(min_face)
        boxes, points, scores = self._detect(rgb, thr)
        if len(scores) == 0 and self.pad_retry > 0:
            boxes, points, scores = self._detect_padded(rgb, thr)
        faces = [
            Face(np.asarray(b, np.float32), np.asarray(p, np.float32).reshape(5, 2), float(s))
            for b, p, s in zip(boxes, points, scores)
        ]
        faces = [f for f in faces if f.size >= low]
        return best_first(faces)

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


def open_detector(
    path: str | os.PathLike,
    engine: str = "onnxruntime",
    threshold: float | None = None,
    min_face: float = 0.0,
    threads: int | None = None,
    input_size: tuple[int, int] | None = None,
    pad_retry: float = PAD_RETRY,
) -> FaceDetector:
    """The detector in ``path`` (SCRFD or YuNet, recognised from the graph).

    ``engine`` runs SCRFD (``onnxruntime`` or ``openvino``); YuNet always runs in OpenCV.
    ``threshold``: minimum detection score (default 0.5 for SCRFD, as insightface; 0.6 for
    YuNet). ``input_size`` (width, height): SCRFD's canvas when its input is dynamic
    (default 640 x 640). ``pad_retry``: see :meth:`FaceDetector.detect` (0: no second try).
    """
    graph = inspect_detector(path)
    if graph.kind == "scrfd":
        from .scrfd import ScrfdDetector

        return ScrfdDetector(
            graph,
            engine=engine,
            threshold=threshold,
            min_face=min_face,
            threads=threads,
            input_size=input_size,
            pad_retry=pad_retry,
        )
    from .yunet import YuNetDetector

    if engine not in ("onnxruntime", "opencv"):
        log.warning("%s: YuNet runs in OpenCV; --engine %s does not apply to it", graph.path, engine)
    return YuNetDetector(graph, threshold=threshold, min_face=min_face, pad_retry=pad_retry)


# ------------------------------------------------------------------ recognising the file


@dataclass
class GraphIO:
    """What a detector file's graph declares: inputs and outputs (name, shape) and the kind found."""

    path: Path
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    kind: str | None = None
    keypoints: bool = True

    def summary(self) -> str:
        def shapes(items):
            return ", ".join(_shape_text(s) for _, s in items)

        ni, no = len(self.inputs), len(self.outputs)
        text = (
            f"{ni} input{'s' if ni != 1 else ''} {shapes(self.inputs)}, "
            f"{no} output{'s' if no != 1 else ''} {shapes(self.outputs[:4])}"
        )
        return text + (", ..." if no > 4 else "")


def _shape_text(shape: list) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _read_graph(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

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
    if not model.graph.node or not model.graph.output:
        raise ArcdeployError(f"{path}: not an ONNX model (no graph)")
    return model


def inspect_detector(path: str | os.PathLike) -> GraphIO:
    """Which detector ``path`` holds; a one-line error saying what was found when it is neither."""
    path = Path(path)
    model = _read_graph(path)
    g = model.graph
    init = {i.name for i in g.initializer}
    io = GraphIO(
        path, [(v.name, _dims(v)) for v in g.input if v.name not in init], [(v.name, _dims(v)) for v in g.output]
    )
    names = {n for n, _ in io.outputs}
    if any(n.startswith(p) for n in names for p in ("cls_", "obj_", "bbox_", "kps_")):
        strides = [n[4:] for n in names if n.startswith("cls_")]
        if strides and all({f"cls_{s}", f"obj_{s}", f"bbox_{s}", f"kps_{s}"} <= names for s in strides):
            io.kind = "yunet"
            return io
    if names >= {"loc", "conf", "iou"}:
        raise ArcdeployError(
            f"{path}: YuNet 2022mar (outputs loc, conf, iou): OpenCV's FaceDetectorYN reads the "
            "2023mar and later releases only (face_detection_yunet_2023mar*.onnx)"
        )
    scrfd = _scrfd_layout(io)
    if scrfd is not None:
        io.kind, io.keypoints = "scrfd", scrfd
        if not scrfd:
            raise ArcdeployError(
                f"{path}: an SCRFD detector without keypoints ({len(io.outputs)} outputs: scores "
                "and boxes only); the 5 alignment points need a *_kps model (e.g. det_500m, "
                "det_10g, scrfd_*_kps)"
            )
        return io
    raise ArcdeployError(f"{path}: not a face detector: {io.summary()}{_looks_like(io)}")


def _scrfd_layout(io: GraphIO) -> bool | None:
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


def _looks_like(io: GraphIO) -> str:
    if len(io.inputs) == 1 and len(io.outputs) == 1:
        ishape, oshape = io.inputs[0][1], io.outputs[0][1]
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


# ------------------------------------------------------------------ files of images

DetectFailure = Failure  # an image without a usable face, named as the embed pipeline names it


@dataclass
class DetectResult:
    """Per input image (input order): its name and its faces, best first (empty when it failed)."""

    names: list[str]
    faces: list[list[Face]]
    failures: list[DetectFailure] = field(default_factory=list)

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
    on_image: Callable[[int, list[Face] | DetectFailure], None] | None = None,
) -> DetectResult:
    """Detect faces in image files, several at once (``workers`` threads), results in input order.

    Without ``all_faces`` each image keeps its best face. An unreadable image, or one without a
    face, is a :class:`DetectFailure` (the others go on). ``on_image(index, faces | failure)``
    is called in input order as results come in.
    """
    from .io import ImageError, read_image

    paths = list(paths)
    names = [image_name(p, root) for p in paths]
    thr_text = f"score {detector.threshold:g}"
    size_text = f", at least {detector.min_face:g} px" if detector.min_face else ""

    def one(i: int) -> tuple[int, list[Face] | DetectFailure]:
        return i, detect_one(i)

    def detect_one(i: int) -> list[Face] | DetectFailure:
        if any(c.isspace() for c in names[i]):
            return DetectFailure(i, str(paths[i]), "the name has white space, which a landmark row cannot hold")
        try:
            faces = detector.detect(read_image(paths[i]))
        except ImageError as exc:
            return DetectFailure(i, str(paths[i]), exc.reason)
        except ArcdeployError as exc:
            return DetectFailure(i, str(paths[i]), first_line(exc))
        if not faces:
            return DetectFailure(i, str(paths[i]), f"no face found ({thr_text}{size_text})")
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
    if isinstance(out, DetectFailure):
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
    when images failed, ``*.failures.tsv`` (index, path, reason); each atomically. The rows file
    is written last, so its presence means the set is complete. Returns the paths written."""
    from ..files import refuse_existing, write_text_atomic

    output = Path(output)
    refuse_existing(output, force)
    boxes_path, failures_path = side_paths(output)
    rows, boxes = [], ["name\tface\tx1\ty1\tx2\ty2\tscore"]
    for name, faces in zip(result.names, result.faces):
        for k, f in enumerate(faces):
            rows.append(face_row(name, f))
            x1, y1, x2, y2 = (float(v) for v in f.box)
            boxes.append(f"{name}\t{k}\t{x1:.2f}\t{y1:.2f}\t{x2:.2f}\t{y2:.2f}\t{f.score:.4f}")
    written = {}
    write_text_atomic(boxes_path, "\n".join(boxes) + "\n")
    written["boxes"] = boxes_path
    if result.failures:
        lines = ["index\tpath\treason"]
        for fl in sorted(result.failures, key=lambda x: x.index):
            cells = (str(v).replace("\t", " ").replace("\n", " ") for v in (fl.index, fl.path, fl.reason))
            lines.append("\t".join(cells))
        write_text_atomic(failures_path, "\n".join(lines) + "\n")
        written["failures"] = failures_path
    elif failures_path.exists():
        failures_path.unlink()  # from an earlier run of the same output; no longer true
    write_text_atomic(output, "".join(r + "\n" for r in rows), force=force)
    written["faces"] = output
    return written
