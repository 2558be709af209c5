"""The `ptqflow` command line. Commands are thin: parse options, call plain functions, turn ptqflow's errors into
one line on stderr and a non-zero exit. Heavy libraries (torch, onnxruntime, mlflow) load only inside commands, so
`--help` stays fast."""

from __future__ import annotations

import os
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer

from ptqflow.common.errors import PtqflowError
from ptqflow.common.interrupts import deferred_interrupts, stop_requested
from ptqflow.pipelines.shared.choices import (
    ORT_VARIANTS,
    PYTORCH_VARIANTS,
    VARIANT_NAMES,
    CalibrationMethod,
    DataFormat,
    LayoutChoice,
    Preprocessing,
    WeightRounding,
)
from ptqflow.pipelines.data.inputs import DEFAULT_DATA_DIR, DEFAULT_MODEL
from ptqflow.pipelines.shared.progress import quiet_library_warnings
from ptqflow.tracking.keys import DEFAULT_EXPERIMENT

app = typer.Typer(help="Experiment-tracked post-training quantization of small image classifiers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
quantize_app = typer.Typer(help="Quantize with one framework only (plus the FP32 reference run).",
                           no_args_is_help=True)
app.add_typer(quantize_app, name="quantize")
fetch_app = typer.Typer(help="Download CIFAR-10 or the MLPerf Tiny ResNet8 (verified, resumable).",
                        no_args_is_help=True)
app.add_typer(fetch_app, name="fetch")

EXIT_INTERRUPTED = 130

# ---- options shared by the sweep-like commands ------------------------------------------------------------------
ModelOpt = Annotated[Path, typer.Option("--model", help="FP32 ONNX image classifier (NHWC or NCHW input, 1 or 3 "
                                                             "channels, any size).", rich_help_panel="Inputs")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="The dataset: CIFAR-10 or CIFAR-100 pickles, an image "
                                                             "folder, or an .npz file (see --data-format).",
                                          rich_help_panel="Inputs")]
DataFormatOpt = Annotated[DataFormat, typer.Option(
    "--data-format", case_sensitive=False, metavar="<format>", rich_help_panel="Inputs",
    help="What --data-dir holds: cifar10, cifar100 (pickles), imagefolder (train/<class>/ and test/<class>/ or "
         "val/<class>/ images) or npz (x_train, y_train, x_test, y_test); auto detects it.")]
InputSizeOpt = Annotated[Optional[str], typer.Option(
    "--input-size", metavar="<HxW>", show_default=False, rich_help_panel="Inputs",
    help="Height x width to feed a model whose input size is dynamic, e.g. 48x48.")]
ResizeOpt = Annotated[bool, typer.Option(
    "--resize", rich_help_panel="Inputs",
    help="Resize images whose size differs from the model's input (Pillow, bilinear); recorded as a param.")]
MeanOpt = Annotated[Optional[str], typer.Option(
    "--mean", metavar="<m,m,m>", show_default=False, rich_help_panel="Inputs",
    help="Per-channel mean subtracted after --preprocessing's scaling (with --std), e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[Optional[str], typer.Option(
    "--std", metavar="<s,s,s>", show_default=False, rich_help_panel="Inputs",
    help="Per-channel standard deviation the values are divided by after subtracting --mean.")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", help="MLflow experiment for the runs.",
                                            rich_help_panel="Tracking")]
RegisteredOpt = Annotated[Optional[str], typer.Option(
    "--registered-model", show_default=False, rich_help_panel="Tracking",
    help="Registry name for the best PyTorch int8 model (default: <model file stem>-int8, e.g. resnet8-int8, "
         "used only for versions of that FP32 model).")]
RegisteredOnnxOpt = Annotated[Optional[str], typer.Option(
    "--registered-onnx-model", show_default=False, rich_help_panel="Tracking",
    help="Registry name for the best ONNX Runtime int8 model (default: <model file stem>-int8-onnx).")]
RegisterOpt = Annotated[bool, typer.Option("--register/--no-register",
                                           help="Register the best int8 models as new registry versions.",
                                           rich_help_panel="Tracking")]
