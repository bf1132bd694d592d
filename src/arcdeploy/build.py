"""Build: a checkpoint or export -> a verified package for one engine and precision.

Engines and precisions built here (CPU; GPU-only combinations fail with a
one-line reason when no GPU is present):

- openvino: fp32; bf16 / fp16 through ``INFERENCE_PRECISION_HINT`` (the
  precision the CPU plugin really executes is read back and recorded); int8
  through NNCF post-training quantization (MIXED preset: symmetric per-channel
  weights, asymmetric activations for PReLU nets), the fc + BN1d head kept in
  float.
- onnxruntime: fp32; int8 as static QDQ (per-channel int8 symmetric weights,
  uint8 asymmetric activations, head kept in float); fp16 only with a GPU provider.
- torch: the TorchScript fp32 model; fp16 / bf16 on a CUDA GPU.

Every build ends with a fidelity check against the fp32 PyTorch reference
(stored in the package as ``reference/model.pt``), recorded in the manifest.
Below the precision's floor the build warns; with ``strict`` it fails and
writes nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ArcdeployError
from .package import PACKAGE_FORMAT
from .utils import atomic_dir, cpu_flags, cpu_name, library_versions, sha256_file, write_json_atomic

PRECISION_ALIASES = {
    "force_float32": "fp32",
    "force_float16": "fp16",
    "qint8_mixed_float16": "int8",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ENGINE_PRECISIONS = {
    "openvino": ("fp32", "fp16", "bf16", "int8"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "torch": ("fp32", "fp16", "bf16"),
}
DEFAULT_ENGINE = "openvino"
REFERENCE_FILE = "reference/model.pt"
# OpenVINO's element types for the precision hint
OV_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
NORMALIZED_INPUT = {"mean": 127.5, "std": 127.5}


def normalize_precision(precision: str) -> str:
    p = PRECISION_ALIASES.get(precision, precision)
    if p not in PRECISIONS:
        raise ArcdeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} "
                             f"(or {', '.join(PRECISION_ALIASES)})")
    return p


def check_engine_precision(engine: str, precision: str) -> None:
    """Fail early, before any export, for combinations that cannot be built here."""
    from .engines import ENGINES, engine_class

    if engine not in ENGINES:
        raise ArcdeployError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if precision not in ENGINE_PRECISIONS[engine]:
        others = [e for e, ps in ENGINE_PRECISIONS.items() if precision in ps]
        raise ArcdeployError(f"engine {engine} has no {precision} build; use --engine {' or '.join(others)}")
    engine_class(engine)  # "engine X is not installed: pip install ..."
    if engine == "onnxruntime" and precision == "fp16":
        from .engines.onnxruntime import gpu_providers

        if not gpu_providers():
            raise ArcdeployError("precision fp16 needs a GPU for onnxruntime (CUDAExecutionProvider from "
                                 "onnxruntime-gpu; none here); use --engine openvino")
    if engine == "torch" and precision in ("fp16", "bf16"):
        import torch

        if not torch.cuda.is_available():
            raise ArcdeployError(f"precision {precision} needs a CUDA GPU for torch (none here); use --engine openvino")


def resolve_source(src: str | os.PathLike, workdir: Path, arch: str = "auto") -> Path:
    """An export folder for ``src``: a checkpoint (exported into ``workdir``), an export folder, or a model.onnx."""
    src = Path(src)
    if not src.exists():
        raise ArcdeployError(f"{src}: no such file or folder")
    if src.is_dir():
        if not (src / "manifest.json").exists() or not (src / "model.onnx").exists():
            raise ArcdeployError(f"{src}: not an export folder (needs model.onnx and manifest.json)")
        return src
    if src.suffix == ".onnx":
        if (src.parent / "manifest.json").exists():
            return src.parent
        raise ArcdeployError(f"{src}: an ONNX file without the manifest.json that arcdeploy export writes beside it")
    from .export import export

    return export(src, workdir / "export", arch=arch).out_dir


def has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI / AMX)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def folded_input(base: dict) -> dict:
    """The input spec of a graph that takes uint8 NHWC RGB and normalises inside."""
    return {**base, "layout": "NHWC", "dtype": "uint8", "normalize": dict(NORMALIZED_INPUT), "normalize_in_graph": True}


def build(src, out, engine: str = DEFAULT_ENGINE, precision: str = "fp32", calib=None, calib_landmarks=None,
          batch: int | None = None, threads: int | None = None, arch: str = "auto", force: bool = False,
          strict: bool = False, calib_count: int | None = None, fold_preprocessing: bool = False,
          check_images=None, check_landmarks=None, check_count: int | None = None, **options) -> Path:
    """Build ``src`` (checkpoint, export folder or model.onnx) into the package folder ``out``.

    ``calib``: for int8, an image folder, list file, list of paths, or aligned
    uint8 crops [N, 112, 112, 3]; ``calib_landmarks`` a 5-point landmark file
    for photos. ``batch``: the batch the model is compiled for (OpenVINO: a
    static shape; others: recorded). ``fold_preprocessing``: the graph takes
    uint8 NHWC RGB and normalises inside. ``check_images``: images for the
    fidelity check (default: held-out calibration images, else generated faces),
    ``check_count`` how many at most (generated: 64 unless given).
    Returns ``out``.
    """
    from .calibration import DEFAULT_CALIB_COUNT, calibration_split, load_images

    requested = precision
    precision = normalize_precision(precision)
    engine = engine or DEFAULT_ENGINE
    out = Path(out)
    if out.exists() and not force:
        raise ArcdeployError(f"{out}: already exists; use --force to replace it")
    if batch is not None and int(batch) < 1:
        raise ArcdeployError(f"--batch must be at least 1, got {batch}")
    if threads is not None and int(threads) < 1:
        raise ArcdeployError(f"--threads must be at least 1, got {threads}")
    check_engine_precision(engine, precision)
    if fold_preprocessing and engine == "torch":
        raise ArcdeployError("--fold-preprocessing is for openvino and onnxruntime; the torch engine takes the section 3 input")

    split = None
    if precision == "int8":
        split = calibration_split(calib, calib_landmarks, count=calib_count or DEFAULT_CALIB_COUNT)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="arcdeploy-build-") as work:
        export_dir = resolve_source(src, Path(work), arch)
        export_manifest = json.loads((export_dir / "manifest.json").read_text())
        with atomic_dir(out, force=True) as tmp:
            base_input = dict(export_manifest["input"])
            base_input.setdefault("normalize_in_graph", False)
            manifest = {
                "format": PACKAGE_FORMAT,
                "engine": engine,
                "precision": precision,
                "requested_precision": requested,
                "device": "CPU",
                "arch": export_manifest["arch"],
                "input": folded_input(base_input) if fold_preprocessing else base_input,
                "output": export_manifest.get("output", {"shape": ["batch", 512], "normalized": False}),
                "batch": int(batch) if batch else None,
                "dynamic_batch": True,
                "threads": int(threads) if threads else None,
                "files": {},
                "calibration": None,
                "reference": None,
                "fidelity": None,
                "source": export_manifest["source"],
                "export": {"opset": export_manifest.get("opset"), "verification": export_manifest.get("verification")},
                "host": {"cpu": cpu_name(), "flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_vnni",
                                                                            "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})},
            }
            calib_faces = split.calib.faces if split else None
            if engine == "openvino":
                _build_openvino(export_dir, tmp, manifest, precision, calib_faces, batch, fold_preprocessing, options)
            elif engine == "onnxruntime":
                _build_onnxruntime(export_dir, tmp, manifest, precision, calib_faces, fold_preprocessing, options)
            else:
                _build_torch(export_dir, tmp, manifest, precision)
            if split:
                manifest["calibration"]["count"] = int(len(split.calib.faces))
                manifest["calibration"]["source"] = split.calib.source
                manifest["calibration"]["preprocessing"] = (
                    "5-point similarity alignment with " + str(calib_landmarks) if calib_landmarks
                    else "taken as aligned crops (resized to 112x112 if needed)") if split.calib.source != "array" else "aligned crops given as an array"
                if split.calib.skipped:
                    manifest["calibration"]["skipped"] = split.calib.skipped[:20]
                    manifest["calibration"]["skipped_count"] = len(split.calib.skipped)
            _store_reference(export_dir, tmp, manifest)
            manifest["versions"] = library_versions("arcdeploy", "torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy")
            write_json_atomic(tmp / "manifest.json", manifest)

            # fidelity on images the calibration did not see
            if check_images is not None:
                images, label, lmk = check_images, None, check_landmarks
            elif split and split.holdout is not None:
                images, label, lmk = split.holdout.faces[:check_count], f"held-out calibration images ({split.holdout.source})", None
            elif calib is not None and precision != "int8":
                images, label, lmk = load_images(calib, calib_landmarks, limit=check_count or 64, what="check images"), None, None
                label = f"calibration images ({images.source}; not used by a {precision} build)"
                images = images.faces
            else:
                images, label, lmk = None, "generated", None
            from .fidelity import check

            result = check(tmp, images=images, landmarks=lmk, threads=threads, images_label=label,
                           count=check_count if images is None or check_images is not None else None)
            result.pop("worst", None)
            manifest["fidelity"] = result
            manifest["build_seconds"] = round(time.time() - started, 1)
            write_json_atomic(tmp / "manifest.json", manifest)
            if not result["passed"]:
                msg = (f"{engine} {precision}: fidelity below the floor against fp32 PyTorch "
                       f"({', '.join(result['below_floor'])}; {result['cosine']['n']} {result['images']} images)")
                if strict:
                    raise ArcdeployError(msg + "; package not written (--strict)")
                print(f"arcdeploy: warning: {msg}", file=sys.stderr)
    return out


def _store_reference(export_dir: Path, tmp: Path, manifest: dict) -> None:
    """Keep the fp32 TorchScript so the package can be checked on its own."""
    src = export_dir / "model.pt"
    if manifest["engine"] == "torch" and manifest["files"].get("model") == "model.pt":
        rel = "model.pt"  # the package's own model is the fp32 TorchScript
    else:
        rel = REFERENCE_FILE
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)
    manifest["reference"] = {"file": rel, "kind": "torchscript", "precision": "fp32", "sha256": sha256_file(tmp / rel)}


@contextlib.contextmanager
def _quiet():
    """Silence the quantizers' progress bars and INFO logs (warnings still reach stderr)."""
    loggers = [logging.getLogger(n) for n in ("nncf", "onnxruntime", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _normalized(faces: np.ndarray) -> np.ndarray:
    from .faces.preprocess import to_model_input

    return to_model_input(faces)


# --------------------------------------------------------------------- OpenVINO
def _ov_head_names(model) -> list[str]:
    """The last MatMul (the fc; the BN1d after it is folded into a Multiply/Add) and
    every op after it: kept in float."""
    ops = list(model.get_ordered_ops())
    idx = max((i for i, op in enumerate(ops) if op.get_type_name() == "MatMul"), default=None)
    if idx is None:
        return []
    return [op.get_friendly_name() for op in ops[idx:] if op.get_type_name() not in ("Result", "Constant")]


def _ov_stem_names(model) -> list[str]:
    conv = next((op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"), None)
    return [] if conv is None else [conv.get_friendly_name()]


def _build_openvino(export_dir, tmp, manifest, precision, calib_faces, batch, fold, options) -> None:
    import openvino as ov

    from .engines.openvino import compile_config, executed_precisions

    core = ov.Core()
    model = core.read_model(str(export_dir / "model.onnx"))
    ovm = {"device": "CPU", "performance_hint": options.get("performance_hint", "LATENCY")}
    if precision in OV_HINTS:
        ovm["inference_precision"] = OV_HINTS[precision]
    if precision == "int8":
        import nncf

        head = _ov_head_names(model)
        ignored = head[:1]  # the fc MatMul; the folded BN1d after it is never quantized
        # the stem conv sees the 3-channel normalised image; in int8 it costs the most
        # fidelity for ~1% of the MACs (measured on r18: cosine mean 0.982 -> 0.992)
        stem = _ov_stem_names(model) if options.get("keep_stem_float", True) else []
        ignored += stem
        x = _normalized(calib_faces)
        dataset = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        fbc = options.get("fast_bias_correction", True)
        # without VNNI the CPU multiplies u8 x s8 pairs into saturating int16 (vpmaddubsw):
        # 7-bit weights in every layer avoid the overflow (measured: cosine 0.95 -> 0.98 on r18)
        seven_bit = options.get("seven_bit_weights", not has_vnni())
        advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if seven_bit else OverflowFix.FIRST_LAYER)
        with _quiet():
            model = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(x),
                                  fast_bias_correction=fbc, advanced_parameters=advanced,
                                  ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
        manifest["calibration"] = {
            "method": "NNCF post-training quantization (MinMax ranges, preset MIXED: per-channel symmetric int8 "
                      f"weights{' (7-bit range: overflow fix for CPUs without VNNI)' if seven_bit else ''}, "
                      f"asymmetric uint8 activations; {'fast ' if fbc else ''}bias correction)",
            "kept_float": stem + head,
            "kept_float_why": "stem convolution (first Convolution) and the fc + BN1d head (last MatMul and after)",
            "seven_bit_weights": seven_bit,
        }
    if batch:
        model.reshape({model.inputs[0]: ov.PartialShape([int(batch), 3, 112, 112])})
        manifest["dynamic_batch"] = False
    if fold:
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(NORMALIZED_INPUT["mean"]).scale(NORMALIZED_INPUT["std"])
        model = ppp.build()
    # fp16 keeps its weights in f16 on disk (what an f16 deployment ships); others stay exact
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=(precision == "fp16"))
    manifest["files"] = {"model": "model.xml", "weights": "model.bin"}
    manifest["openvino"] = ovm
    compiled = core.compile_model(str(tmp / "model.xml"), "CPU", compile_config(manifest, manifest["threads"]))
    executed = executed_precisions(compiled)
    ovm["executed"] = executed
    if precision in ("fp16", "bf16") and executed["inference_precision"] != OV_HINTS[precision]:
        ovm["note"] = (f"this CPU has no native {precision}: the compiled model reports inference precision "
                       f"{executed['inference_precision']} despite the {OV_HINTS[precision]} hint "
                       "(per-layer runtime precisions in openvino.executed)")
        print(f"arcdeploy: warning: {ovm['note']} (recorded in the manifest)", file=sys.stderr)
    manifest["device"] = "CPU"


# ----------------------------------------------------------------- ONNX Runtime
def _onnx_head_nodes(model) -> list[str]:
    """The last Gemm/MatMul node and every node after it (in graph order): kept in float."""
    nodes = list(model.graph.node)
    idx = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
    return [] if idx is None else [n.name for n in nodes[idx:]]


def _fold_onnx_preprocessing(model):
    """Prepend uint8 NHWC -> float NCHW, (x - 127.5) / 127.5 to an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    old = graph.input[0]
    name = old.name
    raw = f"{name}_uint8_nhwc"
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    new_input = helper.make_tensor_value_info(raw, TensorProto.UINT8, [dims[0], 112, 112, 3])
    mean = numpy_helper.from_array(np.array(NORMALIZED_INPUT["mean"], np.float32), f"{name}_mean")
    std = numpy_helper.from_array(np.array(NORMALIZED_INPUT["std"], np.float32), f"{name}_std")
    nodes = [
        helper.make_node("Transpose", [raw], [f"{name}_nchw"], perm=[0, 3, 1, 2], name="pre/Transpose"),
        helper.make_node("Cast", [f"{name}_nchw"], [f"{name}_f32"], to=TensorProto.FLOAT, name="pre/Cast"),
        helper.make_node("Sub", [f"{name}_f32", mean.name], [f"{name}_centered"], name="pre/Sub"),
        helper.make_node("Div", [f"{name}_centered", std.name], [name], name="pre/Div"),
    ]
    graph.initializer.extend([mean, std])
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    return model


def _onnx_stem_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Conv"][:1]


def _quantize_onnx_nncf(src: Path, target: Path, calib_faces, manifest, options) -> dict:
    """NNCF's ONNX backend -> a QDQ model ONNX Runtime runs: the same recipe as the
    OpenVINO int8 build (bias correction included), which measured closer to fp32
    than quantize_static here (r18: cosine mean 0.992 vs 0.990 at best)."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = onnx.load(str(src))
    head = _onnx_head_nodes(model)
    stem = _onnx_stem_nodes(model) if options.get("keep_stem_float", True) else []
    seven_bit = options.get("seven_bit_weights", not has_vnni())
    x = _normalized(calib_faces)
    name = model.graph.input[0].name
    dataset = nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))])
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE if seven_bit else OverflowFix.FIRST_LAYER)
    with _quiet():
        q = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(x),
                          advanced_parameters=advanced,
                          ignored_scope=nncf.IgnoredScope(names=stem + head[:1], validate=False))
    onnx.save(q, str(target))
    return {
        "method": "NNCF post-training quantization, ONNX backend -> QDQ (MinMax ranges, preset MIXED: per-channel "
                  f"symmetric int8 weights{' (7-bit range: overflow fix for CPUs without VNNI)' if seven_bit else ''}, "
                  "asymmetric uint8 activations; fast bias correction)",
        "kept_float": stem + head,
        "kept_float_why": "stem convolution (first Conv) and the fc + BN1d head (last Gemm and after)",
        "seven_bit_weights": seven_bit,
    }


