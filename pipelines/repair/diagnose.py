"""`ptqflow diagnose`: the per-layer diagnosis (ptqflow.models.diagnosis) of a logged int8 variant, found by its run id, its
sweep's run id (every int8 variant of the sweep, plus a plot comparing them layer by layer) or a registered version
(NAME/VERSION, NAME@ALIAS).

Everything the variant was made from is read back from its runs and checked, as `pull` checks a model file: the FP32
model (the sweep's --model, or --model; its SHA-256 must be the run's), the dataset (its SHA-256), the calibration
indices (their SHA-256), the config (qconfig.json) and the logged model file (its SHA-256, before anything loads
it). The diagnosis runs on the first 256 test images. An onnxruntime QDQ variant is diagnosed on its logged file; a
QOperator one through its QDQ twin; an FX variant is quantized again from the same inputs (numeric-suite tools need
its FX graphs, which TorchScript does not keep) and the result is compared with the logged TorchScript on the same
images, so the diagnosis says whether it is the logged model's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ptqflow.models.diagnosis.records import DEBUG_IMAGES, Diagnosis
from ptqflow.common.errors import ConfigError, IntegrityError, ModelError, TrackingError, failure_reason
from ptqflow.pipelines.shared.names import names_a_version, parse_version_ref

FILES = ("layers.csv", "layers.json", "layer_sqnr.png")
COMPARISON_FILE = "backends.png"


@dataclass(frozen=True)
class DiagnoseOptions:
    ref: str  # variant run id, sweep run id, NAME/VERSION or NAME@ALIAS
    data_dir: Path | None = None  # default: the sweep's --data-dir
    data_format: str = "auto"  # auto: the sweep's recorded format, else detected
    model_path: Path | None = None  # default: the sweep's --model
    output_dir: Path = Path("diagnosis")
    images: int = DEBUG_IMAGES  # the first N test images
    log: bool = False  # also log the files on the runs, under diagnosis/
    adaround_iterations: int | None = None  # default: the sweep's (its param), else 1000


@dataclass
class VariantDiagnosis:
    run_id: str
    variant: str
    diagnosis: Diagnosis
    directory: Path  # where its FILES were written


@dataclass
class DiagnoseResult:
    variants: list[VariantDiagnosis] = field(default_factory=list)
    sweep_run_id: str | None = None
    comparison: Path | None = None  # the layer-by-layer plot of the sweep's variants, when a sweep was diagnosed


def variant_runs(ref: str) -> tuple[list, str | None]:
    """The variant runs `ref` names, and the sweep run id when `ref` is a sweep: a sweep gives its finished int8
    variants (not FP32, not unsupported or failed ones)."""
    from ptqflow.tracking import registry
    from ptqflow.tracking import runs
    from ptqflow.tracking.keys import Tag, VersionTag

    if names_a_version(ref):
        named = parse_version_ref(ref)
        version = registry.resolve(named.name, version=named.version, alias=named.alias)
        name = named.name
        run_id = version.run_id or version.tags.get(VersionTag.SOURCE_RUN_ID)  # the tag: older versions
        if not run_id:
            raise TrackingError(f"{name} version {version.version} names no source run; it was not registered by "
                                "ptqflow")
        return [runs.get_run(run_id)], None
    run = runs.get_run(ref)
    if run.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP:
        children = sorted(runs.child_runs(ref), key=lambda r: r.info.start_time)
        chosen = [r for r in children if _diagnosable(r) is None]
        if not chosen:
            raise ConfigError(f"sweep run {ref} has no finished int8 variant to diagnose")
        return chosen, ref
    reason = _diagnosable(run)
    if reason:
        raise ConfigError(f"run {ref} {reason}")
    return [run], None


def _diagnosable(run) -> str | None:
    """None when `run` is a finished quantized variant; else why it cannot be diagnosed."""
    from ptqflow.tracking.keys import Param, Tag

    if run.data.tags.get(Tag.ROLE) != Tag.ROLE_VARIANT:
        return "is not a ptqflow variant run; pass a variant run id, a sweep run id or NAME/VERSION"
    variant = run.data.params.get(Param.VARIANT, "")
    if variant == "fp32":
        return "is the FP32 reference; pass an int8 variant's run"
    status = run.data.tags.get(Tag.STATUS)
    if status != Tag.STATUS_OK:
        return f"({variant}) ended {status or 'without a status'}; only finished variants can be diagnosed"
    return None


@dataclass
class _SweepInputs:
    """What every variant of one sweep shares, loaded and verified once."""

    float_model: object  # ptqflow.models.backends.base.FloatModel, as the sweep's quantizers started from it
    transform: object
    calibration: np.ndarray
    calibration_digest: str
    images: np.ndarray
    adaround_iterations: int
    adaround_calibration: np.ndarray  # AdaRound's set: the calibration set, except in tune (the default size's)
    adaround_digest: str


def _sweep_inputs(run, parent, options: DiagnoseOptions, work_dir: Path) -> _SweepInputs:
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier
    from ptqflow.pipelines.data.calibration import indices_digest
    from ptqflow.pipelines.data.datasets import load_dataset
    from ptqflow.pipelines.data.shapes import RecordedFeed, resolve_model_input
    from ptqflow.pipelines.shared.choices import DataFormat, LayoutChoice
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Artifact, Param, Tag

    params, tags = run.data.params, run.data.tags
    model_path = options.model_path or (Path(parent.data.params[Param.MODEL_PATH])
                                        if Param.MODEL_PATH in parent.data.params else None)
    if model_path is None or not model_path.is_file():
        raise ModelError(f"the FP32 model of run {run.info.run_id} is not at {model_path or 'a recorded path'}; "
                         "pass it with --model")
    model = load_classifier(model_path)
    if model.sha256 != tags.get(Tag.MODEL_SHA256):
        raise IntegrityError(f"{model_path} has SHA-256 {model.sha256[:12]}…, but run {run.info.run_id} was "
                             f"quantized from {str(tags.get(Tag.MODEL_SHA256))[:12]}…; pass that model with --model")
    data_dir = options.data_dir or (Path(parent.data.params[Param.DATA_DIR])
                                    if Param.DATA_DIR in parent.data.params else None)
    if data_dir is None:
        raise ConfigError("the sweep recorded no data directory; pass --data-dir")
    # The data as the sweep fed it: same format, size (resized when the sweep resized) and mean/std.
    feed = RecordedFeed.read(params)
    data_format = options.data_format if options.data_format != DataFormat.auto.value else feed.data_format
    data = load_dataset(data_dir, data_format)
    shape = resolve_model_input(model.input, data, LayoutChoice(feed.layout or "auto"), feed.size, feed.resized)
    if tags.get(Tag.DATASET_DIGEST) and data.digest != tags[Tag.DATASET_DIGEST]:
        raise IntegrityError(f"{data_dir} is not the dataset run {run.info.run_id} was calibrated on (dataset "
                             "SHA-256 differs); pass the sweep's --data-dir")
    # A sweep's variants share the sweep's calibration set (on the parent); a tune trial's is its own (on its run).
    holder = run if Tag.TUNE_TRIAL in tags else parent
    try:
        path = records.download_artifact(holder.info.run_id, Artifact.CALIBRATION_INDICES, work_dir / "calibration")
    except TrackingError as exc:
        raise TrackingError(f"{exc} (a tune trial made before trials recorded their calibration set: run the "
                            "trial again)") from exc
    recorded = json.loads(path.read_text())
    indices = np.array(recorded["indices"], dtype=np.int64)
    digest = indices_digest(indices)
    if tags.get(Tag.CALIBRATION_DIGEST) and digest != tags[Tag.CALIBRATION_DIGEST]:
        raise IntegrityError(f"the calibration indices of run {holder.info.run_id} do not match run "
                             f"{run.info.run_id}'s calibration digest")
    adaround_indices = np.array(recorded.get("adaround_indices", indices), dtype=np.int64)
    transform = feed.transform(shape.layout)
    iterations = options.adaround_iterations or int(parent.data.params.get(Param.ADAROUND_ITERATIONS, 1000))
    float_model = FloatModel.for_runtimes(model, work_dir).for_quantization()
    return _SweepInputs(float_model, transform, transform(shape.fit_images(data.train.images[indices])), digest,
                        transform(shape.fit_images(data.test.images[:options.images])), iterations,
                        transform(shape.fit_images(data.train.images[adaround_indices])),
                        indices_digest(adaround_indices))


def config_of(run):
    """The backend config a variant run was quantized with, from its qconfig.json."""
    from ptqflow.models.backends.ort import OrtStaticConfig
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Artifact

    payload = json.loads(records.download_text(run.info.run_id, Artifact.QCONFIG)).get("config", {})
    kinds = {cls.__name__: cls for cls in (PytorchFxConfig, OrtStaticConfig)}
    kind = kinds.get(payload.get("type"))
    if kind is None:
        raise ConfigError(f"run {run.info.run_id} has no backend config ptqflow can rebuild (qconfig.json type "
                          f"{payload.get('type')!r})")
    return kind.from_dict(payload)


def _logged_model_file(run, work_dir: Path) -> Path:
    """The variant's logged model file, downloaded and verified against the run's SHA-256 tag before anything loads
    it (TorchScript loading runs code)."""
    from ptqflow.common.files import file_sha256
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Artifact, Tag

    expected = run.data.tags.get(Tag.MODEL_FILE_SHA256)
    name = "model.pt" if run.data.tags.get(Tag.QUANTIZED_ENGINE) else "model.onnx"
    path = records.download_artifact(run.info.run_id, f"{Artifact.MODEL_FILE_DIR}/{name}", work_dir / run.info.run_id)
    actual = file_sha256(path)
    if not expected or actual != expected:
        raise IntegrityError(f"run {run.info.run_id}: {name} has SHA-256 {actual[:12]}…, the run recorded "
                             f"{str(expected)[:12]}…; refusing to load it")
    return path


def _agreement_note(what: str, ours: np.ndarray, logged: np.ndarray) -> str:
    agree = float(np.mean(ours.argmax(axis=1) == logged.argmax(axis=1)))
    difference = float(np.max(np.abs(ours - logged))) if ours.size else 0.0
    verdict = "the logged model's" if agree == 1.0 else "NOT exactly the logged model's (AdaRound iterations or " \
                                                         "library versions differ from the sweep's?)"
    return (f"{what} vs the logged model on the same {len(ours)} images: top-1 agreement {100 * agree:.2f}%, "
            f"max |Δ score| {difference:.3g}; the diagnosis is {verdict}")


def diagnose_run(run, inputs: _SweepInputs, work_dir: Path) -> Diagnosis:
    """The diagnosis of one variant run (see the module docstring for how each kind is diagnosed)."""
    from ptqflow.models.diagnosis.fx import diagnose_fx
    from ptqflow.models.diagnosis.ort import diagnose_ort_config
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize_graphs
    from ptqflow.models.runtime.runners import OrtRunner, TorchRunner
    from ptqflow.pipelines.shared.progress import progress_task
    from ptqflow.tracking.keys import Param, Tag

    config = config_of(run)
    variant = run.data.params.get(Param.VARIANT, run.info.run_name)
    model_file = _logged_model_file(run, work_dir)
    batch = inputs.float_model.onnx.input.batch_size or 64
    if config.adaround_scheme is not None:
        with progress_task(f"AdaRound weights ({config.adaround_scheme}, cached by the sweep)", total=1) as advance:
            source = inputs.float_model.for_config(
                config, inputs.adaround_calibration, inputs.adaround_digest, advance,
                iterations=inputs.adaround_iterations,
                context={"layout": inputs.transform.layout, "preprocessing": inputs.transform.preprocessing.value})
    else:
        source = inputs.float_model
    with progress_task(f"diagnosing {variant}", total=1) as advance:
        if isinstance(config, PytorchFxConfig):
            import torch

            graphs = quantize_graphs(source, config, inputs.calibration)
            diagnosis = diagnose_fx(inputs.float_model, source, config, inputs.calibration, inputs.images,
                                    graphs=graphs, batch_size=batch)
            logged = TorchRunner.from_torchscript(model_file, run.data.tags.get(Tag.QUANTIZED_ENGINE) or None)
            ours = TorchRunner(graphs.converted, config.backend)
            with torch.no_grad():
                note = _agreement_note("re-quantized FX model", _predict(ours, inputs.images, batch),
                                       _predict(logged, inputs.images, batch))
        else:
            qdq = model_file if config.quant_format == "QDQ" else None
            diagnosis = diagnose_ort_config(inputs.float_model, source, config, inputs.calibration, inputs.images,
                                            work_dir / f"{run.info.run_id}-quantized", qdq_path=qdq, batch_size=batch)
            if qdq is not None:
                digest = run.data.tags[Tag.MODEL_FILE_SHA256]
                note = f"diagnosed the logged model file itself (SHA-256 {digest[:12]}…)"
            else:
                twin = next((work_dir / f"{run.info.run_id}-quantized" / "qdq-twin").glob("*.onnx"))
                note = _agreement_note("its QDQ twin", _predict(OrtRunner(twin), inputs.images, batch),
                                       _predict(OrtRunner(model_file), inputs.images, batch))
        advance()
    return diagnosis.with_notes(note)


def _predict(runner, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.predict(images[i:i + batch]) for i in range(0, len(images), batch)])


def render(diagnosis: Diagnosis, variant: str, run_id: str) -> dict[str, bytes]:
    """FILES for one variant: the table as CSV and JSON (worst first) and the SQNR plot."""
    from ptqflow.pipelines.reports.diagnosis import layer_sqnr

    return {**tables(diagnosis, variant, run_id), "layer_sqnr.png": layer_sqnr(diagnosis, plot_title(diagnosis,
                                                                                                   variant))}


def tables(diagnosis: Diagnosis, variant: str, run_id: str) -> dict[str, bytes]:
    """FILES but the plot: the table as CSV and JSON (worst first)."""
    payload = {"variant": variant, "run_id": run_id, **diagnosis.to_dict()}
    return {"layers.csv": diagnosis.to_csv().encode(), "layers.json": (json.dumps(payload, indent=2) + "\n").encode()}


def plot_title(diagnosis: Diagnosis, variant: str) -> str:
    return f"{variant}: per-layer SQNR, worst first ({diagnosis.images} images)"


def artifact_paths() -> dict[str, str]:
    """Where each of FILES goes among a run's artifacts."""
    from ptqflow.tracking.keys import Artifact

    return {"layers.csv": Artifact.DIAGNOSIS_CSV, "layers.json": Artifact.DIAGNOSIS_JSON,
            "layer_sqnr.png": Artifact.DIAGNOSIS_PLOT}


