"""What the int8 recipe needs from a calibration set, checked before anything is quantized.

Measured (trained MobileFaceNet and w600k_mbf, real faces; see :mod:`arcdeploy.quantize`):
with the recipe's activation ranges (``max_quantile``) and depthwise layers in float, grayscale or colour
calibration sets of 16 to 800 faces all give packages that meet the int8 floor on colour photos,
held-out grayscale faces, colour faces of every group and small detector-fed faces. 8 faces, of one
person or of eight people, did not (cosine 0.945-0.959 on the colour photos): too few faces show too
little of the activation ranges other faces reach. So:

- fewer than :data:`~arcdeploy.quantize.MIN_CALIBRATION_FACES` usable faces: refused (one line, with
  the way out), unless the caller accepts it;
- fewer than :data:`~arcdeploy.quantize.ADVISED_CALIBRATION_FACES`, all grayscale, or all one
  person (the fp32 model itself says so: the median cosine between the faces' embeddings is that of
  one person's photos, where different people score near 0): a warning naming what to add.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import ArcdeployError
from .fidelity_groups import grayscale_mask
from .manifest import CalibrationSetRecord
from .quantize import ADVISED_CALIBRATION_FACES, MIN_CALIBRATION_FACES

log = logging.getLogger(__name__)

PEOPLE_SAMPLE = 48  # faces embedded (fp32) to tell one person from many
# median pairwise cosine of fp32 embeddings: one person's LFW photos 0.48-0.65 (trained mbf), different
# people ~0.00 (95th percentile 0.17)
ONE_PERSON_COSINE = 0.35


PEOPLE_NEED = f"many (one person's faces look alike to the model: median cosine >= {ONE_PERSON_COSINE})"


@dataclass
class CalibrationSetReport:
    """What a calibration set is, measured, and what the recipe says about it."""

    count: int
    grayscale: int
    source: str
    median_cosine: float | None = None  # between the fp32 embeddings of up to PEOPLE_SAMPLE faces
    sampled: int = 0
    warnings: list[str] = field(default_factory=list)
    refusal: str | None = None

    @property
    def one_person(self) -> bool:
        return self.median_cosine is not None and self.median_cosine >= ONE_PERSON_COSINE

    def record(self) -> CalibrationSetRecord:
        """What the package's manifest keeps of it."""
        measured = self.median_cosine is not None
        return CalibrationSetRecord(
            count=self.count,
            grayscale=self.grayscale,
            min_faces=MIN_CALIBRATION_FACES,
            advised_faces=ADVISED_CALIBRATION_FACES,
            people=PEOPLE_NEED,
            warnings=tuple(self.warnings),
            median_cosine=round(self.median_cosine, 4) if self.median_cosine is not None else None,
            faces_sampled=self.sampled if measured else None,
            looks_like_one_person=self.one_person if measured else None,
        )

    def to_json(self) -> dict:
        return self.record().to_json()


def refusal(count: int, source: str) -> str | None:
    """Why the recipe refuses a calibration set of ``count`` usable faces (None: it does not)."""
    if count >= MIN_CALIBRATION_FACES:
        return None
    return (
        f"{source}: {count} usable calibration face(s); the int8 recipe needs at least {MIN_CALIBRATION_FACES} "
        f"(with 8 faces int8 fell to cosine 0.95 on other people's photos): add faces of more people "
        f"(a few hundred is best), build --precision bf16 or fp32, or pass --accept-calib to build anyway"
    )


def refuse_too_few(calib, accept: bool = False) -> None:
    """Refuse an :class:`~arcdeploy.faces.calibration.ImageSet` with too few faces at once, before
    any export (unless ``accept``)."""
    reason = refusal(len(calib.faces), calib.source)
    if reason and not accept:
        raise ArcdeployError(reason)


def assess(
    faces: np.ndarray, source: str, embed: Callable[[np.ndarray], np.ndarray] | None = None
) -> CalibrationSetReport:
    """Measure a calibration set (aligned uint8 crops) against what the recipe needs; ``embed`` (fp32
    embeddings of crops) enables the one-person check."""
    n = int(len(faces))
    gray = int(grayscale_mask(faces).sum()) if n else 0
    rep = CalibrationSetReport(count=n, grayscale=gray, source=source)
    rep.refusal = refusal(n, source)
    if embed is not None and n >= 2:
        pick = np.linspace(0, n - 1, min(n, PEOPLE_SAMPLE)).round().astype(int)
        e = np.asarray(embed(faces[pick]), dtype=np.float64)
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        c = e @ e.T
        iu = np.triu_indices(len(pick), 1)
        rep.median_cosine = float(np.median(c[iu])) if len(iu[0]) else None
        rep.sampled = int(len(pick))
    if MIN_CALIBRATION_FACES <= n < ADVISED_CALIBRATION_FACES:
        rep.warnings.append(
            f"{source}: only {n} calibration faces; under {ADVISED_CALIBRATION_FACES} the int8 ranges may miss "
            "faces unlike them (the build's check by group shows it): add faces of more people, of both "
            "colour and grayscale if you will see both"
        )
    if gray == n:
        rep.warnings.append(
            f"{source}: every calibration face is grayscale; the recipe holds on colour faces (measured on "
            "colour photos and colour LFW), but check it on yours: add colour faces to --calib, or pass colour "
            "faces as --check-images"
        )
    if rep.one_person:
        rep.warnings.append(
            f"{source}: the calibration faces look like one person to the model (median cosine "
            f"{rep.median_cosine:.2f} between them; different people score near 0): calibrate on faces of many "
            "people, or the int8 ranges fit that one face"
        )
    return rep


def enforce(rep: CalibrationSetReport, accept: bool = False) -> None:
    """Refuse (ArcdeployError) a set the recipe cannot promise fidelity on, unless ``accept``; log warnings."""
    if rep.refusal and not accept:
        raise ArcdeployError(rep.refusal)
    if rep.refusal:
        rep.warnings.insert(
            0,
            f"{rep.source}: {rep.count} calibration face(s), under the {MIN_CALIBRATION_FACES} the int8 recipe "
            "needs, accepted as asked (--accept-calib): the build's check is the only evidence of fidelity",
        )
    for w in rep.warnings:
        log.warning(w)


def check_calibration_set(calib, export_dir, exported, accept: bool = False) -> CalibrationSetRecord:
    """What a build does with its calibration set (an :class:`arcdeploy.faces.calibration.ImageSet`):
    :func:`assess` it, the export's fp32 ONNX embedding a sample of the faces for the one-person check,
    then :func:`enforce` it before anything is quantized (``accept``: build on a set it would refuse).
    Returns what the manifest keeps."""
    from .engines.registry import open_graph
    from .engines.runner import CropRunner, graph_input_feed

    session = open_graph(exported.file(export_dir, "onnx"), engine="onnxruntime")
    embed = CropRunner(graph_input_feed(session, exported.input.name, strict=False), exported.input, max_batch=32)
    report = assess(calib.faces, calib.source, embed)
    enforce(report, accept=accept)
    return report.record()
