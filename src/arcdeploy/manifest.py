"""Typed manifests: what a package or an export folder is, read and written with validation.

- :class:`InputSpec` is the one home of the input convention (size, layout, colour
  order, dtype, normalisation, whether the graph normalises itself) and turns
  aligned uint8 RGB crops into the model's input (:meth:`InputSpec.to_model_input`).
- :class:`OutputSpec`: the embedding's name, size (512 and 128 both exist) and
  whether the model already L2-normalises it.
- :class:`PackageManifest` / :class:`ExportManifest`: ``manifest.json`` of a package /
  an export folder. Reading checks every required key and type; a problem is one
  line naming the file. Files a manifest names must stay inside its folder.
- What a package records, each a typed record read and written the same way:
  :class:`SourceRecord` (the model it came from), :class:`VerificationRecord` (the
  export's self-check), :class:`ExportRecord`, :class:`CalibrationRecord` (int8),
  :class:`ExecutedRecord` (what the engine runs), :class:`FidelityRecord` (the check
  against the fp32 reference, with :class:`CosineStats`, and by group:
  :class:`FidelityGroupsRecord` of :class:`GroupFidelityRecord`), :class:`HostRecord`;
  :class:`CalibrationSetRecord` (the calibration set against the recipe's needs) and
  :class:`PrecisionChoiceRecord` (what ``--precision auto`` chose, and why).
  ``engine_config`` stays a name -> value map: it belongs to the engine that reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import ArcdeployError
from .types import Device, FloatLayerPrecision, Precision

PACKAGE_FORMAT_NAME = "arcdeploy-package"
PACKAGE_FORMAT_VERSION = 2
PACKAGE_FORMAT = f"{PACKAGE_FORMAT_NAME}/{PACKAGE_FORMAT_VERSION}"
EXPORT_FORMAT_NAME = "arcdeploy-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_FORMAT = f"{EXPORT_FORMAT_NAME}/{EXPORT_FORMAT_VERSION}"
MANIFEST_NAME = "manifest.json"

ALIGNED_SIZE = 112
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


# ------------------------------------------------------------------ validation helpers


class _Reader:
    """Typed access to one JSON object, with errors that name the file and the key."""

    def __init__(self, data: Any, source: str, where: str = ""):
        if not isinstance(data, dict):
            raise ArcdeployError(f"{source}: {where or 'the manifest'} is not a JSON object")
        self.data, self.source, self.where = data, source, where

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(
        self,
        key: str,
        types: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise ArcdeployError(f"{self.source}: missing {self._key(key)!r}")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ArcdeployError(f"{self.source}: {self._key(key)!r} must be {names}, got {type(value).__name__}")
        return value

    def obj(self, key: str, default: Any = ...) -> _Reader | None:
        value = self.get(key, dict, default)
        return None if value is None or value is default else _Reader(value, self.source, self._key(key))

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not default and value not in choices:
            raise ArcdeployError(
                f"{self.source}: {self._key(key)!r} is {value!r}; expected one of {', '.join(choices)}"
            )
        return value

    def str_list(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, list, default)
        if value is not default and not all(isinstance(v, str) for v in value):
            raise ArcdeployError(f"{self.source}: {self._key(key)!r} must be a list of strings")
        return value

    def str_map(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, dict, default)
        if value is not default and not all(isinstance(v, str) for v in value.values()):
            raise ArcdeployError(f"{self.source}: {self._key(key)!r} must map names to strings")
        return value

    def number_map(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, dict, default)
        if value is not default and not all(_number(v) for v in value.values()):
            raise ArcdeployError(f"{self.source}: {self._key(key)!r} must map names to numbers")
        return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def safe_relpath(name: Any, source: str, what: str) -> str:
    """A file name from a manifest: relative, no '..', no empty parts, no backslashes."""
    if not isinstance(name, str) or not name:
        raise ArcdeployError(f"{source}: {what} must be a file name, got {name!r}")
    p = PurePosixPath(name)
    if (
        p.is_absolute()
        or name.startswith(("/", "\\"))
        or "\\" in name
        or ":" in p.parts[0]
        or any(part in ("", "..") for part in p.parts)
    ):
        raise ArcdeployError(f"{source}: {what} {name!r} points outside the package; refused")
    return str(p)


def resolve_inside(root: str | os.PathLike, name: str, source: str, what: str) -> Path:
    """``root / name``, refused when it (or a link on the way) leads outside ``root``."""
    rel = safe_relpath(name, source, what)
    root_real = Path(root).resolve()
    path = root_real / rel
    real = path.resolve()
    if real != root_real and root_real not in real.parents:
        raise ArcdeployError(f"{source}: {what} {name!r} leads outside the package (through a link); refused")
    return path


# ------------------------------------------------------------------ input / output


@dataclass(frozen=True)
class InputSpec:
    """How aligned faces become the model's input tensor.

    The tensor holds pixels in ``color`` order and ``layout``, of ``dtype``. When
    ``normalize_in_graph`` is set the tensor takes raw 0..255 values and the graph
    normalises inside (``mean``/``std`` then say what it does there); otherwise the
    tensor holds ``(pixel - mean) / std``.
    """

    name: str = "input"
    layout: str = "NCHW"  # NCHW | NHWC
    color: str = "RGB"  # RGB | BGR
    dtype: str = "float32"  # float32 | uint8
    size: tuple[int, int] = (ALIGNED_SIZE, ALIGNED_SIZE)
    mean: float | tuple[float, ...] = PIXEL_MEAN
    std: float | tuple[float, ...] = PIXEL_STD
    normalize_in_graph: bool = False

    LAYOUTS = ("NCHW", "NHWC")
    COLORS = ("RGB", "BGR")
    DTYPES = ("float32", "uint8")

    def folded(self) -> InputSpec:
        """The spec of the same model with uint8 NHWC input and normalisation inside the graph."""
        return replace(self, layout="NHWC", dtype="uint8", normalize_in_graph=True)

    def to_model_input(self, faces: np.ndarray) -> np.ndarray:
        """Aligned uint8 RGB crops [N, H, W, 3] (or one [H, W, 3]) -> the model's input tensor."""
        faces = np.asarray(faces)
        if faces.ndim == 3:
            faces = faces[None]
        h, w = self.size
        if faces.ndim != 4 or faces.shape[1:] != (h, w, 3):
            raise ValueError(f"expected aligned crops [N, {h}, {w}, 3], got {list(faces.shape)}")
        if self.color == "BGR":
            faces = faces[..., ::-1]
        if self.dtype == "uint8":
            x = faces if self.layout == "NHWC" else faces.transpose(0, 3, 1, 2)
            return np.ascontiguousarray(x, dtype=np.uint8)
        x = (faces.transpose(0, 3, 1, 2) if self.layout == "NCHW" else faces).astype(np.float32)
        if not self.normalize_in_graph:
            axis_shape = (1, 3, 1, 1) if self.layout == "NCHW" else (1, 1, 1, 3)
            mean, std = self.norm_vectors()
            x -= mean.reshape(axis_shape) if mean.size == 3 else mean[0]
            x /= std.reshape(axis_shape) if std.size == 3 else std[0]
        return np.ascontiguousarray(x)

    def norm_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``mean`` and ``std`` as float32 vectors (one value, or one per channel in ``color`` order)."""
        return np.asarray(self.mean, np.float32).reshape(-1), np.asarray(self.std, np.float32).reshape(-1)

    def describe(self) -> str:
        norm = f"(x - {format_norm(self.mean)}) / {format_norm(self.std)}"
        where = f"raw 0..255 pixels, normalised inside the graph as {norm}" if self.normalize_in_graph else norm
        return f"{self.color} {self.layout} {self.dtype} {self.size[0]}x{self.size[1]}, {where}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "color": self.color,
            "dtype": self.dtype,
            "size": list(self.size),
            "normalize": {"mean": _json_norm(self.mean), "std": _json_norm(self.std)},
            "normalize_in_graph": self.normalize_in_graph,
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "input") -> InputSpec:
        r = _Reader(data, source, where)
        size = r.get("size", list, [ALIGNED_SIZE, ALIGNED_SIZE])
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise ArcdeployError(f"{source}: '{where}.size' must be [height, width], got {size!r}")
        norm = r.obj("normalize", None)
        mean: Any = PIXEL_MEAN
        std: Any = PIXEL_STD
        if norm is not None:
            mean = _norm_value(norm.get("mean", (int, float, list)), source, f"{where}.normalize.mean")
            std = _norm_value(norm.get("std", (int, float, list)), source, f"{where}.normalize.std")
        return cls(
            name=r.get("name", str, "input"),
            layout=r.choice("layout", cls.LAYOUTS, "NCHW"),
            color=r.choice("color", cls.COLORS, "RGB"),
            dtype=r.choice("dtype", cls.DTYPES, "float32"),
            size=(int(size[0]), int(size[1])),
            mean=mean,
            std=std,
            normalize_in_graph=r.get("normalize_in_graph", bool, False),
        )


def norm_value(values: Any, digits: int | None = None) -> float | tuple[float, ...]:
    """A normalisation constant as an :class:`InputSpec` holds it: one number, or three per-channel
    ones (three equal ones collapse to one); ``digits``: rounded to that many significant digits."""
    vals = tuple(float(x) for x in np.asarray(values, np.float64).reshape(-1))
    if digits is not None:
        vals = tuple(float(f"{x:.{digits}g}") for x in vals)
    return vals[0] if len(set(vals)) == 1 else vals


def format_norm(v: float | tuple[float, ...]) -> str:
    """``127.5`` or ``103.94/116.78/123.68``."""
    return "/".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"


def _json_norm(v: float | tuple[float, ...]) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _norm_value(v: Any, source: str, key: str) -> float | tuple[float, ...]:
    if isinstance(v, list):
        if len(v) != 3 or not all(_number(x) for x in v):
            raise ArcdeployError(f"{source}: {key!r} must be a number or 3 numbers, got {v!r}")
        return norm_value(v)
    if not _number(v):
        raise ArcdeployError(f"{source}: {key!r} must be a number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class OutputSpec:
    """The embedding the model returns: [N, dim]."""

    name: str = "embedding"
    dim: int = 512
    normalized: bool = False  # the model already L2-normalises its output

    def to_json(self) -> dict:
        return {"name": self.name, "dim": self.dim, "shape": ["batch", self.dim], "normalized": self.normalized}

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "output") -> OutputSpec:
        r = _Reader(data, source, where)
        dim = r.get("dim", int, None)
        if dim is None:  # older manifests: only the shape
            shape = r.get("shape", list, ["batch", 512])
            dim = shape[-1] if shape and isinstance(shape[-1], int) else 512
        if dim < 1:
            raise ArcdeployError(f"{source}: '{where}.dim' must be positive, got {dim}")
        return cls(name=r.get("name", str, "embedding"), dim=int(dim), normalized=r.get("normalized", bool, False))


# ------------------------------------------------------------------ references

REFERENCE_KINDS = ("torchscript", "onnx")


@dataclass(frozen=True)
class ReferenceSpec:
    """The fp32 model a package is checked against, stored inside the package."""

    file: str
    kind: str = "torchscript"  # torchscript (a checkpoint's) | onnx (a foreign model's source)
    sha256: str | None = None
    input: InputSpec | None = None  # the reference's own input convention (None: the package's float one)
    batch: int | None = None  # the only batch it runs correctly at (a fixed or traced one); None: any

    def to_json(self) -> dict:
        d: dict[str, Any] = {"file": self.file, "kind": self.kind, "precision": "fp32", "sha256": self.sha256}
        if self.input is not None:
            d["input"] = self.input.to_json()
        if self.batch is not None:
            d["batch"] = self.batch
        return d

    @classmethod
    def from_json(cls, data: Any, source: str) -> ReferenceSpec:
        r = _Reader(data, source, "reference")
        inp = r.get("input", dict, None)
        batch = r.get("batch", int, None)
        if batch is not None and batch < 1:
            raise ArcdeployError(f"{source}: 'reference.batch' must be at least 1, got {batch}")
        return cls(
            file=safe_relpath(r.get("file", str), source, "reference.file"),
            kind=r.choice("kind", REFERENCE_KINDS, "torchscript"),
            sha256=r.get("sha256", str, None),
            input=InputSpec.from_json(inp, source, "reference.input") if inp is not None else None,
            batch=batch,
        )


# ------------------------------------------------------------------ what a package records


def _omit_none(d: dict) -> dict:
    """A record's JSON without its absent optional keys (as the manifest has always been written)."""
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class CosineStats:
    """Per-image cosine to the fp32 reference: mean, min, 1st percentile, max over ``n`` images."""

    mean: float
    min: float
    p1: float
    max: float
    n: int

    @classmethod
    def of(cls, cos: np.ndarray) -> CosineStats:
        return cls(float(cos.mean()), float(cos.min()), float(np.percentile(cos, 1)), float(cos.max()), int(cos.size))

    def to_json(self) -> dict:
        return {"mean": self.mean, "min": self.min, "p1": self.p1, "max": self.max, "n": self.n}

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "cosine") -> CosineStats:
        r = _Reader(data, source, where)
        num = (int, float)
        return cls(r.get("mean", num), r.get("min", num), r.get("p1", num), r.get("max", num), r.get("n", int))


