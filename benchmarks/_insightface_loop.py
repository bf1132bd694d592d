"""insightface's own photo loop, transcribed for comparison only (arcdeploy never imports this).

What a user of the ``insightface`` package runs (``FaceAnalysis.get`` with the ``buffalo_sc``
models): ``cv2.imread`` (BGR), SCRFD at 640x640 (``model_zoo/scrfd.py``), ``norm_crop``
(``utils/face_align.py``) and ``ArcFaceONNX`` (``model_zoo/arcface_onnx.py``), one image at a
time, each network in a default ONNX Runtime session. Written here from that code's published
behaviour, step by step, so that arcdeploy can be compared with it on the same photos:

- letterbox: ``im_ratio = h / w``; when it is above the canvas's ratio the new height is the
  canvas height and ``new_width = int(new_height / im_ratio)``, else ``new_width`` is the canvas
  width and ``new_height = int(new_width * im_ratio)``; ``det_scale = new_height / h`` (one scale,
  taken from the height, for both axes); ``cv2.resize`` (bilinear) to that size, placed at the
  top-left of a zero canvas;
- ``cv2.dnn.blobFromImage(canvas, 1/128, size, (127.5,)*3, swapRB=True)``: RGB, ``(x - 127.5) / 128``;
- per stride 8, 16, 32 and 2 anchors per cell, centres ``(col * s, row * s)``; scores over the
  threshold (0.5); boxes ``centre -/+ distance * s``; keypoints ``centre + offset * s``;
- boxes and keypoints divided by ``det_scale``, sorted by score (``argsort()[::-1]``), NMS at 0.4 with
  the ``+ 1`` pixel convention in image coordinates (float32);
- ``norm_crop``: scikit-image ``SimilarityTransform`` from the 5 keypoints to the ArcFace template,
  ``cv2.warpAffine`` (bilinear, border 0) to 112x112;
- ``blobFromImages(crops, 1/127.5, (112, 112), (127.5,)*3, swapRB=True)`` -> ``ArcFaceONNX``
  (the raw embedding; insightface's ``normed_embedding`` divides it by its norm).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """scikit-image's SimilarityTransform estimate (what insightface calls), as a 2x3 matrix."""
    from skimage import transform

    if hasattr(transform.SimilarityTransform, "from_estimate"):
        tform = transform.SimilarityTransform.from_estimate(src, dst)
    else:
        tform = transform.SimilarityTransform()
        tform.estimate(src, dst)
    return tform.params[0:2, :]


def norm_crop(bgr: np.ndarray, landmark: np.ndarray) -> np.ndarray:
    m = _similarity(landmark, ARCFACE_TEMPLATE)
    return cv2.warpAffine(bgr, m, (112, 112), borderValue=0.0)


