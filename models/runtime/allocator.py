"""Keep freed memory in the process's heap, so a model's large activations are not page-faulted in afresh per call.

glibc's malloc serves a large block (from 128 KiB, a threshold it raises as blocks are freed) with its own mmap and
unmaps it on free, and gives back freed memory above 128 KiB at the top of its heap. torch's CPU tensors come from
malloc: a TorchScript int8 ResNet8 at batch 256 allocates 4 MiB activations each layer, and every one of them was
page-faulted in again on every call in a fresh process. With freed memory kept, the oneDNN variant ran a batch in
5.8 ms instead of 8.6 ms (`benchmarks/malloc.py`, docs/results.md). onnxruntime is not affected: its sessions keep
their own memory arena. This is what PyTorch's CPU performance guide gets from jemalloc or tcmalloc ("reusing memory
as much as possible"); those must be preloaded before the process starts, while glibc takes the same two settings at
run time with `mallopt`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks up to glibc's largest allowed mmap threshold on 64-bit (32 MiB) come from the heap and are reused there.
MMAP_THRESHOLD = 32 << 20
# Freed memory at the top of the heap is given back only above 1 GiB: a process holds on to what its peak used.
TRIM_THRESHOLD = 1 << 30
DEFAULT = "system default"


def _glibc():
    """The C library when it is glibc (the only one whose `mallopt` takes these parameters), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


@cache
def reuse_freed_memory() -> str:
    """Make this process's malloc keep freed memory for reuse (once per process); returns the setting in force, as
    recorded on runs: the thresholds under glibc, DEFAULT where it is not glibc or refuses them."""
    libc = _glibc()
    if libc is None:
        return DEFAULT
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return DEFAULT
    return f"glibc malloc: mmap_threshold={MMAP_THRESHOLD >> 20} MiB, trim_threshold={TRIM_THRESHOLD >> 20} MiB"
