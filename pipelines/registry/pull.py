"""Get a registered model back: download, verify its SHA-256 before loading, optionally re-check accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqflow.common.errors import IntegrityError, ModelError
from ptqflow.common.files import file_sha256



@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    model_file: Path
    sha256: str
    logged_accuracy: float | None
    accuracy: float | None = None  # re-computed with --evaluate
    model_dir: Path | None = None  # the downloaded MLflow model directory the verified file sits in
    engine: str | None = None  # torch quantized engine the file was loaded under (its version's tag)
    recorded_accuracy: str | None = None  # the version's accuracy tag as written, with --evaluate
    test_images: int | None = None  # re-evaluated on, with --evaluate
    latency_threads: int | None = None  # the batch-1 threads its version records, which it was loaded with


def pull(name: str, version: str | None, alias: str | None, output_dir: Path,
         data_dir: Path | None = None, data_format: str = "auto") -> PullResult:
    """Download, verify and load a registered version; with `data_dir`, re-compute its accuracy on that dataset
    (read as `data_format`; auto: the format the version records, else detected), fed as the sweep fed it."""
    from ptqflow.tracking import registry
    from ptqflow.tracking.keys import VersionTag as V

    registered = registry.resolve(name, version, alias)
    expected_sha = registered.tags.get(V.SHA256)
    relative_file = registered.tags.get(V.MODEL_FILE)
    if not expected_sha or not relative_file:
        raise IntegrityError(f"{name} version {registered.version} has no '{V.SHA256}'/'{V.MODEL_FILE}' tags; "
                             "it was not registered by ptqflow and cannot be verified")
    model_dir = registry.download(registered, output_dir / f"{name}-v{registered.version}")
    model_file = (model_dir / relative_file).resolve()
    if model_dir.resolve() not in model_file.parents or not model_file.is_file():
        raise IntegrityError(f"{name} version {registered.version}: model file '{relative_file}' is missing "
                             "from the download")
    actual_sha = file_sha256(model_file)
    if actual_sha != expected_sha:
        # TorchScript loading runs code and has no safe mode: a changed file is never loaded.
        raise IntegrityError(f"{name} version {registered.version}: {model_file.name} has SHA-256 "
                             f"{actual_sha[:12]}…, registered {expected_sha[:12]}…; refusing to load it")
    logged = float(registered.tags[V.ACCURACY]) if V.ACCURACY in registered.tags else None
    engine = registered.tags.get(V.QUANTIZED_ENGINE) or None
    threads = recorded_threads(registered.tags)
    result = PullResult(name, registered.version, model_file, actual_sha, logged, model_dir=model_dir.resolve(),
                        engine=engine, latency_threads=threads)
    from ptqflow.models.runtime.runners import load_runner

    # Loading proves the file is usable. TorchScript int8 modules pack their weights for the quantized engine that
    # is current at load time, so the version's engine is set first (and stays set for whoever uses the result),
    # and torch's threads too: the version's batch-1 threads, its runtime setting.
    if model_file.suffix != ".onnx":
        checked_engine(engine, f"{name} version {registered.version}")
        if threads:
            import torch

            torch.set_num_threads(threads)
    runner = load_runner(model_file, threads, engine=engine)
    if data_dir is None:
        return result
    return _reevaluate(result, runner, registered.tags, data_dir, data_format)


def recorded_threads(tags: dict[str, str]) -> int | None:
    """The batch-1 threads a version's tags record (VersionTag.LATENCY_THREADS), None when it has none."""
    from ptqflow.tracking.keys import VersionTag as V

    value = tags.get(V.LATENCY_THREADS, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def checked_engine(engine: str | None, what: str) -> str | None:
    """`engine` if this torch build supports it (None stays None); a ModelError naming `what` otherwise."""
    if not engine:
        return None
    import torch

    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ModelError(f"{what} was quantized for torch's '{engine}' engine, which this torch build lacks "
                         f"(it has {', '.join(e for e in supported if e != 'none')})")
    return engine


def _reevaluate(result: PullResult, runner, tags: dict[str, str], data_dir: Path,
                data_format: str = "auto") -> PullResult:
    from dataclasses import replace

    from ptqflow.pipelines.data.dataset import size_text
    from ptqflow.pipelines.data.datasets import load_dataset, resize_images
    from ptqflow.pipelines.variants.evaluation import EVAL_BATCH_SIZE, evaluate, predict_scores
    from ptqflow.pipelines.data.shapes import RecordedFeed
    from ptqflow.tracking.keys import VersionTag as V

    feed = RecordedFeed.read(tags)  # the data as the sweep fed it
    data_format = getattr(data_format, "value", data_format)
    if data_format == "auto":
        data_format = feed.data_format
    data = load_dataset(data_dir, data_format)
    limit = int(tags[V.TEST_IMAGES]) if V.TEST_IMAGES in tags else None
    if V.DATASET_DIGEST in tags and tags[V.DATASET_DIGEST] != data.digest:
        raise IntegrityError(f"{data_dir} is not the dataset {result.name} v{result.version} was measured on "
                             "(dataset SHA-256 differs); pass the same --data-dir as the sweep")
    test = data.test.head(limit)
    size = feed.size
    images = test.images
    if size is not None and size != data.image_size:
        if not feed.resized:  # a tag edited by hand, or another dataset
            raise IntegrityError(f"{result.name} v{result.version} takes {size_text(size)} images but {data_dir} "
                                 f"holds {size_text(data.image_size)} ones and the version was not measured resized")
        images = resize_images(images, size)
    transform = feed.transform()  # the recorded layout, else NHWC
    batch = int(tags.get(V.INPUT_BATCH, 0)) or EVAL_BATCH_SIZE  # a model exported with a fixed batch of 1
    scores = predict_scores(runner, images, transform, f"evaluating {result.name} v{result.version}", batch)
    accuracy = evaluate(scores, test.labels, data.class_names).accuracy
    recorded = tags.get(V.ACCURACY)
    result = replace(result, accuracy=accuracy, recorded_accuracy=recorded, test_images=len(test))
    if recorded is not None and not accuracy_matches(accuracy, recorded, len(test)):
        correct = round(accuracy * len(test))
        raise IntegrityError(f"{result.name} v{result.version}: accuracy {accuracy:.6f} ({correct} of {len(test)} "
                             f"images) differs from the registered {recorded} by more than its rounding "
                             f"(±{recorded_half_step(recorded):g})")
    return result


def recorded_half_step(recorded: str) -> float:
    """Half the last decimal of a number as the registry records it ("0.773" -> 0.0005): how far the true value
    may lie from the recorded one."""
    decimals = len(recorded.partition(".")[2])
    return 0.5 * 10 ** -decimals


def accuracy_matches(accuracy: float, recorded: str, test_images: int) -> bool:
    """Whether `accuracy`, re-computed on `test_images` images, is the one registered as the text `recorded`. The
    tag is rounded to the test set's resolution (ptqflow.pipelines.shared.precision.share_decimals), so what is
    compared is what rounding cannot hide: the number of correct images must lie within half the last recorded
    decimal of the recorded share."""
    correct = round(accuracy * test_images)
    return abs(correct / max(test_images, 1) - float(recorded)) <= recorded_half_step(recorded) + 1e-12
