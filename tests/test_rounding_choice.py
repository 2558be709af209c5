"""AdaRound or nearest rounding, and cross-layer equalization on or off, chosen on held-out training images (issue 24:
'AdaRound never makes a variant worse than nearest rounding; a choice is made on a validation slice of the training
data and recorded')."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.pipelines.variants.equalization_check import KL_MARGIN, OFF, ON, choose_equalization
from ptqflow.pipelines.variants.rounding_choice import ADAROUND, NEAREST, choose_rounding


def _scores(classes: np.ndarray, confidence: float = 4.0) -> np.ndarray:
    scores = np.zeros((len(classes), 3), np.float32)
    scores[np.arange(len(classes)), classes] = confidence
    return scores


def test_adaround_is_kept_only_when_it_agrees_more_often():
    reference = _scores(np.array([0, 1, 2, 0, 1, 2]))
    better = _scores(np.array([0, 1, 2, 0, 1, 1]))
    worse = _scores(np.array([0, 1, 2, 0, 0, 0]))
    kept = choose_rounding(reference, adaround=better, nearest=worse)
    assert kept.chosen == ADAROUND and kept.agreement == {ADAROUND: 5 / 6, NEAREST: 4 / 6} and kept.images == 6
    assert choose_rounding(reference, adaround=worse, nearest=better).chosen == NEAREST
    assert "kept AdaRound" in kept.summary() and "83.33%" in kept.summary()


def test_a_tie_in_agreement_goes_to_the_smaller_divergence_and_an_exact_tie_to_nearest():
    reference = _scores(np.array([0, 1, 2, 0]))
    close, far = _scores(np.array([0, 1, 2, 0]), 3.9), _scores(np.array([0, 1, 2, 0]), 2.0)
    assert choose_rounding(reference, adaround=close, nearest=far).chosen == ADAROUND
    assert choose_rounding(reference, adaround=far, nearest=close).chosen == NEAREST
    assert choose_rounding(reference, adaround=close, nearest=close).chosen == NEAREST


def test_the_roundings_are_compared_on_the_same_images():
    reference = _scores(np.array([0, 1]))
    with pytest.raises(ValueError, match="same, non-empty"):
        choose_rounding(reference, reference, reference[:1])
    with pytest.raises(ValueError):
        choose_rounding(reference[:0], reference[:0], reference[:0])


def test_equalization_is_kept_only_with_a_clearly_smaller_divergence_and_no_lower_agreement():
    reference = _scores(np.array([0, 1, 2, 0, 1, 2]))
    close, far = _scores(np.array([0, 1, 2, 0, 1, 2]), 3.9), _scores(np.array([0, 1, 2, 0, 1, 2]), 2.0)
    kept = choose_equalization(reference, on=close, off=far, pairs=2)
    assert kept.chosen and kept.kl_divergence[ON] <= (1 - KL_MARGIN) * kept.kl_divergence[OFF]
    assert "equalization on" in kept.summary() and "2 pairs" in kept.summary() and "6 held-out" in kept.summary()
    assert not choose_equalization(reference, on=far, off=close, pairs=2).chosen
    assert not choose_equalization(reference, on=close, off=close, pairs=2).chosen  # no gain: the model as it is
    # a smaller divergence that costs an image of agreement is not kept
    wrong_once = _scores(np.array([0, 1, 2, 0, 1, 1]), 3.9)
    assert not choose_equalization(reference, on=wrong_once, off=_scores(np.array([0, 1, 2, 0, 1, 2]), 0.5),
                                   pairs=2).chosen
    with pytest.raises(ValueError, match="same, non-empty"):
        choose_equalization(reference, reference, reference[:1], pairs=2)
