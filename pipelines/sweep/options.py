"""What a sweep is asked to do: the model and data, the variants, calibration, tracking names, the gate, timing,
diagnosis and fallback settings. Checked when made, so a bad value is one line before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqflow.common.errors import ConfigError
from ptqflow.pipelines.data import shapes
from ptqflow.pipelines.data.inputs import DEFAULT_DATA_DIR, DEFAULT_MODEL
from ptqflow.pipelines.data.preprocessing import InputTransform, parse_values
from ptqflow.pipelines.registry.gate import GatePolicy
from ptqflow.pipelines.repair.fallback import DEFAULT_CANDIDATES, DEFAULT_RANKING_IMAGES, FallbackTarget, check_options
from ptqflow.pipelines.shared.choices import DataFormat, Equalization, LayoutChoice, Preprocessing
from ptqflow.pipelines.shared.names import (
    MIXED_ONNX_SUFFIX,
    MIXED_PYTORCH_SUFFIX,
    ONNX_SUFFIX,
    PYTORCH_SUFFIX,
    experiment_name_for,
    mixed_name_for,
    registered_name_for,
    validate_name,
)
from ptqflow.pipelines.variants.runner import RunnerOptions
from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS, ONNXRUNTIME, PYTORCH, VariantSpec, select


@dataclass(frozen=True)
class SweepOptions:
    model_path: Path = DEFAULT_MODEL
    data_dir: Path = DEFAULT_DATA_DIR
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    experiment: str | None = None  # None: `<model file stem>-quantization` (resnet8-quantization for resnet8.onnx)
    # None: `<model file stem>-int8` / `<stem>-int8-onnx`, and only for versions of this FP32 model
    registered_model: str | None = None
    registered_onnx_model: str | None = None
    register: bool = True
    calibration_size: int = 1000
    calibration_seed: int = 0
    # Training images outside the calibration set on which each AdaRound variant is compared with its nearest-rounded
    # twin, the better one kept (0: AdaRound kept without the check)
    validation_size: int = 500
    test_limit: int | None = None
    input_layout: LayoutChoice = LayoutChoice.auto
    preprocessing: Preprocessing = Preprocessing.raw
    data_format: DataFormat = DataFormat.auto  # detected from what data_dir holds (ptqflow.pipelines.data.datasets)
    input_size: tuple[int, int] | None = None  # (height, width) for a model whose input size is dynamic ("HxW" too)
    resize: bool = False  # resize images of another size to the model's (bilinear)
    mean: tuple[float, ...] | None = None  # per channel, after the preprocessing's scaling ("a,b,c" too)
    std: tuple[float, ...] | None = None
    ort_per_channel: bool | None = None
    ort_calibration_method: str | None = None
    run_name: str | None = None
    gate: GatePolicy = GatePolicy()  # when a new registry version takes the champion alias
    weight_rounding: str | None = None  # override every variant's weight rounding (adaround or nearest)
    # cross-layer equalization: auto (each variant's on/off chosen on the held-out images), on or off
    equalization: Equalization = Equalization.auto
    adaround_iterations: int = 1000  # optimization steps per layer
    # keep layers whose int8 kernel is slower than FP32 on this CPU in FP32 (ptqflow.models.backends.speed_check)
    speed_check: bool = True
    resume: bool = False  # reuse finished variant runs with identical inputs instead of recomputing them
    bench: bool = True  # measure latency and throughput of every variant
    # single images' threads, each model's runtime setting (0: chosen per model, ptqflow.models.runtime.latency)
    latency_threads: int = 0
    fetch_missing: bool = True  # fetch the default model/data paths when they are missing
    cifar10_url: str | None = None  # mirrors for that fetch; None = the pinned official URLs
    resnet8_url: str | None = None
    cifar10_md5: str | None = None  # for a mirror holding another copy of the archive
    # Per-layer diagnosis of every int8 variant on the first N test images, logged on its run (ptqflow.pipelines.repair.diagnose)
    diagnose: bool = True
    diagnose_images: int = 256
    # Sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback): a variant that misses the target gets a `<variant>-mixed`
    target_agreement: float | None = None  # least top-1 agreement with FP32, e.g. 0.995
    max_drop_pp: float | None = None  # most accuracy points below FP32
    ranking_images: int = DEFAULT_RANKING_IMAGES  # the first N held-out images rank the candidate layers
    fallback_candidates: int = DEFAULT_CANDIDATES  # layers ranked (worst local SQNR, plus any with a hint)

    def __post_init__(self):
        if self.experiment is None:
            object.__setattr__(self, "experiment", experiment_name_for(self.model_path))
        validate_name("--experiment", self.experiment)
        for kind, value in (("--registered-model", self.registered_model),
                            ("--registered-onnx-model", self.registered_onnx_model)):
            if value:  # empty when the command registers no model of that kind
                validate_name(kind, value)
        if self.test_limit is not None and self.test_limit < 0:
            raise ConfigError(f"--test-limit must be positive (0 = all), got {self.test_limit}")
        # The CLI's text forms are accepted too: "48x48", "0.5,0.5,0.5", "npz", "nchw".
        for option, choice in (("data_format", DataFormat), ("input_layout", LayoutChoice),
                               ("preprocessing", Preprocessing), ("equalization", Equalization)):
            object.__setattr__(self, option, _choice(choice, getattr(self, option), option))
        if isinstance(self.input_size, str):
            object.__setattr__(self, "input_size", shapes.parse_size(self.input_size))
        for option, value in (("mean", self.mean), ("std", self.std)):
            if isinstance(value, str):
                object.__setattr__(self, option, parse_values(f"--{option}", value))
            elif value is not None:
                object.__setattr__(self, option, tuple(float(v) for v in value))
        InputTransform("NCHW", self.preprocessing, self.mean, self.std)  # --mean/--std checked before any loading
        # bad --target-agreement, --max-drop, ... are one line before anything loads
        check_options(self.fallback_target(), self.diagnose_images, self.ranking_images, self.fallback_candidates)

    def fallback_target(self) -> FallbackTarget:
        return FallbackTarget(self.target_agreement, self.max_drop_pp)

    def registered_names(self) -> dict[tuple[str, bool], tuple[str, bool]]:
        """(framework, mixed) → (registered model name, whether the user chose it): the fully quantized variants'
        names (`<stem>-int8`, `<stem>-int8-onnx`, or the user's) and the `-mixed` variants' (`<stem>-mixed`,
        `<stem>-mixed-onnx`, or the user's name + `-mixed`)."""
        names = {}
        for framework, explicit, suffix, mixed_suffix in (
                (PYTORCH, self.registered_model, PYTORCH_SUFFIX, MIXED_PYTORCH_SUFFIX),
                (ONNXRUNTIME, self.registered_onnx_model, ONNX_SUFFIX, MIXED_ONNX_SUFFIX)):
            if explicit:
                names[(framework, False)] = (explicit, True)
                names[(framework, True)] = (mixed_name_for(explicit), True)
            else:
                names[(framework, False)] = (registered_name_for(self.model_path, suffix), False)
                names[(framework, True)] = (registered_name_for(self.model_path, mixed_suffix), False)
        return names

    def specs(self) -> list[VariantSpec]:
        """The variants to run, with the ONNX Runtime, weight-rounding and equalization overrides applied."""
        fixed = None if self.equalization == Equalization.auto else self.equalization == Equalization.on
        return select(self.variants, self.ort_per_channel, self.ort_calibration_method, self.weight_rounding,
                      equalization=fixed, speed_check=self.speed_check)

    def runner_options(self) -> RunnerOptions:
        from ptqflow.models.runtime.latency import BenchConfig

        return RunnerOptions(bench=self.bench, choose_threads=self.bench, adaround_iterations=self.adaround_iterations,
                             choose_equalization=self.equalization == Equalization.auto and self.validation_size > 0,
                             bench_config=BenchConfig(latency_threads=self.latency_threads),
                             diagnose_images=self.diagnose_images if self.diagnose else 0)


def _choice(enum, value, option: str):
    """`value` as a member of `enum`, also from its value in any case ("nchw" for LayoutChoice.nchw)."""
    if isinstance(value, enum):
        return value
    for member in enum:
        if str(value).lower() in (member.value.lower(), member.name.lower()):
            return member
    raise ConfigError(f"--{option.replace('_', '-')} {value!r} is not one of {', '.join(m.value for m in enum)}")
