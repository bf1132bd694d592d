"""arcface_torch checkpoints: read safely, loaded into a backbone, exported (:class:`CheckpointSource`).

Checkpoints are pickles: they are only ever read with ``weights_only=True``,
so a hostile file fails with a clear error instead of running code.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones import ARCHS, build_model, describe_layout, detect_arch
from ..errors import ArcdeployError, describe, first_line
from ..files import atomic_dir, write_json_atomic
from ..manifest import (
    MANIFEST_NAME,
    ExportManifest,
    InputSpec,
    OutputSpec,
    ReferenceSpec,
    SourceRecord,
    VerificationRecord,
)
from ..utils import library_versions, sha256_file
from .base import ModelSource
from .verify import TOLERANCE, ExportResult, check_export, verification_inputs

# wrappers people save around the state dict (training scripts, Lightning, ...)
_WRAPPER_KEYS = ("state_dict", "model", "backbone", "model_state_dict", "module")
# prefixes added by DataParallel / DDP and by torch.compile
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


@dataclass
class LoadedCheckpoint:
    path: Path
    arch: str
    state_dict: dict[str, torch.Tensor]
    notes: list[str]


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The float32 state dict inside a checkpoint file, and notes on what was unwrapped."""
    path = Path(path)
    if not path.exists():
        raise ArcdeployError(f"{path}: no such file")
    if path.is_dir():
        raise ArcdeployError(f"{path}: is a folder, expected a checkpoint file (backbone.pth)")
    if path.stat().st_size == 0:
        raise ArcdeployError(f"{path}: empty file, not a checkpoint")
    kind = sniff_model_file(path)
    if kind == "torchscript":
        raise ArcdeployError(
            f"{path}: a TorchScript model, not a checkpoint; arcdeploy needs the backbone's "
            "state dict (torch.save(model.state_dict(), 'backbone.pth'))"
        )
    if kind == "onnx":
        raise ArcdeployError(
            f"{path}: an ONNX model, not a checkpoint; build it as it is: arcdeploy build {path} --engine ... -o PKG"
        )
    if kind is None:
        raise ArcdeployError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        if "weights_only" in str(exc) or "GLOBAL" in str(exc) or "Unsupported" in str(exc):
            raise ArcdeployError(
                f"{path}: refused: the pickle holds objects a weights-only load does not allow "
                f"({_short(first)}); save the model's state_dict() instead"
            ) from None
        raise ArcdeployError(f"{path}: not a PyTorch checkpoint ({_short(first)})") from None
    except Exception as exc:  # whatever torch raises for a file it cannot read
        msg = first_line(exc)
        if zipfile.is_zipfile(path) or "zip" in msg.lower() or isinstance(exc, EOFError):
            raise ArcdeployError(f"{path}: truncated or damaged checkpoint ({_short(msg)})") from None
        raise ArcdeployError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {_short(msg)})") from None

    notes: list[str] = []
    for _ in range(3):  # unwrap {"state_dict": ...}, {"model": {"state_dict": ...}}, ...
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            notes.append(f"unwrapped {inner!r}")
            obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise ArcdeployError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ArcdeployError(f"{path}: unknown layout ({describe_layout(obj)}); no tensors found")

    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
            notes.append(f"stripped prefix {prefix!r}")
    converted = {v.dtype for v in tensors.values() if v.is_floating_point() and v.dtype != torch.float32}
    if converted:
        notes.append(f"converted {', '.join(sorted(str(d).replace('torch.', '') for d in converted))} to float32")
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise ArcdeployError(
            f"{path}: weight {broken[0]!r}{more} holds NaN or infinite values; "
            "the checkpoint is broken (diverged training or a damaged file)"
        )
    return tensors, notes


