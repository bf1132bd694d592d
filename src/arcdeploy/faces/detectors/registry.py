"""The detector kinds, and opening a detector file as the kind its graph says it is.

Adding a detector kind is one module beside this one (a :class:`FaceDetector` subclass) and
one line in :data:`DETECTOR_KINDS`. Kinds are tried in order; the first whose
:meth:`~FaceDetector.recognise` accepts the graph opens the file.

A :class:`DetectorSpec` is how a detector is opened (its file and settings): small and
picklable, so a job can carry it to other threads, processes and machines and open the same
detector there.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
from pathlib import Path

from ...errors import ArcdeployError
from ...machine import check_threads
from .base import DECODES, DEFAULT_DECODE, PAD_RETRY, FaceDetector, GraphIO, read_graph_io

# kind -> (module, class); tried in this order
DETECTOR_KINDS: dict[str, tuple[str, str]] = {
    "yunet": ("arcdeploy.faces.detectors.yunet", "YuNetDetector"),
    "scrfd": ("arcdeploy.faces.detectors.scrfd", "ScrfdDetector"),
}
# what runs a graph-based detector when nobody says (YuNet always runs in OpenCV)
DEFAULT_DETECTOR_ENGINE = "onnxruntime"
DETECTOR_ENGINES = ("onnxruntime", "openvino")
# engine threads per detector call when arcdeploy opens the detector: several preparation
# workers call the one shared detector at once, so each call gets few threads (measured with
# benchmarks/bench_e2e_detect.py: one thread per call is the fastest on 2 cores)
DETECTOR_THREADS = 1

# how the cores are shared when photos are embedded with a detector: one preparation worker more than
# the cores (faces/job.py, measured there), each detector call on one engine thread (above), and the
# recognition engine on every core, its engine's own default (its threads wait while the workers'
# calls run). Measured on a quiet 2-core machine (benchmarks/bench_photos.py's packages, 4 interleaved
# rounds each): recognition on both cores against one, 1.07-1.08x on 12 MP photos, 1.23x on LFW-size
# photos with the 640 detector, 1.44x with a 256x256 detector package (the smaller the photo, the more
# of the work is recognition). An earlier grid on a busy machine (load 4-8) had found one recognition
# thread better on 12 MP photos (every core 0.89-0.95x); on a quiet one it is not.

log = logging.getLogger(__name__)


def detector_class(kind: str) -> type[FaceDetector]:
    module, name = DETECTOR_KINDS[kind]
    return getattr(importlib.import_module(module), name)


def inspect_detector(path: str | os.PathLike) -> type[FaceDetector]:
    """The detector class for the file at ``path``; a one-line error saying what was found when
    the file is no kind of detector."""
    if Path(path).is_dir():
        from .package import check_package_folder

        check_package_folder(path)
        return detector_class("scrfd")
    graph = read_graph_io(path)
    return _kind_of(graph)


def kind_of_graph(graph: GraphIO) -> type[FaceDetector] | None:
    """The detector class of a graph, None when it is no detector (a recognition model, say); a
    detector the kinds refuse (a near miss, e.g. SCRFD without keypoints) is a one-line error."""
    for kind in DETECTOR_KINDS:
        cls = detector_class(kind)
        if cls.recognise(graph):
            return cls
    return None


def _kind_of(graph: GraphIO) -> type[FaceDetector]:
    found = kind_of_graph(graph)
    if found is not None:
        return found
    raise ArcdeployError(f"{graph.path}: not a face detector: {graph.summary()}{graph.looks_like()}")


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """A detector file and the settings to open it with.

    ``engine`` runs graph-based kinds (``onnxruntime`` or ``openvino``; YuNet always runs in
    OpenCV). ``threshold``: minimum detection score (None: the kind's default, 0.5 for SCRFD as
    insightface, 0.6 for YuNet). ``min_face``: faces whose box's shorter side is under this many
    pixels are left out. ``threads``: engine threads per call (None: the engine's default).
    ``input_size`` (width, height): SCRFD's canvas when its input is dynamic (default 640 x 640).
    ``pad_retry``: see
    :meth:`FaceDetector.detect` (0: no second try). ``decode``: "full" (default), "reduced"
    (large JPEGs decoded at 1/2 to 1/8 for detection, see :mod:`arcdeploy.faces.prepare`) or "planes"
    (large JPEGs held as their Y, Cb, Cr planes, :mod:`arcdeploy.faces.jpeg_planes`). ``batch``:
    canvases per network call for a graph with a batch axis (None: the kind's default)."""

    path: Path
    engine: str = DEFAULT_DETECTOR_ENGINE
    threshold: float | None = None
    min_face: float = 0.0
    threads: int | None = None
    input_size: tuple[int, int] | None = None
    pad_retry: float = PAD_RETRY
    decode: str = DEFAULT_DECODE
    batch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ArcdeployError(f"detection threshold must be between 0 and 1, got {self.threshold:g}")
        if not (isinstance(self.min_face, (int, float)) and math.isfinite(self.min_face) and self.min_face >= 0):
            raise ArcdeployError(f"minimum face size must be a number of pixels, 0 or more, got {self.min_face}")
        if self.decode not in DECODES:
            raise ArcdeployError(f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.batch is not None and int(self.batch) < 1:
            raise ArcdeployError(f"detector batch must be at least 1, got {self.batch}")
        check_threads(self.threads, "detector threads")
        if self.input_size is not None:
            w, h = (int(v) for v in self.input_size)
            if w < 32 or h < 32:
                raise ArcdeployError(f"detector input size must be at least 32x32, got {w}x{h}")
            object.__setattr__(self, "input_size", (w, h))

    def open(self) -> FaceDetector:
        """The detector, opened as this spec says (the file's kind read from its graph; a detector
        package folder as its manifest says)."""
        detector: FaceDetector
        if self.path.is_dir():
            from .package import open_detector_package

            detector = open_detector_package(self)
        else:
            graph = read_graph_io(self.path)
            detector = _kind_of(graph).from_spec(graph, self)
        detector.spec = self
        if self.decode == "planes":
            from ..jpeg_planes import planes_available

            if not planes_available():  # said once per opening, not per photo
                log.warning(
                    "decode planes: libturbojpeg is not installed (Debian/Ubuntu: apt install libturbojpeg0); "
                    "photos are decoded in full"
                )
        return detector

    def with_path(self, path: str | os.PathLike) -> DetectorSpec:
        """The same settings for a copy of the file elsewhere (e.g. unpacked on a worker)."""
        return dataclasses.replace(self, path=Path(path))


def open_detector(path: str | os.PathLike, **settings) -> FaceDetector:
    """The detector in ``path`` (SCRFD or YuNet, recognised from the graph), opened with the
    settings of :class:`DetectorSpec` (engine, threshold, min_face, threads, input_size, pad_retry,
    decode, batch)."""
    return DetectorSpec(Path(path), **settings).open()


def as_detector(detector, **settings) -> DetectorSpec | FaceDetector | None:
    """``detector`` as a job holds it: None, an opened :class:`FaceDetector` (kept as it is), a
    :class:`DetectorSpec`, or a detector file (a spec with ``settings``; arcdeploy's own callers
    share one detector between preparation workers, so :data:`DETECTOR_THREADS` engine threads per
    call unless the settings say otherwise)."""
    if detector is None or isinstance(detector, (DetectorSpec, FaceDetector)):
        if detector is not None and any(v is not None for v in settings.values()):
            raise ArcdeployError("detector settings apply to a detector file, not to an opened detector")
        return detector
    if not isinstance(detector, (str, os.PathLike)):
        raise ArcdeployError(f"detector: expected a detector file or an opened detector, got {type(detector).__name__}")
    given = {k: v for k, v in settings.items() if v is not None}
    given.setdefault("threads", DETECTOR_THREADS)
    return DetectorSpec(Path(detector), **given)
