"""How the runner times model files: each in its own runtime, freshly loaded per batch size, beside the FP32
reference (ptqflow.models.runtime.latency), with each model's batch-1 thread count chosen for it.

The batch-1 threads are a model's runtime setting, not only a timing detail: the runner chooses them right after
quantization (choose_threads), the model is stored with them (an ONNX model's MLmodel carries them as onnxruntime
session options, which MLflow's onnx flavor applies when it loads the model: `ptqflow serve`), the run and its
registered version record them, and `pull` and `bench` load the file with them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqflow.models.runtime.latency import (BenchConfig, BenchResult, RoundsResult, benchmark, benchmark_rounds,
                                            choose_latency_threads)
from ptqflow.pipelines.shared.progress import progress_task
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.specs import FP32


def file_load(model_file: Path, engine: str = ""):
    """The Load (ptqflow.models.runtime.latency) of a model file: a fresh runner on the given threads."""
    from ptqflow.models.runtime.runners import load_runner

    return lambda threads: load_runner(model_file, threads, engine or None).predict


class ModelTimer:
    """Times one sweep's model files on its benchmark images, against its FP32 reference file."""

    def __init__(self, reference_file: Path, images: np.ndarray, config: BenchConfig, timer: PhaseTimer,
                 throughput: bool):
        self.reference_file = reference_file
        self.images = images
        self.config = config
        self.timer = timer
        self.throughput = throughput  # False for a model whose batch dimension is fixed at 1
        self._reference_threads: int | None = None

    def choose_threads(self, model_file: Path, engine: str = "") -> int:
        """The batch-1 thread count `model_file` answers fastest on (choose_latency_threads)."""
        with self.timer.phase("bench"):
            return choose_latency_threads(file_load(model_file, engine), self.images, self.config)

    def reference_threads(self) -> int:
        if self._reference_threads is None:
            self._reference_threads = self.choose_threads(self.reference_file)
        return self._reference_threads

    def bench(self, model_file: Path, engine: str, name: str, latency_threads: int = 0) -> BenchResult:
        """One model file timed in rounds beside the reference (latency_threads 0: chosen here)."""
        return self.bench_together([(name, model_file, engine, latency_threads)]).results[name]

    def bench_reference(self) -> BenchResult:
        """The FP32 reference alone."""
        with self.timer.phase("bench"), progress_task("benchmarking fp32", total=1) as advance:
            result = benchmark(file_load(self.reference_file), self.images,
                               self._config(self.reference_threads()), self.throughput)
            advance()
        return result

    def bench_together(self, models: list[tuple[str, Path, str, int]]) -> RoundsResult:
        """Time the FP32 reference (named FP32) and every (name, model file, torch engine or "", batch-1 threads or 0
        to choose) in shared rounds (benchmark_rounds): FP32 is timed once per round for all of them, and each
        ratio is taken against it within the round."""
        loads = {FP32: file_load(self.reference_file)}
        chosen = {FP32: self.reference_threads()}
        for name, model_file, engine, threads in models:
            loads[name] = file_load(model_file, engine)
            if threads:
                chosen[name] = threads
        title = f"benchmarking {len(loads)} models in {self.config.rounds} rounds"
        with self.timer.phase("bench"), progress_task(title, total=max(1, self.config.rounds) * len(loads)) as advance:
            return benchmark_rounds(loads, FP32, self.images, self.config, self.throughput, advance, chosen)

    def _config(self, latency_threads: int) -> BenchConfig:
        from dataclasses import replace

        return replace(self.config, latency_threads=latency_threads)
