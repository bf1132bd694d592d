"""A foreign ArcFace-family ONNX file (no arcdeploy manifest beside it) -> an export folder
(:class:`OnnxSource`).

The folder is laid out like a checkpoint's (:mod:`arcdeploy.sources.checkpoint`):

- ``source.onnx``: a byte copy of the user's file, the package's fp32 reference (run
  in ONNX Runtime with the source's own input convention);
- ``model.onnx``: the graph arcdeploy builds from: one float32 NCHW 112x112 input with
  a really dynamic batch axis; graph inputs no node reads are dropped, initializers
  listed as inputs become plain initializers, an NHWC or uint8 input gets a
  Transpose / Cast in front, and shape constants that carry a traced batch follow
  the input's batch instead;
- ``manifest.json``: what was detected and how, the user's overrides, every rewrite,
  and the check of model.onnx against source.onnx at batch 1, 5 and 64.

What is read off the graph (nothing is guessed where the graph can tell):

- the image input (the one input some node reads), its layout (the axis of size 3),
  size (112x112; a dynamic height/width is fixed to 112) and dtype;
- the input normalisation: leading Sub/Add/Mul/Div by scalar or per-channel constants
  on the input mean the graph normalises itself and takes raw 0..255 pixels
  (insightface's model router reads the same nodes by name); their constants give
  the mean and std. Otherwise the graph takes ``(x - 127.5) / 127.5``, insightface's
  ArcFace convention. ``input_mean`` / ``input_std`` override either;
- the colour order: RGB (what insightface feeds its ArcFace ONNX files), unless an
  in-graph per-channel mean is Caffe's BGR ImageNet mean; ``bgr`` overrides;
- the embedding size, and whether the graph L2-normalises it (a normalisation node
  at the end, confirmed by unit norms);
- the batch: dynamic already (checked row by row), fixed, or renamed after a fixed
  trace (then it only works at the traced batch, and the reference runs at it).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.runner import CropRunner, graph_input_feed
from ..errors import ArcdeployError, describe, first_line, in_users_terms
from ..files import atomic_dir, write_json_atomic
from ..manifest import (
    ALIGNED_SIZE,
    MANIFEST_NAME,
    PIXEL_MEAN,
    PIXEL_STD,
    ExportManifest,
    InputSpec,
    OutputSpec,
    ReferenceSpec,
    SourceRecord,
    VerificationRecord,
    format_norm,
    norm_value,
)
from ..onnx_files import data_entries, external_data_files, save_onnx
from ..utils import library_versions, sha256_file, shape_text
from . import onnx_graph as og
from .base import ModelSource
from .verify import TOLERANCE, ExportResult, check_export, relative_error

log = logging.getLogger(__name__)

VERIFY_BATCHES = (1, 5, 64)
PROBE_BATCH = 5
# Caffe-style networks subtract the ImageNet mean in BGR order
CAFFE_BGR_MEAN = np.array([103.94, 116.78, 123.68])

SOURCE_COPY = "source.onnx"  # the user's file as the export keeps it: the fp32 reference
MAX_FIXED_BATCH = 512  # a source fixed at a larger batch is refused: it is run for every check


# ------------------------------------------------------------------ what the user says


def _norm_override(value: Any, what: str) -> float | tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    try:
        nums = [float(v) for v in vals]
    except (TypeError, ValueError):
        raise ArcdeployError(f"--{what}: expected a number or three comma-separated numbers, got {value!r}") from None
    if len(nums) not in (1, 3) or not all(np.isfinite(nums)):
        raise ArcdeployError(f"--{what}: expected a number or three comma-separated numbers, got {value!r}")
    if what == "input-std" and any(v == 0 for v in nums):
        raise ArcdeployError("--input-std: must not be 0")
    return nums[0] if len(set(nums)) == 1 else tuple(nums)


def parse_overrides(input_mean=None, input_std=None, bgr=None) -> dict:
    """The user's convention overrides, validated (only the ones given)."""
    out: dict[str, Any] = {}
    mean, std = _norm_override(input_mean, "input-mean"), _norm_override(input_std, "input-std")
    if mean is not None:
        out["input_mean"] = mean
    if std is not None:
        out["input_std"] = std
    if bgr is not None:
        out["bgr"] = bool(bgr)
    return out


