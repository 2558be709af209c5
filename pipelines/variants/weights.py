"""The FP32 weights each variant quantizes: the model prepared for quantization (BatchNorm folded, nodes named),
equalized when the variant asks for that, then moved onto its integer grid by AdaRound when it asks for that. The
FloatModel caches each result, so variants that share a grid compute it once."""

from __future__ import annotations

import numpy as np

from ptqflow.common.errors import failure_reason
from ptqflow.models.backends.base import FloatModel
from ptqflow.pipelines.shared.progress import progress_task, say
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.specs import VariantSpec


class WeightSource:
    """Where variants get their weights from: `source` (the quantization source, set once converted) and the images
    AdaRound reconstructs each layer's output on."""

    def __init__(self, source: FloatModel, calibration: np.ndarray, calibration_digest: str, context: dict,
                 iterations: int, timer: PhaseTimer):
        self.source = source
        self.iterations = iterations  # AdaRound steps per layer
        self.context = context  # what joins an AdaRound cache key beside the model and the images
        self.timer = timer
        self._rounding_set = (calibration, calibration_digest)

    def round_on(self, images: np.ndarray, digest: str) -> None:
        """AdaRound reconstructs on these model-ready images (their indices' digest) instead of the calibration
        set: ptqflow tune keeps one AdaRound set while it searches the calibration size."""
        self._rounding_set = (images, digest)

    def for_spec(self, spec: VariantSpec, progress: bool = True) -> FloatModel:
        """The FP32 model whose weights `spec` quantizes (equalization first: it would move rounded weights off the
        grid). `progress=False` shows no progress line (for a grid computed before, found in memory)."""
        images, digest = self._rounding_set
        if spec.config.adaround_scheme is None or not progress:
            return self.source.for_config(spec.config, images, digest, iterations=self.iterations,
                                          context=self.context)
        with self.timer.phase("adaround"), progress_task(f"AdaRound weights ({spec.config.adaround_scheme})",
                                                         total=1) as advance:
            return self.source.for_config(spec.config, images, digest, advance, iterations=self.iterations,
                                          context=self.context)

    def adaround_ahead(self, specs: list[VariantSpec]) -> None:
        """The AdaRound grids `specs` will ask for, computed together where several start from the same model (one
        FP32 pass, the schemes' problems side by side: see FloatModel.adaround_ahead), so each variant then finds its
        weights in the cache. A failure here is only reported: each variant then computes its own grid and fails
        (or not) on its own."""
        for (equalized, round_head), schemes in _shared_grids(specs).items():
            try:
                source = self.source.equalized(self._rounding_set[0]) if equalized else self.source
                with self.timer.phase("adaround"), \
                        progress_task(f"AdaRound weights ({', '.join(schemes)})", total=1) as advance:
                    source.adaround_ahead(schemes, *self._rounding_set, advance, iterations=self.iterations,
                                          context=self.context, round_head=round_head)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - each variant retries on its own and records its own failure
                say(f"[yellow]![/] AdaRound for {', '.join(schemes)} together failed ({failure_reason(exc)}); "
                    "each variant computes its own")


def _shared_grids(specs: list[VariantSpec]) -> dict[tuple[bool, bool], list[str]]:
    """(equalized, rounded head) -> the AdaRound schemes asked for from that model, where two or more are."""
    wanted: dict[tuple[bool, bool], list[str]] = {}
    for spec in specs:
        scheme = spec.config.adaround_scheme
        if scheme is not None:
            group = wanted.setdefault((bool(getattr(spec.config, "equalization", False)), not spec.config.float_head),
                                      [])
            if scheme not in group:
                group.append(scheme)
    return {key: schemes for key, schemes in wanted.items() if len(schemes) >= 2}
