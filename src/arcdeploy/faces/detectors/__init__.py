"""Face detectors: the interface (:mod:`.base`), one module per kind (:mod:`.scrfd`,
:mod:`.yunet`) and the registry that opens a file as the kind its graph says (:mod:`.registry`)."""

from .base import NMS_IOU, PAD_RETRY, FaceDetector, GraphIO, best_first, letterbox, letterbox_geometry, nms
from .registry import (
    DEFAULT_DETECTOR_ENGINE,
    DETECTOR_ENGINES,
    DETECTOR_KINDS,
    DETECTOR_THREADS,
    DetectorSpec,
    as_detector,
    inspect_detector,
    open_detector,
)

__all__ = [
    "DEFAULT_DETECTOR_ENGINE",
    "DETECTOR_ENGINES",
    "DETECTOR_KINDS",
    "DETECTOR_THREADS",
    "NMS_IOU",
    "PAD_RETRY",
    "DetectorSpec",
    "FaceDetector",
    "GraphIO",
    "as_detector",
    "best_first",
    "inspect_detector",
    "letterbox",
    "letterbox_geometry",
    "nms",
    "open_detector",
]
