"""Typed options of the build and run stages: what the Python API and the command line construct,
and what :func:`arcdeploy.builder.build` and :func:`arcdeploy.run.run_pipeline` take.

:class:`BuildOptions` describes one package build (the engine-level job an engine receives is
:class:`arcdeploy.engines.BuildJob`, made from it); :class:`RunOptions` the whole job of
``arcdeploy run``, whose packages are built with its ``build`` options, one precision each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .engines.registry import DEFAULT_ENGINE
from .errors import ArcdeployError
from .quantize import QuantRecipe
from .types import AUTO_PRECISION, Precision, PrecisionRequest, parse_precision_request


@dataclass
class CheckImages:
    """Aligned crops for a build's fidelity check and what they are."""

    faces: np.ndarray
    label: str
    source: str
    labels: Any = None  # arcdeploy.fidelity_groups.FaceLabels: each face's groups (None: colour only)


PathLike = str | os.PathLike


@dataclass
class BuildOptions:
    """How to build one package (everything but the source and the output folder).

    ``calib``: for int8, an image folder, list file, list of paths, or aligned uint8 crops
    [N, 112, 112, 3]; ``calib_landmarks`` a 5-point landmark file for photos, or ``calib_detector``
    a face detector (file or opened) that finds the largest face in each photo. ``batch``: the
    batch the model is compiled for (OpenVINO: a static shape). ``fold_preprocessing``: the
    graph takes uint8 NHWC RGB and normalises inside. ``check_images``: aligned crops, a folder /
    list of images (with ``check_landmarks``) or :class:`CheckImages` for the fidelity check
    (default: the calibration images the int8 build held out; else ``default_check_images``).
    ``recipe``: the int8 recipe (default :meth:`QuantRecipe.for_this_cpu`); ``fallback``: keep
    sensitive layers in float until the floor (or ``max_cosine_drop``) is met; ``strict``: below
    the floor, fail and write nothing. ``onnx_options``: ``input_mean`` / ``input_std`` / ``bgr``
    for a foreign ONNX. ``engine_options``: what the engine's builder reads (``performance_hint``,
    ``ort_quantizer``). ``input_size``: for a face detector source, its fixed canvas (width, height).
    ``accept_calib``: build int8 on a calibration set the recipe refuses (too few faces).
    ``precision="auto"``: choose the precision by evidence on this CPU
    (:func:`arcdeploy.auto_precision.build_auto`); ``auto_precision`` then says so, and ``precision``
    holds fp32 until each candidate's options replace it.
    """

    engine: str = DEFAULT_ENGINE
    precision: Precision = Precision.FP32
    arch: str = "auto"
    batch: int | None = None
    threads: int | None = None
    fold_preprocessing: bool = False
    calib: Any = None
    calib_landmarks: PathLike | None = None
    calib_detector: Any = None
    calib_count: int | None = None
    recipe: QuantRecipe | None = None
    fallback: bool = True
    max_cosine_drop: float | None = None
    check_images: Any = None
    check_landmarks: PathLike | None = None
    check_count: int | None = None
    default_check_images: CheckImages | None = None
    strict: bool = False
    force: bool = False
    onnx_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None  # a face detector's canvas (width, height)
    requested_precision: str = ""  # what the user asked for (an alias stays on record); default: precision
    accept_calib: bool = False  # int8: build even on a calibration set the recipe refuses
    auto_precision: bool = False  # precision "auto": the candidates are built and the choice kept

    def __post_init__(self) -> None:
        self.requested_precision = self.requested_precision or str(self.precision)
        if self.precision == AUTO_PRECISION:
            self.auto_precision, self.precision = True, Precision.FP32
        self.precision = Precision.parse(self.precision)
        self.engine = self.engine or DEFAULT_ENGINE
        self.onnx_options = dict(self.onnx_options or {})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> BuildOptions:
        """The keyword arguments of :func:`arcdeploy.build`: the fields by name; any other name is
        an engine option."""
        names = {f.name for f in fields(cls)}
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        kwargs["engine_options"] = {**(kwargs.get("engine_options") or {}), **extra}
        return cls(**kwargs)

    def validate(self) -> None:
        """One-line errors for values no build can take (before any work)."""
        for name, value in (("batch", self.batch), ("threads", self.threads), ("check-count", self.check_count)):
            if value is not None and int(value) < 1:
                raise ArcdeployError(f"--{name} must be at least 1, got {value}")
        if self.max_cosine_drop is not None and not 0 < float(self.max_cosine_drop) < 1:
            raise ArcdeployError(f"--max-cosine-drop must be between 0 and 1, got {self.max_cosine_drop}")


# auto: the candidates this CPU runs fast, then the run says which one to deploy
DEFAULT_RUN_PRECISIONS: tuple[PrecisionRequest, ...] = (AUTO_PRECISION,)


@dataclass
class RunOptions:
    """The whole job of ``arcdeploy run``: each package built with ``build`` (its precision each
    of ``precisions`` in turn; ``auto``: the candidates this CPU runs fast, see
    :func:`arcdeploy.auto_precision.candidates`), checked on ``check_images`` (default: generated
    faces), timed at ``batches`` (``iterations`` each, default the benchmark's duration), and
    evaluated on an IJB set (``ijb_root``, ``target``, ``ijb_flip``) and ``.bin`` sets (``bins``)
    where given. ``title`` and ``notes`` head the report; ``force`` writes into a folder with files
    arcdeploy did not write."""

    build: BuildOptions = field(default_factory=BuildOptions)
    precisions: tuple[PrecisionRequest, ...] = DEFAULT_RUN_PRECISIONS
    check_images: PathLike | None = None
    check_landmarks: PathLike | None = None
    ijb_root: PathLike | None = None
    target: str = "IJBC"
    ijb_flip: bool = True
    bins: tuple[PathLike, ...] = ()
    batches: tuple[int, ...] = (1, 16)
    iterations: int | None = None
    title: str | None = None
    notes: tuple[str, ...] = ()
    force: bool = False

    def __post_init__(self) -> None:
        self.precisions = tuple(parse_precision_request(p) for p in self.precisions)
        self.bins, self.batches, self.notes = tuple(self.bins), tuple(self.batches), tuple(self.notes or ())

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RunOptions:
        """The keyword arguments of :func:`arcdeploy.run.run_pipeline`: the fields by name, and the
        build's (``engine``, ``arch``, ``calib``, ``calib_landmarks``, ``threads``, ...) by theirs."""
        names = {f.name for f in fields(cls)}
        build = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        unknown = [k for k in build if k not in {f.name for f in fields(BuildOptions)}]
        if unknown:
            raise TypeError(f"run_pipeline() got unexpected keyword argument(s) {', '.join(unknown)}")
        return cls(build=BuildOptions(**build), **kwargs)
