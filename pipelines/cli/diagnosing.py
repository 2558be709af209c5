"""`ptqflow diagnose`: per-layer SQNR of an int8 variant, read back from its run or registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ptqflow.pipelines.cli.errors import cli_errors
from ptqflow.pipelines.cli.options import DataFormatOpt
from ptqflow.pipelines.shared.choices import DataFormat


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
