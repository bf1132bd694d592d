"""A face detector is a package too: an SCRFD ONNX file -> a verified detector package.

``arcdeploy build scrfd_500m_kps.onnx --engine openvino|onnxruntime --precision fp32|bf16|int8
[--calib PHOTOS] [--input-size WxH] -o PKG`` (the build command routes a detector source here):

1. the graph gets a real batch axis and a fixed input (640x640 by default;
   :mod:`arcdeploy.faces.detectors.graph`), checked against the source: canvases run together give
   what each gives alone;
2. the engine builds it as it builds a recognition model (:class:`~arcdeploy.engines.BuildJob`: the
   same precision hints, and for int8 the same :class:`~arcdeploy.quantize.QuantRecipe` with full
   bias correction, calibrated on letterboxed canvases of the calibration photos made by the
   detector's own canvas function), taking uint8 NHWC canvases and normalising ``(x - 127.5) / 128`` inside the graph;
3. its fidelity is checked in a detector's own terms against the source ONNX (run as insightface
   runs it, ONNX Runtime fp32) on held-out photos (:func:`detector_fidelity`): every face over the
   threshold matched with box IoU >= 0.9, none lost or added, landmarks within 1% (mean) and 3%
   (max, on faces whose eyes are at least 16 canvas pixels apart: ``FLOOR``) of the inter-ocular
   distance; recorded in the manifest (:class:`~arcdeploy.manifest.DetectorManifest`);
4. an int8 package below the floor keeps its most sensitive layers in float until calibration
   photos meet it (:mod:`arcdeploy.detector_fallback`, the recognition fallback's search; not with
   ``fallback=False``, ``--no-fallback``). Still below, the build warns, or with ``strict`` fails
   and writes nothing.

The package is opened wherever a detector file is taken (``--detector PKG``,
:mod:`arcdeploy.faces.detectors.package`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .detector_check import FLOOR, SMALL_IOD, detector_fidelity, reference_faces
from .engines import BuildJob, get_engine
from .engines.registry import DEFAULT_ENGINE
from .errors import ArcdeployError
from .files import atomic_dir, refuse_existing, scratch_dir, write_json_atomic
from .machine import cpu_name, relevant_flags
from .manifest import (
    MANIFEST_NAME,
    DetectorFidelity,
    DetectorManifest,
    InputSpec,
    PackageManifest,
)
from .types import Precision
from .utils import library_versions, sha256_file

__all__ = ["FLOOR", "SMALL_IOD", "build_detector", "detector_fidelity", "is_detector_source", "reference_faces"]

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (640, 640)
# canvases the int8 build calibrates on (a 640x640 float canvas is 4.9 MB), and photos held out
DEFAULT_CALIB_COUNT = 100
DEFAULT_CHECK_COUNT = 32
# int8: the recognition recipe (QuantRecipe.for_this_cpu: depthwise convolutions in float, each
# canvas's own ranges) with full bias correction. Measured on SCRFD-500M (OpenVINO, AVX-512 VNNI; 64
# calibration canvases, the 13 held-out photos of bench_photos.py): against NNCF's own ranges with
# depthwise quantized (the detector recipe before), the landmark error on faces of a useful size fell
# from 0.94% to 0.53% of the IOD (mean; max 1.9% -> 0.79%), on the group photo's 16-px faces from
# 5.6% to 1.4% (max 16% -> 5.6%), no face lost (one before), box IoU >= 0.96 (0.84), for 8% of
# detector speed. Keeping the landmark head's convolutions float as well gained 0.1 point for 12%
# more. NNCF's full bias correction (layer by layer, on the calibration canvases) in place of its
# fast one gained more for nothing: over four calibration sets (60 or 120 LFW photos + 4 group
# photos) that error came to 0.40-0.45% (0.53-0.54% with the fast one on three of them), at the
# same detector speed (12.1 ms per 640x640 canvas on one thread either way), for builds of 26-48 s
# against 24-32 (the embeddings' cosine to insightface's loop: README.md).
DETECTOR_BIAS_CORRECTION = "full"
# OpenVINO: the stem quantized too, its input quantizer on the exact grid of the canvas's uint8 pixels
# (QuantRecipe.pixel_input): its input then loses nothing, and the plugin feeds the pixels to an int8
# convolution instead of normalising and reordering a float copy of the canvas first. Measured on
# SCRFD-500M (AVX-512 VNNI EPYC, the bench_photos.py calibration, before any fallback): the landmark
# error on the check photos 1.31% of the IOD (mean) against 1.30% with the stem in float (1.43% with the
# stem's input on NNCF's own range), and 0.93x the time a canvas (11.5 against 12.4 ms, one thread).
# ONNX Runtime keeps the stem in float (its quantizer has no such grid here).
REFERENCE_DIR = "reference"


def is_detector_source(src) -> bool:
    """Whether ``src`` is an ONNX file whose graph is a face detector's (a near miss, e.g. SCRFD
    without keypoints, is a one-line error; a file that is no ONNX is left to the model path)."""
    from .faces.detectors.base import read_graph_io
    from .faces.detectors.registry import kind_of_graph

    path = Path(src) if isinstance(src, (str, Path)) else None
    if path is None or path.suffix.lower() != ".onnx" or not path.is_file():
        return False
    try:
        graph = read_graph_io(path)
    except ArcdeployError:
        return False
    return kind_of_graph(graph) is not None


@dataclass
class _Photos:
    calib: list  # DecodedImage
    check: list
    source: str
    skipped: list[str]


def _read_photos(spec, count: int, check_count: int, what: str) -> _Photos:
    """Photos decoded in full, in order: the first ``count`` usable ones, then up to ``check_count`` more."""
    from .faces.io import decode_image, list_images, read_image_bytes
    from .faces.types import DecodedImage, ImageError

    if isinstance(spec, (list, tuple)):
        paths, source = [Path(p) for p in spec], f"{len(spec)} listed photos"
    else:
        paths, source = list_images(spec), str(spec)
    got: list[DecodedImage] = []
    skipped: list[str] = []
    for p in paths:
        if len(got) >= count + check_count:
            break
        try:
            data = read_image_bytes(p)
            got.append(DecodedImage.full(decode_image(data, p), None, str(p)))
        except ImageError as exc:
            skipped.append(str(exc))
    if not got:
        raise ArcdeployError(f"{source}: no usable {what}" + (f" (first: {skipped[0]})" if skipped else ""))
    if skipped:
        log.warning("%s: skipped %d unusable photo(s), first: %s", source, len(skipped), skipped[0])
    return _Photos(got[:count], got[count:], source, skipped)


def _photos(calib, check_images, count: int, n_check: int):
    """(the calibration photos and those they hold out, the check photos, what the check photos are)."""
    photos = _read_photos(calib, count, 0 if check_images else n_check, "calibration photos") if calib else None
    if check_images is not None:
        checked = _read_photos(check_images, 0, n_check, "check photos")
        return photos, checked.check, checked.source
    if photos is not None and (photos.check or not count):
        return photos, photos.check or photos.calib, f"{'held-out ' if photos.calib else ''}photos of {photos.source}"
    raise ArcdeployError(
        "no photos for the detector's fidelity check: pass --check-images PHOTOS, or more --calib photos "
        "than --calib-count"
    )


def build_detector(
    src,
    out,
    engine: str = DEFAULT_ENGINE,
    precision: str = "fp32",
    calib=None,
    calib_count: int | None = None,
    check_images=None,
    check_count: int | None = None,
    threads: int | None = None,
    force: bool = False,
    strict: bool = False,
    recipe=None,
    input_size: tuple[int, int] | None = None,
    fallback: bool = True,
    **ignored: Any,
) -> Path:
    """Build the SCRFD ONNX ``src`` into the detector package ``out`` (module doc). ``calib``: photos
    (a folder, a list file or paths) whose first ``calib_count`` (default 100) calibrate int8 and
    whose next ``check_count`` (default 32) check fidelity; ``check_images``: photos for the check
    instead; ``fallback``: an int8 package below its floor keeps its most sensitive layers in float
    (:mod:`arcdeploy.detector_fallback`). Returns ``out``."""
    started = time.time()
    requested, precision = str(precision), Precision.parse(precision)
    engine = engine or DEFAULT_ENGINE
    out, src = Path(out), Path(src)
    refuse_existing(out, force)
    eng = _engine_for(engine, precision)
    size = (int(input_size[0]), int(input_size[1])) if input_size else DEFAULT_INPUT_SIZE
    reference = _source_detector(src, size, threads)
    if precision is Precision.INT8 and calib is None:
        raise ArcdeployError(
            "int8 needs calibration photos: pass --calib PHOTOS (photos with faces, a hundred or so; "
            "those beyond --calib-count check the package's fidelity)"
        )
    count = int(calib_count or DEFAULT_CALIB_COUNT) if precision is Precision.INT8 else 0
    photos, check, check_source = _photos(calib, check_images, count, int(check_count or DEFAULT_CHECK_COUNT))

    with scratch_dir("build-detector") as work:
        batched = work / "detector.onnx"
        probe = _canvases(reference, check[:3])
        rewrites, worst = _batched_graph(src, batched, size, probe)
        spec = InputSpec(name=reference.input_name, size=(size[1], size[0]), mean=127.5, std=128.0)
        calib_x = _canvases(reference, photos.calib) if precision is Precision.INT8 and photos is not None else None
        if precision is Precision.INT8 and recipe is None:
            recipe = detector_recipe(engine, count)
        with atomic_dir(out, force=force) as tmp:
            job = _engine_files(eng, batched, tmp, spec, precision, threads, recipe, calib_x)
            (tmp / REFERENCE_DIR).mkdir(exist_ok=True)
            ref_rel = f"{REFERENCE_DIR}/{src.name}"
            shutil.copyfile(src, tmp / ref_rel)

            fixed = dict(  # what the manifest says whatever the fallback does
                kind="scrfd",
                engine=engine,
                precision=precision,
                input=spec.folded(),
                strides=tuple(reference.strides),
                anchors=2 if reference.levels == 3 else 1,
                reference=ref_rel,
                reference_sha256=sha256_file(tmp / ref_rel),
                requested_precision=requested,
                source={"file": str(src), "name": src.name, "sha256": sha256_file(src)},
                graph_rewrites=rewrites,
                batch_check={"batch": len(probe), "max_abs_diff": worst},
                host={"cpu": cpu_name(), "flags": relevant_flags()},
                versions=library_versions("arcdeploy", "onnx", "onnxruntime", "openvino", "nncf", "numpy"),
            )
            manifest = _manifest(job, fixed, photos)
            write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
            fidelity = _fidelity(tmp, reference, check, check_source, threads)
            if not fidelity.passed and precision is Precision.INT8 and fallback and photos is not None:
                checks = (check, check_source)
                manifest, fidelity = _fallback(eng, job, fixed, photos, reference, fidelity, checks, threads)
            _record(manifest, tmp, fidelity, started, strict, src)
    return out


def _manifest(job, fixed: dict, photos, fallback_record: dict | None = None) -> DetectorManifest:
    """The detector manifest: ``fixed`` and the engine's entries of ``job`` (as a recognition build
    records them: files, calibration, what executes), the fallback's record in the calibration entry."""
    scratch = job.manifest
    calibration = None
    if scratch.calibration is not None and photos is not None:
        calibration = {
            **scratch.calibration.to_json(),
            "photos": photos.source,
            "canvases": len(photos.calib),
            **({"fallback": fallback_record} if fallback_record else {}),
        }
    return DetectorManifest(
        **fixed,
        files=dict(scratch.files),
        calibration=calibration,
        executed=scratch.executed.to_json() if scratch.executed is not None else None,
        engine_config=dict(scratch.engine_config),
    )


