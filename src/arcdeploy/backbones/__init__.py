"""Backbone registry and architecture detection from a state dict.

Each architecture is a name -> constructor entry (in the manner of timm's
registry); ``detect_arch`` reads the architecture off the checkpoint's keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ..archs import ARCHS, IRESNET_LAYERS, MBF_CONFIGS
from ..errors import ArcdeployError
from .iresnet import IResNet
from .mobilefacenet import MobileFaceNet


def build_model(arch: str, num_features: int = 512) -> nn.Module:
    """An untrained backbone of the named architecture, in eval mode."""
    model: nn.Module
    if arch in IRESNET_LAYERS:
        model = IResNet(IRESNET_LAYERS[arch], num_features)
    elif arch in MBF_CONFIGS:
        blocks, scale = MBF_CONFIGS[arch]
        model = MobileFaceNet(blocks, scale, num_features)
    else:
        raise ArcdeployError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return model.eval()


def _max_index(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def describe_layout(state_dict: Mapping) -> str:
    """A short description of what the keys look like, for error messages."""
    keys = list(state_dict)
    sample = ", ".join(repr(k) for k in keys[:3])
    return f"{len(keys)} keys such as {sample}" if keys else "no keys"


def detect_arch(state_dict: Mapping, source: str = "checkpoint") -> str:
    """Name of the architecture whose layout the state dict has.

    IResNets are told apart by blocks per stage; MobileFaceNets by blocks per
    residual stage and the stem width (the width scale).
    """
    keys = list(state_dict)
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        layers = tuple(_max_index(keys, rf"layer{i}\.(\d+)\.") for i in range(1, 5))
        for name, spec in IRESNET_LAYERS.items():
            if spec == layers:
                return name
        raise ArcdeployError(
            f"{source}: an IResNet with {list(layers)} blocks per stage, which is none of "
            f"{', '.join(f'{n} {list(s)}' for n, s in IRESNET_LAYERS.items())}"
        )
    if "layers.0.layers.0.weight" in state_dict and "conv_sep.layers.0.weight" in state_dict:
        scale = state_dict["layers.0.layers.0.weight"].shape[0] // 64
        first = 1 if "layers.1.layers.0.weight" in state_dict else _max_index(keys, r"layers\.1\.layers\.(\d+)\.")
        blocks = (first, *(_max_index(keys, rf"layers\.{i}\.layers\.(\d+)\.") for i in (3, 5, 7)))
        for name, (spec, spec_scale) in MBF_CONFIGS.items():
            if spec == blocks and spec_scale == scale:
                return name
        hint = (
            " (width scale 1 is the layout before 2021-07-22, which the current MobileFaceNet does not load)"
            if scale == 1
            else ""
        )
        raise ArcdeployError(
            f"{source}: a MobileFaceNet with blocks {list(blocks)} and width scale {scale}, "
            f"which is none of the known configurations{hint}"
        )
    if any(k.startswith(("conv_23.", "conv_34.", "conv_45.")) for k in keys):
        raise ArcdeployError(
            f"{source}: a MobileFaceNet in the layout used before 2021-07-22 (width scale 1), "
            "which does not load into the current layout"
        )
    raise ArcdeployError(
        f"{source}: unknown layout ({describe_layout(state_dict)}); expected an arcface_torch "
        f"IResNet or MobileFaceNet state dict"
    )


__all__ = ["ARCHS", "build_model", "detect_arch", "describe_layout", "IResNet", "MobileFaceNet"]
