"""What CPU the numbers were measured on: its model name and the int8 instruction sets its kernels may use.

Without `reduce_range`, int8 results depend on these (VNNI accumulates u8*s8 pairs without the 16-bit saturation
that plain AVX2 kernels risk), and latency obviously does, so every run records them.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flags that matter to onnxruntime's and PyTorch's int8 kernels (x86 and Arm).
INT8_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                  "asimddp", "i8mm", "sve")


def _cpuinfo_fields(text: str) -> tuple[str, set[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


@lru_cache(maxsize=1)
def cpu_description() -> tuple[str, str]:
    """(CPU model name, comma-separated int8 instruction sets it has, or "none")."""
    try:
        model, flags = _cpuinfo_fields(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        model, flags = "", set()
    isa = [flag for flag in INT8_ISA_FLAGS if flag in flags]
    return model or platform.processor() or platform.machine() or "unknown", ",".join(isa) or "none"
