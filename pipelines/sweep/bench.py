"""`ptqflow bench`: time model files (or registered versions) the way the sweep times its variants."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqflow.common.errors import ModelError
from ptqflow.models.runtime.latency import BenchConfig, BenchResult, benchmark


@dataclass(frozen=True)
class BenchTarget:
    label: str
    path: Path
    layout: str
    preprocessing: str
    engine: str | None = None  # torch quantized engine a TorchScript file is loaded under (None: the current one)
    size: tuple[int, int] | None = None  # (height, width) the model takes, when known: test images are resized to it
    mean: tuple[float, ...] | None = None  # as the registered version records them
    std: tuple[float, ...] | None = None


def resolve_target(ref: str, download_dir: Path, layout: str | None, preprocessing: str,
                   engine: str | None = None) -> BenchTarget:
    """A file path (.onnx or TorchScript, loaded under `engine`; None: torch's current engine), or a registered
    model NAME@ALIAS or NAME/VERSION (downloaded and SHA-256-checked by pull before it is loaded, and loaded under
    its version's `quantized_engine` tag)."""
    path = Path(ref)
    if path.exists():
        if engine and path.suffix != ".onnx":
            from ptqflow.pipelines.registry.pull import checked_engine

            checked_engine(engine, path.name)
        model_layout, size = _input_of(path)
        return BenchTarget(path.name, path, layout or model_layout, preprocessing, engine, size)
    if "@" in ref or ("/" in ref and not ref.endswith((".onnx", ".pt", ".pth"))):
        from ptqflow.pipelines.data.shapes import RecordedFeed
        from ptqflow.pipelines.registry.pull import pull
        from ptqflow.pipelines.shared.names import parse_version_ref
        from ptqflow.tracking import registry
        from ptqflow.tracking.keys import VersionTag as V

        named = parse_version_ref(ref)
        pulled = pull(named.name, named.version, named.alias, download_dir)
        tags = registry.resolve(named.name, version=pulled.version).tags
        feed = RecordedFeed.read(tags)  # fed as the sweep fed it
        return BenchTarget(f"{named.name} v{pulled.version}", pulled.model_file, layout or feed.layout or "NHWC",
                           tags.get(V.PREPROCESSING, preprocessing), pulled.engine or engine,  # untagged: as a file
                           feed.size, feed.mean, feed.std)
    raise ModelError(f"{ref} is neither a model file nor a registered NAME@ALIAS or NAME/VERSION")


def resolve_targets(refs: list[str], download_dir: Path, layout: str | None, preprocessing: str,
                    engine: str | None = None) -> list[BenchTarget]:
    """resolve_target for each ref. Model files load under `engine`, by default the quantized engine torch has
    now, before pulling registered versions (which loads each under its own engine) changes it."""
    import torch

    engine = engine or torch.backends.quantized.engine
    return [resolve_target(ref, download_dir, layout, preprocessing, engine) for ref in refs]


def _input_of(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(layout, (height, width) or None) of a model file's input, as far as the file says."""
    if path.suffix == ".onnx":
        from ptqflow.models.graph.onnx_model import load_classifier

        spec = load_classifier(path).input
        if spec.layout is None:
            return "NHWC", None  # undecided by the shape: like a TorchScript file (--input-layout overrides)
        size = (spec.height, spec.width)
        return spec.layout, size if None not in size else None
    return "NHWC", None  # TorchScript files carry no input description; ptqflow's own are traced on NHWC by default


def bench_files(targets: list[BenchTarget], images_nchw, config: BenchConfig) -> list[tuple[BenchTarget, BenchResult]]:
    from ptqflow.models.runtime.latency import set_torch_threads
    from ptqflow.models.runtime.runners import load_runner
    from ptqflow.pipelines.shared.choices import Preprocessing
    from ptqflow.pipelines.data.datasets import resize_images
    from ptqflow.pipelines.data.preprocessing import InputTransform

    set_torch_threads(config.resolved_threads)
    results = []
    for target in targets:
        sized = resize_images(images_nchw, target.size) if target.size else images_nchw  # timing only: any pixels
        images = InputTransform(target.layout, Preprocessing(target.preprocessing), target.mean, target.std)(sized)
        load = lambda t=target: load_runner(t.path, config.resolved_threads, t.engine).predict  # noqa: E731
        results.append((target, benchmark(load, images, config)))
    return results