CalSizeOpt = Annotated[int, typer.Option("--calibration-size", min=1,
                                         help="Training images for calibration, an equal share from each class.",
                                         rich_help_panel="Calibration")]
CalSeedOpt = Annotated[int, typer.Option("--calibration-seed", help="Seed of the calibration subset.",
                                         rich_help_panel="Calibration")]
TestLimitOpt = Annotated[Optional[int], typer.Option("--test-limit", min=0,
                                                     help="Evaluate on the first N test images only "
                                                          "(default or 0: all).", rich_help_panel="Evaluation")]
MaxDropOpt = Annotated[float, typer.Option("--max-accuracy-drop", min=0.0,
                                           help="Promotion gate: most accuracy points a new version may lose vs "
                                                "FP32 and still become @champion.", rich_help_panel="Registry")]
MinAgreementOpt = Annotated[float, typer.Option("--min-agreement", min=0.0, max=1.0,
                                                help="Promotion gate: least top-1 agreement with FP32 for "
                                                     "@champion.", rich_help_panel="Registry")]
MinLatencyGainOpt = Annotated[float, typer.Option("--min-latency-gain", min=0.0, max=1.0,
                                                  help="Promotion gate: on an agreement tie with @champion, how much "
                                                       "lower (as a fraction) a new version's batch-1 latency must "
                                                       "be.", rich_help_panel="Registry")]
RoundingOpt = Annotated[Optional[WeightRounding], typer.Option(
    "--weight-rounding", help="adaround: move FP32 weights onto the int8 grid with AdaRound first (default of every "
                              "int8 variant, cached per model and calibration set); nearest: the quantizer's own "
                              "rounding (fast).", rich_help_panel="Calibration")]
BenchOpt = Annotated[bool, typer.Option("--bench/--no-bench",
                                        help="Measure batch-1 latency and batch-256 throughput of every variant.",
                                        rich_help_panel="Evaluation")]
FetchOpt = Annotated[bool, typer.Option("--fetch/--no-fetch",
                                        help="Fetch the default model and data paths when they are missing.",
                                        rich_help_panel="Fetch")]
Cifar10UrlOpt = Annotated[Optional[str], typer.Option("--cifar10-url", envvar="PTQFLOW_CIFAR10_URL",
                                                      help="Mirror of cifar-10-python.tar.gz (same MD5).",
                                                      rich_help_panel="Fetch")]
Cifar10Md5Opt = Annotated[Optional[str], typer.Option("--cifar10-md5", envvar="PTQFLOW_CIFAR10_MD5",
                                                      help="MD5 of the archive at --cifar10-url when it is not the "
                                                           "official one.", rich_help_panel="Fetch")]
Resnet8UrlOpt = Annotated[Optional[str], typer.Option("--resnet8-url", envvar="PTQFLOW_RESNET8_URL",
                                                      help="Mirror of the MLPerf Tiny pretrainedResnet.h5 "
                                                           "(same SHA-256).", rich_help_panel="Fetch")]
LayoutOpt = Annotated[LayoutChoice, typer.Option("--input-layout", case_sensitive=False,
                                                 help="Input layout; auto reads it from the model.",
                                                 rich_help_panel="Inputs")]
PreprocessingOpt = Annotated[Preprocessing, typer.Option("--preprocessing",
                                                         help="raw: pixel values as they are (0..255); unit: "
                                                              "divided by 255; standardize: (x - mean) / std on "
                                                              "0..255, CIFAR-10's unless given.",
                                                         rich_help_panel="Inputs")]
PerChannelOpt = Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor",
                                                       help="ONNX Runtime weights per channel or per tensor "
                                                            "(default: each variant's own).",
                                                       rich_help_panel="ONNX Runtime")]
AdaroundItersOpt = Annotated[int, typer.Option("--adaround-iterations", min=1, rich_help_panel="Calibration",
                                              help="AdaRound optimization steps per layer.")]
