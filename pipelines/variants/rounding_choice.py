"""AdaRound or the quantizer's own nearest rounding, chosen per variant on training images the calibration set does
not hold: AdaRound fits each layer's rounding to the calibration images with float activations, and on some models
(depthwise-separable ones, with a few weights per channel) the fit does not carry over to the int8 model. The test
set never takes part in the choice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqflow.models.backends.base import WEIGHT_ROUNDINGS
from ptqflow.pipelines.variants.evaluation import as_probabilities

ADAROUND, NEAREST = WEIGHT_ROUNDINGS


@dataclass(frozen=True)
class RoundingChoice:
    """Which rounding a variant kept, and the held-out numbers that chose it."""

    chosen: str  # ADAROUND or NEAREST
    images: int  # held-out training images compared on
    agreement: dict[str, float]  # rounding -> top-1 agreement with FP32 on them
    kl_divergence: dict[str, float]  # rounding -> mean KL(FP32 || variant) on them, in nats
    reason: str = ""  # why there was no comparison (then agreement and kl_divergence are empty)

    def summary(self) -> str:
        if self.reason:
            return self.reason
        a, n = self.agreement[ADAROUND], self.agreement[NEAREST]
        return (f"AdaRound agrees with FP32 on {100 * a:.2f}%, nearest rounding on {100 * n:.2f}% of {self.images} "
                f"held-out training images: kept {'AdaRound' if self.chosen == ADAROUND else 'nearest rounding'}")


def agreement_and_kl(reference: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    agreement = float((reference.argmax(axis=1) == scores.argmax(axis=1)).mean())
    p, q = as_probabilities(reference).astype(np.float64), as_probabilities(scores).astype(np.float64)
    eps = 1e-12
    return agreement, float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))


def choose_rounding(reference: np.ndarray, adaround: np.ndarray, nearest: np.ndarray) -> RoundingChoice:
    """Compare the two roundings' scores with the FP32 `reference` scores on the same held-out images. AdaRound is
    kept when it agrees on more images, or on as many with a smaller KL divergence; otherwise nearest rounding, the
    quantizer's own, which AdaRound exists to improve on."""
    if not (len(reference) == len(adaround) == len(nearest)) or not len(reference):
        raise ValueError("the roundings are compared on the same, non-empty set of held-out images")
    measured = {ADAROUND: agreement_and_kl(reference, adaround), NEAREST: agreement_and_kl(reference, nearest)}
    (a_agree, a_kl), (n_agree, n_kl) = measured[ADAROUND], measured[NEAREST]
    chosen = ADAROUND if (a_agree, -a_kl) > (n_agree, -n_kl) else NEAREST
    return RoundingChoice(chosen, len(reference), {k: v[0] for k, v in measured.items()},
                          {k: v[1] for k, v in measured.items()})
