"""Latency and throughput of a model file in its own runtime, measured the same way for every variant."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ptqflow.common.errors import failure_reason
from ptqflow.common.interrupts import checkpoint
from ptqflow.models.runtime.runners import cpu_threads

BATCH_LATENCY = 1
BATCH_THROUGHPUT = 256
# p90/p50 of the timings above which a measurement is flagged as contended. On this project's 2-core VM a quiet
# machine gives batch-1 p90/p50 of 1.1-1.5 (docs/results.md); twice the median at the 90th percentile means at least
# one run in ten waited for the CPU as long as it computed, so the numbers describe the machine's load, not the model.
CONTENDED_SPREAD = 2.0


@dataclass(frozen=True)
class BenchConfig:
    warmup_runs: int = 20
    latency_runs: int = 300  # single-image runs; percentiles over all of them
    throughput_runs: int = 15  # batch-256 runs; median of them
    threads: int = 0  # batch-256 threads; 0 = all available cores
    # batch-1 threads; 0 = chosen per model: the faster of one thread and `threads` (choose_latency_threads). A
    # single small image rarely has work for two cores: on a MobileNetV1 0.25 at 96x96 one thread answered in 0.13 ms
    # and two in 0.22 ms, FP32 and int8 alike, while ResNet8 at 32x32 was faster on two.
    latency_threads: int = 0
    # Beside a reference (benchmark_rounds): rounds of reference then each model, each freshly loaded, the runs
    # above split between the rounds, so a change of load on a shared machine falls on both sides of every ratio.
    rounds: int = 3

    @property
    def resolved_threads(self) -> int:
        return self.threads or cpu_threads()

    def latency_candidates(self) -> tuple[int, ...]:
        """The batch-1 thread counts a model is tried on: the fixed one, or one thread and `resolved_threads`."""
        if self.latency_threads:
            return (self.latency_threads,)
        return tuple(sorted({1, self.resolved_threads}))


@dataclass(frozen=True)
class BenchResult:
    latency_ms_b1_p50: float
    latency_ms_b1_p90: float
    throughput_ips_b256: float | None  # None for a model whose batch dimension is fixed at 1
    threads: int  # the batch-256 timings' threads
    spread_b256: float | None = None  # p90/p50 of the batch-256 timings; None when not measured
    # From benchmark_rounds: the numbers above are medians over `rounds`; `reference` is the reference's medians
    # over the same rounds; the speedups are medians of the per-round ratios, each with its (min, max) over rounds.
    rounds: int = 1
    reference: "BenchResult | None" = None
    speedup_b1: float | None = None  # the reference's batch-1 p50 over this one's: > 1 is faster
    speedup_b1_range: tuple[float, float] | None = None
    speedup_b256: float | None = None  # this batch-256 throughput over the reference's
    speedup_b256_range: tuple[float, float] | None = None
    latency_threads: int = 0  # the batch-1 timings' threads (0: the same as `threads`)

    @property
    def spread_b1(self) -> float:
        """p90/p50 of the single-image timings: 1 for a perfectly steady machine."""
        return self.latency_ms_b1_p90 / self.latency_ms_b1_p50 if self.latency_ms_b1_p50 > 0 else float("inf")

    @property
    def contended(self) -> bool:
        """Whether a spread exceeds CONTENDED_SPREAD: the machine was busy and the timings are not facts."""
        return any(spread is not None and spread > CONTENDED_SPREAD for spread in (self.spread_b1, self.spread_b256))


# A fresh load of a model file on the given number of intra-op threads, giving its predict.
Load = Callable[[int], Callable[[np.ndarray], np.ndarray]]
LATENCY_CHOICE_RUNS = 60  # single-image runs per candidate thread count and round when choosing
CHOICE_WARMUP_RUNS = 5
LATENCY_CHOICE_ROUNDS = 2
MORE_THREADS_MARGIN = 0.95  # more threads are chosen only when at least 5% faster: they take cores from others


@contextmanager
def torch_threads(threads: int):
    """Torch's intra-op threads set to `threads` for the block, then restored: a TorchScript model runs on torch's
    threads, whatever a timing records, unless they are set."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def choose_latency_threads(load: Load, images: np.ndarray, config: BenchConfig = BenchConfig()) -> int:
    """The batch-1 thread count of `config.latency_candidates()` this model answers fastest on: each candidate
    freshly loaded and timed in LATENCY_CHOICE_ROUNDS interleaved rounds, the medians compared; more threads win
    only by MORE_THREADS_MARGIN."""
    candidates = config.latency_candidates()
    if len(candidates) == 1:
        return candidates[0]
    p50s: dict[int, list[float]] = {threads: [] for threads in candidates}
    for _ in range(LATENCY_CHOICE_ROUNDS):
        for threads in candidates:
            with torch_threads(threads):
                timings = _latency_timings(load(threads), images, CHOICE_WARMUP_RUNS, LATENCY_CHOICE_RUNS)
                p50s[threads].append(float(np.median(timings)))
    medians = {threads: float(np.median(times)) for threads, times in p50s.items()}
    chosen = candidates[0]
    for threads in candidates[1:]:
        if medians[threads] < MORE_THREADS_MARGIN * medians[chosen]:
            chosen = threads
    return chosen