# ------------------------------------------------------------------ inspection


@dataclass
class Inspection:
    """The image input and the output of a foreign graph, and what they say."""

    input_name: str
    input_dims: list
    input_dtype: str
    layout: str
    size: tuple[int, int]
    size_fixed: bool
    batch: int | None  # the fixed batch of the input, None when named / unknown
    output_name: str
    output_dims: list
    dropped_inputs: list[str] = field(default_factory=list)
    initializer_inputs: int = 0


_ELEM = {1: "float32", 2: "uint8", 10: "float16", 11: "float64", 3: "int8", 7: "int64", 6: "int32"}


def _load(src: Path):
    import onnx

    if not src.is_file():
        raise ArcdeployError(f"{src}: no such file")
    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise ArcdeployError(f"{src}: not a readable ONNX model ({first_line(exc)})") from None
    if not model.graph.node or not model.graph.output:
        raise ArcdeployError(f"{src}: not an ONNX model (no graph; empty, truncated or another format)")
    return model


def inspect(model, src: Path) -> Inspection:
    """Find the image input and the embedding output; refuse what is not a face-recognition model."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    used = og.used_names(graph)
    real = [i for i in graph.input if i.name not in inits]
    images = [i for i in real if i.name in used]
    dropped = [i.name for i in real if i.name not in used]
    if not images:
        raise ArcdeployError(f"{src}: no graph input is read by any node; nothing to feed an image to")
    inp = images[0]
    dims = og.tensor_dims(inp)
    outs = [(o.name, og.tensor_dims(o)) for o in graph.output]
    found = (
        f"{len(outs)} output{'s' if len(outs) != 1 else ''} "
        f"({', '.join(f'{n} {shape_text(d)}' for n, d in outs[:4])}{', ...' if len(outs) > 4 else ''}), "
        f"input {inp.name} {shape_text(dims)}"
    )
    if len(images) > 1:
        raise ArcdeployError(
            f"{src}: not a face-recognition model: {len(images)} inputs "
            f"({', '.join(i.name for i in images)}); a recognition model takes one image"
        )
    layout = None
    if len(dims) == 4:
        if dims[1] == 3:
            layout = "NCHW"
        elif dims[3] == 3:
            layout = "NHWC"
    hw = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2]) if layout == "NHWC" else (None, None)
    fixed_hw = all(isinstance(d, int) and d > 0 for d in hw)
    wrong_size = fixed_hw and tuple(hw) != (ALIGNED_SIZE, ALIGNED_SIZE)
    if len(outs) != 1 or layout is None or wrong_size:
        what = f"{hw[0]}x{hw[1]} images" if fixed_hw else "images of any size" if layout else "no 3-channel image"
        raise ArcdeployError(
            f"{src}: not a face-recognition model: {found} ({what}); a recognition model has one "
            f"embedding output [N, D] and a {ALIGNED_SIZE}x{ALIGNED_SIZE} face image input"
        )
    if len(outs[0][1]) not in (0, 2):
        raise ArcdeployError(
            f"{src}: not a face-recognition model: its output {outs[0][0]} is "
            f"{shape_text(outs[0][1])}, not embeddings [N, D]"
        )
    elem = _ELEM.get(inp.type.tensor_type.elem_type, f"type {inp.type.tensor_type.elem_type}")
    if elem not in ("float32", "uint8"):
        raise ArcdeployError(f"{src}: input {inp.name} is {elem}; arcdeploy feeds float32 or uint8 images")
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return Inspection(
        input_name=inp.name,
        input_dims=dims,
        input_dtype=elem,
        layout=layout,
        size=(ALIGNED_SIZE, ALIGNED_SIZE),
        size_fixed=fixed_hw,
        batch=batch,
        output_name=outs[0][0],
        output_dims=outs[0][1],
        dropped_inputs=dropped,
        initializer_inputs=sum(1 for i in graph.input if i.name in inits),
    )


@dataclass
class Convention:
    """The source's input convention as detected, then with the user's overrides."""

    source: InputSpec
    detected: dict
    overrides: dict


def detect_convention(model, insp: Inspection, overrides: dict) -> Convention:
    """The source's input convention read off the graph, then with the user's ``overrides``."""
    norm = _normalization(model, insp)
    in_graph, mean = norm["in_graph"], norm["mean"]
    color, color_how = "RGB", "default: insightface feeds its ArcFace ONNX files RGB (the graph cannot tell)"
    if in_graph and isinstance(mean, tuple) and np.allclose(mean, CAFFE_BGR_MEAN, atol=1.5):
        color, color_how = "BGR", f"the in-graph mean {format_norm(mean)} is the ImageNet mean in Caffe's BGR order"

    size_how = (
        "fixed in the graph"
        if insp.size_fixed
        else f"dynamic in the graph; {ALIGNED_SIZE}x{ALIGNED_SIZE} (the ArcFace alignment template)"
    )
    detected = {
        "input": {
            "name": insp.input_name,
            "shape": insp.input_dims,
            "dtype": insp.input_dtype,
            "layout": insp.layout,
            "layout_how": f"axis {'1' if insp.layout == 'NCHW' else '3'} holds the 3 colour channels",
            "size": list(insp.size),
            "size_how": size_how,
        },
        "normalization": norm,
        "color": {"value": color, "how": color_how},
    }
    spec = InputSpec(
        name=insp.input_name,
        layout=insp.layout,
        color=color,
        dtype=insp.input_dtype,
        size=insp.size,
        mean=mean,
        std=norm["std"],
        normalize_in_graph=in_graph,
    )
    spec, applied = _apply_overrides(spec, insp, norm["how"], overrides)
    return Convention(
        source=spec, detected=detected, overrides={**overrides, **({"applied": applied} if applied else {})}
    )


def _normalization(model, insp: Inspection) -> dict:
    """The manifest's detected.normalization: whether the graph normalises its input itself (and
    with what mean and std), or takes insightface's ``(x - 127.5) / 127.5``; and how that was seen."""
    graph = model.graph
    chain = og.read_input_affine(graph, insp.input_name, og.constant_values(graph))
    in_graph = False
    mean: Any = PIXEL_MEAN
    std: Any = PIXEL_STD
    if chain.found and chain.maps_pixels_to_normalised_range():
        in_graph, mean, std = True, norm_value(chain.mean, 9), norm_value(chain.std, 9)
        how = (
            f"the graph normalises its input ({'; '.join(chain.steps)}): it takes raw 0..255 pixels, "
            f"(x - {format_norm(mean)}) / {format_norm(std)} inside"
        )
    elif chain.found:
        how = (
            f"leading arithmetic on the input ({'; '.join(chain.steps)}) does not map 0..255 pixels to a "
            f"normalised range; assumed insightface's (x - 127.5) / 127.5 in front of it"
        )
        log.warning("%s: %s (pass --input-mean/--input-std if the model expects something else)", insp.input_name, how)
    elif chain.irregular:
        in_graph = True
        how = f"the graph normalises its input with {chain.irregular} (not per-channel): it takes raw 0..255 pixels"
    elif insp.input_dtype == "uint8":
        in_graph = True
        how = "the input is uint8: the graph takes raw 0..255 pixels and normalises inside"
    else:
        how = (
            f"no normalisation inside the graph (the input goes straight to {chain.stopped_at or 'the network'}): "
            "insightface's ArcFace convention (x - 127.5) / 127.5"
        )
    norm = {"in_graph": in_graph, "mean": mean, "std": std, "how": how}
    norm["insightface_router"] = og.insightface_router_rule(graph)
    if chain.passed:
        norm["passes_through"] = chain.passed
    return norm


