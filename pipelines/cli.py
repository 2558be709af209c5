"""The `ptqflow` command line. Commands are thin: parse options, call plain functions, turn ptqflow's errors into
one line on stderr and a non-zero exit. Heavy libraries (torch, onnxruntime, mlflow) load only inside commands, so
`--help` stays fast."""

from __future__ import annotations

import signal
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.choices import (
    ORT_VARIANTS,
    PYTORCH_VARIANTS,
    VARIANT_NAMES,
    CalibrationMethod,
    LayoutChoice,
    Preprocessing,
)
from pipelines.errors import PtqflowError

app = typer.Typer(help="Experiment-tracked post-training quantization of small image classifiers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
quantize_app = typer.Typer(help="Quantize with one framework only (plus the FP32 reference run).",
                           no_args_is_help=True)
app.add_typer(quantize_app, name="quantize")

EXIT_INTERRUPTED = 130

# ---- options shared by the sweep-like commands ------------------------------------------------------------------
ModelOpt = Annotated[Path, typer.Option("--model", help="FP32 ONNX classifier (32x32 RGB input, NHWC or NCHW).",
                                        rich_help_panel="Inputs")]
DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="CIFAR-10 in the official cifar-10-batches-py layout.",
                                          rich_help_panel="Inputs")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", help="MLflow experiment for the runs.",
                                            rich_help_panel="Tracking")]
RegisteredOpt = Annotated[str, typer.Option("--registered-model",
                                            help="Registry name for the best PyTorch int8 model.",
                                            rich_help_panel="Tracking")]
RegisteredOnnxOpt = Annotated[str, typer.Option("--registered-onnx-model",
                                                help="Registry name for the best ONNX Runtime int8 model.",
                                                rich_help_panel="Tracking")]
RegisterOpt = Annotated[bool, typer.Option("--register/--no-register",
                                           help="Register the best int8 models as new registry versions.",
                                           rich_help_panel="Tracking")]
CalSizeOpt = Annotated[int, typer.Option("--calibration-size", min=10,
                                         help="Training images for calibration, stratified by class "
                                              "(a multiple of 10).", rich_help_panel="Calibration")]
CalSeedOpt = Annotated[int, typer.Option("--calibration-seed", help="Seed of the calibration subset.",
                                         rich_help_panel="Calibration")]
TestLimitOpt = Annotated[Optional[int], typer.Option("--test-limit", min=1,
                                                     help="Evaluate on the first N test images only "
                                                          "(default: all 10,000).", rich_help_panel="Evaluation")]
LayoutOpt = Annotated[LayoutChoice, typer.Option("--input-layout", case_sensitive=False,
                                                 help="Input layout; auto reads it from the model.",
                                                 rich_help_panel="Inputs")]
PreprocessingOpt = Annotated[Preprocessing, typer.Option("--preprocessing",
                                                         help="raw: float32 0..255; unit: 0..1; standardize: "
                                                              "CIFAR-10 mean/std.", rich_help_panel="Inputs")]
PerChannelOpt = Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor",
                                                       help="ONNX Runtime weights per channel or per tensor "
                                                            "(default: each variant's own).",
                                                       rich_help_panel="ONNX Runtime")]
CalMethodOpt = Annotated[Optional[CalibrationMethod], typer.Option("--calibration-method",
                                                                   help="ONNX Runtime calibration method "
                                                                        "(default: each variant's own).",
                                                                   rich_help_panel="ONNX Runtime")]


def _install_sigterm_handler() -> None:
    """SIGTERM behaves like Ctrl-C, so open runs end KILLED instead of staying RUNNING."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _quiet_library_warnings() -> None:
    """torch.ao and torch.jit print deprecation notices on every call; users need ptqflow's own output."""
    import warnings

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|onnxruntime|onnx2torch|mlflow)(\.|$)")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """One line on stderr and an exit code for ptqflow's errors; no tracebacks for problems a user can fix."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        _install_sigterm_handler()
        _quiet_library_warnings()
        try:
            return fn(*args, **kwargs)
        except PtqflowError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; open runs were ended as KILLED", EXIT_INTERRUPTED)

    return wrapper


def _sweep(variants: tuple[str, ...], model: Path, data_dir: Path, experiment: str, registered_model: str,
           registered_onnx_model: str, register: bool, calibration_size: int, calibration_seed: int,
           test_limit: int | None, input_layout: LayoutChoice, preprocessing: Preprocessing,
           per_channel: bool | None, calibration_method: CalibrationMethod | None) -> None:
    from pipelines.sweep import SweepOptions, VariantsFailed, run_sweep
    from pipelines.tables import print_rows

    options = SweepOptions(
        model_path=model, data_dir=data_dir, variants=variants, experiment=experiment,
        registered_model=registered_model, registered_onnx_model=registered_onnx_model, register=register,
        calibration_size=calibration_size, calibration_seed=calibration_seed, test_limit=test_limit,
        input_layout=input_layout, preprocessing=preprocessing, ort_per_channel=per_channel,
        ort_calibration_method=calibration_method.value if calibration_method else None)
    try:
        result = run_sweep(options)
    except VariantsFailed as exc:
        print_rows(exc.result.rows)
        raise
    print_rows(result.rows)
    typer.echo(f"sweep run {result.parent_run_id} finished in {result.seconds:.1f} s; browse it with `mlflow ui`")