# A short metavar and the choices in the help text: rich folds a long <A|B|C|D> type column mid-word at 80 columns.
CalMethodOpt = Annotated[Optional[CalibrationMethod], typer.Option(
    "--calibration-method", metavar="<method>", rich_help_panel="ONNX Runtime",
    help=f"ONNX Runtime calibration method: {', '.join(m.value for m in CalibrationMethod)} (default: each "
         "variant's own).")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """One line on stderr and an exit code for ptqflow's errors; no tracebacks for problems a user can fix."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_library_warnings()
        try:
            with deferred_interrupts():  # SIGTERM like Ctrl-C: open runs end KILLED instead of staying RUNNING
                result = fn(*args, **kwargs)
                if stop_requested():
                    typer.echo("note: the stop came after the last safe point; the command had finished", err=True)
                return result
        except PtqflowError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; open runs were ended as KILLED", EXIT_INTERRUPTED)
        except Exception as exc:
            if os.environ.get("PTQFLOW_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"unexpected {type(exc).__name__}: {first[:500]} (open runs were ended as FAILED; "
                  "set PTQFLOW_DEBUG=1 for the traceback)", 1)

    return wrapper


def _value(choice):
    """An optional Enum option as the plain value the library code takes."""
    return choice.value if choice is not None else None


def _only(framework: str, chosen: list[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    from ptqflow.common.errors import ConfigError

    for name in chosen or ():
        if name not in allowed:
            raise ConfigError(f"'{name}' is not a {framework} variant; choose from {', '.join(allowed)}")
    return tuple(chosen) if chosen else allowed


def _gate_policy(max_accuracy_drop: float, min_agreement: float, min_latency_gain: float):
    from ptqflow.pipelines.registry.gate import GatePolicy

    return GatePolicy(max_accuracy_drop_pp=max_accuracy_drop, min_agreement=min_agreement,
                      min_latency_gain=min_latency_gain)


def _run_sweep(**options) -> None:
    from ptqflow.pipelines.sweep.sweep import SweepOptions, VariantsFailed, run_sweep
    from ptqflow.pipelines.reports.tables import print_rows

    try:
        result = run_sweep(SweepOptions(**options))
    except VariantsFailed as exc:
        print_rows(exc.result.rows)
        raise
    print_rows(result.rows)
    typer.echo(f"sweep run {result.parent_run_id} finished in {result.seconds:.1f} s; browse it with `mlflow ui`")


# ---- per-layer diagnosis and the sensitivity-ranked fallback (sweep only) --------------------------------------
DiagnoseOpt = Annotated[bool, typer.Option(
    "--diagnose/--no-diagnose", rich_help_panel="Diagnosis",
    help="Per-layer SQNR of every int8 variant on the first --diagnose-images test images, logged on its run under "
         "diagnosis/ (a few seconds each).")]
DiagnoseImagesOpt = Annotated[int, typer.Option("--diagnose-images", min=1, rich_help_panel="Diagnosis",
                                                help="Test images the diagnosis runs on.")]
TargetAgreementOpt = Annotated[Optional[float], typer.Option(
    "--target-agreement", show_default=False, rich_help_panel="Fallback",
    help="Least top-1 agreement with FP32 (e.g. 0.995): a variant below it gets a <variant>-mixed variant with its "
         "most harmful layers in 16 bits (ONNX Runtime QDQ) or FP32.")]
MaxDropPpOpt = Annotated[Optional[float], typer.Option(
    "--max-drop", metavar="<pp>", show_default=False, rich_help_panel="Fallback",
    help="Most accuracy points a variant may lose vs FP32 (e.g. 0.3); one that loses more gets a <variant>-mixed "
         "variant, as with --target-agreement (both: both must hold).")]
RankingImagesOpt = Annotated[int, typer.Option("--ranking-images", min=1, rich_help_panel="Fallback",
                                               help="The fallback ranks layers on the first N test images.")]
FallbackCandidatesOpt = Annotated[int, typer.Option(
    "--fallback-candidates", min=1, rich_help_panel="Fallback",
    help="Layers the fallback ranks: the worst by local SQNR, plus any the diagnosis gives a hint.")]


@app.command()
@cli_errors
def sweep(
    model: ModelOpt = DEFAULT_MODEL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"Variant to run (repeatable; default: all of {', '.join(VARIANT_NAMES)}).")] = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    registered_model: RegisteredOpt = None,
    registered_onnx_model: RegisteredOnnxOpt = None,
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    data_format: DataFormatOpt = DataFormat.auto,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    per_channel: PerChannelOpt = None,
    calibration_method: CalMethodOpt = None,
    weight_rounding: RoundingOpt = None,
    adaround_iterations: AdaroundItersOpt = 1000,
    max_accuracy_drop: MaxDropOpt = 0.5,
    min_agreement: MinAgreementOpt = 0.97,
    min_latency_gain: MinLatencyGainOpt = 0.25,
    bench: BenchOpt = True,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse finished variant runs whose inputs (model, "
                                                          "data, calibration, config) are identical.")] = False,
    fetch: FetchOpt = True,
    cifar10_url: Cifar10UrlOpt = None,
    cifar10_md5: Cifar10Md5Opt = None,
    resnet8_url: Resnet8UrlOpt = None,
    diagnose: DiagnoseOpt = True,
    diagnose_images: DiagnoseImagesOpt = 256,
    target_agreement: TargetAgreementOpt = None,
    max_drop: MaxDropPpOpt = None,
    ranking_images: RankingImagesOpt = 1000,
    fallback_candidates: FallbackCandidatesOpt = 8,
):
    """FP32 baseline and every quantization variant, each an MLflow run; registers the best int8 models."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=tuple(variant) if variant else VARIANT_NAMES,
               experiment=experiment, registered_model=registered_model,
               registered_onnx_model=registered_onnx_model, register=register, calibration_size=calibration_size,
               calibration_seed=calibration_seed, test_limit=test_limit, input_layout=input_layout,
               preprocessing=preprocessing, data_format=data_format, input_size=input_size, resize=resize,
               mean=mean, std=std, ort_per_channel=per_channel,
               ort_calibration_method=_value(calibration_method),
               weight_rounding=_value(weight_rounding),
               adaround_iterations=adaround_iterations,
               gate=_gate_policy(max_accuracy_drop, min_agreement, min_latency_gain), bench=bench, resume=resume,
               fetch_missing=fetch,
               cifar10_url=cifar10_url, cifar10_md5=cifar10_md5, resnet8_url=resnet8_url,
               diagnose=diagnose, diagnose_images=diagnose_images, target_agreement=target_agreement,
               max_drop_pp=max_drop, ranking_images=ranking_images, fallback_candidates=fallback_candidates)