def benchmark(load: Load, images: np.ndarray,
              config: BenchConfig = BenchConfig(), throughput: bool = True) -> BenchResult:
    """Time real, model-ready images: batch-1 latency percentiles and batch-256 throughput.

    `load()` returns a freshly loaded model's predict function; it is called once per batch size, so each is timed
    the way a serving process that loaded the file for that batch size runs it. A shared module would not do:
    oneDNN's quantized conv (the x86 engine) caches its primitive for the first input shape a module sees and
    rebuilds it on every call of any other shape, so an int8 TorchScript that first ran a batch of 256 answers a
    single image about 2x slower than one that started at batch 1.

    `images` needs at least one image; batches of 256 are tiled from it when fewer are given. `throughput=False`
    times batch 1 only (a model whose batch dimension is fixed at 1). Single images run on
    `config.latency_threads` (chosen here when 0: choose_latency_threads), batches on `config.resolved_threads`;
    torch is set to them (torch_threads) and `load(threads)` opens an onnxruntime session with them."""
    if len(images) == 0:
        raise ValueError("benchmarking needs at least one input image")
    latency_threads = choose_latency_threads(load, images, config)
    with torch_threads(latency_threads):
        timings = _latency_timings(load(latency_threads), images, config.warmup_runs, config.latency_runs)
    if not throughput:
        return BenchResult(float(np.percentile(timings, 50) * 1e3), float(np.percentile(timings, 90) * 1e3), None,
                           config.resolved_threads, latency_threads=latency_threads)
    with torch_threads(config.resolved_threads):
        batch_timings = _batch_timings(load(config.resolved_threads), images, config)
    return BenchResult(
        latency_ms_b1_p50=float(np.percentile(timings, 50) * 1e3),
        latency_ms_b1_p90=float(np.percentile(timings, 90) * 1e3),
        throughput_ips_b256=float(BATCH_THROUGHPUT / np.median(batch_timings)),
        threads=config.resolved_threads, latency_threads=latency_threads,
        spread_b256=float(np.percentile(batch_timings, 90) / np.percentile(batch_timings, 50)),
    )


def _latency_timings(predict, images: np.ndarray, warmup_runs: int, runs: int) -> np.ndarray:
    """Seconds per single image over `runs` timed runs after `warmup_runs`, cycling through `images`."""
    for i in range(warmup_runs):
        checkpoint()
        predict(images[i % len(images): i % len(images) + 1])
    timings = np.empty(runs)
    for i in range(runs):
        checkpoint()
        x = images[i % len(images): i % len(images) + 1]
        start = time.perf_counter()
        predict(x)
        timings[i] = time.perf_counter() - start
    return timings


