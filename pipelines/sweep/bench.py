"""`ptqflow bench`: time model files (or registered versions) the way the sweep times its variants."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ptqflow.common.errors import ConfigError, ModelError
from ptqflow.models.runtime.latency import BenchConfig, BenchResult, benchmark
from ptqflow.pipelines.variants.specs import FP32
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag


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
    fixed_batch: int | None = None  # a batch dimension fixed in the model (then batch 1 only is timed)
    latency_threads: int = 0  # the batch-1 threads the registered version records (0: chosen when timed)


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
        model_layout, size, fixed_batch = _input_of(path)
        return BenchTarget(path.name, path, layout or model_layout, preprocessing, engine, size,
                           fixed_batch=fixed_batch)
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
        batch = tags.get(V.INPUT_BATCH)
        return BenchTarget(f"{named.name} v{pulled.version}", pulled.model_file, layout or feed.layout or "NHWC",
                           tags.get(V.PREPROCESSING, preprocessing), pulled.engine or engine,  # untagged: as a file
                           feed.size, feed.mean, feed.std, int(batch) if batch and batch.isdigit() else None,
                           pulled.latency_threads or 0)
    raise ModelError(f"{ref} is neither a model file nor a registered NAME@ALIAS or NAME/VERSION")


def resolve_targets(refs: list[str], download_dir: Path, layout: str | None, preprocessing: str,
                    engine: str | None = None) -> list[BenchTarget]:
    """resolve_target for each ref. Model files load under `engine`, by default the quantized engine torch has
    now, before pulling registered versions (which loads each under its own engine) changes it."""
    import torch

    engine = engine or torch.backends.quantized.engine
    return [resolve_target(ref, download_dir, layout, preprocessing, engine) for ref in refs]


def _input_of(path: Path) -> tuple[str, tuple[int, int] | None, int | None]:
    """(layout, (height, width) or None, fixed batch size or None) of a model file's input, as far as it says."""
    if path.suffix == ".onnx":
        from ptqflow.models.graph.onnx_model import load_classifier

        spec = load_classifier(path).input
        if spec.layout is None:  # undecided by the shape: like a TorchScript file (--input-layout overrides)
            return "NHWC", None, spec.batch_size
        size = (spec.height, spec.width)
        return spec.layout, size if None not in size else None, spec.batch_size
    return "NHWC", None, None  # TorchScript files carry no input description; ptqflow's are traced on NHWC


def bench_files(targets: list[BenchTarget], images_nchw, config: BenchConfig) -> list[tuple[BenchTarget, BenchResult]]:
    """Each target timed alone (benchmark: on config's threads, torch's and onnxruntime's; single images on the
    batch-1 threads a registered version records, unless config fixes them); batch 1 only for a model whose batch
    dimension is fixed."""
    return [(target, benchmark(_load(target), _images_for(target, images_nchw), _config_for(target, config),
                               throughput=not target.fixed_batch)) for target in targets]


def _config_for(target: BenchTarget, config: BenchConfig) -> BenchConfig:
    from dataclasses import replace

    if config.latency_threads or not target.latency_threads:
        return config
    return replace(config, latency_threads=target.latency_threads)


def _images_for(target: BenchTarget, images_nchw):
    from ptqflow.pipelines.data.datasets import resize_images
    from ptqflow.pipelines.data.preprocessing import InputTransform
    from ptqflow.pipelines.shared.choices import Preprocessing

    sized = resize_images(images_nchw, target.size) if target.size else images_nchw  # timing only: any pixels
    return InputTransform(target.layout, Preprocessing(target.preprocessing), target.mean, target.std)(sized)


def _load(target: BenchTarget):
    from ptqflow.models.runtime.runners import load_runner

    return lambda threads: load_runner(target.path, threads, target.engine).predict


