"""What a tune worker is asked to do: the sweep's inputs and options, the study, its stopping rules and target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ptqflow.common.errors import ConfigError
from ptqflow.models.runtime.latency import BenchConfig
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.tune.space import CALIBRATION_SIZES

DEFAULT_STUDY_SUFFIX = "-tune"
DEFAULT_HEARTBEAT_S = 30


@dataclass
class TuneOptions:
    sweep: SweepOptions = field(default_factory=SweepOptions)  # model, data, inputs, experiment, gate, registry
    n_trials: int = 40  # finished trials (complete or pruned) of the whole study, over all workers
    timeout_s: float | None = 1200.0  # this worker stops starting trials after this many seconds
    target_agreement: float = 0.995
    min_speedup: float = 1.0  # batch-256 throughput over ORT FP32's
    stop_at_target: bool = True  # stop at the first feasible trial
    study: str | None = None  # default: `<model file stem>-tune`
    storage: str | None = None  # an SQLAlchemy URL; default: sqlite file beside the MLflow store
    seed: int = 0  # of the study creator's sampler; a joining worker adds its pid (two workers, two sequences)
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    enqueue_defaults: bool = True  # a new study's first trials are the default sweep's recipes
    calibration_sizes: tuple[int, ...] = CALIBRATION_SIZES  # the space's choices of calibration-set size
    bench_config: BenchConfig = BenchConfig()  # how each model is timed (the sweep's default)

    def __post_init__(self):
        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ConfigError(f"--n-trials must be a whole number, at least 1; got {self.n_trials!r}")
        if self.timeout_s is not None and not (self.timeout_s > 0):
            raise ConfigError(f"--timeout is in seconds, more than 0; got {self.timeout_s!r}")
        if not 0 < self.target_agreement <= 1:
            raise ConfigError(f"--target-agreement is a share in (0, 1], e.g. 0.995; got {self.target_agreement!r}")
        if not (self.min_speedup >= 0 and math.isfinite(self.min_speedup)):
            raise ConfigError(f"--min-speedup is a ratio to ORT FP32 throughput, 0 or more; got {self.min_speedup!r}")
        if self.heartbeat_s < 1:
            raise ConfigError(f"--heartbeat is in seconds, at least 1; got {self.heartbeat_s!r}")
        object.__setattr__(self, "calibration_sizes", tuple(int(n) for n in self.calibration_sizes))
        if not self.calibration_sizes or min(self.calibration_sizes) < 1:
            raise ConfigError(f"--calibration-sizes takes sizes of at least 1; got {self.calibration_sizes!r}")
        if not self.sweep.bench:
            raise ConfigError("tune times every trial (speed is one of its objectives): benchmarking must stay on")
        if self.study is not None:
            from ptqflow.pipelines.shared.names import validate_name

            validate_name("--study", self.study)

    @property
    def default_calibration_size(self) -> int:
        """The size of the space nearest the sweep's (1000): the default recipes' size, and AdaRound's set."""
        return min(self.calibration_sizes, key=lambda n: abs(n - self.sweep.calibration_size))

    @property
    def study_name(self) -> str:
        return self.study or f"{self.sweep.model_path.stem}{DEFAULT_STUDY_SUFFIX}"