def log_variant_diagnosis(result, run_id: str, plot: Callable) -> None:
    """In a sweep, on the active variant run: the diagnosis the runner made (`result` is a
    ptqflow.pipelines.variants.runner.VariantResult) as FILES under diagnosis/, or, when it failed, a tag with the reason;
    `plot(function, *args)` draws and logs the SQNR plot (the sweep's plot worker, which tags a plot that fails).
    The variant stands either way."""
    from ptqflow.pipelines.reports.diagnosis import layer_sqnr
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Tag

    error = result.diagnosis_error
    if result.diagnosis is not None:
        try:
            files = tables(result.diagnosis, result.name, run_id)
        except Exception as exc:  # noqa: BLE001 - a diagnosis that cannot be written must not fail the variant
            error = failure_reason(exc)
        else:
            for name, data in files.items():
                records.log_bytes(data, artifact_paths()[name])
            plot(layer_sqnr, result.diagnosis, plot_title(result.diagnosis, result.name))
    if error:
        records.set_tags({Tag.DIAGNOSIS_ERROR: error[:5000]})


def log_backend_comparison(outcomes: list, test_images: int, plot: Callable) -> None:
    """In a sweep: the variants' diagnoses compared layer by layer (their `-mixed` repairs left out: the plot
    compares backends), when at least one variant has a diagnosis; `plot(function, *args)` draws and logs it (the
    sweep's plot worker, which tags a plot that fails)."""
    from ptqflow.pipelines.reports.diagnosis import backend_comparison

    diagnoses = {o.name: o.diagnosis for o in outcomes
                 if getattr(o, "diagnosis", None) is not None and (o.spec is None or o.spec.mixed is None)}
    if diagnoses:
        images = next(iter(diagnoses.values())).images
        plot(backend_comparison, diagnoses, f"Per-layer SQNR by variant ({images} of {test_images} test images)")


