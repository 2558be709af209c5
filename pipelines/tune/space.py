"""The declared search space of `ptqflow tune`: what one trial chooses, and the backend config it makes.

Every dimension is an Optuna categorical or integer suggestion made by `suggest`, so the same function replays a
finished trial from its params (`choice_of(params)`, through optuna.trial.FixedTrial) and documents the space
(`SPACE`, logged as tune/space.json). Conditional dimensions are suggested only where they mean something: the
percentile only with a percentile calibration, the upgrade kind only when layers are upgraded and the backend has
16-bit activations (ONNX Runtime QDQ).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptqflow.models.backends.base import WEIGHT_ROUNDINGS
from ptqflow.models.backends.ort import OrtStaticConfig
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
from ptqflow.pipelines.variants.specs import ONNXRUNTIME, PYTORCH

# format -> (framework, config without the searched fields); the int8 formats the sweep knows, plus ORT QDQ with
# int8 activations (s8s8: what ARM kernels take; x86 runs most of it in float, see ort-int8 in ptqflow.pipelines.variants.specs).
FORMATS = {
    "fx-x86": (PYTORCH, PytorchFxConfig(backend="x86")),
    "fx-fbgemm": (PYTORCH, PytorchFxConfig(backend="fbgemm")),
    "fx-onednn": (PYTORCH, PytorchFxConfig(backend="onednn")),
    "ort-qdq-s8s8": (ONNXRUNTIME, OrtStaticConfig(quant_format="QDQ", activation_dtype="int8", weight_dtype="int8")),
    "ort-qdq-u8s8": (ONNXRUNTIME, OrtStaticConfig(quant_format="QDQ", activation_dtype="uint8", weight_dtype="int8")),
    "ort-qop-u8s8": (ONNXRUNTIME, OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8",
                                                  weight_dtype="int8")),
}
FX_OBSERVERS = ("percentile", "histogram", "minmax")
ORT_CALIBRATIONS = ("Percentile", "Entropy", "MinMax")
PERCENTILES = (99.9, 99.99, 99.995, 99.999)
CALIBRATION_SIZES = (500, 1000, 2000)
MAX_UPGRADED_LAYERS = 3

SPACE = {
    "format": list(FORMATS),
    "per_channel": [True, False],
    "fx_observer": {"values": list(FX_OBSERVERS), "when": "format fx-*"},
    "ort_calibration": {"values": list(ORT_CALIBRATIONS), "when": "format ort-*"},
    "percentile": {"values": list(PERCENTILES), "when": "percentile calibration"},
    "calibration_size": {"values": list(CALIBRATION_SIZES), "note": "default; --calibration-sizes sets them"},
    "weight_rounding": {"values": list(WEIGHT_ROUNDINGS), "when": "the backend has an AdaRound grid (not FX "
                        "per-tensor)"},
    "equalization": [False, True],
    "upgrade_layers": {"range": [0, MAX_UPGRADED_LAYERS],
                       "meaning": "the N worst layers of this config's own diagnosis (local SQNR) leave 8 bits"},
    "upgrade_kind": {"values": ["int16", "fp32"], "when": "upgrade_layers > 0 and format ort-qdq-*",
                     "meaning": "int16: the layer's input activations in 16 bits; fp32: the layer in FP32 "
                                "(always fp32 for the other formats)"},
}


@dataclass(frozen=True)
class TrialChoice:
    """What one trial chose: a backend config, the calibration size, and how many of its worst layers leave 8 bits."""

    format: str
    framework: str
    config: PytorchFxConfig | OrtStaticConfig
    calibration_size: int
    upgrade_layers: int = 0
    upgrade_kind: str = "fp32"

    @property
    def base_key(self) -> tuple:
        """What the trial's diagnosis depends on (everything but the upgrades)."""
        return self.format, self.config, self.calibration_size


def suggest(trial, calibration_sizes: tuple[int, ...] = CALIBRATION_SIZES) -> TrialChoice:
    """The trial's choice in the declared space (an optuna Trial, or a FixedTrial replaying finished params);
    `calibration_sizes` are the study's (fewer for a small training set)."""
    fmt = trial.suggest_categorical("format", list(FORMATS))
    framework, config = FORMATS[fmt]
    per_channel = trial.suggest_categorical("per_channel", [True, False])
    if framework == PYTORCH:
        method = trial.suggest_categorical("fx_observer", list(FX_OBSERVERS))
        percentile = trial.suggest_categorical("percentile", list(PERCENTILES)) if method == "percentile" else None
        config = replace(config, per_channel=per_channel, activation_observer=method,
                         **({"percentile": percentile} if percentile is not None else {}))
    else:
        method = trial.suggest_categorical("ort_calibration", list(ORT_CALIBRATIONS))
        percentile = trial.suggest_categorical("percentile", list(PERCENTILES)) if method == "Percentile" else None
        config = replace(config, per_channel=per_channel, calibration_method=method,
                         extra_options=(("CalibPercentile", percentile),) if percentile is not None else ())
    # AdaRound only where the backend has a grid for it to target (FX per-tensor has none): a trial never records
    # a rounding that did not run.
    rounding = "nearest"
    if replace(config, weight_rounding="adaround").adaround_scheme is not None:
        rounding = trial.suggest_categorical("weight_rounding", list(WEIGHT_ROUNDINGS))
    equalization = trial.suggest_categorical("equalization", [False, True])
    config = replace(config, weight_rounding=rounding, equalization=equalization)
    size = trial.suggest_categorical("calibration_size", list(calibration_sizes))
    layers = trial.suggest_int("upgrade_layers", 0, MAX_UPGRADED_LAYERS)
    kind = "fp32"
    if layers and isinstance(config, OrtStaticConfig) and config.quant_format == "QDQ":
        kind = trial.suggest_categorical("upgrade_kind", ["int16", "fp32"])
    return TrialChoice(fmt, framework, config, size, layers, kind)


def choice_of(params: dict) -> TrialChoice:
    """The choice a finished trial made, from its params."""
    import optuna

    return suggest(optuna.trial.FixedTrial(params), (params["calibration_size"],))


def sweep_defaults(calibration_size: int = 1000) -> list[dict]:
    """Params that reproduce the default sweep's int8 recipes that are in the space (its best ones on ResNet8):
    enqueued as a new study's first trials, so the search starts from what the sweep already knows."""
    common = {"per_channel": True, "percentile": 99.995, "weight_rounding": "adaround", "equalization": False,
              "calibration_size": calibration_size, "upgrade_layers": 0}
    return [{"format": "fx-x86", "fx_observer": "percentile", **common},
            {"format": "ort-qop-u8s8", "ort_calibration": "Percentile", **common},
            {"format": "ort-qdq-u8s8", "ort_calibration": "Percentile", **common}]