def _apply_overrides(spec: InputSpec, insp: Inspection, how: str, overrides: dict) -> tuple[InputSpec, dict]:
    """The detected spec with the user's --input-mean / --input-std / --bgr; (spec, what was applied)."""
    applied: dict[str, Any] = {}
    in_graph = spec.normalize_in_graph
    if "input_mean" in overrides or "input_std" in overrides:
        if insp.input_dtype == "uint8":
            raise ArcdeployError(
                f"{insp.input_name}: the model takes uint8 pixels and normalises inside; "
                "--input-mean/--input-std cannot apply"
            )
        new_mean = overrides.get("input_mean", spec.mean if not in_graph else PIXEL_MEAN)
        new_std = overrides.get("input_std", spec.std if not in_graph else PIXEL_STD)
        if in_graph:
            log.warning(
                "%s: the graph normalises its input itself (%s); --input-mean/--input-std add "
                "(x - %s) / %s in front of it as asked",
                insp.input_name,
                how,
                format_norm(new_mean),
                format_norm(new_std),
            )
        spec = replace(spec, mean=new_mean, std=new_std, normalize_in_graph=False)
        applied["normalization"] = f"(x - {format_norm(new_mean)}) / {format_norm(new_std)} fed to the graph"
    if "bgr" in overrides:
        spec = replace(spec, color="BGR" if overrides["bgr"] else "RGB")
        applied["color"] = spec.color
    return spec, applied