# ---- ptqflow tune ----------------------------------------------------------------------------------------------
def _sizes(text: str) -> tuple[int, ...]:
    from ptqflow.common.errors import ConfigError

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--calibration-sizes takes whole numbers separated by commas, e.g. 500,1000; got "
                          f"{text!r}") from None


@app.command()
@cli_errors
def tune(
    model: ModelOpt = DEFAULT_MODEL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    registered_model: RegisteredOpt = None,
    registered_onnx_model: RegisteredOnnxOpt = None,
    register: RegisterOpt = True,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    data_format: DataFormatOpt = DataFormat.auto,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    adaround_iterations: AdaroundItersOpt = 1000,
    max_accuracy_drop: MaxDropOpt = 0.5,
    min_agreement: MinAgreementOpt = 0.97,
    min_latency_gain: MinLatencyGainOpt = 0.25,
    fetch: FetchOpt = True,
    n_trials: Annotated[int, typer.Option("--n-trials", metavar="<n>", rich_help_panel="Search",
                                          help="Finished trials of the whole study (all workers).")] = 40,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", metavar="<s>", rich_help_panel="Search",
        help="Seconds after which this worker starts no new trial.")] = 1200,
    seed: Annotated[int, typer.Option("--seed", metavar="<n>", rich_help_panel="Search",
                                      help="The sampler's seed.")] = 0,
    calibration_sizes: Annotated[str, typer.Option(
        "--calibration-sizes", metavar="<n,n>", rich_help_panel="Search",
        help="Calibration-set sizes the search chooses from.")] = "500,1000,2000",
    target_agreement: Annotated[float, typer.Option(
        "--target-agreement", metavar="<share>", rich_help_panel="Target",
        help="Top-1 agreement with FP32 a feasible trial reaches.")] = 0.995,
    min_speedup: Annotated[float, typer.Option(
        "--min-speedup", metavar="<ratio>", rich_help_panel="Target",
        help="Batch-256 throughput over ORT FP32 (timed by the same worker) a feasible trial reaches.")] = 1.0,
    stop_at_target: Annotated[bool, typer.Option(
        "--stop-at-target/--no-stop-at-target", rich_help_panel="Target",
        help="Stop at the first feasible trial, or go on mapping the Pareto front.")] = True,
    study: Annotated[Optional[str], typer.Option(
        "--study", metavar="<name>", rich_help_panel="Study",
        help="Optuna study name (default: <model stem>-tune); workers with the same --study and --storage share "
        "it.")] = None,
    storage: Annotated[Optional[str], typer.Option(
        "--storage", metavar="<url>", envvar="PTQFLOW_TUNE_STORAGE", show_envvar=False, rich_help_panel="Study",
        help="Where the study lives, an SQLAlchemy URL (postgresql:// for several machines; also from "
        "PTQFLOW_TUNE_STORAGE). Default: optuna.db beside the MLflow sqlite store.")] = None,
    heartbeat: Annotated[int, typer.Option(
        "--heartbeat", metavar="<s>", rich_help_panel="Study",
        help="Seconds between a worker's heartbeats; a trial silent for twice that is retried.")] = 30,
):
    """Search quantization recipes with Optuna for agreement with FP32 and speed; every trial an MLflow run."""
    from ptqflow.pipelines.sweep.sweep import SweepOptions
    from ptqflow.pipelines.tune.tuner import TuneOptions, run_tune

    sweep_options = SweepOptions(
        model_path=model, data_dir=data_dir, experiment=experiment, registered_model=registered_model,
        registered_onnx_model=registered_onnx_model, register=register, calibration_seed=calibration_seed,
        test_limit=test_limit, input_layout=input_layout, preprocessing=preprocessing, data_format=data_format,
        input_size=input_size, resize=resize, mean=mean, std=std, adaround_iterations=adaround_iterations,
        gate=_gate_policy(max_accuracy_drop, min_agreement, min_latency_gain), fetch_missing=fetch)
    result = run_tune(TuneOptions(sweep=sweep_options, n_trials=n_trials, timeout_s=timeout,
                                  target_agreement=target_agreement, min_speedup=min_speedup,
                                  stop_at_target=stop_at_target, study=study, storage=storage, seed=seed,
                                  heartbeat_s=heartbeat, calibration_sizes=_sizes(calibration_sizes)))
    from ptqflow.pipelines.reports.tables import print_tune

    print_tune(result)


