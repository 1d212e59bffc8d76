"""What this machine's CPU offers, read from the operating system: its model name and the instruction-set flags
that decide whether bf16 arithmetic is fast here. Importing it imports no torch."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Flags under which oneDNN runs bf16 matmuls natively: x86's AVX512-BF16 and AMX, Arm's BF16 extension. Without
# one of them torch still accepts bf16 on the CPU but emulates it, measured 5-60x slower than fp32.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text: x86's `model name`/`flags`, or Arm's
    `Features` (and `Hardware` when no model name is given)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif key == "Hardware" and not model:
            model = value
    return model, flags


@cache
def cpu_info() -> tuple[str, frozenset[str]] | None:
    """This machine's (CPU model, flags), or None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name for benchmark logs; the platform's processor or machine name where it is not given."""
    model = (cpu_info() or ("", frozenset()))[0]
    return model or platform.processor() or platform.machine()


def cores_allowed() -> int:
    """The cores this process may run on (`taskset` and cgroup cpusets narrow it), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def native_bf16() -> bool | None:
    """Whether the CPU has native bf16 instructions; None where the flags cannot be read."""
    info = cpu_info()
    if info is None or not info[1]:
        return None
    return bool(info[1] & NATIVE_BF16_FLAGS)


def fast_half(device: torch.device) -> bool:
    """Whether bf16/fp16 matmuls run at least as fast as fp32 on `device`: CUDA, or a CPU with native bf16, detected at
    run time. Elsewhere they run many times slower, so loading computes a half-precision checkpoint in fp32 there and
    training uses fp32 unless told otherwise (`dgemma bench` measures both)."""
    if device.type == "cuda":
        return True
    import torch

    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    # oneDNN also answers True on AVX-512 CPUs without the BF16 extension, where it emulates bf16 (measured 5x slower
    # than fp32 on one such Xeon); the CPU's own flags decide where they can be read.
    return onednn and native_bf16() is not False