def _fallback(eng, job, fixed: dict, photos, reference, missed, checks: tuple[list, str], threads):
    """The int8 build ``job`` that ``missed`` its floor, with its most sensitive layers in float
    (:mod:`arcdeploy.detector_fallback`): its manifest (written) and its fidelity on the check photos
    (``checks``: the photos and what they are)."""
    from .detector_fallback import keep_sensitive_layers_float

    tmp = job.out_dir
    log.info("%s int8 detector below its floor (%s): fallback", eng.name, "; ".join(missed.below_floor))
    record, nothing_left = keep_sensitive_layers_float(eng, job, reference, photos.calib, FLOOR, missed, threads)
    manifest = _manifest(job, fixed, photos, record)
    write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
    fidelity = missed
    if record["kept_float"]:  # requantized: checked again, as every build is
        fidelity = _fidelity(tmp, reference, *checks, threads)
    if nothing_left:  # an fp32 detector under an int8 label is no int8 package: said where the verdict is read
        fidelity = replace(fidelity, passed=False, below_floor=[*fidelity.below_floor, nothing_left])
    return manifest, fidelity


def _canvases(reference, images) -> np.ndarray:
    """Normalised canvases [N, 3, H, W], as the source graph takes them."""
    x = np.stack([reference.canvas(img)[0] for img in images]).transpose(0, 3, 1, 2).astype(np.float32)
    return (x - 127.5) / 128.0