def _batch_timings(predict, images: np.ndarray, config: BenchConfig) -> np.ndarray:
    batch = np.ascontiguousarray(np.resize(images, (BATCH_THROUGHPUT, *images.shape[1:])))
    for _ in range(max(1, config.warmup_runs // 10)):
        predict(batch)
    batch_timings = np.empty(config.throughput_runs)
    for i in range(config.throughput_runs):
        checkpoint()
        start = time.perf_counter()
        predict(batch)
        batch_timings[i] = time.perf_counter() - start
    return batch_timings


def benchmark_against(load: Load, load_reference: Load, images: np.ndarray, config: BenchConfig = BenchConfig(),
                      throughput: bool = True) -> BenchResult:
    """Time a model and its reference in `config.rounds` interleaved rounds (reference, model, reference, model,
    ...): benchmark_rounds with one model."""
    return benchmark_rounds({"reference": load_reference, "model": load}, "reference", images, config,
                            throughput).results["model"]


@dataclass(frozen=True)
class RoundsResult:
    results: dict[str, BenchResult]  # by name; the reference's has no speedups
    failed: dict[str, str]  # name -> why its timing failed (it left the rounds then)


def benchmark_rounds(loads: dict[str, Load], reference: str, images: np.ndarray, config: BenchConfig = BenchConfig(),
                     throughput: bool = True, advance: Callable[[int], None] | None = None,
                     chosen: dict[str, int] | None = None) -> RoundsResult:
    """Time several models and a reference in `config.rounds` shared rounds: each round times the reference, then
    every model in turn, each freshly loaded per batch size (as `benchmark`), with the single-image and batch-256
    runs split evenly between the rounds. Each model's numbers are its medians over the rounds, with the
    reference's medians beside them and the per-round speedups' median and range: a ratio is taken within a round,
    against the reference timed seconds before, so a change of load on a shared machine falls on both sides of it.
    The reference is timed once per round for all the models, and each model's batch-1 threads are chosen once,
    before the rounds (choose_latency_threads), unless `chosen` gives them (by name). A model whose timing raises
    leaves the rounds (`failed` says why); the reference's failure is raised. `advance(1)` after each model's turn."""
    rounds = max(1, config.rounds)
    per_round = replace(config, warmup_runs=max(2, config.warmup_runs // rounds),
                        latency_runs=max(10, -(-config.latency_runs // rounds)),
                        throughput_runs=max(2, -(-config.throughput_runs // rounds)))
    order = [reference, *(name for name in loads if name != reference)]
    timed: dict[str, list[BenchResult]] = {name: [] for name in order}
    failed: dict[str, str] = {}
    configs: dict[str, BenchConfig] = {}
    for round_index in range(rounds):
        for name in order:
            if name in failed:
                continue
            try:
                if round_index == 0:
                    threads = (chosen or {}).get(name) or choose_latency_threads(loads[name], images, config)
                    configs[name] = replace(per_round, latency_threads=threads)
                timed[name].append(benchmark(loads[name], images, configs[name], throughput))
            except Exception as exc:  # noqa: BLE001 - one model's failure to run is its own; the others go on
                if name == reference:
                    raise
                failed[name] = failure_reason(exc)
            if advance is not None:
                advance(1)
    theirs = timed[reference]
    results = {reference: _medians(theirs)}
    for name in order[1:]:
        if name not in failed:
            results[name] = _against(timed[name], theirs)
    return RoundsResult(results, failed)


def _against(mine: list[BenchResult], theirs: list[BenchResult]) -> BenchResult:
    """A model's medians over its rounds with the reference's beside them and the per-round ratios."""
    b1 = [r.latency_ms_b1_p50 / m.latency_ms_b1_p50 for r, m in zip(theirs, mine) if m.latency_ms_b1_p50 > 0]
    b256 = [m.throughput_ips_b256 / r.throughput_ips_b256 for r, m in zip(theirs, mine)
            if m.throughput_ips_b256 and r.throughput_ips_b256]
    return replace(_medians(mine), reference=_medians(theirs),
                   speedup_b1=_median(b1), speedup_b1_range=(min(b1), max(b1)) if b1 else None,
                   speedup_b256=_median(b256), speedup_b256_range=(min(b256), max(b256)) if b256 else None)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _medians(results: list[BenchResult]) -> BenchResult:
    """One result from several rounds of the same model: each field's median over the rounds."""
    def of(field: str) -> float | None:
        return _median([getattr(r, field) for r in results if getattr(r, field) is not None])

    return BenchResult(latency_ms_b1_p50=of("latency_ms_b1_p50"), latency_ms_b1_p90=of("latency_ms_b1_p90"),
                       throughput_ips_b256=of("throughput_ips_b256"), threads=results[0].threads,
                       latency_threads=results[0].latency_threads,
                       spread_b256=of("spread_b256"), rounds=len(results))
