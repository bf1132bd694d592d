"""Architecture names and their shapes: plain data, so the CLI can list them without importing torch."""

from __future__ import annotations

# IResNet: blocks per stage
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

# MobileFaceNet: (blocks per residual stage, width scale)
MBF_CONFIGS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}

ARCHS: tuple[str, ...] = (*IRESNET_LAYERS, *MBF_CONFIGS)