def diagnose(options: DiagnoseOptions) -> DiagnoseResult:
    """Diagnose every variant `options.ref` names; write FILES per variant under options.output_dir (and the
    comparison plot for a sweep); with options.log, log them on the runs."""
    from ptqflow.common.files import write_atomic
    from ptqflow.pipelines.shared.names import validate_output_dir
    from ptqflow.tracking import records
    from ptqflow.tracking import runs
    from ptqflow.tracking.keys import Artifact, Param, Tag

    if options.images < 1:
        raise ConfigError(f"--images must be at least 1, got {options.images}")
    output_dir = validate_output_dir(options.output_dir)
    chosen, sweep_run_id = variant_runs(options.ref)
    result = DiagnoseResult(sweep_run_id=sweep_run_id)
    artifacts = artifact_paths()
    inputs_by_parent: dict[str, _SweepInputs] = {}
    with tempfile.TemporaryDirectory(prefix="ptqflow-diagnose-") as scratch:
        work_dir = Path(scratch)
        for run in chosen:
            parent_id = run.data.tags.get(Tag.SWEEP_RUN_ID) or run.data.tags.get(Tag.MLFLOW_PARENT)
            if not parent_id:
                raise TrackingError(f"run {run.info.run_id} names no sweep run; it was not logged by a ptqflow sweep")
            # a sweep's variants share its inputs; each tune trial has a calibration set of its own
            key = run.info.run_id if Tag.TUNE_TRIAL in run.data.tags else parent_id
            if key not in inputs_by_parent:
                inputs_by_parent[key] = _sweep_inputs(run, runs.get_run(parent_id), options, work_dir / key)
            variant = run.data.params.get(Param.VARIANT, run.info.run_name)
            diagnosis = diagnose_run(run, inputs_by_parent[key], work_dir)
            directory = output_dir / f"{variant}-{run.info.run_id[:8]}"
            for name, data in render(diagnosis, variant, run.info.run_id).items():
                write_atomic(directory / name, data)
                if options.log:
                    records.log_bytes_to_run(run.info.run_id, data, artifacts[name])
            result.variants.append(VariantDiagnosis(run.info.run_id, variant, diagnosis, directory))
    if sweep_run_id and result.variants:
        from ptqflow.pipelines.reports.diagnosis import backend_comparison

        png = backend_comparison({v.variant: v.diagnosis for v in result.variants},
                                 f"Per-layer SQNR by variant (sweep {sweep_run_id[:8]})")
        result.comparison = output_dir / f"sweep-{sweep_run_id[:8]}-{COMPARISON_FILE}"
        write_atomic(result.comparison, png)
        if options.log:
            records.log_bytes_to_run(sweep_run_id, png, Artifact.DIAGNOSIS_BACKENDS_PLOT)
    return result
