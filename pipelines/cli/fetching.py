"""`ptqflow fetch cifar10|resnet8`: verified, resumable downloads of the default data and model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ptqflow.pipelines.cli.errors import cli_errors
from ptqflow.pipelines.data.inputs import DEFAULT_MODEL


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
