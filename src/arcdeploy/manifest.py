"""Typed manifests: what a package or an export folder is, read and written with validation.

- :class:`InputSpec` is the one home of the input convention (size, layout, colour
  order, dtype, normalisation, whether the graph normalises itself) and turns
  aligned uint8 RGB crops into the model's input (:meth:`InputSpec.to_model_input`).
- :class:`OutputSpec`: the embedding's name, size (512 and 128 both exist) and
  whether the model already L2-normalises it.
- :class:`PackageManifest` / :class:`ExportManifest`: ``manifest.json`` of a package /
  an export folder. Reading checks every required key and type; a problem is one
  line naming the file. Files a manifest names must stay inside its folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import ArcdeployError

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


# ------------------------------------------------------------------ precisions

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# the reference pipeline's names for the same modes
PRECISION_ALIASES = {"force_float32": "fp32", "force_float16": "fp16", "qint8_mixed_float16": "int8"}


def parse_precision(text: str) -> str:
    """``fp32`` / ``force_float32`` ... -> one of :data:`PRECISIONS`."""
    p = PRECISION_ALIASES.get(text, text)
    if p not in PRECISIONS:
        raise ArcdeployError(
            f"unknown precision {text!r}; choose one of {', '.join(PRECISIONS)} (or {', '.join(PRECISION_ALIASES)})"
        )
    return p


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
            mean = np.asarray(self.mean, np.float32).reshape(-1)
            std = np.asarray(self.std, np.float32).reshape(-1)
            x -= mean.reshape(axis_shape) if mean.size == 3 else mean[0]
            x /= std.reshape(axis_shape) if std.size == 3 else std[0]
        return np.ascontiguousarray(x)

    def describe(self) -> str:
        norm = f"(x - {_fmt(self.mean)}) / {_fmt(self.std)}"
        where = f"raw 0..255 pixels, normalised inside the graph as {norm}" if self.normalize_in_graph else norm
        return f"{self.color} {self.layout} {self.dtype} {self.size[0]}x{self.size[1]}, {where}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "color": self.color,
            "dtype": self.dtype,
            "size": list(self.size),
            "normalize": {"mean": _jnum(self.mean), "std": _jnum(self.std)},
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


def _fmt(v: float | tuple[float, ...]) -> str:
    return "/".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"


def _jnum(v: float | tuple[float, ...]) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _norm_value(v: Any, source: str, key: str) -> float | tuple[float, ...]:
    if isinstance(v, list):
        if len(v) != 3 or not all(_number(x) for x in v):
            raise ArcdeployError(f"{source}: {key!r} must be a number or 3 numbers, got {v!r}")
        vals = tuple(float(x) for x in v)
        return vals[0] if len(set(vals)) == 1 else vals
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


# ------------------------------------------------------------------ fidelity by group, precision choice


def _floats(r: _Reader, *keys: str) -> dict[str, float]:
    out = {}
    for k in keys:
        v = r.get(k, (int, float))
        out[k] = float(v)
    return out


def _strings(r: _Reader, key: str) -> tuple[str, ...]:
    values = r.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        raise ArcdeployError(f"{r.source}: {r._key(key)!r} must be a list of strings")
    return tuple(values)


@dataclass(frozen=True)
class GroupFidelity:
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
    def from_json(cls, data: Any, source: str, where: str) -> GroupFidelity:
        r = _Reader(data, source, where)
        n = r.get("n", int)
        if n < 1:
            raise ArcdeployError(f"{source}: '{where}.n' must be at least 1, got {n}")
        return cls(
            axis=r.get("axis", str),
            group=r.get("group", str),
            n=n,
            **_floats(r, "mean", "min", "p1"),
            judged=_strings(r, "judged"),
            below_floor=_strings(r, "below_floor"),
        )


@dataclass(frozen=True)
class FidelityByGroup:
    """A fidelity check by group: the worst group is the verdict; the lowest faces are named."""

    groups: tuple[GroupFidelity, ...]
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
    def from_json(cls, data: Any, source: str, where: str = "fidelity_groups") -> FidelityByGroup:
        r = _Reader(data, source, where)
        groups = r.get("groups", list)
        lowest = r.get("lowest", list, [])
        if not all(isinstance(x, dict) for x in lowest):
            raise ArcdeployError(f"{source}: '{where}.lowest' must be a list of objects")
        return cls(
            groups=tuple(GroupFidelity.from_json(g, source, f"{where}.groups[{i}]") for i, g in enumerate(groups)),
            worst=r.get("worst", str, None),
            lowest=tuple(lowest),
            min_faces_for_mean=r.get("min_faces_for_mean", int, 8),
        )


@dataclass(frozen=True)
class PrecisionCandidate:
    """One precision ``--precision auto`` considered: its speed on this CPU and its fidelity verdict."""

    precision: str
    images_per_s: float | None = None
    vs_fp32: float | None = None
    passed: bool | None = None  # its floor met on every group of the check images
    worst_group: str | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    note: str | None = None  # why it was not built or not timed

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Any, source: str, where: str) -> PrecisionCandidate:
        r = _Reader(data, source, where)
        return cls(
            precision=r.choice("precision", PRECISIONS),
            images_per_s=r.get("images_per_s", (int, float), None),
            vs_fp32=r.get("vs_fp32", (int, float), None),
            passed=r.get("passed", bool, None),
            worst_group=r.get("worst_group", str, None),
            cosine_mean=r.get("cosine_mean", (int, float), None),
            cosine_min=r.get("cosine_min", (int, float), None),
            note=r.get("note", str, None),
        )


@dataclass(frozen=True)
class PrecisionChoice:
    """Why ``--precision auto`` kept the precision it kept."""

    chosen: str
    why: str
    candidates: tuple[PrecisionCandidate, ...]
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
    def from_json(cls, data: Any, source: str, where: str = "precision_choice") -> PrecisionChoice:
        r = _Reader(data, source, where)
        cands = r.get("candidates", list)
        return cls(
            chosen=r.choice("chosen", PRECISIONS),
            why=r.get("why", str),
            candidates=tuple(
                PrecisionCandidate.from_json(c, source, f"{where}.candidates[{i}]") for i, c in enumerate(cands)
            ),
            how=r.get("how", str, ""),
            cpu=r.get("cpu", str, ""),
            flags=_strings(r, "flags"),
        )


# ------------------------------------------------------------------ the package manifest


@dataclass
class PackageManifest:
    """``manifest.json`` of a built package.

    ``engine_config`` belongs to the engine (how to compile and run it);
    ``executed`` is what the engine reported it really runs (precision per layer
    kind), written by every engine that can tell.
    """

    engine: str
    precision: str
    arch: str
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    files: dict[str, str] = field(default_factory=dict)
    requested_precision: str | None = None
    device: str = "CPU"
    batch: int | None = None
    dynamic_batch: bool = True
    threads: int | None = None
    reference: ReferenceSpec | None = None
    calibration: dict | None = None
    fidelity: dict | None = None
    fidelity_groups: FidelityByGroup | None = None  # the same check by group (colour, face size, folder)
    precision_choice: PrecisionChoice | None = None  # --precision auto: the candidates and why this one
    executed: dict | None = None
    engine_config: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
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
            precision=r.choice("precision", PRECISIONS),
            arch=r.get("arch", str),
            input=InputSpec.from_json(r.get("input", dict), source),
            output=OutputSpec.from_json(r.get("output", dict, {}), source),
            files=files,
            requested_precision=r.get("requested_precision", str, None),
            device=r.get("device", str, "CPU"),
            batch=batch,
            dynamic_batch=r.get("dynamic_batch", bool, True),
            threads=threads,
            reference=ReferenceSpec.from_json(ref, source) if ref is not None else None,
            calibration=r.get("calibration", dict, None),
            fidelity=r.get("fidelity", dict, None),
            fidelity_groups=FidelityByGroup.from_json(fg, source)
            if (fg := r.get("fidelity_groups", dict, None))
            else None,
            precision_choice=PrecisionChoice.from_json(pc, source)
            if (pc := r.get("precision_choice", dict, None))
            else None,
            executed=r.get("executed", dict, None),
            engine_config=r.get("engine_config", dict, {}),
            source=r.get("source", dict, {}),
            export=r.get("export", dict, {}),
            host=r.get("host", dict, {}),
            versions=r.get("versions", dict, {}),
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
    return mf


def read_package_manifest(path: str | os.PathLike) -> PackageManifest:
    """The validated manifest of the package folder ``path`` (or of its manifest.json)."""
    mf = manifest_path(path)
    return PackageManifest.from_json(read_json(mf), str(mf))


# ------------------------------------------------------------------ the export manifest


@dataclass
class ExportManifest:
    """``manifest.json`` of an export folder: a verified ONNX (+ the fp32 reference) of one model."""

    arch: str
    input: InputSpec
    output: OutputSpec
    files: dict[str, str]
    reference: ReferenceSpec
    source: dict = field(default_factory=dict)
    opset: int | None = None
    dynamic_batch: bool = True
    verification: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    format: str = EXPORT_FORMAT

    def file(self, root: str | os.PathLike, key: str = "onnx") -> Path:
        if key not in self.files:
            raise ArcdeployError(f"{Path(root) / MANIFEST_NAME}: no {key!r} in 'files'")
        return resolve_inside(root, self.files[key], str(Path(root) / MANIFEST_NAME), f"files.{key}")

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("input", "output", "reference"):
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
            source=r.get("source", dict, {}),
            opset=r.get("opset", int, None),
            dynamic_batch=r.get("dynamic_batch", bool, True),
            verification=r.get("verification", dict, {}),
            versions=r.get("versions", dict, {}),
        )


def read_export_manifest(path: str | os.PathLike) -> ExportManifest:
    mf = manifest_path(path, "export folder")
    return ExportManifest.from_json(read_json(mf), str(mf))


def as_dict(obj: Any) -> dict:
    """A dataclass as a plain dict (for logging and tests)."""
    return asdict(obj)