def _source_detector(src: Path, size: tuple[int, int], threads):
    """The source SCRFD run as it is (ONNX Runtime, the canvas asked for): the reference."""
    from .faces.detectors.base import read_graph_io
    from .faces.detectors.registry import kind_of_graph
    from .faces.detectors.scrfd import ScrfdDetector

    graph = read_graph_io(src)
    kind = kind_of_graph(graph)
    if kind is not ScrfdDetector:
        raise ArcdeployError(
            f"{src}: a {getattr(kind, 'kind', 'face')} detector; only SCRFD builds into a detector package "
            "(YuNet runs in OpenCV as it is: give the file to --detector)"
        )
    return ScrfdDetector(graph, engine="onnxruntime", input_size=size, threads=threads)


def _batched_graph(src: Path, batched: Path, size: tuple[int, int], probe: np.ndarray) -> tuple[list, float]:
    """The source with a real batch axis at a fixed canvas, written to ``batched`` and checked
    against the source on ``probe`` canvases: (the rewrites, the largest difference)."""
    from .faces.detectors.graph import batch_check, write_batched

    rewrites = write_batched(src, batched, size)
    worst = batch_check(src, batched, probe)
    if not worst <= 1e-3:
        raise ArcdeployError(f"{src}: the graph with a batch axis differs from the source by {worst:g}; refused")
    return rewrites, worst


