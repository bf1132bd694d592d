"""Build: a model source -> a verified package for one engine and precision.

Orchestration only: the source becomes an export folder (:mod:`arcdeploy.exporter`),
the engine's builder writes its files (:mod:`arcdeploy.engines`), int8 follows a
:class:`~arcdeploy.quantize.QuantRecipe`, the fp32 reference is stored in the
package, and the package is checked per image against it
(:mod:`arcdeploy.fidelity`), overall and by group (:mod:`arcdeploy.fidelity_groups`).
An int8 build first measures its calibration set against what the recipe needs
(:mod:`arcdeploy.calibration_set`). Below the precision's floor the accuracy-aware
fallback keeps the most sensitive layers in float until it passes
(:mod:`arcdeploy.fallback`); still below, the build warns, or with ``strict`` fails
and writes nothing. What to build is a :class:`~arcdeploy.options.BuildOptions`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .engines import BuildJob, Engine, get_engine
from .errors import ArcdeployError, in_users_terms
from .files import atomic_dir, refuse_existing, scratch_dir, write_json_atomic
from .machine import cpu_name, relevant_flags
from .manifest import (
    MANIFEST_NAME,
    CalibrationRecord,
    ExportManifest,
    ExportRecord,
    HostRecord,
    PackageManifest,
    ReferenceSpec,
    read_export_manifest,
    resolve_inside,
)
from .onnx_files import copy_onnx, data_entries
from .options import BuildOptions, CheckImages
from .quantize import QuantRecipe
from .types import Precision
from .utils import library_versions, sha256_file

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference"


def check_engine_precision(engine: str, precision: Precision, fold_preprocessing: bool = False) -> None:
    """Fail early, before any export, for combinations that cannot be built here."""
    eng = get_engine(engine)
    if precision not in eng.capabilities.precisions:
        from .engines import engine_names

        others = [e for e in engine_names() if precision in get_engine(e).capabilities.precisions]
        raise ArcdeployError(f"engine {engine} has no {precision} build; use --engine {' or '.join(others)}")
    eng.check_precision(precision)
    if fold_preprocessing and not eng.capabilities.folds_preprocessing:
        raise ArcdeployError(f"--fold-preprocessing is not available with --engine {engine}")


def build(src, out, options: BuildOptions | None = None, **kwargs: Any) -> Path:
    """Build ``src`` (checkpoint, export folder, exported or foreign model.onnx) into the package ``out``,
    as ``options`` say (or the keyword arguments of :class:`BuildOptions`). Returns ``out``."""
    if options is not None and kwargs:
        raise TypeError("build(): give options or keyword arguments, not both")
    opts = options or BuildOptions.from_kwargs(**kwargs)
    from .detector_package import build_detector, is_detector_source

    if is_detector_source(src):  # a face detector (SCRFD ONNX) builds into a detector package
        if opts.auto_precision:
            raise ArcdeployError(f"{src}: --precision auto chooses among recognition packages; name a precision")
        return build_detector(
            src,
            out,
            opts.engine,
            opts.precision,
            opts.calib,
            opts.calib_count,
            opts.check_images,
            opts.check_count,
            opts.threads,
            opts.force,
            opts.strict,
            opts.recipe,
            input_size=opts.input_size,
            fallback=opts.fallback,
        )
    if opts.auto_precision:  # the candidates this CPU runs fast, each checked and timed; the choice kept
        from .auto_precision import build_auto

        return build_auto(src, out, opts, build)
    out = Path(out)
    refuse_existing(out, opts.force)
    opts.validate()
    check_engine_precision(opts.engine, opts.precision, opts.fold_preprocessing)
    eng = get_engine(opts.engine)
    recipe, split, detection = _calibration(opts)
    started = time.time()
    places: dict[str, str] = {}  # our temporary folders, and what the user calls what is in them
    try:
        return _build(src, out, opts, eng, recipe, split, detection, started, places)
    except ArcdeployError as exc:
        raise in_users_terms(exc, places) from None


def _build(src, out: Path, opts: BuildOptions, eng, recipe, split, detection, started: float, places) -> Path:
    from .exporter import resolve_export

    with scratch_dir("build") as work:
        places[str(work)] = str(src)
        export_dir = resolve_export(src, work, opts.arch, **opts.onnx_options)
        exported = read_export_manifest(export_dir)
        with atomic_dir(out, force=opts.force) as tmp:
            places[str(tmp)] = str(out)
            job = _build_engine_files(eng, opts, exported, export_dir, tmp, recipe, split, detection)
            images = _check_images(opts, split, detection)
            result = _check_fidelity(eng, job, opts, split, images)
            job.manifest.fidelity = result.summary()
            job.manifest.build_seconds = round(time.time() - started, 1)
            write_json_atomic(tmp / MANIFEST_NAME, job.manifest.to_json())
            if not result.passed:
                msg = (
                    f"{opts.engine} {opts.precision}: fidelity below the floor against the fp32 reference "
                    f"({', '.join(result.below_floor)}; {result.cosine.n} {result.images} images)"
                )
                if opts.strict:
                    raise ArcdeployError(msg + "; package not written (--strict)")
                log.warning(msg)
    return out


def _calibration(opts: BuildOptions) -> tuple[QuantRecipe | None, Any, Any]:
    """(the int8 recipe, the calibration images split into calibration and held-out ones, the face
    detection that found them); the recipe and split only for int8."""
    from .calibration_set import refuse_too_few
    from .faces.calibration import calibration_split
    from .faces.prepare import as_detection, exclusive_landmarks_detector

    exclusive_landmarks_detector(opts.calib_landmarks, opts.calib_detector, "--calib-landmarks", "--calib-detector")
    detection = as_detection(opts.calib_detector) if opts.calib is not None else None
    if opts.precision is not Precision.INT8:
        return None, None, detection
    recipe = opts.recipe or QuantRecipe.for_this_cpu(calibration_count=opts.calib_count)
    split = calibration_split(opts.calib, opts.calib_landmarks, count=recipe.calibration_count, detector=detection)
    refuse_too_few(split.calib, opts.accept_calib)  # before the export: the count alone decides
    return recipe, split, detection


def _build_engine_files(
    eng: Engine, opts: BuildOptions, exported: ExportManifest, export_dir: Path, tmp: Path, recipe, split, detection
) -> BuildJob:
    """The engine's files in ``tmp``, the fp32 reference beside them, and the manifest; the engine's job."""
    from .calibration_set import check_calibration_set

    manifest = PackageManifest(
        engine=opts.engine,
        precision=opts.precision,
        requested_precision=opts.requested_precision,
        arch=exported.arch,
        input=exported.input.folded() if opts.fold_preprocessing else exported.input,
        output=exported.output,
        batch=int(opts.batch) if opts.batch else None,
        threads=int(opts.threads) if opts.threads else None,
        source=exported.source,
        export=ExportRecord(opset=exported.opset, verification=exported.verification, input=exported.input),
        host=HostRecord(cpu=cpu_name(), flags=relevant_flags()),
    )
    # measured against what the recipe needs (the fp32 export tells one person from many)
    cal_set = check_calibration_set(split.calib, export_dir, exported, opts.accept_calib) if split else None
    ts = exported.file(export_dir, "torchscript") if "torchscript" in exported.files else None
    job = BuildJob(
        onnx_path=exported.file(export_dir, "onnx"),
        out_dir=tmp,
        manifest=manifest,
        precision=opts.precision,
        input=exported.input,
        torchscript_path=ts,
        recipe=recipe,
        calib_inputs=exported.input.to_model_input(split.calib.faces) if split else None,
        batch=opts.batch,
        fold_preprocessing=opts.fold_preprocessing,
        options=opts.engine_options,
    )
    eng.build(job)
    for w in job.warnings:
        log.warning(w)
    if split:
        assert manifest.calibration is not None  # every int8 engine writes its recipe's entry
        manifest.calibration = replace(
            _calibration_images(manifest.calibration, split, opts.calib_landmarks, detection), calibration_set=cal_set
        )
    manifest.reference = _store_reference(eng, export_dir, exported, tmp, manifest)
    manifest.versions = library_versions("arcdeploy", "torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy")
    write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
    return job


def _check_fidelity(eng: Engine, job: BuildJob, opts: BuildOptions, split, images: CheckImages):
    """The package against its fp32 reference on ``images``; an int8 package below the floor gets
    the accuracy-aware fallback (when allowed)."""
    from .fidelity import check, floor_for

    floor = floor_for(opts.precision, opts.max_cosine_drop)
    result = check(
        job.out_dir,
        images=images.faces,
        threads=opts.threads,
        images_label=images.label,
        images_source=images.source,
        floor=floor,
        labels=images.labels,
    )
    if not result.passed and opts.precision is Precision.INT8 and opts.fallback and split is not None:
        from .fallback import keep_sensitive_layers_float

        result = keep_sensitive_layers_float(eng, job, split, images, floor, opts.threads)
    return result


def _calibration_images(entry: CalibrationRecord, split, calib_landmarks, detection=None) -> CalibrationRecord:
    """The engine's calibration entry with what the calibration images were and how they were aligned."""
    cal = split.calib
    if cal.source == "array":
        how = "aligned crops given as an array"
    elif detection is not None:
        how = f"faces found by {detection.describe()}"
    elif calib_landmarks:
        how = f"5-point similarity alignment with {calib_landmarks}"
    else:
        how = "taken as aligned crops (resized to 112x112 if needed)"
    return replace(
        entry,
        count=int(len(cal.faces)),
        source=cal.source,
        preprocessing=how,
        skipped=cal.skipped[:20] if cal.skipped else None,
        skipped_count=len(cal.skipped) if cal.skipped else None,
    )


