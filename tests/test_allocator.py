"""torch's large CPU buffers are reused instead of page-faulted in afresh on every call (models.runtime.allocator)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ptqflow.models.runtime.allocator import DEFAULT, _glibc, reuse_freed_memory

# Minor page faults per forward of a small float CNN at batch 64 (4 MiB activations), before and after the setting,
# in one fresh process: the setting is process-wide and cannot be undone.
FAULTS_PER_CALL = textwrap.dedent("""
    import resource
    import torch
    from ptqflow.models.runtime.allocator import reuse_freed_memory

    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.rand(64, 3, 32, 32)

    def faults_per_call():
        with torch.inference_mode():
            for _ in range(5):
                net(x)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                net(x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

    default = faults_per_call()
    setting = reuse_freed_memory()
    print(default, faults_per_call(), setting, sep="\\n")
""")


@pytest.mark.skipif(_glibc() is None, reason="the setting is glibc's")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], capture_output=True, text=True, check=True)
    default, reused, setting = out.stdout.strip().splitlines()[-3:]
    assert setting.startswith("glibc malloc: mmap_threshold=32 MiB")
    # glibc's defaults give freed multi-MiB blocks back to the system: a forward faults its activations in again
    assert float(default) > 1000
    assert float(reused) <= float(default) / 100


def test_the_setting_is_applied_once_and_named_the_same_every_time():
    assert reuse_freed_memory() == reuse_freed_memory()
    assert reuse_freed_memory() == DEFAULT or "trim_threshold=1024 MiB" in reuse_freed_memory()