# ------------------------------------------------------------------ model.onnx


def base_model(model, insp: Inspection, reset_batch: bool) -> tuple[Any, list[str]]:
    """model.onnx before any batch rewrite: clean inputs, NCHW float32 112x112, dynamic batch axis."""
    from onnx import TensorProto, helper

    m = type(model)()
    m.CopyFrom(model)
    graph = m.graph
    notes: list[str] = []
    keep = [i for i in graph.input if i.name == insp.input_name]
    if insp.initializer_inputs:
        notes.append(f"{insp.initializer_inputs} initializer(s) listed as graph inputs are plain initializers")
    if insp.dropped_inputs:
        notes.append(f"graph input(s) no node reads dropped: {', '.join(insp.dropped_inputs)}")
    del graph.input[:]
    graph.input.extend(keep)
    used = og.used_names(graph)
    stale = [i for i in graph.initializer if i.name not in used]
    for init in stale:
        graph.initializer.remove(init)
    if stale:
        notes.append(f"{len(stale)} initializer(s) no node reads removed")
    name = insp.input_name
    adapters = []
    if insp.layout == "NHWC" or insp.input_dtype == "uint8":
        internal = f"{name}/as_in_source"
        for node in graph.node:
            for k, v in enumerate(node.input):
                if v == name:
                    node.input[k] = internal
        cur = name
        if insp.layout == "NHWC":
            nxt = internal if insp.input_dtype != "uint8" else f"{name}/nhwc"
            adapters.append(helper.make_node("Transpose", [cur], [nxt], name="arcdeploy/to_nhwc", perm=[0, 2, 3, 1]))
            notes.append("NHWC input: model.onnx takes NCHW (a Transpose in front)")
            cur = nxt
        if insp.input_dtype == "uint8":
            adapters.append(
                helper.make_node("Cast", [cur], [internal], name="arcdeploy/to_uint8", to=TensorProto.UINT8)
            )
            notes.append("uint8 input: model.onnx takes float32 0..255 pixels (a Cast in front)")
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(adapters + nodes)
    if not insp.size_fixed:
        notes.append(f"input height and width fixed to {ALIGNED_SIZE}x{ALIGNED_SIZE}")
    batch_dim: Any = "batch" if reset_batch or insp.batch is not None else (insp.input_dims[0] or "batch")
    new_input = helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch_dim, 3, *insp.size])
    graph.input.remove(keep[0])
    graph.input.insert(0, new_input)
    if reset_batch or insp.batch is not None:
        og.set_batch_dim(graph.output[0], "batch")
        # intermediate shapes recorded at the traced batch would contradict a dynamic one
        del graph.value_info[:]
    return m, notes