def _check_images(opts: BuildOptions, split, detection) -> CheckImages:
    """Images for the build's fidelity check: given ones, else the calibration images held out
    by an int8 build, else (other precisions) the calibration images."""
    from .faces.calibration import load_images
    from .fidelity_groups import labels_of_image_set

    given, count = opts.check_images, opts.check_count
    if isinstance(given, CheckImages):
        return given
    if given is not None:
        got = load_images(given, opts.check_landmarks, limit=count, what="check images")
        return CheckImages(got.faces, got.source, got.source, labels_of_image_set(got))
    if split is not None and split.holdout is not None:
        h = split.holdout.head(count)
        return CheckImages(h.faces, f"held-out calibration images ({h.source})", h.source, labels_of_image_set(h))
    if opts.calib is not None and opts.precision is not Precision.INT8:
        got = load_images(opts.calib, opts.calib_landmarks, limit=count or 64, what="check images", detector=detection)
        label = f"calibration images ({got.source}; not used by a {opts.precision} build)"
        return CheckImages(got.faces, label, got.source, labels_of_image_set(got))
    if opts.default_check_images is not None:
        return opts.default_check_images
    raise ArcdeployError(
        "no images for the fidelity check: pass check images (--check-images) "
        "or enough calibration images to hold some out"
    )


def _store_reference(
    eng: Engine, export_dir: Path, exported: ExportManifest, tmp: Path, manifest: PackageManifest
) -> ReferenceSpec:
    """Keep the fp32 reference so the package can be checked on its own: the engine's own model
    file when the engine says it is the reference, else a copy under ``reference/``."""
    ref = exported.reference
    src = resolve_inside(export_dir, ref.file, str(export_dir / MANIFEST_NAME), "reference.file")
    if ref.kind in eng.capabilities.model_is_reference:
        rel = manifest.files["model"]
    else:
        rel = f"{REFERENCE_DIR}/{Path(ref.file).name}"
        (tmp / REFERENCE_DIR).mkdir(exist_ok=True)
        if ref.kind == "onnx":  # with the data files of a model that keeps its weights beside it
            data = copy_onnx(src, tmp / rel)
            manifest.files.update(data_entries("reference", [f"{REFERENCE_DIR}/{n}" for n in data]))
        else:
            shutil.copyfile(src, tmp / rel)
    return replace(ref, file=rel, sha256=sha256_file(tmp / rel))