def bench_run(run_id: str, target: BenchTarget, images_nchw, config: BenchConfig,
              download_dir: Path) -> BenchResult:
    """`ptqflow bench --run-id`: time `target` again for the sweep run `run_id` and replace the run's timings with a
    whole, consistent set, as the sweep logs them (ptqflow.pipelines.sweep.recording.timing_record: rounded,
    spreads, the contended flag and tag, set or cleared). A variant of a sweep is timed in rounds beside its
    sweep's FP32 model, so its speedups are measured again too; a run with speedups whose FP32 model cannot be
    found, or timed on another CPU or thread count than its record says, is refused (ConfigError)."""
    from ptqflow.models.runtime.latency import benchmark_against
    from ptqflow.pipelines.sweep.recording import timing_record
    from ptqflow.tracking import logged_models, records, runs

    run = runs.get_run(run_id)
    _check_comparable(run, config)
    recorded = run.data.params.get(Param.LATENCY_THREADS)
    if recorded and recorded.isdigit() and not config.latency_threads:  # the run's runtime setting
        from dataclasses import replace

        config = replace(config, latency_threads=int(recorded))
    images = _images_for(target, images_nchw)
    throughput = not target.fixed_batch
    reference = None if run.data.tags.get(Tag.VARIANT) == FP32 else _sweep_fp32_model(run, download_dir)
    if reference is not None:
        fp32 = BenchTarget(FP32, reference, target.layout, target.preprocessing)
        bench = benchmark_against(_load(target), _load(fp32), images, config, throughput)
    elif run.data.tags.get(Tag.VARIANT) != FP32 and Metric.SPEEDUP_VS_FP32_B1 in run.data.metrics:
        raise ConfigError(f"run {run_id} records speedups over its sweep's FP32 model, which cannot be found to "
                          "time beside it; time the model without --run-id")
    else:
        bench = benchmark(_load(target), images, config, throughput=throughput)
    metrics, params, tags, stale = timing_record(bench, bench if run.data.tags.get(Tag.VARIANT) == FP32 else None,
                                                 run.data.tags)
    tags[Tag.BENCH_RETIMED] = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC by ptqflow bench "
                               f"({'beside FP32' if reference else 'alone'})")
    params = {k: v for k, v in params.items() if k not in run.data.params}  # equal ones: _check_comparable
    records.log_to_ended_run(run_id, logged_models.logged_model_uri(run), metrics, params, tags)
    records.delete_run_tags(run_id, stale)
    return bench


def _check_comparable(run, config: BenchConfig) -> None:
    """Refuse to put timings on a run whose record says other threads or another CPU (its other numbers are that)."""
    from ptqflow.models.runtime.machine import cpu_description

    recorded = run.data.params.get(Param.BENCH_THREADS)
    if recorded and recorded != str(config.resolved_threads):
        raise ConfigError(f"run {run.info.run_id} was timed on {recorded} threads, not {config.resolved_threads}: "
                          f"pass --threads {recorded}")
    rounds = run.data.params.get(Param.BENCH_ROUNDS)
    if rounds and rounds != str(max(1, config.rounds)):
        raise ConfigError(f"run {run.info.run_id} was timed in {rounds} rounds, not {config.rounds}")
    cpu = cpu_description()
    theirs = (run.data.tags.get(Tag.CPU_MODEL), run.data.tags.get(Tag.CPU_INT8_ISA))
    if None not in theirs and theirs != cpu:
        raise ConfigError(f"run {run.info.run_id} was measured on {theirs[0]} ({theirs[1]}), this machine is "
                          f"{cpu[0]} ({cpu[1]}): its timings would describe two machines")


def _sweep_fp32_model(run, download_dir: Path) -> Path | None:
    """The FP32 model file of the sweep `run` belongs to (its fp32 run's model_file/ artifact), downloaded."""
    from ptqflow.tracking import records, runs

    sweep = run.data.tags.get(Tag.SWEEP_RUN_ID)
    if not sweep:
        return None
    fp32_runs = [r for r in runs.child_runs(sweep) if r.data.tags.get(Tag.VARIANT) == FP32]
    if not fp32_runs:
        return None
    folder = records.download_artifact(fp32_runs[0].info.run_id, Artifact.MODEL_FILE_DIR,
                                       download_dir / f"fp32-{fp32_runs[0].info.run_id}")
    return next(iter(sorted(folder.glob("*.onnx"))), None)