@dataclass(frozen=True)
class GroupFidelityRecord:
    """Per-image cosine to fp32 of one group of check faces (``axis``: colour, face size, folder)."""

    axis: str
    group: str
    n: int
    mean: float
    min: float
    p1: float
    judged: tuple[str, ...]  # the floor's keys applied to this group ("min" only for small groups)
    below_floor: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.below_floor

    @property
    def label(self) -> str:
        return f"{self.axis}: {self.group}"

    def to_json(self) -> dict:
        return {
            "axis": self.axis,
            "group": self.group,
            "n": self.n,
            "mean": self.mean,
            "min": self.min,
            "p1": self.p1,
            "judged": list(self.judged),
            "passed": self.passed,
            "below_floor": list(self.below_floor),
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> GroupFidelityRecord:
        r = _Reader(data, source, where)
        n = r.get("n", int)
        if n < 1:
            raise ArcdeployError(f"{source}: '{where}.n' must be at least 1, got {n}")
        num = (int, float)
        return cls(
            axis=r.get("axis", str),
            group=r.get("group", str),
            n=n,
            mean=float(r.get("mean", num)),
            min=float(r.get("min", num)),
            p1=float(r.get("p1", num)),
            judged=tuple(r.str_list("judged")),
            below_floor=tuple(r.str_list("below_floor", [])),
        )


@dataclass(frozen=True)
class FidelityGroupsRecord:
    """A fidelity check by group (:mod:`arcdeploy.fidelity_groups`): the worst group is the
    verdict; the lowest faces are named with their groups."""

    groups: tuple[GroupFidelityRecord, ...]
    worst: str | None  # label of the group closest to (or furthest below) the floor
    lowest: tuple[dict, ...] = ()  # [{"name", "cosine", "groups": {axis: group}}], lowest first
    min_faces_for_mean: int = 8

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.groups)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "worst": self.worst,
            "min_faces_for_mean": self.min_faces_for_mean,
            "groups": [g.to_json() for g in self.groups],
            "lowest": [dict(x) for x in self.lowest],
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "fidelity.groups") -> FidelityGroupsRecord:
        r = _Reader(data, source, where)
        groups = r.get("groups", list)
        lowest = r.get("lowest", list, [])
        if not all(isinstance(x, dict) for x in lowest):
            raise ArcdeployError(f"{source}: '{where}.lowest' must be a list of objects")
        return cls(
            groups=tuple(
                GroupFidelityRecord.from_json(g, source, f"{where}.groups[{i}]") for i, g in enumerate(groups)
            ),
            worst=r.get("worst", str, None),
            lowest=tuple(lowest),
            min_faces_for_mean=r.get("min_faces_for_mean", int, 8),
        )