@app.command()
@cli_errors
def sweep(
    model: ModelOpt = Path("models/resnet8.onnx"),
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"Variant to run (repeatable; default: all of {', '.join(VARIANT_NAMES)}).")] = None,
    experiment: ExperimentOpt = "resnet8-quantization",
    registered_model: RegisteredOpt = "resnet8-int8",
    registered_onnx_model: RegisteredOnnxOpt = "resnet8-int8-onnx",
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    per_channel: PerChannelOpt = None,
    calibration_method: CalMethodOpt = None,
):
    """FP32 baseline and every quantization variant, each an MLflow run; registers the best int8 models."""
    _sweep(tuple(variant) if variant else VARIANT_NAMES, model, data_dir, experiment, registered_model,
           registered_onnx_model, register, calibration_size, calibration_seed, test_limit, input_layout,
           preprocessing, per_channel, calibration_method)


@app.command()
@cli_errors
def baseline(
    model: ModelOpt = Path("models/resnet8.onnx"),
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
    experiment: ExperimentOpt = "resnet8-quantization",
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
):
    """FP32 accuracy through onnxruntime and through the onnx2torch module, and their top-1 agreement."""
    _sweep((), model, data_dir, experiment, "", "", False, 1000, 0, test_limit, input_layout, preprocessing,
           None, None)


@quantize_app.command("pytorch")
@cli_errors
def quantize_pytorch(
    model: ModelOpt = Path("models/resnet8.onnx"),
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"PyTorch variant (repeatable; default: {', '.join(PYTORCH_VARIANTS)}).")] = None,
    experiment: ExperimentOpt = "resnet8-quantization",
    registered_model: RegisteredOpt = "resnet8-int8",
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
):
    """PyTorch FX static quantization (fbgemm, x86) to TorchScript."""
    chosen = tuple(variant) if variant else PYTORCH_VARIANTS
    _sweep(chosen, model, data_dir, experiment, registered_model, "", register, calibration_size,
           calibration_seed, test_limit, input_layout, preprocessing, None, None)


@quantize_app.command("ort")
@cli_errors
def quantize_ort(
    model: ModelOpt = Path("models/resnet8.onnx"),
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"ONNX Runtime variant (repeatable; default: {', '.join(ORT_VARIANTS)}).")] = None,
    experiment: ExperimentOpt = "resnet8-quantization",
    registered_onnx_model: RegisteredOnnxOpt = "resnet8-int8-onnx",
    register: RegisterOpt = True,
    calibration_size: CalSizeOpt = 1000,
    calibration_seed: CalSeedOpt = 0,
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    per_channel: PerChannelOpt = None,
    calibration_method: CalMethodOpt = None,
):
    """ONNX Runtime static quantization (quantize_static, QDQ and QOperator)."""
    chosen = tuple(variant) if variant else ORT_VARIANTS
    _sweep(chosen, model, data_dir, experiment, "", registered_onnx_model, register, calibration_size,
           calibration_seed, test_limit, input_layout, preprocessing, per_channel, calibration_method)


@app.command()
@cli_errors
def pull(
    name: Annotated[str, typer.Argument(help="Registered model name, or NAME@ALIAS.")],
    version: Annotated[Optional[str], typer.Option("--version", help="Version number to pull.")] = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Alias to pull (e.g. champion).")] = None,
    output: Annotated[Path, typer.Option("--output", help="Directory to download into.")] = Path("pulled"),
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Re-compute accuracy and compare it with the "
                                                              "version's 'accuracy' tag.")] = False,
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
):
    """Download a registered model, verify its SHA-256, load it, and optionally re-check its accuracy."""
    from pipelines.pull import parse_model_ref
    from pipelines.pull import pull as pull_model

    model_name, ref_alias = parse_model_ref(name)
    if ref_alias and alias and ref_alias != alias:
        _fail(f"{name} names alias '{ref_alias}' but --alias says '{alias}'", 2)
    result = pull_model(model_name, version, alias or ref_alias, output, data_dir if evaluate else None)
    typer.echo(f"{result.name} version {result.version}: {result.model_file} (sha256 {result.sha256[:12]}…, "
               "verified)")
    if result.accuracy is not None:
        typer.echo(f"accuracy {result.accuracy:.4f} matches the registered {result.logged_accuracy:.4f}")


@app.command()
@cli_errors
def compare(
    run_id: Annotated[Optional[str], typer.Argument(help="Sweep (parent) run id; default: the latest sweep.")] = None,
    experiment: ExperimentOpt = "resnet8-quantization",
):
    """Print the comparison table of a sweep run."""
    from pipelines.tables import print_sweep_table

    print_sweep_table(run_id, experiment)


def main() -> None:  # pragma: no cover - console entry point convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
