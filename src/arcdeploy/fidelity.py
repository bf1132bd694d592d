"""Fidelity: a package's embeddings against its fp32 reference, per image.

Every package carries its fp32 reference (a checkpoint's TorchScript, or a foreign
model's source ONNX, at ``manifest.reference``), so it can be checked on its own.
The reference sees the aligned crops through its own input convention; the package
through :meth:`Package.infer` (folded preprocessing included). The result is the
per-image cosine: mean, min, 1st percentile, against the precision's floor.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engines.runner import CropRunner, graph_input_feed
from .errors import ArcdeployError
from .manifest import CosineStats, FidelityGroupsRecord, FidelityRecord
from .types import Precision
from .utils import hash_file_into

if TYPE_CHECKING:
    from .fidelity_groups import FaceLabels

# per-image cosine floors by precision
FLOORS: dict[Precision, dict[str, float]] = {
    Precision.FP32: {"min": 0.99999},
    Precision.FP16: {"mean": 0.9995},
    Precision.BF16: {"mean": 0.9995},
    Precision.INT8: {"mean": 0.99, "min": 0.97},
}
REFERENCE_BATCH = 32
# The fp32 reference's embeddings already computed in this process, by all they depend on: the
# reference file's content, how it is fed, the faces. The packages of one source checked on the
# same faces (the candidates of --precision auto, a run's check steps beside its builds' gates)
# run the reference once. The most recent entries, each [N, D] float32.
REFERENCE_MEMO_ENTRIES = 8
_reference_memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
_file_digests: dict[tuple, str] = {}
_data_file_names: dict[tuple, list[str]] = {}
_memo_lock = threading.Lock()


def floor_for(precision: Precision, max_cosine_drop: float | None = None) -> dict[str, float]:
    """The floor for ``precision``; ``max_cosine_drop`` tightens (or sets) the mean."""
    floor = dict(FLOORS.get(precision, FLOORS[Precision.INT8]))
    if max_cosine_drop is not None:
        floor["mean"] = round(1.0 - float(max_cosine_drop), 9)
    return floor


@dataclass
class FidelityResult:
    """Per-image cosine of one package against its fp32 reference."""

    cosine: CosineStats
    reference: str
    images: str
    images_source: str
    engine: str
    precision: Precision
    floor: dict[str, float]
    below_floor: list[str]
    worst: list[dict] = field(default_factory=list)
    per_image: np.ndarray | None = None
    groups: FidelityGroupsRecord | None = None  # the same check by group; the worst group is the verdict

    @property
    def passed(self) -> bool:
        return not self.below_floor

    def summary(self) -> FidelityRecord:
        """What the manifest keeps (no per-image values)."""
        return FidelityRecord(
            cosine=self.cosine,
            reference=self.reference,
            images=self.images,
            images_source=self.images_source,
            engine=self.engine,
            precision=self.precision,
            floor=self.floor,
            passed=self.passed,
            below_floor=self.below_floor,
            groups=self.groups,
        )

    def to_json(self) -> dict:
        d: dict[str, Any] = {**self.summary().to_json(), "worst": self.worst}
        if self.per_image is not None:
            d["per_image"] = [round(float(c), 7) for c in self.per_image]  # for the report's histogram
        return d

    @classmethod
    def from_json(cls, data: Any, source: str) -> FidelityResult:
        """A result written by :meth:`to_json` (a run's step result), validated."""
        rec = FidelityRecord.from_json(data, source, "check")
        per_image = data.get("per_image")
        return cls(
            cosine=rec.cosine,
            reference=rec.reference,
            images=rec.images,
            images_source=rec.images_source,
            engine=rec.engine,
            precision=rec.precision,
            floor=rec.floor,
            below_floor=rec.below_floor,
            worst=list(data.get("worst") or []),
            groups=rec.groups,
            per_image=np.asarray(per_image, dtype=np.float64) if per_image else None,
        )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine; a row with a non-finite value scores -1 (it fails any floor)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = (a * b).sum(axis=1) / den
    return np.where(np.isfinite(cos), cos, -1.0)


def _bad_rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(~np.isfinite(np.asarray(x, np.float64).reshape(len(x), -1)).all(axis=1))


def _refuse_a_broken_model(reference_rows: np.ndarray, names: list[str], label: str) -> None:
    """The fp32 model itself giving NaN or infinity is no fidelity question: say what it is."""
    bad = np.flatnonzero(_bad_rows(reference_rows))
    if len(bad):
        first = f" (first: {names[bad[0]]})" if names else f" (first: image {bad[0]})"
        raise ArcdeployError(
            f"{label}: the model outputs NaN or infinity for {len(bad)} of {len(reference_rows)} check "
            f"images{first}; the model is broken for such inputs, whatever the precision"
        )


def _non_finite(rows: np.ndarray) -> list[str]:
    bad = int(_bad_rows(rows).sum())
    return [f"NaN or infinity for {bad} of {len(rows)} images"] if bad else []


def summarize(cos: np.ndarray) -> dict:
    return CosineStats.of(cos).to_json()


def floor_problems(stats: CosineStats, floor: dict[str, float]) -> list[str]:
    """What falls below the floor, e.g. ["mean 0.951200 < 0.99"]; empty when it passes."""
    values = stats.to_json()
    return [f"{k} {values[k]:.6f} < {v}" for k, v in floor.items() if not values[k] >= v]


class Reference:
    """A package's fp32 reference model, run on aligned crops."""

    def __init__(self, pkg, threads: int | None = None):
        from .engines.registry import REFERENCE_ENGINES, open_graph
        from .manifest import InputSpec

        ref = pkg.manifest.reference
        if ref is None:
            raise ArcdeployError(
                f"{pkg.path}: the package has no fp32 reference to check against (manifest 'reference')"
            )
        self.path = pkg.manifest.reference_path(pkg.path)
        if not self.path.exists():
            raise ArcdeployError(f"{self.path}: the package's fp32 reference is missing")
        self.kind = ref.kind
        self.input = ref.input or InputSpec()
        self.engine = REFERENCE_ENGINES[ref.kind]
        self.session = open_graph(self.path, engine=self.engine, threads=threads)
        self.label = (
            f"pytorch fp32 (torchscript {ref.file})"
            if ref.kind == "torchscript"
            else f"onnxruntime fp32 (source onnx {ref.file})"
        )

        # a reference traced at one batch runs at that batch; a foreign source's unread inputs get zeros
        run = graph_input_feed(self.session, self.input.name, strict=False)
        self.runner = CropRunner(run, self.input, batch=ref.batch, max_batch=REFERENCE_BATCH)

    def embed(self, faces: np.ndarray) -> np.ndarray:
        """The reference's embeddings of aligned crops (computed once per process for the same
        reference content and faces: ``REFERENCE_MEMO_ENTRIES``)."""
        faces = np.ascontiguousarray(faces)
        key = (
            _reference_digest(self.path, self.kind),
            self.kind,
            self.input,
            self.runner.batch,
            faces.shape,
            faces.dtype.str,
            hashlib.blake2b(faces.view(np.uint8).reshape(-1).data).hexdigest(),
        )
        with _memo_lock:
            if key in _reference_memo:
                _reference_memo.move_to_end(key)
                return _reference_memo[key].copy()
        out = self.runner(faces).astype(np.float32)
        with _memo_lock:
            _reference_memo[key] = out.copy()
            while len(_reference_memo) > REFERENCE_MEMO_ENTRIES:
                _reference_memo.popitem(last=False)
        return out


def _reference_digest(path: Path, kind: str) -> str:
    """sha256 over a reference file and, for an ONNX one, the external data files it names (in the
    order it names them); computed once per process while their sizes, times and inodes stay the same."""
    from .onnx_files import external_data_files

    files = [path]
    if kind == "onnx":
        files += [path.parent / n for n in _once_per_version(_data_file_names, [path], external_data_files)]
    return _once_per_version(_file_digests, files, _sha256_of_files)


def _sha256_of_files(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        hash_file_into(h, f)
    return h.hexdigest()


def _once_per_version(table: dict, files: list[Path], compute: Callable[..., Any]) -> Any:
    """``compute(*files)``, kept in ``table`` while each file's size, mtime and inode stay the same."""
    key = tuple((str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])
    with _memo_lock:
        if key in table:
            return table[key]
    value = compute(*files)
    with _memo_lock:
        table[key] = value
    return value


def package_embeddings(pkg, faces: np.ndarray) -> np.ndarray:
    batch = pkg.manifest.batch or REFERENCE_BATCH
    return np.concatenate([pkg.infer(faces[s : s + batch]) for s in range(0, len(faces), batch)])


def check(
    package,
    images,
    landmarks=None,
    count: int | None = None,
    threads: int | None = None,
    floor: dict | None = None,
    images_label: str | None = None,
    images_source: str | None = None,
    reference: Reference | None = None,
    labels: FaceLabels | None = None,
    detector=None,
) -> FidelityResult:
    """Per-image cosine of a package against its fp32 reference, overall and by group
    (:mod:`arcdeploy.fidelity_groups`: colour, face size, the folders the images lie in).

    ``package``: a path or a loaded :class:`arcdeploy.package.Package`. ``images``: aligned
    uint8 crops [N, 112, 112, 3], a folder, a list file or a list of paths (aligned with
    ``landmarks`` when given, or faces found by ``detector``), ``count`` of them at most.
    ``labels``: the groups of crops given as an array (else only their colour is known).
    """
    from .faces.calibration import load_images
    from .fidelity_groups import by_group, group_problems, labels_of_image_set
    from .package import load

    if images is None:
        raise ArcdeployError("no images to check on")
    pkg = load(package, threads=threads)
    ref = reference or Reference(pkg, threads)
    got = load_images(images, landmarks, limit=count, what="check images", detector=detector)
    faces, names = got.faces, got.names
    if labels is None or len(next(iter(labels.axes.values()), [])) != len(faces):
        labels = labels_of_image_set(got)
    names = names or labels.names
    out = package_embeddings(pkg, faces)
    want = ref.embed(faces)
    _refuse_a_broken_model(want, names, ref.label)
    cos = cosine_rows(out, want)
    stats = CosineStats.of(cos)
    precision = pkg.manifest.precision
    floor = floor or floor_for(precision)
    grouped = by_group(cos, labels, floor)
    order = np.argsort(cos)[:5]
    worst = [{"index": int(i), "cosine": float(cos[i]), **({"name": names[i]} if names else {})} for i in order]
    return FidelityResult(
        cosine=stats,
        reference=ref.label,
        images=images_label or got.source,
        images_source=images_source or got.source,
        engine=pkg.manifest.engine,
        precision=precision,
        floor=dict(floor),
        below_floor=floor_problems(stats, floor) + _non_finite(out) + group_problems(grouped),
        worst=worst,
        per_image=cos,
        groups=grouped,
    )
