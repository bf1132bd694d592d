"""Build: a model source -> a verified package for one engine and precision.

Orchestration only: the source becomes an export folder (:mod:`arcdeploy.sources`),
the engine's builder writes its files (:mod:`arcdeploy.engines`), int8 follows a
:class:`~arcdeploy.quantize.QuantRecipe`, the fp32 reference is stored in the
package, and the package is checked per image against it
(:mod:`arcdeploy.fidelity`). Below the precision's floor the accuracy-aware
fallback keeps the most sensitive layers in float until it passes
(:mod:`arcdeploy.fallback`); still below, the build warns, or with ``strict`` fails
and writes nothing.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .engines import BuildJob, get_engine
from .engines.registry import DEFAULT_ENGINE
from .errors import ArcdeployError
from .fidelity_groups import labels_of_image_set
from .files import atomic_dir, refuse_existing, scratch_dir, write_json_atomic
from .machine import cpu_name, relevant_flags
from .manifest import (
    MANIFEST_NAME,
    PackageManifest,
    ReferenceSpec,
    parse_precision,
    read_export_manifest,
    resolve_inside,
)
from .quantize import QuantRecipe
from .utils import library_versions, sha256_file

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference"


@dataclass
class CheckImages:
    """Aligned crops for a build's fidelity check and what they are."""

    faces: np.ndarray
    label: str
    source: str
    labels: Any = None  # arcdeploy.fidelity_groups.FaceLabels: each face's groups (None: colour only)


def normalize_precision(precision: str) -> str:
    return parse_precision(precision)


def check_engine_precision(
    engine: str, precision: str, fold_preprocessing: bool = False, batch: int | None = None
) -> None:
    """Fail early, before any export, for combinations that cannot be built here."""
    eng = get_engine(engine)
    if precision not in eng.capabilities.precisions:
        from .engines import engine_names

        others = [e for e in engine_names() if precision in get_engine(e).capabilities.precisions]
        raise ArcdeployError(f"engine {engine} has no {precision} build; use --engine {' or '.join(others)}")
    eng.check_precision(precision)
    if fold_preprocessing and not eng.capabilities.folds_preprocessing:
        raise ArcdeployError(f"--fold-preprocessing is not available with --engine {engine}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and int(value) < 1:
        raise ArcdeployError(f"--{name} must be at least 1, got {value}")


def build(
    src,
    out,
    engine: str = DEFAULT_ENGINE,
    precision: str = "fp32",
    calib=None,
    calib_landmarks=None,
    batch: int | None = None,
    threads: int | None = None,
    arch: str = "auto",
    force: bool = False,
    strict: bool = False,
    calib_count: int | None = None,
    fold_preprocessing: bool = False,
    check_images=None,
    check_landmarks=None,
    check_count: int | None = None,
    recipe: QuantRecipe | None = None,
    fallback: bool = True,
    max_cosine_drop: float | None = None,
    onnx_options: dict | None = None,
    default_check_images: CheckImages | None = None,
    calib_detector=None,
    **options: Any,
) -> Path:
    """Build ``src`` (checkpoint, export folder, exported or foreign model.onnx) into the package ``out``.

    ``calib``: for int8, an image folder, list file, list of paths, or aligned uint8 crops
    [N, 112, 112, 3]; ``calib_landmarks`` a 5-point landmark file for photos, or ``calib_detector``
    a face detector (file or opened) that finds the largest face in each photo. ``batch``: the
    batch the model is compiled for (OpenVINO: a static shape). ``fold_preprocessing``:
    the graph takes uint8 NHWC RGB and normalises inside. ``check_images``: aligned crops,
    a folder / list of images (with ``check_landmarks``) or a :class:`CheckImages` for the
    fidelity check (default: the calibration images the int8 build held out).
    ``recipe``: the int8 recipe (default :meth:`QuantRecipe.for_this_cpu`); ``fallback``:
    keep sensitive layers in float until the floor (or ``max_cosine_drop``) is met.
    ``onnx_options``: ``input_mean`` / ``input_std`` / ``bgr`` for a foreign ONNX.
    ``default_check_images``: what to check on when none of the above gives images. Returns ``out``.
    """
    from .calibration_set import check_calibration_set
    from .faces.calibration import calibration_split, load_images
    from .faces.prepare import as_detection, exclusive_landmarks_detector
    from .fidelity import check, floor_for

    requested = precision
    precision = parse_precision(precision)
    engine = engine or DEFAULT_ENGINE
    out = Path(out)
    refuse_existing(out, force)
    for name, value in (("batch", batch), ("threads", threads), ("check-count", check_count)):
        _positive(name, value)
    check_engine_precision(engine, precision, fold_preprocessing, batch)
    eng = get_engine(engine)
    if max_cosine_drop is not None and not 0 < float(max_cosine_drop) < 1:
        raise ArcdeployError(f"--max-cosine-drop must be between 0 and 1, got {max_cosine_drop}")

    exclusive_landmarks_detector(calib_landmarks, calib_detector, "--calib-landmarks", "--calib-detector")
    calib_detector = as_detection(calib_detector) if calib is not None else None
    split = None
    if precision == "int8":
        recipe = recipe or QuantRecipe.for_this_cpu(calibration_count=calib_count)
        split = calibration_split(calib, calib_landmarks, count=recipe.calibration_count, detector=calib_detector)
    started = time.time()
    with scratch_dir("build") as work:
        export_dir = _resolve_source(src, work, arch, onnx_options or {})
        exported = read_export_manifest(export_dir)
        with atomic_dir(out, force=force) as tmp:
            manifest = PackageManifest(
                engine=engine,
                precision=precision,
                requested_precision=requested,
                arch=exported.arch,
                input=exported.input.folded() if fold_preprocessing else exported.input,
                output=exported.output,
                batch=int(batch) if batch else None,
                threads=int(threads) if threads else None,
                source=exported.source,
                export={
                    "opset": exported.opset,
                    "verification": exported.verification,
                    "input": exported.input.to_json(),
                },
                host={"cpu": cpu_name(), "flags": relevant_flags()},
            )
            cal_set = check_calibration_set(split.calib, export_dir, exported, options) if split else None
            ts = exported.file(export_dir, "torchscript") if "torchscript" in exported.files else None
            job = BuildJob(
                onnx_path=exported.file(export_dir, "onnx"),
                out_dir=tmp,
                manifest=manifest,
                precision=precision,
                input=exported.input,
                torchscript_path=ts,
                recipe=recipe,
                calib_inputs=exported.input.to_model_input(split.calib.faces) if split else None,
                batch=batch,
                fold_preprocessing=fold_preprocessing,
                options=options,
            )
            eng.build(job)
            for w in job.warnings:
                log.warning(w)
            if split:
                how = _calibration_images(split, calib_landmarks, calib_detector)
                manifest.calibration = {**(manifest.calibration or {}), **how, "set": cal_set and cal_set.to_json()}
            manifest.reference = _store_reference(export_dir, exported, tmp, manifest)
            manifest.versions = library_versions(
                "arcdeploy", "torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy"
            )
            write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())

            images = _check_images(
                check_images,
                check_landmarks,
                check_count,
                split,
                calib,
                calib_landmarks,
                precision,
                load_images,
                default_check_images,
                calib_detector,
            )
            floor = floor_for(precision, max_cosine_drop)
            result = check(
                tmp,
                images=images.faces,
                threads=threads,
                images_label=images.label,
                images_source=images.source,
                floor=floor,
                labels=images.labels,
            )
            if not result.passed and precision == "int8" and fallback and split is not None:
                from .fallback import keep_sensitive_layers_float

                result = keep_sensitive_layers_float(eng, job, split, images, floor, threads)
            manifest.fidelity = result.summary()
            manifest.fidelity_groups = result.groups
            manifest.build_seconds = round(time.time() - started, 1)
            write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
            if not result.passed:
                msg = (
                    f"{engine} {precision}: fidelity below the floor against the fp32 reference "
                    f"({', '.join(result.below_floor)}; {result.cosine.n} {result.images} images)"
                )
                if strict:
                    raise ArcdeployError(msg + "; package not written (--strict)")
                log.warning(msg)
    return out