def _quantize_onnx_ort(src: Path, target: Path, calib_faces, manifest, options) -> dict:
    """onnxruntime.quantization.quantize_static, QDQ: the settings that measured best
    here (percentile ranges, convolutions only, 7-bit weights without VNNI)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x = _normalized(calib_faces)
    input_name = manifest["input"].get("name", "input")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(len(x)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {input_name: x[i:i + 1]}

    with tempfile.TemporaryDirectory(prefix="arcdeploy-ortq-") as qwork:
        pre = Path(qwork) / "pre.onnx"
        with _quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre), load_external_data=False)
        head = _onnx_head_nodes(graph)
        stem = _onnx_stem_nodes(graph) if options.get("keep_stem_float", True) else []
        # 7-bit weights avoid u8 x s8 int16 saturation on CPUs without VNNI (ORT's own advice)
        reduce_range = options.get("seven_bit_weights", not has_vnni())
        with _quiet():
            quantize_static(str(pre), str(target), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=reduce_range, calibrate_method=CalibrationMethod.Percentile,
                            op_types_to_quantize=["Conv"], nodes_to_exclude=stem + head,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return {
        "method": "onnxruntime quantize_static QDQ (percentile ranges; convolutions only; per-channel symmetric "
                  f"int8 weights{' (reduced range)' if reduce_range else ''}, asymmetric uint8 activations)",
        "kept_float": stem + head,
        "kept_float_why": "stem convolution (first Conv) and the fc + BN1d head (last Gemm and after)",
        "seven_bit_weights": reduce_range,
    }


def _build_onnxruntime(export_dir, tmp, manifest, precision, calib_faces, fold, options) -> None:
    import onnx

    src = export_dir / "model.onnx"
    target = tmp / "model.onnx"
    if precision == "int8":
        quantizer = options.get("ort_quantizer", "nncf")
        if quantizer == "nncf":
            manifest["calibration"] = _quantize_onnx_nncf(src, target, calib_faces, manifest, options)
        elif quantizer == "onnxruntime":
            manifest["calibration"] = _quantize_onnx_ort(src, target, calib_faces, manifest, options)
        else:
            raise ArcdeployError(f"unknown ort_quantizer {quantizer!r}; choose nncf or onnxruntime")
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model16 = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model16, str(target))
        manifest["device"] = "GPU"
    else:
        shutil.copyfile(src, target)
    if fold:
        model = _fold_onnx_preprocessing(onnx.load(str(target)))
        onnx.checker.check_model(model)
        onnx.save(model, str(target))
    manifest["files"] = {"model": "model.onnx"}


# ------------------------------------------------------------------------ torch
def _build_torch(export_dir, tmp, manifest, precision) -> None:
    shutil.copyfile(export_dir / "model.pt", tmp / "model.pt")
    manifest["files"] = {"model": "model.pt"}
    manifest["torch"] = {"format": "torchscript (torch.jit.trace of the eager model)"}
    if precision in ("fp16", "bf16"):
        manifest["device"] = "cuda"