@dataclass(frozen=True)
class FidelityRecord:
    """A package's fidelity check as its manifest keeps it (no per-image values); ``groups``: the
    same check by group, whose worst group is the verdict (absent in packages checked before)."""

    cosine: CosineStats
    reference: str  # what the package was compared with
    images: str  # which images, in words
    images_source: str
    engine: str
    precision: Precision
    floor: dict[str, float]
    passed: bool
    below_floor: list[str]
    groups: FidelityGroupsRecord | None = None

    @property
    def worst_group(self) -> str | None:
        return self.groups.worst if self.groups is not None else None

    def to_json(self) -> dict:
        out = {
            "cosine": self.cosine.to_json(),
            "reference": self.reference,
            "images": self.images,
            "images_source": self.images_source,
            "engine": self.engine,
            "precision": self.precision,
            "floor": dict(self.floor),
            "passed": self.passed,
            "below_floor": list(self.below_floor),
        }
        if self.groups is not None:
            out["groups"] = self.groups.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "fidelity") -> FidelityRecord:
        r = _Reader(data, source, where)
        groups = r.get("groups", dict, None)
        return cls(
            cosine=CosineStats.from_json(r.get("cosine", dict), source, f"{where}.cosine"),
            reference=r.get("reference", str),
            images=r.get("images", str),
            images_source=r.get("images_source", str),
            engine=r.get("engine", str),
            precision=Precision(r.choice("precision", tuple(Precision))),
            floor=r.number_map("floor"),
            passed=r.get("passed", bool),
            below_floor=r.str_list("below_floor", []),
            groups=FidelityGroupsRecord.from_json(groups, source, f"{where}.groups") if groups else None,
        )