# ------------------------------------------------------------------ running


def _runner(path: Path, spec: InputSpec, batch: int | None = None) -> CropRunner:
    """One ONNX file in ONNX Runtime, fed through ``spec``, at a fixed batch or any."""
    from ..engines import open_graph

    session = open_graph(path, engine="onnxruntime")
    return CropRunner(graph_input_feed(session, spec.name, where=str(path)), spec, batch)


def verification_faces(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Seeded uint8 RGB crops for the self-check: the check compares two graphs number for number,
    so the content does not matter, only that every path is exercised."""
    rng = np.random.default_rng(2000 + seed)
    return rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def _try(fn, *args) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except ArcdeployError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, first_line(exc, limit=2000)


# ------------------------------------------------------------------ the export


class OnnxSource(ModelSource):
    """A foreign ArcFace-family ONNX file (see the module doc).

    ``input_mean`` / ``input_std`` (a number or three): the normalisation the model expects,
    ``(x - mean) / std`` fed to it, replacing the detected one; ``bgr``: the model takes BGR.
    """

    kind = "onnx"
    label = "an ONNX source"
    options = ("input_mean", "input_std", "bgr")

    def __init__(self, path, input_mean=None, input_std=None, bgr: bool | None = None, **common: Any):
        super().__init__(path, **common)
        self.overrides = parse_overrides(input_mean, input_std, bgr)

    def export(self, out_dir: Path, force: bool = False) -> ExportResult:
        src = self.path
        model = _load(src)
        insp = inspect(model, src)
        conv = detect_convention(model, insp, self.overrides)
        try:
            with atomic_dir(out_dir, force=force, empty_ok=True) as tmp:
                try:
                    manifest = _export_into(src, model, insp, conv, tmp)
                except ArcdeployError as exc:  # named as the user knows them, not by our temporary copies
                    raise in_users_terms(exc, {str(tmp / SOURCE_COPY): str(src), str(tmp): str(out_dir)}) from None
                write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
        except ArcdeployError:
            raise
        except Exception as exc:
            raise ArcdeployError(f"{src}: export failed ({describe(exc)})") from None
        return ExportResult(out_dir, out_dir / "model.onnx", out_dir / "source.onnx", manifest)


SOURCE = OnnxSource


def _copy_source(src: Path, model, target: Path) -> tuple[str | None, list[str]]:
    """The user's file as ``target``: a byte copy, or for a model whose weights are in external
    data files, the loaded model written out (inline when it fits, else beside it). Returns a note
    for the manifest and the data files written."""
    if not external_data_files(src):
        shutil.copyfile(src, target)
        return None, []
    data = save_onnx(model, target)
    where = f"in {', '.join(data)}" if data else "inline"
    return f"the source keeps its weights in external data files; {target.name} holds them {where}", data


def _fold_weight_quantization(model, source_path: Path, source_data: list[str]) -> tuple[list[str], list[str]]:
    """Weights stored quantized (``DequantizeLinear`` on constants) become the float weights they
    stand for, in ``model`` (what model.onnx is made from): every engine converts that, where
    OpenVINO refuses per-block dequantization. The source stays the reference while ONNX Runtime
    runs it; when it cannot, the folded graph (the same numbers) is the reference, and the notes
    say so. Returns (notes, the reference's data files)."""
    folded = og.fold_weight_dequantization(model)
    if not folded:
        return [], source_data
    notes = [f"{len(folded)} DequantizeLinear node(s) on constant weights folded into float weights"]
    from ..engines import open_graph

    _, err = _try(open_graph, source_path, "onnxruntime")
    if err is None:
        return notes + ["the reference is the source as it is (ONNX Runtime runs it)"], source_data
    for name in source_data:
        (source_path.parent / name).unlink(missing_ok=True)
    data = save_onnx(model, source_path)
    return notes + [f"ONNX Runtime cannot run the source ({err}); the reference is the folded graph"], data


@dataclass
class _SourceRun:
    """The source as it is, run on the verification faces: its outputs (the reference) and its batch."""

    ref: np.ndarray
    batch: dict  # the manifest's detected.batch (without the rewrites)
    traced: int | None  # the batch a renamed axis was traced at; None: the batch is really dynamic
    ref_batch: int | None  # the batch the reference runs at (fixed or traced); None: any


def _export_into(src: Path, model, insp: Inspection, conv: Convention, tmp: Path) -> ExportManifest:
    source_path, model_path = tmp / SOURCE_COPY, tmp / "model.onnx"
    copy_note, source_data = _copy_source(src, model, source_path)
    fold_notes, source_data = _fold_weight_quantization(model, source_path, source_data)
    faces = verification_faces(max(VERIFY_BATCHES), insp.size)
    model_spec = replace(conv.source, layout="NCHW", dtype="float32")
    run = _run_source(src, source_path, model, insp, conv, faces)
    bad = int((~np.isfinite(run.ref).all(axis=1)).sum())
    if bad:  # a model that is broken for some inputs is named as such, not found later as "low fidelity"
        raise ArcdeployError(f"{src}: the model outputs NaN or infinity for {bad} of {len(faces)} verification images")
    notes, rewrites = _write_dynamic_model(src, model, insp, run, model_spec, faces, model_path)
    # the full check: batch 1, 5 and 64 against the source
    checked = check_export(
        str(src),
        {"model.onnx": _runner(model_path, model_spec)},
        lambda x: run.ref[: len(x)],
        faces,
        VERIFY_BATCHES,
        against="the source",
        tolerance=TOLERANCE,
    )
    outputs = checked.outputs["model.onnx"]
    errors = {str(b): e for b, e in checked.errors["model.onnx"].items()}
    dim = int(outputs.shape[1])
    unit, norm_how = _output_normalization(model, insp, outputs)
    detected = {
        **conv.detected,
        "batch": {**run.batch, "rewrites": rewrites},
        "output": {
            "name": insp.output_name,
            "shape": insp.output_dims,
            "dim": dim,
            "normalized": unit,
            "how": norm_how,
        },
        "opset": _opset(model),
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
    }
    source = SourceRecord(
        kind="onnx",
        path=str(src.resolve()),
        sha256=sha256_file(src),
        detected=detected,
        overrides=conv.overrides,
        model_changes=fold_notes + notes + rewrites + ([copy_note] if copy_note else []),
    )
    verification = VerificationRecord(
        reference="source.onnx",
        engine="onnxruntime",
        tolerance=TOLERANCE,
        batches=list(VERIFY_BATCHES),
        source_batch=run.ref_batch or "any",
        how=(
            "model.onnx at each batch against source.onnx at the same batch"
            if run.ref_batch is None
            else f"model.onnx at each batch against source.onnx run {run.ref_batch} image(s) at a time"
        ),
        relative_error={"onnx": max(errors.values()), **{f"batch_{k}": v for k, v in errors.items()}},
    )
    return ExportManifest(
        arch=f"onnx:{_name(src)}",
        input=model_spec,
        output=OutputSpec(name=insp.output_name, dim=dim, normalized=unit),
        files={
            "onnx": "model.onnx",
            "source": "source.onnx",
            **data_entries("onnx", external_data_files(model_path)),
            **data_entries("source", source_data),
        },
        reference=ReferenceSpec(
            file="source.onnx", kind="onnx", sha256=sha256_file(source_path), input=conv.source, batch=run.ref_batch
        ),
        source=source,
        verification=verification,
        opset=_opset(model),
        dynamic_batch=True,
        versions=library_versions("arcdeploy", "onnx", "onnxruntime"),
    )


def _run_source(src: Path, source_path: Path, model, insp: Inspection, conv: Convention, faces) -> _SourceRun:
    """The source as it is: its output, and whether its batch axis really is one."""
    if insp.batch is not None and insp.batch > MAX_FIXED_BATCH:
        # the source is the fp32 reference: every check would run it on that many images at a time
        raise ArcdeployError(
            f"{src}: its input {insp.input_name} is fixed at batch {insp.batch}; the source is the package's "
            f"reference and would run {insp.batch} images for every check (at most {MAX_FIXED_BATCH}): "
            "export it again with a dynamic batch axis, or a small fixed batch"
        )
    src_run = _runner(source_path, conv.source, insp.batch)
    # one image (a fixed batch is filled up with copies, whose rows the runner drops)
    first, err = _try(src_run, faces[:1])
    if err:
        raise ArcdeployError(f"{src}: ONNX Runtime cannot run it on a {insp.size[0]}x{insp.size[1]} image ({err})")
    if first.ndim != 2 or first.shape[0] != 1:
        raise ArcdeployError(
            f"{src}: not a face-recognition model: its output {insp.output_name} is "
            f"{list(first.shape)} for 1 image, not embeddings [N, D]"
        )
    if not np.all(np.isfinite(first)):
        raise ArcdeployError(f"{src}: the model gives non-finite outputs")
    if insp.batch is not None:
        how = f"input {insp.input_name} has a fixed batch of {insp.batch}"
        return _SourceRun(src_run(faces), {"source": insp.batch, "how": how}, insp.batch, insp.batch)
    rows = np.concatenate([src_run(faces[i : i + 1]) for i in range(PROBE_BATCH)])
    together, err = _try(src_run, faces[:PROBE_BATCH])
    gap = float("inf") if together is None else relative_error(together, rows)
    if gap <= TOLERANCE:
        how = (
            f"batch axis {insp.input_dims[0] or '?'}; the source gives the "
            f"same rows at batch {PROBE_BATCH} as one by one"
        )
        return _SourceRun(src_run(faces), {"source": "dynamic", "how": how}, None, None)
    traced = og.traced_batch_guess(model.graph, insp.input_name, og.constant_values(model.graph))
    why = err or f"rows differ from one-by-one runs by relative error {gap:.1e}"
    batch = {
        "source": f"renamed (traced at batch {traced})",
        "how": f"batch axis named {insp.input_dims[0] or '?'} but the source fails at batch "
        f"{PROBE_BATCH} ({why}): a batch-{traced} trace with the axis renamed",
    }
    return _SourceRun(_runner(source_path, conv.source, traced)(faces), batch, traced, traced)


def _write_dynamic_model(
    src: Path, model, insp: Inspection, run: _SourceRun, spec: InputSpec, faces, model_path: Path
) -> tuple[list[str], list[str]]:
    """model.onnx with the least rewriting that gives a batch axis that works; (notes, rewrites)."""

    stages = [()] if run.traced is None else [(), ("Reshape",), og.BATCH_SHAPE_OPS]
    tried: list[list[str]] = []
    failure = ""
    for kinds in stages:
        cand, notes = base_model(model, insp, reset_batch=run.traced is not None)
        rewrites = og.make_batch_dynamic(cand, insp.input_name, run.traced, kinds) if kinds and run.traced else []
        if rewrites in tried:
            continue  # this stage finds nothing the last one did not rewrite
        tried.append(rewrites)
        save_onnx(cand, model_path)
        got, err = _try(lambda: _runner(model_path, spec)(faces[:PROBE_BATCH]))
        gap = float("inf") if got is None else relative_error(got, run.ref[:PROBE_BATCH])
        if gap <= TOLERANCE:
            return notes, rewrites
        failure = err or f"rows differ from the source's by relative error {gap:.1e}"
    raise ArcdeployError(f"{src}: cannot make the batch dynamic: {_diagnose(model_path, spec, faces, failure)}")


def _output_normalization(model, insp: Inspection, outputs: np.ndarray) -> tuple[bool, str]:
    """Whether the model L2-normalises its embedding (unit norms), and how that was seen."""
    norms = np.linalg.norm(outputs.astype(np.float64), axis=1)
    unit = bool(np.all(np.abs(norms - 1.0) <= 1e-3))
    node = og.find_l2_normalization(model.graph, insp.output_name, og.constant_values(model.graph))
    if unit:
        return unit, (
            f"{node}; outputs have unit norm" if node else "outputs have unit norm (no normalisation node recognised)"
        )
    return unit, (
        f"{node} found, but outputs do not have unit norm: taken as raw"
        if node
        else f"the graph ends in no L2 normalisation (norms {norms.min():.3g}..{norms.max():.3g})"
    )


def _opset(model) -> int | None:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _name(src: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", src.stem) or "model"


def _diagnose(model_path: Path, spec: InputSpec, faces: np.ndarray, failure: str) -> str:
    """Which node breaks at batch > 1, and why: ONNX Runtime's message names it when it fails;
    when the rows are merely wrong, the first node whose output at batch 2 is not its batch-1
    outputs stacked."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    named = re.search(r"running (\w+) node\. Name:'([^']+)'", failure)
    if named:
        op, reported = named.groups()
        # ONNX Runtime's optimizer may rename a node it rewrote ('/Reshape' -> '/Reshape_new_reshape')
        matches = [n for n in graph.node if n.op_type == op and reported.startswith(n.name)]
        node = max(matches, key=lambda n: len(n.name)) if matches else None
        fixed = og.constant_inputs(node, og.constant_values(graph)) if node is not None else []
        detail = f" with constant shape {', '.join(fixed)}" if fixed else ""
        reason = failure.split("Status Message:")[-1].strip()
        # drop the source location and the failed condition: keep what ONNX Runtime says in words
        reason = re.sub(r"^\S+:\d+ .*? (was false|failed)\.\s*", "", reason)
        return f"node '{node.name if node else reported}' ({op}){detail} fails at batch {PROBE_BATCH}: {reason}"
    culprit = _first_batch_mixing_node(model, spec, faces[:2])
    return culprit or failure


def _first_batch_mixing_node(model, spec: InputSpec, faces: np.ndarray) -> str | None:
    import tempfile

    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    graph = inferred.graph
    dep = og.dependent_tensors(graph, spec.name)
    known = {v.name: v for v in graph.value_info}
    outs = [
        known[o]
        for n in graph.node
        for o in n.output
        if o in known and o in dep and known[o].type.tensor_type.elem_type == 1
    ]
    if not outs:
        return None
    probe = type(model)()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(outs)
    with tempfile.TemporaryDirectory(prefix="arcdeploy-onnx-") as work:
        path = Path(work) / "probe.onnx"
        save_onnx(probe, path)
        try:
            from ..engines import open_graph

            session = open_graph(path, engine="onnxruntime")
            x = spec.to_model_input(faces)
            both = session.run({spec.name: x})
            singles = [session.run({spec.name: x[i : i + 1]}) for i in range(len(x))]
        except Exception:
            return None
    prods = og.producers(graph)
    consts = og.constant_values(graph)
    for k, vi in enumerate(outs):
        a = np.asarray(both[k])
        b = np.concatenate([np.asarray(s[k]) for s in singles]) if all(np.ndim(s[k]) for s in singles) else None
        if b is None or a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4):
            node = prods[vi.name]
            fixed = og.constant_inputs(node, consts)
            got = list(a.shape)
            single = list(np.asarray(singles[0][k]).shape)
            detail = f" with constant {', '.join(fixed)}" if fixed else ""
            return (
                f"node '{node.name}' ({node.op_type}){detail} mixes the images of a batch: its output at batch "
                f"{len(faces)} ({got}) is not its per-image outputs ({single} each) stacked"
            )
    return None
