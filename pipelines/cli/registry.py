"""The commands on what sweeps left behind: registered models (`pull`, `serve`, `promote`, `models`), sweeps and
runs side by side (`compare`), and model files or versions timed the sweep's way (`bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ptqflow.pipelines.cli.errors import cli_errors
from ptqflow.pipelines.cli.options import DataDirOpt, DataFormatOpt, LayoutOpt, PreprocessingOpt
from ptqflow.pipelines.data.inputs import DEFAULT_DATA_DIR
from ptqflow.pipelines.shared.choices import DataFormat, LayoutChoice, Preprocessing


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
    from ptqflow.pipelines.registry.pull import pull as pull_model
    from ptqflow.pipelines.shared.names import validate_output_dir, version_ref

    named = version_ref(name, version, alias)
    result = pull_model(named.name, named.version, named.alias, validate_output_dir(output),
                        data_dir if evaluate else None, data_format)
    typer.echo(f"{result.name} version {result.version}: {result.model_file} (sha256 {result.sha256[:12]}…, "
               "verified)")
    if result.accuracy is not None:
        measured = (f"accuracy {result.accuracy:.4f} ({round(result.accuracy * result.test_images)} of "
                    f"{result.test_images} test images)")
        typer.echo(f"{measured} matches the registered {result.recorded_accuracy}" if result.recorded_accuracy
                   else f"{measured}; the version records no accuracy to compare with")


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
    from ptqflow.pipelines.registry.serve import serve as serve_model
    from ptqflow.pipelines.shared.names import validate_output_dir

    stopped_by = serve_model(name, version, alias, host, port,
                             validate_output_dir(output) if output is not None else None, announce=typer.echo)
    typer.echo(f"stopped{f' ({stopped_by})' if stopped_by else ''}")


@cli_errors
def compare(
    refs: Annotated[Optional[list[str]], typer.Argument(
        help="Sweep run ids, variant run ids, or registered NAME/VERSION or NAME@ALIAS. None: the latest sweep's "
             "table; one sweep: its table; two sweeps: variant by variant with deltas.")] = None,
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", show_default=False, rich_help_panel="Tracking",
        help="The experiment whose latest sweep is shown (default: the latest sweep of any experiment).")] = None,
):
    """Compare sweeps, registered versions or runs side by side."""
    from ptqflow.pipelines.reports.tables import print_comparison, print_sweep_table

    if not refs or (len(refs) == 1 and "/" not in refs[0] and "@" not in refs[0]):
        print_sweep_table(refs[0] if refs else None, experiment)
    else:
        print_comparison(refs)


@cli_errors
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to point the alias at.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to set.")] = "champion",
):
    """Point an alias at a version by hand (no gate); the decision is recorded as tags on the version."""
    from ptqflow.pipelines.shared.names import validate_alias, validate_name
    from ptqflow.tracking import aliases, registry

    validate_name("registered model name", name)
    validate_alias(alias)
    registry.resolve(name, version=version)  # a clear error for a version that does not exist
    aliases.set_alias(name, alias, version)
    aliases.record_decision(name, version, "manual", f"@{alias} set by hand with `ptqflow promote`", "none")
    typer.echo(f"{name}@{alias} -> version {version}")


@cli_errors
def list_models(
    name: Annotated[Optional[str], typer.Argument(help="Only this registered model.")] = None,
):
    """Registered models with their versions, aliases and key numbers."""
    from ptqflow.pipelines.reports.tables import print_registered_models
    from ptqflow.tracking.aliases import list_registered

    print_registered_models(list_registered(name))


@cli_errors
def bench(
    targets: Annotated[list[str], typer.Argument(
        help="ONNX or TorchScript files, or registered models NAME@ALIAS / NAME/VERSION.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    data_format: DataFormatOpt = DataFormat.auto,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Threads per runtime (0: all cores for batches; "
                                                                   "single images on a registered version's "
                                                                   "recorded threads, else the faster of 1 and "
                                                                   "all cores).")] = 0,
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
    from ptqflow.pipelines.data.datasets import load_dataset
    from ptqflow.pipelines.reports.tables import print_bench
    from ptqflow.pipelines.sweep.bench import bench_files, resolve_targets

    if run_id and len(targets) != 1:
        raise ConfigError("--run-id logs one target's numbers; pass a single target")
    layout = None if input_layout is LayoutChoice.auto else input_layout.value
    resolved = resolve_targets(targets, output, layout, preprocessing.value, engine)
    images = load_dataset(data_dir, data_format).test.images[:256]
    config = BenchConfig(threads=threads, latency_threads=threads)  # 0: see --threads
    if run_id:  # timed beside its sweep's FP32 model, the run's whole timing record replaced
        from ptqflow.pipelines.sweep.bench import bench_run

        results = [(resolved[0], bench_run(run_id, resolved[0], images, config, output))]
    else:
        results = bench_files(resolved, images, config)
    print_bench(results)
    if run_id:
        typer.echo(f"logged to run {run_id}")