@dataclass
class ExecutedRecord:
    """What the engine reported it really runs: the inference precision and, where it can tell,
    the precision of each kind of compute layer ({"Convolution": {"u8": 21, "f32": 2}, ...})."""

    inference_precision: str
    layers: dict[str, dict[str, int]] | None = None
    note: str | None = None

    def to_json(self) -> dict:
        return _omit_none({"inference_precision": self.inference_precision, "layers": self.layers, "note": self.note})

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "executed") -> ExecutedRecord:
        r = _Reader(data, source, where)
        layers = r.get("layers", dict, None)
        if layers is not None and not all(
            isinstance(v, dict) and all(isinstance(n, int) for n in v.values()) for v in layers.values()
        ):
            raise ArcdeployError(f"{source}: '{where}.layers' must map layer kinds to counts per precision")
        return cls(r.get("inference_precision", str), layers, r.get("note", str, None))


@dataclass(frozen=True)
class CalibrationSetRecord:
    """What an int8 build's calibration set was, measured (:mod:`arcdeploy.calibration_set`), against
    what the recipe needs from one; the warnings the build gave about it."""

    count: int
    grayscale: int
    min_faces: int  # under this the build refuses the set (unless accepted)
    advised_faces: int  # under this it warns
    people: str  # what the recipe needs of the people, in words
    warnings: tuple[str, ...] = ()
    median_cosine: float | None = None  # between the fp32 embeddings of a sample of the faces
    faces_sampled: int | None = None
    looks_like_one_person: bool | None = None

    @property
    def colour(self) -> int:
        return self.count - self.grayscale

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "count": self.count,
            "grayscale": self.grayscale,
            "colour": self.colour,
            "needs": {"min_faces": self.min_faces, "advised_faces": self.advised_faces, "people": self.people},
            "warnings": list(self.warnings),
        }
        if self.median_cosine is not None:
            out["people_check"] = {
                "median_cosine": self.median_cosine,
                "faces_sampled": self.faces_sampled,
                "looks_like_one_person": self.looks_like_one_person,
            }
        return out

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "calibration.set") -> CalibrationSetRecord:
        r = _Reader(data, source, where)
        needs = r.obj("needs")
        assert needs is not None
        people = r.obj("people_check", None)
        count, gray = r.get("count", int), r.get("grayscale", int)
        if not 0 <= gray <= count:
            raise ArcdeployError(f"{source}: '{where}.grayscale' must be between 0 and 'count' ({count}), got {gray}")
        return cls(
            count=count,
            grayscale=gray,
            min_faces=needs.get("min_faces", int),
            advised_faces=needs.get("advised_faces", int),
            people=needs.get("people", str),
            warnings=tuple(r.str_list("warnings", [])),
            median_cosine=float(people.get("median_cosine", (int, float))) if people else None,
            faces_sampled=people.get("faces_sampled", int) if people else None,
            looks_like_one_person=people.get("looks_like_one_person", bool) if people else None,
        )


@dataclass
class CalibrationRecord:
    """How an int8 package was calibrated: the recipe's entry (:meth:`QuantRecipe.manifest_entry`),
    the images it saw, and the accuracy-aware fallback's record when it ran."""

    method: str
    recipe: dict  # QuantRecipe.to_json()
    count: int
    kept_float: list[str]
    kept_float_why: dict[str, str]
    seven_bit_weights: bool
    float_layers_execute: FloatLayerPrecision
    input_channel_spread: dict[str, float] | None = None  # of the layers kept in float for their spread
    source: str | None = None  # the calibration images
    preprocessing: str | None = None  # how they became aligned crops
    skipped: list[str] | None = None  # the first unusable ones
    skipped_count: int | None = None
    fallback: dict | None = None  # the accuracy-aware fallback's record (arcdeploy.fallback)
    calibration_set: CalibrationSetRecord | None = None  # the set measured against the recipe's needs

    def with_images_of(self, other: CalibrationRecord | None) -> CalibrationRecord:
        """This entry with what ``other`` says about the calibration images (a rebuild keeps them)."""
        if other is None:
            return self
        return replace(
            self,
            source=other.source,
            preprocessing=other.preprocessing,
            skipped=other.skipped,
            skipped_count=other.skipped_count,
            calibration_set=other.calibration_set,
        )

    def to_json(self) -> dict:
        out = _omit_none({f.name: getattr(self, f.name) for f in fields(self)})
        if self.calibration_set is not None:
            out["set"] = out.pop("calibration_set").to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "calibration") -> CalibrationRecord:
        r = _Reader(data, source, where)
        return cls(
            method=r.get("method", str),
            recipe=r.get("recipe", dict),
            count=r.get("count", int),
            kept_float=r.str_list("kept_float", []),
            kept_float_why=r.str_map("kept_float_why", {}),
            seven_bit_weights=r.get("seven_bit_weights", bool, False),
            float_layers_execute=FloatLayerPrecision(
                r.choice("float_layers_execute", tuple(FloatLayerPrecision), FloatLayerPrecision.F32)
            ),
            input_channel_spread=r.number_map("input_channel_spread", None),
            source=r.get("source", str, None),
            preprocessing=r.get("preprocessing", str, None),
            skipped=r.str_list("skipped", None),
            skipped_count=r.get("skipped_count", int, None),
            fallback=r.get("fallback", dict, None),
            calibration_set=CalibrationSetRecord.from_json(cs, source, f"{where}.set")
            if (cs := r.get("set", dict, None))
            else None,
        )


