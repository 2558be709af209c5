"""Wall time per sweep phase, so a slow sweep says where its time goes."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("load", "convert", "adaround", "quantize", "evaluate", "diagnose", "fallback", "bench", "log", "register")


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._started = time.perf_counter()
        self._depth = 0

    @contextmanager
    def phase(self, name: str):
        """Time a block. Nested blocks count only toward the outermost phase, so phases never double count."""
        start = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds[name] += time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        """Seconds per phase; 'log' is everything not inside another phase (MLflow calls, reports)."""
        total = time.perf_counter() - self._started
        timed = {name: self.seconds.get(name, 0.0) for name in PHASES if name != "log"}
        return {**timed, "log": max(0.0, total - sum(timed.values())), "total": total}
