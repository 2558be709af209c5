"""The `ptqflow` command line: the Typer apps and which command each name runs. Commands are thin: parse options,
call plain functions, turn ptqflow's errors into one line on stderr and a non-zero exit. Heavy libraries (torch,
onnxruntime, mlflow) load only inside commands, so `--help` stays fast."""

from __future__ import annotations

import typer

from ptqflow.pipelines.cli import diagnosing, fetching, quantizing, registry

app = typer.Typer(help="Experiment-tracked post-training quantization of small image classifiers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
quantize_app = typer.Typer(help="Quantize with one framework only (plus the FP32 reference run).",
                           no_args_is_help=True)
fetch_app = typer.Typer(help="Download CIFAR-10 or the MLPerf Tiny ResNet8 (verified, resumable).",
                        no_args_is_help=True)

app.command()(quantizing.sweep)
app.add_typer(quantize_app, name="quantize")
quantize_app.command("pytorch")(quantizing.quantize_pytorch)
quantize_app.command("ort")(quantizing.quantize_ort)
app.command()(quantizing.tune)
app.command()(quantizing.baseline)
app.command()(registry.pull)
app.command()(registry.serve)
app.command()(registry.compare)
app.command()(registry.promote)
app.command("models")(registry.list_models)
app.command()(registry.bench)
app.command()(diagnosing.diagnose)
app.add_typer(fetch_app, name="fetch")
fetch_app.command("cifar10")(fetching.fetch_cifar10)
fetch_app.command("resnet8")(fetching.fetch_resnet8)