def sniff_model_file(path: Path) -> str | None:
    """What a file looks like from its first bytes: "checkpoint" (a torch zip archive or a
    legacy pickle), "torchscript", "onnx", or None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "checkpoint"  # damaged archive: torch.load says more
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "checkpoint"
    if head[:1] == b"\x80" or head[:2] == b"PK":
        return "checkpoint"
    # an ONNX ModelProto starts with ir_version (field 1, varint) followed by another field
    if len(head) > 2 and head[0] == 0x08 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x40, 0x42):
        return "onnx"
    return None


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | os.PathLike, arch: str = "auto") -> LoadedCheckpoint:
    """Read a checkpoint and settle its architecture (detected, and checked against ``arch``)."""
    state_dict, notes = read_state_dict(path)
    if arch not in ("auto", *ARCHS):
        raise ArcdeployError(f"unknown --arch {arch!r}; choose auto or one of {', '.join(ARCHS)}")
    detected = detect_arch(state_dict, source=str(path))
    if arch != "auto" and arch != detected:
        raise ArcdeployError(f"{path}: the checkpoint is {detected}, but {arch} was asked for")
    return LoadedCheckpoint(Path(path), detected, state_dict, notes)


def load_backbone(path: str | os.PathLike, arch: str = "auto") -> tuple[nn.Module, LoadedCheckpoint]:
    """The backbone in eval mode with the checkpoint strict-loaded into it."""
    ckpt = read_checkpoint(path, arch)
    model = build_model(ckpt.arch)
    state = {k: v for k, v in ckpt.state_dict.items()}
    # num_batches_tracked is bookkeeping; some exporters drop it, so supply it when missing
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing, unexpected = _key_diff(model, state)
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} such as {missing[0]!r}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} such as {unexpected[0]!r}")
        if not detail:
            detail.append(_short(str(exc).splitlines()[-1]))
        raise ArcdeployError(f"{path}: does not load into {ckpt.arch}: {'; '.join(detail)}") from None
    return model.eval(), ckpt


def _key_diff(model: nn.Module, state: Mapping) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


# ------------------------------------------------------------------ the export

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
VERIFY_BATCHES = (1, 5)


class CheckpointSource(ModelSource):
    """An arcface_torch checkpoint (``backbone.pth``), exported to ONNX with a real dynamic batch
    axis (never a batch-1 trace renamed afterwards, which breaks mbf at batch > 1) and to TorchScript,
    the package's fp32 reference. The ONNX keeps insightface's input convention: RGB NCHW float32
    112x112, ``(x - 127.5) / 127.5``, output [N, D] raw embeddings, named ``input`` / ``embedding``.
    ONNX Runtime and TorchScript are checked against eager PyTorch at batch 1 and 5."""

    kind = "checkpoint"
    label = "a checkpoint"

    def export(self, out_dir: Path, force: bool = False) -> ExportResult:
        model, info = load_backbone(self.path, self.arch)
        try:
            with atomic_dir(out_dir, force=force, empty_ok=True) as tmp:
                onnx_path, ts_path = tmp / "model.onnx", tmp / "model.pt"
                dim = self._trace(model, onnx_path, ts_path)
                verification = self._check(model, onnx_path, ts_path)
                manifest = ExportManifest(
                    arch=info.arch,
                    input=InputSpec(name=INPUT_NAME),
                    output=OutputSpec(name=OUTPUT_NAME, dim=dim),
                    files={"onnx": "model.onnx", "torchscript": "model.pt"},
                    reference=ReferenceSpec(file="model.pt", kind="torchscript", sha256=sha256_file(ts_path)),
                    source=SourceRecord(
                        kind=self.kind, path=str(self.path.resolve()), sha256=sha256_file(self.path), notes=info.notes
                    ),
                    verification=verification,
                    opset=self.opset,
                    dynamic_batch=True,
                    versions=library_versions("arcdeploy", "torch", "onnx", "onnxruntime"),
                )
                write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
        except ArcdeployError:
            raise
        except Exception as exc:  # the exporter's own failures, reported in one line
            raise ArcdeployError(f"{self.path}: export failed ({describe(exc)})") from None
        return ExportResult(out_dir, out_dir / "model.onnx", out_dir / "model.pt", manifest)

    def _trace(self, model: nn.Module, onnx_path: Path, ts_path: Path) -> int:
        """model.onnx (dynamic batch) and model.pt (TorchScript); the embedding size."""
        example = torch.from_numpy(verification_inputs(2))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(onnx_path),
                dynamo=False,
                opset_version=self.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(ts_path))
            return int(model(example).shape[1])

    def _check(self, model: nn.Module, onnx_path: Path, ts_path: Path) -> VerificationRecord:
        """ONNX Runtime and TorchScript against eager PyTorch at batch 1 and 5."""
        from ..engines import open_graph

        graphs = {
            "onnx": open_graph(onnx_path, engine="onnxruntime").run_one,
            "torchscript": open_graph(ts_path, engine="torch").run_one,
        }

        def eager(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()

        x = verification_inputs(max(VERIFY_BATCHES), seed=1)
        checked = check_export(str(self.path), graphs, eager, x, VERIFY_BATCHES, against="PyTorch")
        return VerificationRecord(
            tolerance=TOLERANCE,
            batches=list(VERIFY_BATCHES),
            relative_error={name: checked.worst(name) for name in graphs},
        )


SOURCE = CheckpointSource