def detector_recipe(engine: str, count: int):
    """The int8 recipe of a detector package (the comments at ``DETECTOR_BIAS_CORRECTION``): the
    recognition recipe with full bias correction; on OpenVINO the stem quantized on the pixels' grid."""
    from .quantize import QuantRecipe

    recipe = QuantRecipe.for_this_cpu(calibration_count=count, bias_correction=DETECTOR_BIAS_CORRECTION)
    if engine != "openvino":
        return recipe
    return replace(recipe, keep_float=tuple(r for r in recipe.keep_float if r != "stem"), pixel_input=True)


def _engine_files(eng, batched: Path, tmp: Path, spec: InputSpec, precision: Precision, threads, recipe, calib_x):
    """The engine's build of the batched graph into ``tmp``: its job, whose manifest holds what a
    recognition package's would (files, calibration, what executes)."""
    scratch = PackageManifest(engine=eng.name, precision=precision, arch="scrfd", input=spec, threads=threads)
    job = BuildJob(
        onnx_path=batched,
        out_dir=tmp,
        manifest=scratch,
        precision=precision,
        input=spec,
        recipe=recipe,
        calib_inputs=calib_x,
        fold_preprocessing=True,
    )
    eng.build(job)
    for w in job.warnings:
        log.warning(w)
    return job