SOURCE_KINDS = ("checkpoint", "onnx")


@dataclass
class SourceRecord:
    """The model a package or an export folder was made from."""

    kind: str  # checkpoint | onnx
    path: str
    sha256: str
    notes: list[str] | None = None  # checkpoint: what was unwrapped on reading it
    detected: dict | None = None  # foreign ONNX: what was read off the graph, and how
    overrides: dict | None = None  # foreign ONNX: the user's convention overrides
    model_changes: list[str] | None = None  # foreign ONNX: every rewrite of model.onnx

    def to_json(self) -> dict:
        return _omit_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "source") -> SourceRecord:
        r = _Reader(data, source, where)
        return cls(
            kind=r.choice("kind", SOURCE_KINDS),
            path=r.get("path", str),
            sha256=r.get("sha256", str),
            notes=r.str_list("notes", None),
            detected=r.get("detected", dict, None),
            overrides=r.get("overrides", dict, None),
            model_changes=r.str_list("model_changes", None),
        )


@dataclass
class VerificationRecord:
    """An export's self-check: the worst relative error of each checked graph against the
    reference, at each batch, within ``tolerance``."""

    tolerance: float
    batches: list[int]
    relative_error: dict[str, float]
    reference: str | None = None  # foreign ONNX: the file model.onnx is checked against
    engine: str | None = None
    source_batch: int | str | None = None  # the batch the reference runs at ("any")
    how: str | None = None

    def to_json(self) -> dict:
        return _omit_none({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "verification") -> VerificationRecord:
        r = _Reader(data, source, where)
        batches = r.get("batches", list)
        if not all(isinstance(b, int) and not isinstance(b, bool) for b in batches):
            raise ArcdeployError(f"{source}: '{where}.batches' must be a list of batch sizes")
        return cls(
            tolerance=r.get("tolerance", (int, float)),
            batches=batches,
            relative_error=r.number_map("relative_error"),
            reference=r.get("reference", str, None),
            engine=r.get("engine", str, None),
            source_batch=r.get("source_batch", (int, str), None),
            how=r.get("how", str, None),
        )


@dataclass
class ExportRecord:
    """What a package keeps of the export folder it was built from."""

    opset: int | None = None
    verification: VerificationRecord | None = None
    input: InputSpec | None = None  # the export's own input (before folded preprocessing)

    def to_json(self) -> dict:
        return {
            "opset": self.opset,
            "verification": self.verification.to_json() if self.verification else None,
            "input": self.input.to_json() if self.input else None,
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "export") -> ExportRecord:
        r = _Reader(data, source, where)
        ver, inp = r.get("verification", dict, None), r.get("input", dict, None)
        return cls(
            opset=r.get("opset", int, None),
            verification=VerificationRecord.from_json(ver, source, f"{where}.verification") if ver else None,
            input=InputSpec.from_json(inp, source, f"{where}.input") if inp else None,
        )


@dataclass
class HostRecord:
    """The machine a package was built on."""

    cpu: str
    flags: list[str]

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "flags": list(self.flags)}

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "host") -> HostRecord:
        r = _Reader(data, source, where)
        return cls(cpu=r.get("cpu", str), flags=r.str_list("flags", []))


@dataclass(frozen=True)
class PrecisionCandidateRecord:
    """One precision ``--precision auto`` considered: its speed on this CPU and its fidelity verdict."""

    precision: Precision
    images_per_s: float | None = None
    vs_fp32: float | None = None  # median over rounds of its speed over fp32's in the same round
    passed: bool | None = None  # its floor met on every group of the check images
    worst_group: str | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    note: str | None = None  # why it was not built or not timed

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> PrecisionCandidateRecord:
        r = _Reader(data, source, where)
        num = (int, float)
        return cls(
            precision=Precision(r.choice("precision", tuple(Precision))),
            images_per_s=r.get("images_per_s", num, None),
            vs_fp32=r.get("vs_fp32", num, None),
            passed=r.get("passed", bool, None),
            worst_group=r.get("worst_group", str, None),
            cosine_mean=r.get("cosine_mean", num, None),
            cosine_min=r.get("cosine_min", num, None),
            note=r.get("note", str, None),
        )


