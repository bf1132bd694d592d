"""The machine arcdeploy runs on: CPU name and the instruction-set features that decide
which kernels int8 / bf16 / fp32 can use (AVX2 only; AVX-512 + VNNI + BF16; AMX)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

from .errors import ArcdeployError

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
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})


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


def has_native_bf16() -> bool:
    """bf16 arithmetic (AVX512_BF16 / AMX): a bf16 package runs bf16 kernels, not f32 ones
    (:mod:`arcdeploy.auto_precision` builds bf16 only there)."""
    return bool(cpu_flags() & BF16_FLAGS)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    return {"cpu": cpu_name(), "logical_cpus": usable_cpus(), "flags": relevant_flags()}


def check_threads(value: int | None, what: str = "threads", per_cpu: int = 1) -> int | None:
    """``value`` (None: the engine decides) checked: at least 1, and at most ``per_cpu`` times the
    CPUs this process may use. Compute threads beyond the cores only wait for each other (a
    thousand of them took minutes on one photo), so a larger number is refused, not obeyed."""
    if value is None:
        return None
    value = int(value)
    if value < 1:
        raise ArcdeployError(f"{what} must be at least 1, got {value}")
    limit = per_cpu * usable_cpus()
    if value > limit:
        raise ArcdeployError(
            f"{what} {value}: this machine gives this process {usable_cpus()} CPUs; use at most {limit}"
        )
    return value


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for the process to reuse instead of handing it back
    to the system at once; True when it now does (Linux with glibc, and no malloc settings of the
    user's own in the environment: ``GLIBC_TUNABLES`` with malloc in it, ``MALLOC_*``).

    Why: a decoded photo is tens of megabytes (12 MP: 36 MB). By default glibc gives each such
    block its own mapping and returns it on free, and the preparation threads' arenas give their
    tops back too, so the next photo's pages are faulted in and zeroed by the kernel all over
    again. With three threads decoding 9-12 MP JPEGs that was 17-26 ms of system time per photo
    (of 60-80 ms in all) on a 2-core machine; kept for reuse, 1-3 ms
    (``benchmarks/bench_photos.py``). The cost: the process keeps what it once needed (a few
    hundred MB while photos are embedded) until it ends. The command line (``arcdeploy ...``)
    and the Ray workers call this; a program using the Python API may call it itself.
    """
    own = "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ)
    if platform.system() != "Linux" or own:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return False
    # no block gets its own mapping (it comes from the heap, which is kept), and the heap's free top
    # is never trimmed: both are needed, either alone still faults
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