def _resolve_source(src, work: Path, arch: str, onnx_options: dict) -> Path:
    from .sources import resolve_export

    return resolve_export(src, work, arch, **onnx_options)


def _calibration_images(split, calib_landmarks, detection=None) -> dict:
    cal = split.calib
    if cal.source == "array":
        how = "aligned crops given as an array"
    elif detection is not None:
        how = f"faces found by {detection.describe()}"
    elif calib_landmarks:
        how = f"5-point similarity alignment with {calib_landmarks}"
    else:
        how = "taken as aligned crops (resized to 112x112 if needed)"
    entry: dict[str, Any] = {"count": int(len(cal.faces)), "source": cal.source, "preprocessing": how}
    if cal.skipped:
        entry["skipped"] = cal.skipped[:20]
        entry["skipped_count"] = len(cal.skipped)
    return entry


def _check_images(
    check_images,
    check_landmarks,
    check_count,
    split,
    calib,
    calib_landmarks,
    precision,
    load_images,
    default: CheckImages | None,
    calib_detector=None,
) -> CheckImages:
    """Images for the build's fidelity check: given ones, else the calibration images held out
    by an int8 build, else (other precisions) the calibration images."""
    if isinstance(check_images, CheckImages):
        return check_images
    if check_images is not None:
        got = load_images(check_images, check_landmarks, limit=check_count, what="check images")
        return CheckImages(got.faces, got.source, got.source, labels_of_image_set(got))
    if split is not None and split.holdout is not None:
        h = split.holdout.head(check_count)
        return CheckImages(h.faces, f"held-out calibration images ({h.source})", h.source, labels_of_image_set(h))
    if calib is not None and precision != "int8":
        got = load_images(calib, calib_landmarks, limit=check_count or 64, what="check images", detector=calib_detector)
        label = f"calibration images ({got.source}; not used by a {precision} build)"
        return CheckImages(got.faces, label, got.source, labels_of_image_set(got))
    if default is not None:
        return default
    raise ArcdeployError(
        "no images for the fidelity check: pass check images (--check-images) "
        "or enough calibration images to hold some out"
    )


def _store_reference(export_dir: Path, exported, tmp: Path, manifest: PackageManifest) -> ReferenceSpec:
    """Keep the fp32 reference so the package can be checked on its own."""
    ref = exported.reference
    src = resolve_inside(export_dir, ref.file, str(export_dir / MANIFEST_NAME), "reference.file")
    if manifest.engine == "torch" and ref.kind == "torchscript":
        rel = "model.pt"  # the package's own model is the fp32 TorchScript (cast when it runs)
    else:
        rel = f"{REFERENCE_DIR}/{Path(ref.file).name}"
        (tmp / REFERENCE_DIR).mkdir(exist_ok=True)
        shutil.copyfile(src, tmp / rel)
    return replace(ref, file=rel, sha256=sha256_file(tmp / rel))