def _session(path, threads: int | None):
    so = onnxruntime.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Scrfd:
    """insightface's SCRFD class (5-keypoint models with 3 strides and 2 anchors)."""

    def __init__(self, path, input_size=(640, 640), threshold: float = 0.5, nms: float = 0.4, threads=None):
        self.session = _session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_size = tuple(input_size)
        self.threshold = threshold
        self.nms_threshold = nms
        self.strides = (8, 16, 32)
        self.anchors = 2
        self._centres: dict = {}

    def letterbox(self, img: np.ndarray) -> tuple[np.ndarray, float]:
        w_in, h_in = self.input_size
        im_ratio = float(img.shape[0]) / img.shape[1]
        model_ratio = float(h_in) / w_in
        if im_ratio > model_ratio:
            new_height = h_in
            new_width = int(new_height / im_ratio)
        else:
            new_width = w_in
            new_height = int(new_width * im_ratio)
        det_scale = float(new_height) / img.shape[0]
        resized = cv2.resize(img, (new_width, new_height))
        canvas = np.zeros((h_in, w_in, 3), dtype=np.uint8)
        canvas[:new_height, :new_width, :] = resized
        return canvas, det_scale

    def forward(self, canvas: np.ndarray):
        size = tuple(canvas.shape[0:2][::-1])
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, size, (127.5, 127.5, 127.5), swapRB=True)
        outs = self.session.run(self.output_names, {self.input_name: blob})
        h, w = blob.shape[2], blob.shape[3]
        scores_l, boxes_l, kps_l = [], [], []
        fmc = len(self.strides)
        for idx, stride in enumerate(self.strides):
            scores = outs[idx]
            box_d = outs[idx + fmc] * stride
            kps_d = outs[idx + 2 * fmc] * stride
            fh, fw = h // stride, w // stride
            key = (fh, fw, stride)
            if key not in self._centres:
                c = np.stack(np.mgrid[:fh, :fw][::-1], axis=-1).astype(np.float32)
                c = (c * stride).reshape((-1, 2))
                c = np.stack([c] * self.anchors, axis=1).reshape((-1, 2))
                self._centres[key] = c
            centres = self._centres[key]
            pos = np.where(scores >= self.threshold)[0]
            boxes = np.stack(
                [
                    centres[:, 0] - box_d[:, 0],
                    centres[:, 1] - box_d[:, 1],
                    centres[:, 0] + box_d[:, 2],
                    centres[:, 1] + box_d[:, 3],
                ],
                axis=-1,
            )
            preds = []
            for i in range(0, kps_d.shape[1], 2):  # distance2kps (i % 2 is 0: x from x, y from y)
                preds.append(centres[:, i % 2] + kps_d[:, i])
                preds.append(centres[:, i % 2 + 1] + kps_d[:, i + 1])
            kps = np.stack(preds, axis=-1).reshape((-1, 5, 2))
            scores_l.append(scores[pos])
            boxes_l.append(boxes[pos])
            kps_l.append(kps[pos])
        return scores_l, boxes_l, kps_l

    def detect(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(det [n, 5]: x1 y1 x2 y2 score, kps [n, 5, 2]) in image pixels, NMS order (score first)."""
        canvas, det_scale = self.letterbox(img)
        scores_l, boxes_l, kps_l = self.forward(canvas)
        scores = np.vstack(scores_l)
        order = scores.ravel().argsort()[::-1]
        boxes = np.vstack(boxes_l) / det_scale
        kpss = np.vstack(kps_l) / det_scale
        pre = np.hstack((boxes, scores)).astype(np.float32, copy=False)[order, :]
        keep = self.nms(pre)
        return pre[keep, :], kpss[order][keep]

    def nms(self, dets: np.ndarray) -> list[int]:
        x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        order = scores.argsort()[::-1]
        keep = []
        while order.size > 0:
            i = order[0]
            keep.append(i)
            xx1 = np.maximum(x1[i], x1[order[1:]])
            yy1 = np.maximum(y1[i], y1[order[1:]])
            xx2 = np.minimum(x2[i], x2[order[1:]])
            yy2 = np.minimum(y2[i], y2[order[1:]])
            w = np.maximum(0.0, xx2 - xx1 + 1)
            h = np.maximum(0.0, yy2 - yy1 + 1)
            inter = w * h
            ovr = inter / (areas[i] + areas[order[1:]] - inter)
            order = order[np.where(ovr <= self.nms_threshold)[0] + 1]
        return keep


class ArcFaceOnnx:
    """insightface's ArcFaceONNX for a model normalised as ``(x - 127.5) / 127.5`` (w600k_mbf)."""

    def __init__(self, path, threads=None):
        self.session = _session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def get_feat(self, crops: list[np.ndarray]) -> np.ndarray:
        blob = cv2.dnn.blobFromImages(crops, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
        return self.session.run(self.output_names, {self.input_name: blob})[0]


class InsightfaceLoop:
    """``FaceAnalysis(...).get(cv2.imread(path))`` for SCRFD + ArcFaceONNX: faces in NMS order, each
    with ``bbox``, ``kps``, ``det_score`` and its raw ``embedding`` (one crop per ArcFace call)."""

    def __init__(self, detector, recognition, det_size=(640, 640), threads=None):
        self.det = Scrfd(detector, det_size, threads=threads)
        self.rec = ArcFaceOnnx(recognition, threads=threads)

    def get(self, bgr: np.ndarray, embed: bool = True) -> list[dict]:
        det, kpss = self.det.detect(bgr)
        faces = []
        for i in range(det.shape[0]):
            face = {"bbox": det[i, 0:4], "kps": kpss[i], "det_score": float(det[i, 4])}
            if embed:
                face["embedding"] = self.rec.get_feat([norm_crop(bgr, kpss[i])]).flatten()
            faces.append(face)
        return faces

    def run_file(self, path: str | Path, embed: bool = True) -> list[dict]:
        return self.get(cv2.imread(str(path)), embed)