@dataclass(frozen=True)
class PrecisionChoiceRecord:
    """Why ``--precision auto`` kept the precision it kept (:mod:`arcdeploy.auto_precision`)."""

    chosen: Precision
    why: str
    candidates: tuple[PrecisionCandidateRecord, ...]
    how: str = ""  # how speed was measured
    cpu: str = ""
    flags: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "chosen": self.chosen,
            "why": self.why,
            "candidates": [c.to_json() for c in self.candidates],
            "how": self.how,
            "cpu": self.cpu,
            "flags": list(self.flags),
        }

    @classmethod
    def from_json(cls, data: Any, source: str, where: str = "precision_choice") -> PrecisionChoiceRecord:
        r = _Reader(data, source, where)
        cands = r.get("candidates", list)
        return cls(
            chosen=Precision(r.choice("chosen", tuple(Precision))),
            why=r.get("why", str),
            candidates=tuple(
                PrecisionCandidateRecord.from_json(c, source, f"{where}.candidates[{i}]") for i, c in enumerate(cands)
            ),
            how=r.get("how", str, ""),
            cpu=r.get("cpu", str, ""),
            flags=tuple(r.str_list("flags", [])),
        )


def _record(r: _Reader, key: str, cls: Any) -> Any:
    data = r.get(key, dict, None)
    return cls.from_json(data, r.source) if data else None


# ------------------------------------------------------------------ the package manifest


@dataclass
class PackageManifest:
    """``manifest.json`` of a built package.

    ``engine_config`` belongs to the engine (how to compile and run it);
    ``executed`` is what the engine reported it really runs (precision per layer
    kind), written by every engine that can tell.
    """

    engine: str
    precision: Precision
    arch: str
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    files: dict[str, str] = field(default_factory=dict)
    requested_precision: str | None = None
    device: Device = Device.CPU
    batch: int | None = None
    dynamic_batch: bool = True
    threads: int | None = None
    reference: ReferenceSpec | None = None
    calibration: CalibrationRecord | None = None
    fidelity: FidelityRecord | None = None
    executed: ExecutedRecord | None = None
    precision_choice: PrecisionChoiceRecord | None = None  # --precision auto: the candidates and why this one
    engine_config: dict[str, str] = field(default_factory=dict)  # the engine's own settings, by name
    graph_rewrites: list[str] = field(default_factory=list)  # what the engine changed in the graph, and why
    source: SourceRecord | None = None
    export: ExportRecord | None = None
    host: HostRecord | None = None
    versions: dict[str, str] = field(default_factory=dict)  # library -> version
    build_seconds: float | None = None
    format: str = PACKAGE_FORMAT

    # -- access
    def file(self, root: str | os.PathLike, key: str = "model") -> Path:
        """The path of one of the package's files, checked to lie inside ``root``."""
        if key not in self.files:
            raise ArcdeployError(f"{Path(root) / MANIFEST_NAME}: no {key!r} in 'files'")
        return resolve_inside(root, self.files[key], str(Path(root) / MANIFEST_NAME), f"files.{key}")

    def reference_path(self, root: str | os.PathLike) -> Path | None:
        if self.reference is None:
            return None
        return resolve_inside(root, self.reference.file, str(Path(root) / MANIFEST_NAME), "reference.file")

    @property
    def fixed_batch(self) -> int | None:
        return self.batch if self.batch and not self.dynamic_batch else None

    # -- JSON
    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_json() if hasattr(v, "to_json") else v
        return {"format": out.pop("format"), **out}

    @classmethod
    def from_json(cls, data: Any, source: str) -> PackageManifest:
        r = _Reader(data, source)
        check_format(
            r.get("format", str),
            PACKAGE_FORMAT_NAME,
            PACKAGE_FORMAT_VERSION,
            source,
            "a built package",
            "run arcdeploy build",
        )
        files = r.get("files", dict)
        files = {str(k): safe_relpath(v, source, f"files.{k}") for k, v in files.items()}
        if "model" not in files:
            raise ArcdeployError(f"{source}: 'files' names no 'model'")
        ref = r.get("reference", dict, None)
        batch = r.get("batch", int, None)
        threads = r.get("threads", int, None)
        for key, value in (("batch", batch), ("threads", threads)):
            if value is not None and value < 1:
                raise ArcdeployError(f"{source}: {key!r} must be at least 1, got {value}")
        return cls(
            engine=r.get("engine", str),
            precision=Precision(r.choice("precision", tuple(Precision))),
            arch=r.get("arch", str),
            input=InputSpec.from_json(r.get("input", dict), source),
            output=OutputSpec.from_json(r.get("output", dict, {}), source),
            files=files,
            requested_precision=r.get("requested_precision", str, None),
            device=Device(r.choice("device", tuple(Device), Device.CPU)),
            batch=batch,
            dynamic_batch=r.get("dynamic_batch", bool, True),
            threads=threads,
            reference=ReferenceSpec.from_json(ref, source) if ref is not None else None,
            calibration=_record(r, "calibration", CalibrationRecord),
            fidelity=_record(r, "fidelity", FidelityRecord),
            executed=_record(r, "executed", ExecutedRecord),
            precision_choice=_record(r, "precision_choice", PrecisionChoiceRecord),
            engine_config=r.str_map("engine_config", {}),
            graph_rewrites=[str(x) for x in r.get("graph_rewrites", list, [])],
            source=_record(r, "source", SourceRecord),
            export=_record(r, "export", ExportRecord),
            host=_record(r, "host", HostRecord),
            versions=r.str_map("versions", {}),
            build_seconds=r.get("build_seconds", (int, float), None),
        )