@app.command()
@cli_errors
def baseline(
    model: ModelOpt = DEFAULT_MODEL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    data_format: DataFormatOpt = DataFormat.auto,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    fetch: FetchOpt = True,
    cifar10_url: Cifar10UrlOpt = None,
    cifar10_md5: Cifar10Md5Opt = None,
    resnet8_url: Resnet8UrlOpt = None,
):
    """FP32 accuracy through onnxruntime and through the onnx2torch module, and their top-1 agreement."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=(), experiment=experiment, register=False,
               test_limit=test_limit, input_layout=input_layout, preprocessing=preprocessing, data_format=data_format,
               input_size=input_size, resize=resize, mean=mean, std=std, fetch_missing=fetch,
               cifar10_url=cifar10_url, cifar10_md5=cifar10_md5, resnet8_url=resnet8_url)


@quantize_app.command("pytorch")
@cli_errors
def quantize_pytorch(
    model: ModelOpt = DEFAULT_MODEL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"PyTorch variant (repeatable; default: {', '.join(PYTORCH_VARIANTS)}).")] = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    registered_model: RegisteredOpt = None,
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    data_format: DataFormatOpt = DataFormat.auto,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    weight_rounding: RoundingOpt = None,
    bench: BenchOpt = True,
    fetch: FetchOpt = True,
    cifar10_url: Cifar10UrlOpt = None,
    cifar10_md5: Cifar10Md5Opt = None,
    resnet8_url: Resnet8UrlOpt = None,
):
    """PyTorch FX static quantization (fbgemm, x86) to TorchScript."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=_only("PyTorch", variant, PYTORCH_VARIANTS),
               experiment=experiment, registered_model=registered_model, register=register,
               calibration_size=calibration_size, calibration_seed=calibration_seed, test_limit=test_limit,
               input_layout=input_layout, preprocessing=preprocessing, data_format=data_format,
               input_size=input_size, resize=resize, mean=mean, std=std, fetch_missing=fetch, bench=bench,
               weight_rounding=_value(weight_rounding),
               cifar10_url=cifar10_url, cifar10_md5=cifar10_md5, resnet8_url=resnet8_url)


