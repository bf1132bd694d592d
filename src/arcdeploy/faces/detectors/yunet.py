"""YuNet (OpenCV Zoo, 2023mar and later), run by ``cv2.FaceDetectorYN``.

OpenCV takes a BGR image of any size (``setInputSize`` per image; it pads to a multiple of
32 itself) and gives one row per face: x, y, w, h, then 5 points (the person's right eye,
i.e. the image-left eye, first; then the other eye, the nose tip, the image-left and the
image-right mouth corner) and the score. That is already the image-left-first order of the
5-point form. A ``FaceDetectorYN`` object keeps per-image state (its input size), so each
thread gets its own.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from ...errors import ArcdeployError, first_line
from .base import PAD_RETRY, FaceDetector, GraphIO

if TYPE_CHECKING:
    from .registry import DetectorSpec

log = logging.getLogger(__name__)

NMS_IOU = 0.3  # OpenCV Zoo's default for YuNet
TOP_K = 5000
MAX_SIDE = 1920  # larger images are shrunk first: detection cost grows with the pixel count


class YuNetDetector(FaceDetector):
    kind = "yunet"
    default_threshold = 0.6  # OpenCV Zoo's

    @classmethod
    def recognise(cls, graph: GraphIO) -> bool:
        names = graph.output_names
        strides = [n[4:] for n in names if n.startswith("cls_")]
        if strides and all({f"cls_{s}", f"obj_{s}", f"bbox_{s}", f"kps_{s}"} <= names for s in strides):
            return True
        if names >= {"loc", "conf", "iou"}:
            raise ArcdeployError(
                f"{graph.path}: YuNet 2022mar (outputs loc, conf, iou): OpenCV's FaceDetectorYN reads the "
                "2023mar and later releases only (face_detection_yunet_2023mar*.onnx)"
            )
        return False

    @classmethod
    def from_spec(cls, graph: GraphIO, spec: DetectorSpec) -> YuNetDetector:
        if spec.engine not in ("onnxruntime", "opencv"):
            log.warning("%s: YuNet runs in OpenCV; --engine %s does not apply to it", graph.path, spec.engine)
        return cls(
            graph, threshold=spec.threshold, min_face=spec.min_face, pad_retry=spec.pad_retry, decode=spec.decode
        )

    def __init__(
        self,
        graph: GraphIO,
        threshold: float | None = None,
        min_face: float = 0.0,
        max_side: int = MAX_SIDE,
        nms_iou: float = NMS_IOU,
        pad_retry: float = PAD_RETRY,
        decode: str = "full",
    ):
        super().__init__(graph.path, threshold, min_face, pad_retry, decode)
        self.max_side = int(max_side)
        self.nms_iou = float(nms_iou)
        self._local = threading.local()
        self._net()  # load once now, so a broken file fails here and not in a worker thread

    def describe(self) -> str:
        return f"YuNet {self.path.name} (OpenCV)"

    def _net(self):
        net = getattr(self._local, "net", None)
        if net is None:
            import cv2

            # OpenCV's new DNN engine logs a warning per load about targets it ignores
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
            try:
                net = cv2.FaceDetectorYN.create(str(self.path), "", (320, 320), self.threshold, self.nms_iou, TOP_K)
            except cv2.error as exc:
                raise ArcdeployError(f"{self.path}: OpenCV cannot load it as YuNet ({first_line(exc)})") from None
            self._local.net = net
        return net

    def _detect(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import cv2

        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            sx, sy = size[0] / w, size[1] / h
        else:
            sx = sy = 1.0
        net = self._net()
        net.setInputSize((image.shape[1], image.shape[0]))
        net.setScoreThreshold(float(threshold))
        try:
            _, rows = net.detect(image)
        except cv2.error as exc:
            raise ArcdeployError(f"{self.path}: YuNet failed on a {w}x{h} image ({first_line(exc)})") from None
        if rows is None or len(rows) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        rows = np.asarray(rows, np.float32).reshape(-1, 15)
        scale = np.array([sx, sy], np.float32)
        xy, wh = rows[:, 0:2], rows[:, 2:4]
        boxes = np.concatenate([xy / scale, (xy + wh) / scale], axis=1)
        points = rows[:, 4:14].reshape(-1, 5, 2) / scale
        return boxes, points, rows[:, 14].copy()