def _engine_for(engine: str, precision: Precision):
    eng = get_engine(engine)
    if precision not in eng.capabilities.precisions:
        raise ArcdeployError(f"engine {engine} has no {precision} build")
    eng.check_precision(precision)
    return eng


def _fidelity(tmp: Path, reference, check, check_source, threads) -> DetectorFidelity:
    """The detector built into ``tmp`` against its source on the check photos."""
    from .faces.detectors.registry import DetectorSpec

    return detector_fidelity(reference, DetectorSpec(tmp, threads=threads).open(), check, check_source)


def _record(manifest, tmp: Path, fidelity: DetectorFidelity, started, strict, src) -> None:
    """The fidelity recorded in the manifest; below the floor a warning, or with ``strict`` a
    refusal (nothing written)."""
    manifest.fidelity = fidelity
    manifest.build_seconds = round(time.time() - started, 1)
    write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
    if not fidelity.passed:
        msg = (
            f"{manifest.engine} {manifest.precision} detector: fidelity below the floor against {src.name} "
            f"({'; '.join(fidelity.below_floor)}; {fidelity.images} photos)"
        )
        if strict:
            raise ArcdeployError(msg + "; package not written (--strict)")
        log.warning(msg)


def summary_lines(out) -> list[str]:
    """What ``arcdeploy build`` prints for a detector package."""
    from .manifest import read_detector_manifest

    m = read_detector_manifest(out)
    w, h = m.canvas
    lines = [f"built SCRFD detector {m.engine} {m.precision} ({w}x{h}, batch axis) -> {out}"]
    ex = m.executed or {}
    if ex.get("layers"):
        lines.append(
            f"  executes: {ex['inference_precision']} ({', '.join(f'{k} {v}' for k, v in ex['layers'].items())})"
        )
    if m.calibration:
        lines.append(
            f"  calibration: {m.calibration.get('canvases')} photos from {m.calibration.get('photos')}; kept in "
            f"float: {len(m.calibration.get('kept_float', []))} ops"
        )
        fb = m.calibration.get("fallback")
        if fb and not fb["kept_float"]:
            lines.append(f"  fallback: none ({fb.get('nothing_to_do', 'no layer to put back in float')})")
        elif fb:
            b, a = fb["validation_before"], fb["validation_after"]
            speed = fb.get("speed") or {}
            lines.append(
                f"  fallback: {len(fb['kept_float'])} of {fb['candidates']} quantized layers back in float "
                f"(validation: {fb['validation_photos']} calibration photos, landmarks mean "
                f"{b['landmark_error_mean']:.2%} -> {a['landmark_error_mean']:.2%} of the IOD); "
                f"detector speed {speed.get('fallback_vs_recipe', float('nan')):.2f}x the recipe's int8"
                + ("; no int8 layer left" if fb.get("no_int8_left") else "")
            )
    f = m.fidelity
    if f is not None:
        state = "passed" if f.passed else "BELOW FLOOR (" + "; ".join(f.below_floor) + ")"
        lines.append(
            f"  fidelity vs {m.source.get('name')} on {f.images} {f.source}: {f.matched}/{f.reference_faces} faces "
            f"matched, {f.lost} lost, {f.added} added ({f.borderline} borderline), box IoU min {f.min_iou:.3f}, "
            f"landmarks mean {f.landmark_error_mean:.2%} of the IOD, max {f.landmark_error_max_judged:.2%} on "
            f"faces of a useful size ({f.landmark_error_max:.2%} over all) -> {state}"
        )
        for band in ("large", "small"):
            b = f.by_size.get(band) or {}
            if b.get("faces"):
                lines.append(
                    f"    {band} faces (eyes {'under' if band == 'small' else 'at least'} "
                    f"{f.by_size.get('small_iod_canvas_px', SMALL_IOD):g} detector pixels apart): {b['faces']}, "
                    f"landmarks mean {b['landmark_error_mean']:.2%} max {b['landmark_error_max']:.2%}, "
                    f"box IoU min {b['min_iou']:.3f}"
                )
    return lines
