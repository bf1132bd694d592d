"""The machine arcdeploy runs on: CPU name and the instruction-set features that decide
which kernels int8 / bf16 / fp32 can use (AVX2 only; AVX-512 + VNNI + BF16; AMX)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

# the features that decide which kernels int8 / bf16 / fp32 can use
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def relevant_flags() -> list[str]:
    flags = cpu_flags()
    return [f for f in RELEVANT_FLAGS if f in flags]


def has_int8_dot_product() -> bool:
    """int8 dot-product instructions (VNNI / AMX): without them u8 x s8 products saturate in int16."""
    return bool(cpu_flags() & INT8_DOT_FLAGS)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": usable_cpus(), "flags": relevant_flags()}
