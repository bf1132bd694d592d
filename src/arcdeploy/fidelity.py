"""Fidelity: a package's embeddings against its fp32 reference, per image.

Every package carries its fp32 reference (a checkpoint's TorchScript, or a foreign
model's source ONNX, at ``manifest.reference``), so it can be checked on its own.
The reference sees the aligned crops through its own input convention; the package
through :meth:`Package.infer` (folded preprocessing included). The result is the
per-image cosine: mean, min, 1st percentile, against the precision's floor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArcdeployError
from .manifest import FidelityByGroup

if TYPE_CHECKING:
    from .fidelity_groups import FaceLabels

# per-image cosine floors by precision
FLOORS: dict[str, dict[str, float]] = {
    "fp32": {"min": 0.99999},
    "fp16": {"mean": 0.9995},
    "bf16": {"mean": 0.9995},
    "int8": {"mean": 0.99, "min": 0.97},
}
REFERENCE_BATCH = 32


def floor_for(precision: str, max_cosine_drop: float | None = None) -> dict[str, float]:
    """The floor for ``precision``; ``max_cosine_drop`` tightens (or sets) the mean."""
    floor = dict(FLOORS.get(precision, FLOORS["int8"]))
    if max_cosine_drop is not None:
        floor["mean"] = round(1.0 - float(max_cosine_drop), 9)
    return floor


@dataclass
class CosineStats:
    mean: float
    min: float
    p1: float
    max: float
    n: int

    @classmethod
    def of(cls, cos: np.ndarray) -> CosineStats:
        return cls(float(cos.mean()), float(cos.min()), float(np.percentile(cos, 1)), float(cos.max()), int(cos.size))

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class FidelityResult:
    """Per-image cosine of one package against its fp32 reference."""

    cosine: CosineStats
    reference: str
    images: str
    images_source: str
    engine: str
    precision: str
    floor: dict[str, float]
    below_floor: list[str]
    worst: list[dict] = field(default_factory=list)
    per_image: np.ndarray | None = None
    groups: FidelityByGroup | None = None  # the same check by group; the worst group is the verdict

    @property
    def passed(self) -> bool:
        return not self.below_floor

    def summary(self) -> dict:
        """What the manifest keeps (no per-image values)."""
        return {
            "cosine": self.cosine.to_json(),
            "reference": self.reference,
            "images": self.images,
            "images_source": self.images_source,
            "engine": self.engine,
            "precision": self.precision,
            "floor": self.floor,
            "passed": self.passed,
            "below_floor": self.below_floor,
            "worst_group": self.groups.worst if self.groups else None,
        }

    def to_json(self) -> dict:
        d: dict[str, Any] = {**self.summary(), "worst": self.worst}
        if self.groups is not None:
            d["groups"] = self.groups.to_json()
        if self.per_image is not None:
            d["per_image"] = [round(float(c), 7) for c in self.per_image]  # for the report's histogram
        return d


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine; a row with a non-finite value scores -1 (it fails any floor)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = (a * b).sum(axis=1) / den
    return np.where(np.isfinite(cos), cos, -1.0)


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

        self.batch = ref.batch
        # a foreign source may list inputs no node reads; ONNX Runtime still wants them fed
        self.extra = {
            i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], i.dtype)
            for i in self.session.inputs
            if i.name != self.input.name
        }
        if len(self.extra) == len(self.session.inputs):
            self.extra = {}  # the reference does not name its input: run_one feeds the first

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.batch and n < self.batch:  # a reference fixed at one batch: pad the last chunk
            x = np.concatenate([x, np.repeat(x[-1:], self.batch - n, axis=0)])
        if not self.extra:
            return self.session.run_one(x)[:n]
        return self.session.run({self.input.name: x, **self.extra})[0][:n]

    def embed(self, faces: np.ndarray) -> np.ndarray:
        step = self.batch or REFERENCE_BATCH
        outs = [self._run(self.input.to_model_input(faces[s : s + step])) for s in range(0, len(faces), step)]
        return np.concatenate(outs).astype(np.float32)


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
        below_floor=floor_problems(stats, floor) + group_problems(grouped),
        worst=worst,
        per_image=cos,
        groups=grouped,
    )


def check_path(package: str | os.PathLike, **kwargs) -> FidelityResult:
    return check(package, **kwargs)
