"""Accuracy and agreement of a model's class scores against the labels and against the FP32 reference."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ptqflow.pipelines.data.preprocessing import InputTransform
from ptqflow.pipelines.shared.progress import progress_task

# Images per batch when a model's batch dimension is dynamic, in the sweep and in `pull --evaluate` alike (so a
# pulled model is re-checked as it was measured). Measured on ResNet8, 2 cores, µs per image at 500 / 256: ORT FP32
# 154 / 145, onnx2torch FP32 267 / 208, fbgemm int8 224 / 203, ORT int8 131 / 131, x86 int8 51 / 58: a batch's
# activations at 500 outgrow the caches.
EVAL_BATCH_SIZE = 256


class Cancelled(Exception):
    """predict_scores stopped because its `cancelled` event was set."""


def predict_scores(runner, images: np.ndarray, transform: InputTransform | Callable[[np.ndarray], np.ndarray],
                   description: str, batch_size: int = EVAL_BATCH_SIZE,
                   cancelled: threading.Event | None = None) -> np.ndarray:
    """Class scores for every image, computed batch by batch with a progress bar; `transform` makes a batch of
    `images` model-ready. Raises Cancelled before a batch once `cancelled` is set (work on another thread)."""
    outputs = []
    with progress_task(description, total=len(images)) as advance:
        for start in range(0, len(images), batch_size):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(description)
            batch = transform(images[start:start + batch_size])
            outputs.append(np.asarray(runner.predict(batch), dtype=np.float32).reshape(len(batch), -1))
            advance(len(batch))
    return np.concatenate(outputs)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores that already are probabilities pass through; logits go through a softmax."""
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-2):
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def as_centered_logits(scores: np.ndarray) -> np.ndarray:
    """Logits up to a per-image constant (log of probabilities), centred so SQNR does not depend on it."""
    scores = scores.astype(np.float64)
    if (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-2):
        scores = np.log(np.clip(scores, 1e-12, None))
    return scores - scores.mean(axis=1, keepdims=True)


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    per_class_accuracy: dict[str, float]
    predictions: np.ndarray
    scores: np.ndarray


def evaluate(scores: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> Evaluation:
    predictions = scores.argmax(axis=1)
    correct = predictions == labels
    per_class = {name: float(correct[labels == c].mean()) if (labels == c).any() else float("nan")
                 for c, name in enumerate(class_names)}
    return Evaluation(float(correct.mean()), per_class, predictions, scores)


@dataclass(frozen=True)
class Fidelity:
    """How closely a variant follows the FP32 reference, beyond accuracy."""

    top1_agreement: float
    kl_divergence: float  # mean KL(fp32 || variant) over the test set, in nats
    sqnr_db: float  # signal-to-quantization-noise ratio of the logits, in dB


def fidelity(reference: Evaluation, variant: Evaluation) -> Fidelity:
    agreement = float((reference.predictions == variant.predictions).mean())
    p = as_probabilities(reference.scores).astype(np.float64)
    q = as_probabilities(variant.scores).astype(np.float64)
    eps = 1e-12
    kl = float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))
    ref_logits, var_logits = as_centered_logits(reference.scores), as_centered_logits(variant.scores)
    noise = np.sum((ref_logits - var_logits) ** 2)
    signal = np.sum(ref_logits ** 2)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(signal / noise))
    return Fidelity(agreement, kl, sqnr)
