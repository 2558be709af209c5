"""The command line's options, each declared once: the option groups the sweep-like commands take whole (inputs,
fetching, tracking, registry, gate, calibration, recipe, bench, resume, diagnosis, fallback), and the few single
options other commands share with them. Help panels group them in `--help`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ptqflow.pipelines.cli.option_groups import ONNXRUNTIME, PYTORCH, OptionGroup, only_for
from ptqflow.pipelines.data.inputs import DEFAULT_DATA_DIR, DEFAULT_MODEL
from ptqflow.pipelines.shared.choices import (
    CalibrationMethod,
    DataFormat,
    Equalization,
    LayoutChoice,
    Preprocessing,
    WeightRounding,
)

# ---- single options that commands outside the groups take too ---------------------------------------------------
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="The dataset: CIFAR-10 or CIFAR-100 pickles, an image "
                                                             "folder, or an .npz file (see --data-format).",
                                          rich_help_panel="Inputs")]
DataFormatOpt = Annotated[DataFormat, typer.Option(
    "--data-format", case_sensitive=False, metavar="<format>", rich_help_panel="Inputs",
    help="What --data-dir holds: cifar10, cifar100 (pickles), imagefolder (train/<class>/ and test/<class>/ or "
         "val/<class>/ images) or npz (x_train, y_train, x_test, y_test); auto detects it.")]
LayoutOpt = Annotated[LayoutChoice, typer.Option("--input-layout", case_sensitive=False,
                                                 help="Input layout; auto reads it from the model.",
                                                 rich_help_panel="Inputs")]
PreprocessingOpt = Annotated[Preprocessing, typer.Option("--preprocessing",
                                                         help="raw: pixel values as they are (0..255); unit: "
                                                              "divided by 255; standardize: (x - mean) / std on "
                                                              "0..255, CIFAR-10's unless given.",
                                                         rich_help_panel="Inputs")]
ExperimentOpt = Annotated[Optional[str], typer.Option(
    "--experiment", show_default=False, rich_help_panel="Tracking",
    help="MLflow experiment for the runs (default: <model file stem>-quantization, e.g. resnet8-quantization).")]


def _value(choice) -> Any:
    """An optional Enum option as the plain value the library code takes."""
    return choice.value if choice is not None else None


@dataclass(frozen=True)
class InputOptions(OptionGroup):
    """The FP32 model, the dataset, how its images reach the model, and how many test images count."""

    model: Annotated[Path, typer.Option(
        "--model", help="FP32 ONNX image classifier (NHWC or NCHW input, 1 or 3 channels, any size).",
        rich_help_panel="Inputs")] = DEFAULT_MODEL
    data_dir: DataDirOpt = DEFAULT_DATA_DIR
    input_layout: LayoutOpt = LayoutChoice.auto
    preprocessing: PreprocessingOpt = Preprocessing.raw
    data_format: DataFormatOpt = DataFormat.auto
    input_size: Annotated[Optional[str], typer.Option(
        "--input-size", metavar="<HxW>", show_default=False, rich_help_panel="Inputs",
        help="Height x width to feed a model whose input size is dynamic, e.g. 48x48.")] = None
    resize: Annotated[bool, typer.Option(
        "--resize", rich_help_panel="Inputs",
        help="Resize images whose size differs from the model's input (Pillow, bilinear); recorded as a "
             "param.")] = False
    mean: Annotated[Optional[str], typer.Option(
        "--mean", metavar="<m,m,m>", show_default=False, rich_help_panel="Inputs",
        help="Per-channel mean subtracted after --preprocessing's scaling (with --std), e.g. "
             "0.485,0.456,0.406.")] = None
    std: Annotated[Optional[str], typer.Option(
        "--std", metavar="<s,s,s>", show_default=False, rich_help_panel="Inputs",
        help="Per-channel standard deviation the values are divided by after subtracting --mean.")] = None
    test_limit: Annotated[Optional[int], typer.Option(
        "--test-limit", min=0, help="Evaluate on the first N test images only (default or 0: all).",
        rich_help_panel="Evaluation")] = None

    SWEEP_NAMES = {"model": "model_path"}


@dataclass(frozen=True)
class FetchOptions(OptionGroup):
    """Fetching the default model and data paths when they are missing, and mirrors to fetch them from."""

    fetch: Annotated[bool, typer.Option("--fetch/--no-fetch",
                                        help="Fetch the default model and data paths when they are missing.",
                                        rich_help_panel="Fetch")] = True
    cifar10_url: Annotated[Optional[str], typer.Option("--cifar10-url", envvar="PTQFLOW_CIFAR10_URL",
                                                       help="Mirror of cifar-10-python.tar.gz (same MD5).",
                                                       rich_help_panel="Fetch")] = None
    cifar10_md5: Annotated[Optional[str], typer.Option("--cifar10-md5", envvar="PTQFLOW_CIFAR10_MD5",
                                                       help="MD5 of the archive at --cifar10-url when it is not "
                                                            "the official one.", rich_help_panel="Fetch")] = None
    resnet8_url: Annotated[Optional[str], typer.Option("--resnet8-url", envvar="PTQFLOW_RESNET8_URL",
                                                       help="Mirror of the MLPerf Tiny pretrainedResnet.h5 "
                                                            "(same SHA-256).", rich_help_panel="Fetch")] = None

    SWEEP_NAMES = {"fetch": "fetch_missing"}


@dataclass(frozen=True)
class TrackingOptions(OptionGroup):
    """Where the runs are recorded."""

    experiment: ExperimentOpt = None  # SweepOptions names it after the model file


@dataclass(frozen=True)
class RegistryOptions(OptionGroup):
    """Whether the best int8 models become registry versions, and under which names."""

    registered_model: Annotated[Optional[str], typer.Option(
        "--registered-model", show_default=False, rich_help_panel="Tracking",
        help="Registry name for the best PyTorch int8 model (default: <model file stem>-int8, e.g. resnet8-int8, "
             "used only for versions of that FP32 model).")] = only_for(PYTORCH, None)
    registered_onnx_model: Annotated[Optional[str], typer.Option(
        "--registered-onnx-model", show_default=False, rich_help_panel="Tracking",
        help="Registry name for the best ONNX Runtime int8 model (default: <model file stem>-int8-onnx).",
    )] = only_for(ONNXRUNTIME, None)
    register: Annotated[bool, typer.Option("--register/--no-register",
                                           help="Register the best int8 models as new registry versions.",
                                           rich_help_panel="Tracking")] = True


@dataclass(frozen=True)
class CalibrationOptions(OptionGroup):
    """The calibration subset's seed and AdaRound's effort: what every calibrating command fixes (tune too)."""

    calibration_seed: Annotated[int, typer.Option("--calibration-seed", help="Seed of the calibration subset.",
                                                  rich_help_panel="Calibration")] = 0
    adaround_iterations: Annotated[int, typer.Option("--adaround-iterations", min=1, rich_help_panel="Calibration",
                                                     help="AdaRound optimization steps per layer.")] = 1000
    validation_size: Annotated[int, typer.Option(
        "--validation-size", min=0, rich_help_panel="Calibration",
        help="Training images outside the calibration set on which each AdaRound variant is compared with nearest "
             "rounding, the better kept (0: keep AdaRound unchecked).")] = 500


@dataclass(frozen=True)
class RecipeOptions(OptionGroup):
    """Overrides of the variants' recipes: the calibration set's size and the weights' rounding, grid and
    calibration method (`ptqflow tune` searches these instead)."""

    calibration_size: Annotated[int, typer.Option("--calibration-size", min=1,
                                                  help="Training images for calibration, an equal share from each "
                                                       "class.", rich_help_panel="Calibration")] = 1000
    weight_rounding: Annotated[Optional[WeightRounding], typer.Option(
        "--weight-rounding", help="adaround: move FP32 weights onto the int8 grid with AdaRound first (default of "
                                  "every int8 variant, cached per model and calibration set); nearest: the "
                                  "quantizer's own rounding (fast).", rich_help_panel="Calibration")] = None
    equalization: Annotated[Equalization, typer.Option(
        "--equalization", rich_help_panel="Calibration",
        help="Cross-layer equalization of Conv -> activation -> Conv pairs (depthwise ones too; through ReLU6 only "
             "where calibration images stay below its bound): auto keeps it per variant where it agrees with FP32 "
             "on more held-out training images (see --validation-size); on; off.")] = Equalization.auto
    no_speed_check: Annotated[bool, typer.Option(
        "--no-speed-check", rich_help_panel="Calibration",
        help="Quantize every layer the backend can; by default a convolution whose int8 kernel is slower than FP32 "
             "on this CPU (timed alone at batch 1) stays in FP32.")] = False
    per_channel: Annotated[Optional[bool], typer.Option(
        "--per-channel/--per-tensor", rich_help_panel="ONNX Runtime",
        help="ONNX Runtime weights per channel or per tensor (default: each variant's own).",
    )] = only_for(ONNXRUNTIME, None)
    # A short metavar and the choices in the help text: rich folds a long <A|B|C|D> type column mid-word at 80 columns.
    calibration_method: Annotated[Optional[CalibrationMethod], typer.Option(
        "--calibration-method", metavar="<method>", rich_help_panel="ONNX Runtime",
        help=f"ONNX Runtime calibration method: {', '.join(m.value for m in CalibrationMethod)} (default: each "
             "variant's own).")] = only_for(ONNXRUNTIME, None)

    def sweep_fields(self) -> dict[str, Any]:
        return {"calibration_size": self.calibration_size, "weight_rounding": _value(self.weight_rounding),
                "equalization": _value(self.equalization), "speed_check": not self.no_speed_check,
                "ort_per_channel": self.per_channel, "ort_calibration_method": _value(self.calibration_method)}


@dataclass(frozen=True)
class GateOptions(OptionGroup):
    """The promotion gate: when a new registry version takes @champion."""

    max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", min=0.0,
                                                     help="Promotion gate: most accuracy points a new version may "
                                                          "lose vs FP32 and still become @champion.",
                                                     rich_help_panel="Registry")] = 0.5
    min_agreement: Annotated[float, typer.Option("--min-agreement", min=0.0, max=1.0,
                                                 help="Promotion gate: least top-1 agreement with FP32 for "
                                                      "@champion.", rich_help_panel="Registry")] = 0.97
    min_latency_gain: Annotated[float, typer.Option("--min-latency-gain", min=0.0, max=1.0,
                                                    help="Promotion gate: on an agreement tie with @champion, how "
                                                         "much lower (as a fraction) a new version's batch-1 "
                                                         "latency must be.", rich_help_panel="Registry")] = 0.25
    allow_slower: Annotated[bool, typer.Option("--allow-slower", rich_help_panel="Registry",
                                               help="Promotion gate: let a version slower than FP32 at batch 1 "
                                                    "become @champion.")] = False

    def sweep_fields(self) -> dict[str, Any]:
        from ptqflow.pipelines.registry.gate import GatePolicy

        return {"gate": GatePolicy(max_accuracy_drop_pp=self.max_accuracy_drop, min_agreement=self.min_agreement,
                                   min_latency_gain=self.min_latency_gain, allow_slower=self.allow_slower)}


@dataclass(frozen=True)
class BenchOptions(OptionGroup):
    """Timing every variant (`ptqflow baseline` and `tune` always do)."""

    bench: Annotated[bool, typer.Option("--bench/--no-bench",
                                        help="Measure batch-1 latency and batch-256 throughput of every variant.",
                                        rich_help_panel="Evaluation")] = True
    latency_threads: Annotated[int, typer.Option(
        "--latency-threads", min=0, rich_help_panel="Evaluation",
        help="Threads each model answers single images on, recorded with it for pull, serve and bench (0: the "
             "faster of 1 and all cores, measured per model; 1: one request per core).")] = 0


@dataclass(frozen=True)
class ResumeOptions(OptionGroup):
    """Reusing finished variant runs."""

    resume: Annotated[bool, typer.Option("--resume", help="Reuse finished variant runs whose inputs (model, "
                                                          "data, calibration, config) are identical.")] = False


@dataclass(frozen=True)
class DiagnosisOptions(OptionGroup):
    """Per-layer diagnosis of every int8 variant (ptqflow.pipelines.repair.diagnose)."""

    diagnose: Annotated[bool, typer.Option(
        "--diagnose/--no-diagnose", rich_help_panel="Diagnosis",
        help="Per-layer SQNR of every int8 variant on the first --diagnose-images test images, logged on its run "
             "under diagnosis/ (a few seconds each).")] = True
    diagnose_images: Annotated[int, typer.Option("--diagnose-images", min=1, rich_help_panel="Diagnosis",
                                                 help="Test images the diagnosis runs on.")] = 256


@dataclass(frozen=True)
class FallbackOptions(OptionGroup):
    """The sensitivity-ranked fallback (ptqflow.pipelines.repair.fallback): a `<variant>-mixed` variant for one that
    misses the target."""

    target_agreement: Annotated[Optional[float], typer.Option(
        "--target-agreement", show_default=False, rich_help_panel="Fallback",
        help="Least top-1 agreement with FP32 (e.g. 0.995): a variant below it gets a <variant>-mixed variant with "
             "its most harmful layers in 16 bits (ONNX Runtime QDQ) or FP32.")] = None
    max_drop: Annotated[Optional[float], typer.Option(
        "--max-drop", metavar="<pp>", show_default=False, rich_help_panel="Fallback",
        help="Most accuracy points a variant may lose vs FP32 (e.g. 0.3); one that loses more gets a "
             "<variant>-mixed variant, as with --target-agreement (both: both must hold).")] = None
    ranking_images: Annotated[int, typer.Option(
        "--ranking-images", min=1, rich_help_panel="Fallback",
        help="The fallback ranks layers on the first N held-out training images.")] = 1000
    fallback_candidates: Annotated[int, typer.Option(
        "--fallback-candidates", min=1, rich_help_panel="Fallback",
        help="Layers the fallback ranks: the worst by local SQNR, plus any the diagnosis gives a hint.")] = 8

    SWEEP_NAMES = {"max_drop": "max_drop_pp"}


# What each sweep-like command runs, so what it offers. The order is the order of `--help`'s panels and rows.
SWEEP_GROUPS = (InputOptions, TrackingOptions, RegistryOptions, RecipeOptions, CalibrationOptions, GateOptions,
                BenchOptions, ResumeOptions, FetchOptions, DiagnosisOptions, FallbackOptions)
# tune searches the recipe, always times its trials, and neither resumes, diagnoses nor falls back.
TUNE_GROUPS = (InputOptions, TrackingOptions, RegistryOptions, CalibrationOptions, GateOptions, FetchOptions)
# baseline runs FP32 only: no calibration, registry or gate; it always times the FP32 runtimes.
BASELINE_GROUPS = (InputOptions, TrackingOptions, FetchOptions)
