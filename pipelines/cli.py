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
fetch_app = typer.Typer(help="Download CIFAR-10 or the MLPerf Tiny ResNet8 (verified, resumable).",
                        no_args_is_help=True)
app.add_typer(fetch_app, name="fetch")

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
TestLimitOpt = Annotated[Optional[int], typer.Option("--test-limit", min=0,
                                                     help="Evaluate on the first N test images only "
                                                          "(default or 0: all 10,000).", rich_help_panel="Evaluation")]
FetchOpt = Annotated[bool, typer.Option("--fetch/--no-fetch",
                                        help="Fetch the default model and data paths when they are missing.",
                                        rich_help_panel="Fetch")]
Cifar10UrlOpt = Annotated[Optional[str], typer.Option("--cifar10-url", envvar="PTQFLOW_CIFAR10_URL",
                                                      help="Mirror of cifar-10-python.tar.gz (same MD5).",
                                                      rich_help_panel="Fetch")]
Resnet8UrlOpt = Annotated[Optional[str], typer.Option("--resnet8-url", envvar="PTQFLOW_RESNET8_URL",
                                                      help="Mirror of the MLPerf Tiny pretrainedResnet.h5 "
                                                           "(same SHA-256).", rich_help_panel="Fetch")]
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


def _run_sweep(**options) -> None:
    from pipelines.sweep import SweepOptions, VariantsFailed, run_sweep
    from pipelines.tables import print_rows

    try:
        result = run_sweep(SweepOptions(**options))
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
    fetch: FetchOpt = True,
    cifar10_url: Cifar10UrlOpt = None,
    resnet8_url: Resnet8UrlOpt = None,
):
    """FP32 baseline and every quantization variant, each an MLflow run; registers the best int8 models."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=tuple(variant) if variant else VARIANT_NAMES,
               experiment=experiment, registered_model=registered_model,
               registered_onnx_model=registered_onnx_model, register=register, calibration_size=calibration_size,
               calibration_seed=calibration_seed, test_limit=test_limit, input_layout=input_layout,
               preprocessing=preprocessing, ort_per_channel=per_channel,
               ort_calibration_method=calibration_method.value if calibration_method else None,
               fetch_missing=fetch, cifar10_url=cifar10_url, resnet8_url=resnet8_url)


@app.command()
@cli_errors
def baseline(
    model: ModelOpt = Path("models/resnet8.onnx"),
    data_dir: DataDirOpt = Path("data/cifar-10-batches-py"),
    experiment: ExperimentOpt = "resnet8-quantization",
    test_limit: TestLimitOpt = None,
    input_layout: LayoutOpt = LayoutChoice.auto,
    preprocessing: PreprocessingOpt = Preprocessing.raw,
    fetch: FetchOpt = True,
):
    """FP32 accuracy through onnxruntime and through the onnx2torch module, and their top-1 agreement."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=(), experiment=experiment, register=False,
               test_limit=test_limit, input_layout=input_layout, preprocessing=preprocessing, fetch_missing=fetch)


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
    fetch: FetchOpt = True,
):
    """PyTorch FX static quantization (fbgemm, x86) to TorchScript."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=tuple(variant) if variant else PYTORCH_VARIANTS,
               experiment=experiment, registered_model=registered_model, register=register,
               calibration_size=calibration_size, calibration_seed=calibration_seed, test_limit=test_limit,
               input_layout=input_layout, preprocessing=preprocessing, fetch_missing=fetch)


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
    fetch: FetchOpt = True,
):
    """ONNX Runtime static quantization (quantize_static, QDQ and QOperator)."""
    _run_sweep(model_path=model, data_dir=data_dir, variants=tuple(variant) if variant else ORT_VARIANTS,
               experiment=experiment, registered_onnx_model=registered_onnx_model, register=register,
               calibration_size=calibration_size, calibration_seed=calibration_seed, test_limit=test_limit,
               input_layout=input_layout, preprocessing=preprocessing, ort_per_channel=per_channel,
               ort_calibration_method=calibration_method.value if calibration_method else None,
               fetch_missing=fetch)


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


@fetch_app.command("cifar10")
@cli_errors
def fetch_cifar10(
    url: Annotated[Optional[str], typer.Option("--url", envvar="PTQFLOW_CIFAR10_URL",
                                               help="Mirror URL (default: the official archive).")] = None,
    md5: Annotated[Optional[str], typer.Option("--md5", help="Expected MD5 of the archive "
                                                             "(default: the official one).")] = None,
    dest: Annotated[Path, typer.Option("--dest", help="Directory that receives cifar-10-batches-py.")] = Path("data"),
):
    """Download cifar-10-python.tar.gz, verify its MD5, extract it safely to DEST/cifar-10-batches-py."""
    from pipelines import fetch

    root = fetch.fetch_cifar10(dest, url=url or fetch.CIFAR10_URL, md5=md5 or fetch.CIFAR10_MD5)
    typer.echo(f"CIFAR-10 ready in {root}")


@fetch_app.command("resnet8")
@cli_errors
def fetch_resnet8(
    url: Annotated[Optional[str], typer.Option("--url", envvar="PTQFLOW_RESNET8_URL",
                                               help="Mirror URL (default: mlcommons/tiny at a pinned commit).")] = None,
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected SHA-256 of the Keras file "
                                                                   "(default: the pinned one).")] = None,
    dest: Annotated[Path, typer.Option("--dest", help="Directory that receives resnet8.onnx.")] = Path("models"),
):
    """Download the MLPerf Tiny ResNet8 Keras file, verify it, and convert it to DEST/resnet8.onnx."""
    from pipelines import fetch

    path = fetch.fetch_resnet8(dest, url=url or fetch.RESNET8_H5_URL, sha256=sha256 or fetch.RESNET8_H5_SHA256)
    typer.echo(f"ResNet8 ready at {path}")


def main() -> None:  # pragma: no cover - console entry point convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
