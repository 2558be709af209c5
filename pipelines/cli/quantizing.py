"""The commands that quantize and measure: `sweep`, `quantize pytorch|ort` (the sweep restricted to one framework,
with the same options for what they run), `baseline` (FP32 only) and `tune` (a search over the sweep's recipes)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ptqflow.pipelines.cli.errors import cli_errors
from ptqflow.pipelines.cli.option_groups import ONNXRUNTIME, PYTORCH, OptionGroups, takes_groups
from ptqflow.pipelines.cli.options import BASELINE_GROUPS, SWEEP_GROUPS, TUNE_GROUPS
from ptqflow.pipelines.shared.choices import ORT_VARIANTS, PYTORCH_VARIANTS, VARIANT_NAMES


def _only(framework: str, chosen: list[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    from ptqflow.common.errors import ConfigError

    for name in chosen or ():
        if name not in allowed:
            raise ConfigError(f"'{name}' is not a {framework} variant; choose from {', '.join(allowed)}")
    return tuple(chosen) if chosen else allowed


def _run_sweep(groups: OptionGroups, **options) -> None:
    from ptqflow.pipelines.reports.tables import print_rows
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.outcomes import VariantsFailed
    from ptqflow.pipelines.sweep.sweep import run_sweep

    try:
        result = run_sweep(SweepOptions(**groups.sweep_fields(), **options))
    except VariantsFailed as exc:
        print_rows(exc.result.rows)
        raise
    print_rows(result.rows)
    typer.echo(f"sweep run {result.parent_run_id} finished in {result.seconds:.1f} s; browse it with `mlflow ui`")


@cli_errors
@takes_groups(*SWEEP_GROUPS)
def sweep(
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"Variant to run (repeatable; default: all of {', '.join(VARIANT_NAMES)}).")] = None,
    *,
    groups: OptionGroups,
):
    """FP32 baseline and every quantization variant, each an MLflow run; registers the best int8 models."""
    _run_sweep(groups, variants=tuple(variant) if variant else VARIANT_NAMES)


@cli_errors
@takes_groups(*SWEEP_GROUPS, framework=PYTORCH)
def quantize_pytorch(
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"PyTorch variant (repeatable; default: {', '.join(PYTORCH_VARIANTS)}).")] = None,
    *,
    groups: OptionGroups,
):
    """PyTorch FX static quantization (fbgemm, x86) to TorchScript."""
    _run_sweep(groups, variants=_only("PyTorch", variant, PYTORCH_VARIANTS))


@cli_errors
@takes_groups(*SWEEP_GROUPS, framework=ONNXRUNTIME)
def quantize_ort(
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help=f"ONNX Runtime variant (repeatable; default: {', '.join(ORT_VARIANTS)}).")] = None,
    *,
    groups: OptionGroups,
):
    """ONNX Runtime static quantization (quantize_static, QDQ and QOperator)."""
    _run_sweep(groups, variants=_only("ONNX Runtime", variant, ORT_VARIANTS))


@cli_errors
@takes_groups(*BASELINE_GROUPS)
def baseline(*, groups: OptionGroups):
    """FP32 accuracy through onnxruntime and through the onnx2torch module, and their top-1 agreement."""
    _run_sweep(groups, variants=(), register=False)


def _sizes(text: str) -> tuple[int, ...]:
    from ptqflow.common.errors import ConfigError

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--calibration-sizes takes whole numbers separated by commas, e.g. 500,1000; got "
                          f"{text!r}") from None


@cli_errors
@takes_groups(*TUNE_GROUPS)
def tune(
    *,
    groups: OptionGroups,
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
    from ptqflow.pipelines.reports.tables import print_tune
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.tune.options import TuneOptions
    from ptqflow.pipelines.tune.tuner import run_tune

    result = run_tune(TuneOptions(sweep=SweepOptions(**groups.sweep_fields()), n_trials=n_trials, timeout_s=timeout,
                                  target_agreement=target_agreement, min_speedup=min_speedup,
                                  stop_at_target=stop_at_target, study=study, storage=storage, seed=seed,
                                  heartbeat_s=heartbeat, calibration_sizes=_sizes(calibration_sizes)))
    print_tune(result)