def check_format(fmt: str, name: str, version: int, source: str, what: str, hint: str) -> None:
    """Refuse a manifest of another kind, a newer format or an older one, each with its own reason."""
    kind, _, ver = fmt.partition("/")
    if kind != name or not ver.isdigit():
        raise ArcdeployError(f"{source}: not {what} (format {fmt!r}); {hint} first")
    if int(ver) > version:
        raise ArcdeployError(
            f"{source}: made by a newer arcdeploy (format {fmt}; this version reads "
            f"{name}/{version}); upgrade arcdeploy"
        )
    if int(ver) < version:
        raise ArcdeployError(
            f"{source}: made by an older arcdeploy (format {fmt}; this version reads {name}/{version}); {hint} again"
        )


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArcdeployError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArcdeployError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ArcdeployError(f"{path}: not valid JSON ({exc})") from None


def manifest_path(path: str | os.PathLike, what: str = "package") -> Path:
    path = Path(path)
    if not path.exists():
        raise ArcdeployError(f"{path}: no such {what}")
    mf = path / MANIFEST_NAME if path.is_dir() else path
    if not mf.exists():
        raise ArcdeployError(f"{path}: not a {what} (no {MANIFEST_NAME})")
    if not path.is_dir() and path.name != MANIFEST_NAME:
        model = _model_file_kind(path)
        if model:
            raise ArcdeployError(
                f"{path}: {model}, not a {what} (a folder with {MANIFEST_NAME}); "
                f"make one with: arcdeploy build {path} -o PKG"
            )
    return mf