@quantize_app.command("ort")
@cli_errors
def quantize_ort(
    model: ModelOpt = DEFAULT_MODEL,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"ONNX Runtime variant (repeatable; default: {', '.join(ORT_VARIANTS)}).")] = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
    registered_onnx_model: RegisteredOnnxOpt = None,
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    data_format: DataFormatOpt = DataFormat.auto,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    per_channel: PerChannelOpt = None,
    calibration_method: CalMethodOpt = None,
    weight_rounding: RoundingOpt = None,
    bench: BenchOpt = True,
    fetch: FetchOpt = True,
    cifar10_url: Cifar10UrlOpt = None,
    cifar10_md5: Cifar10Md5Opt = None,
    resnet8_url: Resnet8UrlOpt = None,
):
    """ONNX Runtime static quantization (quantize_static, QDQ and QOperator)."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=_only("ONNX Runtime", variant, ORT_VARIANTS),
               experiment=experiment, registered_onnx_model=registered_onnx_model, register=register,
               calibration_size=calibration_size, calibration_seed=calibration_seed, test_limit=test_limit,
               input_layout=input_layout, preprocessing=preprocessing, data_format=data_format,
               input_size=input_size, resize=resize, mean=mean, std=std, ort_per_channel=per_channel,
               ort_calibration_method=_value(calibration_method),
               fetch_missing=fetch, bench=bench, weight_rounding=_value(weight_rounding),
               cifar10_url=cifar10_url, cifar10_md5=cifar10_md5, resnet8_url=resnet8_url)


@app.command()
@cli_errors
def pull(
    name: Annotated[str, typer.Argument(help="Registered model name, or NAME@ALIAS.")],
    version: Annotated[Optional[str], typer.Option("--version", help="Version number to pull.")] = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Alias to pull (e.g. champion).")] = None,
    output: Annotated[Path, typer.Option("--output", help="Directory to download into.")] = Path("pulled"),
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Re-compute accuracy and compare it with the "
                                                              "version's 'accuracy' tag.")] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    data_format: DataFormatOpt = DataFormat.auto,
):
    """Download a registered model, verify its SHA-256, load it, and optionally re-check its accuracy."""
    from ptqflow.pipelines.registry.pull import parse_model_ref
    from ptqflow.pipelines.registry.pull import pull as pull_model

    from ptqflow.pipelines.shared.names import validate_alias, validate_name, validate_output_dir

    model_name, ref_alias = parse_model_ref(name)
    if ref_alias and alias and ref_alias != alias:
        _fail(f"{name} names alias '{ref_alias}' but --alias says '{alias}'", 2)
    validate_name("registered model name", model_name)
    if alias or ref_alias:
        validate_alias(alias or ref_alias)
    result = pull_model(model_name, version, alias or ref_alias, validate_output_dir(output),
                        data_dir if evaluate else None, data_format)
    typer.echo(f"{result.name} version {result.version}: {result.model_file} (sha256 {result.sha256[:12]}…, "
               "verified)")
    if result.accuracy is not None:
        typer.echo(f"accuracy {result.accuracy:.4f} matches the registered {result.logged_accuracy:.4f}")


@app.command()
@cli_errors
def serve(
    name: Annotated[str, typer.Argument(help="Registered model name, or NAME@ALIAS.")],
    version: Annotated[Optional[str], typer.Option("--version", help="Version number to serve.")] = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Alias to serve (e.g. champion).")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 5001,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    output: Annotated[Optional[Path], typer.Option("--output", help="Keep the download here (default: a temp "
                                                                    "dir removed on exit).")] = None,
):
    """Serve a registered model over MLflow's REST API (/ping, /invocations), after verifying its SHA-256 and
    setting torch's quantized engine from the version's tag; Ctrl-C stops."""
    from ptqflow.pipelines.shared.names import validate_output_dir
    from ptqflow.pipelines.registry.serve import serve as serve_model

    stopped_by = serve_model(name, version, alias, host, port,
                             validate_output_dir(output) if output is not None else None, announce=typer.echo)
    typer.echo(f"stopped{f' ({stopped_by})' if stopped_by else ''}")


@app.command()
@cli_errors
def compare(
    refs: Annotated[Optional[list[str]], typer.Argument(
        help="Sweep run ids, variant run ids, or registered NAME/VERSION or NAME@ALIAS. None: the latest sweep's "
             "table; one sweep: its table; two sweeps: variant by variant with deltas.")] = None,
    experiment: ExperimentOpt = DEFAULT_EXPERIMENT,
):
    """Compare sweeps, registered versions or runs side by side."""
    from ptqflow.pipelines.reports.tables import print_comparison, print_sweep_table

    if not refs or (len(refs) == 1 and "/" not in refs[0] and "@" not in refs[0]):
        print_sweep_table(refs[0] if refs else None, experiment)
    else:
        print_comparison(refs)


@app.command()
@cli_errors
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to set.")] = "champion",
):
    """Point an alias at a version by hand (no gate); the decision is recorded as tags on the version."""
    from ptqflow.pipelines.shared.names import validate_alias, validate_name
    from ptqflow.tracking import aliases
    from ptqflow.tracking import registry

    validate_name("registered model name", name)
    validate_alias(alias)
    registry.resolve(name, version=version)  # a clear error for a version that does not exist
    aliases.set_alias(name, alias, version)
    aliases.record_decision(name, version, "manual", f"@{alias} set by hand with `ptqflow promote`", "none")
    typer.echo(f"{name}@{alias} -> version {version}")


@app.command("models")
@cli_errors
def list_models(
    name: Annotated[Optional[str], typer.Argument(help="Only this registered model.")] = None,
):
    """Registered models with their versions, aliases and key numbers."""
    from ptqflow.pipelines.reports.tables import print_registered_models
    from ptqflow.tracking.aliases import list_registered

    print_registered_models(list_registered(name))


@app.command()
@cli_errors
def bench(
    targets: Annotated[list[str], typer.Argument(
        help="ONNX or TorchScript files, or registered models NAME@ALIAS / NAME/VERSION.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    data_format: DataFormatOpt = DataFormat.auto,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Threads per runtime (0: all cores).")] = 0,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Log the numbers to this MLflow run "
                                                                   "(one target only).")] = None,
    output: Annotated[Path, typer.Option("--output", help="Where registered models are downloaded.")] = Path("pulled"),
    engine: Annotated[Optional[str], typer.Option("--engine", help="torch quantized engine (fbgemm, x86, ...) for "
                                                                   "TorchScript files (default: torch's current "
                                                                   "one); registered versions use their "
                                                                   "'quantized_engine' tag.")] = None,
):
    """Batch-1 latency and batch-256 throughput, on real test images, the way the sweep measures them."""
    from ptqflow.common.errors import ConfigError
    from ptqflow.models.runtime.latency import BenchConfig
    from ptqflow.pipelines.sweep.bench import bench_files, resolve_targets
    from ptqflow.pipelines.data.datasets import load_dataset
    from ptqflow.pipelines.reports.tables import print_bench

    if run_id and len(targets) != 1:
        raise ConfigError("--run-id logs one target's numbers; pass a single target")
    layout = None if input_layout is LayoutChoice.auto else input_layout.value
    resolved = resolve_targets(targets, output, layout, preprocessing.value, engine)
    images = load_dataset(data_dir, data_format).test.images[:256]
    results = bench_files(resolved, images, BenchConfig(threads=threads))
    print_bench(results)
    if run_id:
        from ptqflow.tracking.records import log_bench_to_run

        log_bench_to_run(run_id, results[0][1])
        typer.echo(f"logged to run {run_id}")


@app.command()
@cli_errors
def diagnose(
    ref: Annotated[str, typer.Argument(
        help="A variant's run id, a sweep's run id (each of its int8 variants, plus a plot comparing them), or a "
             "registered NAME/VERSION or NAME@ALIAS.")],
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", show_default=False, help="The dataset (default: the sweep's; its SHA-256 must match).")] = None,
    data_format: DataFormatOpt = DataFormat.auto,
    model: Annotated[Optional[Path], typer.Option(
        "--model", show_default=False, help="The FP32 ONNX model (default: the sweep's; its SHA-256 must "
                                            "match).")] = None,
    images: Annotated[int, typer.Option("--images", min=1, max=10_000,
                                        help="Diagnose on the first N test images.")] = 256,
    output: Annotated[Path, typer.Option("--output", help="Directory for each variant's layers.csv, layers.json "
                                                          "and layer_sqnr.png.")] = Path("diagnosis"),
    log: Annotated[bool, typer.Option("--log", help="Also log the files on the variant's run (diagnosis/...) "
                                                    "and a sweep's comparison plot on the sweep run.")] = False,
    adaround_iterations: Annotated[Optional[int], typer.Option(
        "--adaround-iterations", min=1, show_default=False,
        help="AdaRound steps per layer the sweep used (default: its recorded value, else 1000).")] = None,
):
    """Per-layer SQNR of an int8 variant (weights; each layer alone; accumulated), worst first, with a hint per bad
    layer."""
    from ptqflow.pipelines.repair.diagnose import DiagnoseOptions
    from ptqflow.pipelines.repair.diagnose import diagnose as diagnose_variants
    from ptqflow.pipelines.reports.diagnosis import print_diagnosis

    result = diagnose_variants(DiagnoseOptions(ref=ref, data_dir=data_dir, data_format=data_format.value,
                                               model_path=model, output_dir=output,
                                               images=images, log=log, adaround_iterations=adaround_iterations))
    for done in result.variants:
        print_diagnosis(done.diagnosis, f"{done.variant} (run {done.run_id[:8]}): layers worst first")
        typer.echo(f"wrote {done.directory}{' and logged it on the run' if log else ''}")
    if result.comparison is not None:
        typer.echo(f"variants compared layer by layer: {result.comparison}")


@fetch_app.command("cifar10")
@cli_errors
def fetch_cifar10(
    url: Annotated[Optional[str], typer.Option("--url", envvar="PTQFLOW_CIFAR10_URL",
                                               help="Mirror URL (default: the official archive).")] = None,
    md5: Annotated[Optional[str], typer.Option("--md5", envvar="PTQFLOW_CIFAR10_MD5",
                                               help="Expected MD5 of the archive (default: the official one).")] = None,
    dest: Annotated[Path, typer.Option("--dest", help="Directory that receives cifar-10-batches-py.")] = Path("data"),
):
    """Download cifar-10-python.tar.gz, verify its MD5, extract it safely to DEST/cifar-10-batches-py."""
    from ptqflow.pipelines.data import fetch

    root = fetch.fetch_cifar10(dest, url=url or fetch.CIFAR10_URL, md5=md5 or fetch.CIFAR10_MD5)
    typer.echo(f"CIFAR-10 ready in {root}")


@fetch_app.command("resnet8")
@cli_errors
def fetch_resnet8(
    url: Annotated[Optional[str], typer.Option("--url", envvar="PTQFLOW_RESNET8_URL",
                                               help="Mirror URL (default: mlcommons/tiny at a pinned commit).")] = None,
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected SHA-256 of the Keras file "
                                                                   "(default: the pinned one).")] = None,
    dest: Annotated[Path, typer.Option("--dest", help="Directory that receives resnet8.onnx.")] = DEFAULT_MODEL.parent,
):
    """Download the MLPerf Tiny ResNet8 Keras file, verify it, and convert it to DEST/resnet8.onnx."""
    from ptqflow.pipelines.data import fetch

    path = fetch.fetch_resnet8(dest, url=url or fetch.RESNET8_H5_URL, sha256=sha256 or fetch.RESNET8_H5_SHA256)
    typer.echo(f"ResNet8 ready at {path}")
