"""How precisely each number ptqflow records is kept: defined once here, applied wherever metrics are logged and in
the comparison tables, so no run carries float noise such as an accuracy delta of -0.15000000000000568 pp.

The precision follows what the measurement supports:

- shares of the test set (accuracy, agreement): the test set's resolution, 1/N for N images, as the fewest decimals
  that keep every count distinct (4 decimals for 10,000 images, 3 for 1,000)
- accuracy difference in percentage points: 2 decimals
- latency in ms: 3 decimals (1 µs)
- ratios (speedups, compression, spreads), throughput and KL divergence: 3 significant digits; they come from
  timings that move by more than 1% between runs, or are summaries where a fourth digit means nothing
- SQNR: 2 decimals of a dB; seconds of a sweep: 1 decimal; counts and sizes: integers
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ptqflow.tracking.keys import Metric as M


@dataclass(frozen=True)
class Precision:
    """decimals: a fixed number of decimals; significant: that many significant digits; test_set: the resolution
    of a share of `test_images` images. Exactly one applies; none of them means an integer."""

    decimals: int | None = None
    significant: int | None = None
    test_set: bool = False

    def round(self, value: float | None, test_images: int | None = None) -> float | None:
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value) or value == 0:
            return value
        if self.test_set:
            if not test_images:
                raise ValueError("a share of the test set is rounded to its resolution: pass the number of images")
            return round(value, share_decimals(test_images))
        if self.significant is not None:
            return round(value, self.significant - 1 - math.floor(math.log10(abs(value))))
        if self.decimals is not None:
            return round(value, self.decimals)
        return float(round(value))

    def describe(self) -> str:
        if self.test_set:
            return "test-set resolution"
        if self.significant is not None:
            return f"{self.significant} significant digits"
        return f"{self.decimals} decimals" if self.decimals is not None else "integer"


def share_decimals(test_images: int) -> int:
    """Decimals of a share that keep every count of `test_images` distinct: ceil(log10(N))."""
    return max(0, math.ceil(math.log10(max(1, test_images))))


SHARE = Precision(test_set=True)
PP = Precision(decimals=2)
# A share of the held-out training images (--validation-size, 500 by default): 4 decimals keep every count of up to
# 10,000 images distinct, whatever the test set's size
HELD_OUT_SHARE = Precision(decimals=4)
MS = Precision(decimals=3)  # 1 µs
RATIO = Precision(significant=3)
DB = Precision(decimals=2)
SECONDS = Precision(decimals=1)
INTEGER = Precision()

METRICS: dict[str, Precision] = {
    M.ACCURACY: SHARE, M.TOP1_AGREEMENT: SHARE, M.TORCH_ORT_AGREEMENT: SHARE, M.BEST_INT8_ACCURACY: SHARE,
    M.BEST_INT8_AGREEMENT: SHARE,
    M.ACCURACY_DELTA_PP: PP,
    M.KL_DIVERGENCE: RATIO, M.SQNR_DB: DB,
    M.MODEL_SIZE_BYTES: INTEGER, M.COMPRESSION_RATIO: RATIO,
    M.TEST_IMAGES: INTEGER, M.HELD_OUT_IMAGES: INTEGER, M.CALIBRATION_IMAGES_USED: INTEGER, M.TORCH_ORT_IMAGES: INTEGER,
    M.LATENCY_MS_B1_P50: MS, M.LATENCY_MS_B1_P90: MS, M.THROUGHPUT_IPS_B256: RATIO,
    M.SPEEDUP_VS_FP32_B256: RATIO, M.SPEEDUP_VS_FP32_B1: RATIO, M.SPREAD_B1: RATIO, M.SPREAD_B256: RATIO,
    M.SPEEDUP_VS_FP32_B256_MIN: RATIO, M.SPEEDUP_VS_FP32_B256_MAX: RATIO, M.SPEEDUP_VS_FP32_B1_MIN: RATIO,
    M.SPEEDUP_VS_FP32_B1_MAX: RATIO,
    M.BENCH_CONTENDED: INTEGER,
    M.VARIANTS_OK: INTEGER, M.VARIANTS_FAILED: INTEGER, M.VARIANTS_UNSUPPORTED: INTEGER,
    M.SWEEP_SECONDS: SECONDS,
    M.FP32_THROUGHPUT_IPS_B256: RATIO, M.FP32_LATENCY_MS_B1_P50: MS,
    M.TUNE_TRIALS: INTEGER, M.TUNE_PARETO_SIZE: INTEGER, M.TUNE_SECONDS: SECONDS, M.BEST_FEASIBLE_AGREEMENT: SHARE,
    M.BEST_FEASIBLE_SPEEDUP_B256: RATIO,
    M.VALIDATION_AGREEMENT_ADAROUND: HELD_OUT_SHARE, M.VALIDATION_AGREEMENT_NEAREST: HELD_OUT_SHARE,
    M.VALIDATION_AGREEMENT_EQUALIZED: HELD_OUT_SHARE, M.VALIDATION_AGREEMENT_UNEQUALIZED: HELD_OUT_SHARE,
}


def rounded(metrics: dict[str, float | None], test_images: int | None = None) -> dict[str, float]:
    """The metrics as they are logged: each rounded to its precision, None values left out. A key without a
    precision is an error, so a new metric cannot be logged unrounded."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise KeyError(f"no precision defined for metric(s) {sorted(unknown)}: add them to ptqflow.pipelines.shared.precision.METRICS")
    return {key: METRICS[key].round(value, test_images) for key, value in metrics.items() if value is not None}


def round_metric(key: str, value: float | None, test_images: int | None = None) -> float | None:
    return METRICS[key].round(value, test_images)
