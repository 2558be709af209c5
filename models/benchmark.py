"""Latency and throughput of a model file in its own runtime, measured the same way for every variant."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.runtime import cpu_threads
from pipelines.interrupts import checkpoint

BATCH_LATENCY = 1
BATCH_THROUGHPUT = 256


@dataclass(frozen=True)
class BenchConfig:
    warmup_runs: int = 20
    latency_runs: int = 300  # single-image runs; percentiles over all of them
    throughput_runs: int = 15  # batch-256 runs; median of them
    threads: int = 0  # 0 = all available cores

    @property
    def resolved_threads(self) -> int:
        return self.threads or cpu_threads()


@dataclass(frozen=True)
class BenchResult:
    latency_ms_b1_p50: float
    latency_ms_b1_p90: float
    throughput_ips_b256: float
    threads: int


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def benchmark(predict, images: np.ndarray, config: BenchConfig = BenchConfig()) -> BenchResult:
    """Time `predict` on real, model-ready images: batch-1 latency percentiles and batch-256 throughput.

    `images` needs at least one image; batches of 256 are tiled from it when fewer are given."""
    if len(images) == 0:
        raise ValueError("benchmarking needs at least one input image")
    single = images[:1]
    batch = np.ascontiguousarray(np.resize(images, (BATCH_THROUGHPUT, *images.shape[1:])))
    for i in range(config.warmup_runs):
        checkpoint()
        predict(images[i % len(images): i % len(images) + 1])
    predict(batch)
    timings = np.empty(config.latency_runs)
    for i in range(config.latency_runs):
        checkpoint()
        x = images[i % len(images): i % len(images) + 1] if len(images) > 1 else single
        start = time.perf_counter()
        predict(x)
        timings[i] = time.perf_counter() - start
    batch_timings = np.empty(config.throughput_runs)
    for i in range(config.throughput_runs):
        checkpoint()
        start = time.perf_counter()
        predict(batch)
        batch_timings[i] = time.perf_counter() - start
    return BenchResult(
        latency_ms_b1_p50=float(np.percentile(timings, 50) * 1e3),
        latency_ms_b1_p90=float(np.percentile(timings, 90) * 1e3),
        throughput_ips_b256=float(BATCH_THROUGHPUT / np.median(batch_timings)),
        threads=config.resolved_threads,
    )