def _model_file_kind(path: Path) -> str | None:
    """What a model file given where a package folder belongs is, from its name and first bytes."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if suffix == ".onnx":
        return "an ONNX model file"
    if head[:2] == b"PK" or suffix in (".pth", ".pt"):
        return "a PyTorch checkpoint or TorchScript file"
    if suffix in (".xml", ".bin"):
        return "an OpenVINO model file"
    return None


def read_package_manifest(path: str | os.PathLike) -> PackageManifest:
    """The validated manifest of the package folder ``path`` (or of its manifest.json)."""
    mf = manifest_path(path)
    data = read_json(mf)
    if isinstance(data, dict) and str(data.get("format", "")).startswith(DETECTOR_FORMAT_NAME + "/"):
        raise ArcdeployError(f"{path}: a face detector package, not a recognition model (give it as --detector)")
    return PackageManifest.from_json(data, str(mf))


# ------------------------------------------------------------------ the export manifest


@dataclass
class ExportManifest:
    """``manifest.json`` of an export folder: a verified ONNX (+ the fp32 reference) of one model."""

    arch: str
    input: InputSpec
    output: OutputSpec
    files: dict[str, str]
    reference: ReferenceSpec
    source: SourceRecord
    verification: VerificationRecord
    opset: int | None = None
    dynamic_batch: bool = True
    versions: dict[str, str] = field(default_factory=dict)
    format: str = EXPORT_FORMAT

    def file(self, root: str | os.PathLike, key: str = "onnx") -> Path:
        if key not in self.files:
            raise ArcdeployError(f"{Path(root) / MANIFEST_NAME}: no {key!r} in 'files'")
        return resolve_inside(root, self.files[key], str(Path(root) / MANIFEST_NAME), f"files.{key}")

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("input", "output", "reference", "source", "verification"):
            d[k] = d[k].to_json()
        return {"format": d.pop("format"), **d}

    @classmethod
    def from_json(cls, data: Any, source: str) -> ExportManifest:
        r = _Reader(data, source)
        check_format(
            r.get("format", str),
            EXPORT_FORMAT_NAME,
            EXPORT_FORMAT_VERSION,
            source,
            "an export folder",
            "run arcdeploy export",
        )
        files = {str(k): safe_relpath(v, source, f"files.{k}") for k, v in r.get("files", dict).items()}
        if "onnx" not in files:
            raise ArcdeployError(f"{source}: 'files' names no 'onnx'")
        return cls(
            arch=r.get("arch", str),
            input=InputSpec.from_json(r.get("input", dict), source),
            output=OutputSpec.from_json(r.get("output", dict, {}), source),
            files=files,
            reference=ReferenceSpec.from_json(r.get("reference", dict), source),
            source=SourceRecord.from_json(r.get("source", dict), source),
            verification=VerificationRecord.from_json(r.get("verification", dict), source),
            opset=r.get("opset", int, None),
            dynamic_batch=r.get("dynamic_batch", bool, True),
            versions=r.str_map("versions", {}),
        )


def read_export_manifest(path: str | os.PathLike) -> ExportManifest:
    mf = manifest_path(path, "export folder")
    return ExportManifest.from_json(read_json(mf), str(mf))


# ------------------------------------------------------------------ detector packages

DETECTOR_FORMAT_NAME = "arcdeploy-detector"
DETECTOR_FORMAT_VERSION = 1
DETECTOR_FORMAT = f"{DETECTOR_FORMAT_NAME}/{DETECTOR_FORMAT_VERSION}"


@dataclass(frozen=True)
class DetectorFidelity:
    """A detector package checked against its source ONNX in a detector's own terms, on held-out
    photos: faces over the threshold matched by box IoU, none lost or added, landmarks within a
    share of the inter-ocular distance (IOD). A face is lost only when the package does not find
    it even ``score_margin`` below the threshold (and added likewise): a score that moves from
    0.51 to 0.49 is counted as ``borderline``, not as a different face."""

    images: int
    source: str  # what the photos were
    reference_faces: int
    matched: int
    lost: int
    added: int
    borderline: int
    min_iou: float
    landmark_error_mean: float  # fraction of the IOD
    landmark_error_max: float
    max_score_change: float
    threshold: float
    score_margin: float
    floor: dict  # {"iou": 0.9, "landmark_error_mean": 0.01, "landmark_error_max": 0.03}
    passed: bool
    below_floor: list = field(default_factory=list)
    by_size: dict = field(default_factory=dict)  # the same figures for small and large faces apart

    @property
    def landmark_error_max_judged(self) -> float:
        """The largest landmark error where the floor judges it: on faces of a useful size (the
        ``large`` band; 0 when there are none)."""
        return float((self.by_size.get("large") or {}).get("landmark_error_max") or 0.0)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str) -> DetectorFidelity:
        r = _Reader(data, source, "fidelity")

        def num(key: str) -> float:
            return float(r.get(key, (int, float)))

        return cls(
            images=r.get("images", int),
            source=r.get("source", str),
            reference_faces=r.get("reference_faces", int),
            matched=r.get("matched", int),
            lost=r.get("lost", int),
            added=r.get("added", int),
            borderline=r.get("borderline", int),
            min_iou=num("min_iou"),
            landmark_error_mean=num("landmark_error_mean"),
            landmark_error_max=num("landmark_error_max"),
            max_score_change=num("max_score_change"),
            threshold=num("threshold"),
            score_margin=num("score_margin"),
            floor=r.get("floor", dict),
            passed=r.get("passed", bool),
            below_floor=r.get("below_floor", list, []),
            by_size=r.get("by_size", dict, {}),
        )


@dataclass
class DetectorManifest:
    """``manifest.json`` of a detector package: an SCRFD graph built for one engine and precision,
    with a batch axis and a fixed input, and its fidelity to the source ONNX (kept in the package
    as its reference)."""

    kind: str  # "scrfd"
    engine: str
    precision: str
    input: InputSpec  # what the model file takes (the detector's canvas: size = (height, width))
    strides: tuple[int, ...]
    anchors: int
    files: dict[str, str]
    reference: str  # the source ONNX inside the package
    reference_sha256: str
    requested_precision: str | None = None
    source: dict = field(default_factory=dict)
    graph_rewrites: list = field(default_factory=list)
    batch_check: dict = field(default_factory=dict)
    calibration: dict | None = None
    fidelity: DetectorFidelity | None = None
    executed: dict | None = None
    engine_config: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    build_seconds: float | None = None
    format: str = DETECTOR_FORMAT

    @property
    def canvas(self) -> tuple[int, int]:
        """The detector's input as (width, height)."""
        return self.input.size[1], self.input.size[0]

    def file(self, root: str | os.PathLike, key: str = "model") -> Path:
        if key not in self.files:
            raise ArcdeployError(f"{Path(root) / MANIFEST_NAME}: no {key!r} in 'files'")
        return resolve_inside(root, self.files[key], str(Path(root) / MANIFEST_NAME), f"files.{key}")

    def reference_path(self, root: str | os.PathLike) -> Path:
        return resolve_inside(root, self.reference, str(Path(root) / MANIFEST_NAME), "reference")

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_json() if hasattr(v, "to_json") else (list(v) if isinstance(v, tuple) else v)
        return {"format": out.pop("format"), **out}

    @classmethod
    def from_json(cls, data: Any, source: str) -> DetectorManifest:
        r = _Reader(data, source)
        check_format(
            r.get("format", str),
            DETECTOR_FORMAT_NAME,
            DETECTOR_FORMAT_VERSION,
            source,
            "a detector package",
            "run arcdeploy build on the detector's ONNX",
        )
        files = {str(k): safe_relpath(v, source, f"files.{k}") for k, v in r.get("files", dict).items()}
        if "model" not in files:
            raise ArcdeployError(f"{source}: 'files' names no 'model'")
        strides = r.get("strides", list)
        if not strides or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in strides):
            raise ArcdeployError(f"{source}: 'strides' must be positive integers, got {strides!r}")
        fid = r.get("fidelity", dict, None)
        return cls(
            kind=r.choice("kind", ("scrfd",)),
            engine=r.get("engine", str),
            precision=r.choice("precision", tuple(Precision)),
            input=InputSpec.from_json(r.get("input", dict), source),
            strides=tuple(strides),
            anchors=r.get("anchors", int),
            files=files,
            reference=safe_relpath(r.get("reference", str), source, "reference"),
            reference_sha256=r.get("reference_sha256", str),
            requested_precision=r.get("requested_precision", str, None),
            source=r.get("source", dict, {}),
            graph_rewrites=r.get("graph_rewrites", list, []),
            batch_check=r.get("batch_check", dict, {}),
            calibration=r.get("calibration", dict, None),
            fidelity=DetectorFidelity.from_json(fid, source) if fid is not None else None,
            executed=r.get("executed", dict, None),
            engine_config=r.get("engine_config", dict, {}),
            host=r.get("host", dict, {}),
            versions=r.get("versions", dict, {}),
            build_seconds=r.get("build_seconds", (int, float), None),
        )


def is_detector_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose manifest says it is a detector package."""
    mf = Path(path) / MANIFEST_NAME
    if not mf.is_file():
        return False
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(DETECTOR_FORMAT_NAME + "/")


def read_detector_manifest(path: str | os.PathLike) -> DetectorManifest:
    """The validated manifest of the detector package folder ``path``."""
    mf = manifest_path(path, "detector package")
    return DetectorManifest.from_json(read_json(mf), str(mf))
