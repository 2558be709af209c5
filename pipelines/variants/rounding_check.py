"""The held-out comparison of an AdaRound variant with its nearest-rounded twin (rounding_choice says why and how
the better one is chosen): the twin quantized beside the variant, both and the FP32 model scored on the training
images the calibration set does not hold."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ptqflow.models.backends.base import FloatModel, QuantizedModel
from ptqflow.pipelines.shared.progress import progress_task
from ptqflow.pipelines.variants.evaluation import predict_scores
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.rounding_choice import NEAREST, RoundingChoice, choose_rounding
from ptqflow.pipelines.variants.specs import VariantSpec
from ptqflow.pipelines.variants.weights import WeightSource

TWIN_DIR = "nearest-rounding"  # the twin's files, beside the variant's, removed once the variant is kept


@dataclass(frozen=True)
class NearestCandidate:
    """A nearest-rounded quantization made and scored on the held-out images already (by the equalization check),
    which the AdaRound check takes as its twin instead of quantizing it again."""

    spec: VariantSpec
    source: FloatModel
    quantized: QuantizedModel
    scores: np.ndarray


class RoundingCheck:
    """AdaRound or nearest, per variant, on `inputs.validation` (model-ready held-out training images)."""

    def __init__(self, inputs, weights: WeightSource, float_model: FloatModel, batch_size: int, timer: PhaseTimer):
        self.inputs, self.weights, self.float_model = inputs, weights, float_model
        self.batch_size, self.timer = batch_size, timer
        self._reference: np.ndarray | None = None  # FP32 scores of the held-out images, computed once

    def check(self, spec: VariantSpec, source: FloatModel, quantized: QuantizedModel, variant_dir: Path,
              twin: NearestCandidate | None = None
              ) -> tuple[VariantSpec, FloatModel, QuantizedModel, RoundingChoice | None]:
        """(spec, source, quantized, choice) of the rounding kept; the AdaRound ones with choice None when there is
        nothing to compare (nearest asked, no AdaRound grid, no held-out images). `twin`: the nearest-rounded
        quantization of the same recipe, made and scored already."""
        validation = getattr(self.inputs, "validation", None)
        if spec.config.adaround_scheme is None or validation is None or not len(validation):
            return spec, source, quantized, None
        if twin is None:
            twin = self._twin(spec, variant_dir)
        with self.timer.phase("evaluate"):
            choice = choose_rounding(self.fp32_scores(),
                                     self.scores_of(spec, quantized, validation, f"{spec.name} (AdaRound)"),
                                     twin.scores)
        if choice.chosen == NEAREST:
            return twin.spec, twin.source, twin.quantized, choice
        return spec, source, quantized, choice

    def _twin(self, spec: VariantSpec, variant_dir: Path) -> NearestCandidate:
        nearest = replace(spec, config=replace(spec.config, weight_rounding=NEAREST))
        nearest_source = self.weights.for_spec(nearest, progress=False)
        twin_dir = variant_dir / TWIN_DIR
        shutil.rmtree(twin_dir, ignore_errors=True)
        with self.timer.phase("quantize"), progress_task(f"calibrating {spec.name} (nearest rounding)",
                                                         total=len(self.inputs.calibration)) as advance:
            twin = nearest.quantize(nearest_source, self.inputs.calibration, twin_dir, advance)
        with self.timer.phase("evaluate"):
            scores = self.scores_of(nearest, twin, self.inputs.validation, f"{spec.name} (nearest)")
        return NearestCandidate(nearest, nearest_source, twin, scores)

    def fp32_scores(self) -> np.ndarray:
        """The FP32 model's scores of the held-out images, computed once (the rounding choice and the fallback
        search's selection both compare with them)."""
        from ptqflow.models.runtime.runners import OrtRunner

        if self._reference is None:
            self._reference = self._scores(OrtRunner(self.float_model.onnx.path), self.inputs.validation, "FP32")
        return self._reference

    def scores_of(self, spec: VariantSpec, quantized: QuantizedModel, validation: np.ndarray,
                   label: str) -> np.ndarray:
        from ptqflow.models.runtime.runners import OrtRunner, TorchRunner

        engine = spec.config.backend if quantized.format == "torchscript" else ""
        return self._scores(TorchRunner.from_torchscript(quantized.path, engine) if engine
                            else OrtRunner(quantized.path), validation, label)

    def _scores(self, runner, images: np.ndarray, label: str) -> np.ndarray:
        """Scores of model-ready `images`, in batches the model takes."""
        return predict_scores(runner, images, _as_they_are, f"held-out images: {label}", self.batch_size)


def _as_they_are(batch: np.ndarray) -> np.ndarray:
    return batch  # the held-out images are model-ready already
