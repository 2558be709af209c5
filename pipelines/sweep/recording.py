"""What a sweep writes on its runs besides the numbers' meaning: the tags and params every run carries, the datasets
as MLflow inputs, metrics at their recorded precision, timings with their speed ratios, and the variant's model as
an MLflow logged model."""

from __future__ import annotations

import hashlib
import importlib
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ptqflow.common.versions import package_versions

from ptqflow.models.backends.mac_share import MacTable
from ptqflow.models.runtime.allocator import reuse_freed_memory
from ptqflow.models.runtime.latency import BenchResult
from ptqflow.models.runtime.machine import cpu_description
from ptqflow.pipelines.repair.fallback import mixed_params
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.sweep.inputs import SweepInputs
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.outcomes import VariantOutcome, speedup_b1, speedup_b256
from ptqflow.pipelines.variants.runner import ModelToStore
from ptqflow.pipelines.variants.specs import FP32, ONNXRUNTIME, VariantSpec
from ptqflow.tracking import experiments
from ptqflow.tracking import logged_models
from ptqflow.tracking import records
from ptqflow.tracking import runs
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when ptqflow runs from one (git_commit)
TRACKED_PACKAGES = ("ptqflow", "torch", "onnx", "onnxruntime", "onnx2torch", "mlflow", "numpy")


def git_commit() -> str | None:
    """The commit ptqflow runs from, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ptqflow's packages as they are imported: the checkout's folders (editable install) or the installed wheel's.
SOURCE_PACKAGES = ("ptqflow", "ptqflow.common", "ptqflow.models", "ptqflow.tracking", "ptqflow.pipelines")


@lru_cache(maxsize=None)
def source_digest(packages: tuple[str, ...] = SOURCE_PACKAGES) -> str:
    """SHA-256 over the source of the ptqflow code this process runs: every .py file of its packages, by module
    name. It names the code whether it runs from a commit, a checkout with uncommitted edits or an installed wheel
    without git, where a commit alone would not; it ignores what cannot change a number (docs, tests)."""
    files: dict[str, Path] = {}
    for package in packages:
        for directory in importlib.import_module(package).__path__:
            root = Path(directory)  # the first package's own modules only: an editable install adds the checkout
            for path in (root.glob("*.py") if package == packages[0] else root.rglob("*.py")):
                module = ".".join((package, *path.relative_to(root).with_suffix("").parts))
                files.setdefault(module, path)
    sha = hashlib.sha256()
    for module in sorted(files):
        sha.update(f"{module}\0{hashlib.sha256(files[module].read_bytes()).hexdigest()}\n".encode())
    return sha.hexdigest()


def torch_threads() -> int:
    """Torch's intra-op thread count: a large layer's sums (AdaRound, FX calibration) run in its order."""
    import torch

    return torch.get_num_threads()


def run_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server when it is one (without credentials), else where
    `mlflow ui` serves a local store by default (ptqflow.tracking.experiments.ui_base_url)."""
    return f"{experiments.ui_base_url()}#/experiments/{experiment_id}/runs/{run_id}"


class RunRecorder:
    """Writes a sweep's shared run metadata on the active run (or on an ended one, for late timings)."""

    def __init__(self, options: SweepOptions, inputs: SweepInputs, work_dir: Path,
                 quantized_from: Callable[[], object] | None = None,
                 float_layers: Callable[[VariantSpec], tuple[str, ...]] = lambda spec: ()):
        self.options = options
        self.quantized_from = quantized_from  # the ONNX ModelProto every variant quantizes (for the MAC share)
        self.float_layers = float_layers  # the layers a spec's backend keeps in FP32 by measurement (MAC share)
        self._mac_table = None
        self.inputs = inputs
        self.work_dir = work_dir
        self.versions = package_versions(TRACKED_PACKAGES)  # of the code that makes the numbers, as tags
        self.commit = git_commit()  # a tag: which commit, when it runs from one; source_digest is the code's identity
        self.source_sha256 = source_digest()
        # before any model runs: torch's batches reuse freed memory (models.runtime.allocator), as they do served
        self.malloc = reuse_freed_memory()

    def common_tags(self, parent_run_id: str | None) -> dict[str, str]:
        """Tags of the parent run and every variant run: what was run, on what, by which code."""
        cpu_model, cpu_isa = cpu_description()
        inputs = self.inputs
        tags = {Tag.MODEL_SHA256: inputs.model.sha256, Tag.CPU_MODEL: cpu_model, Tag.CPU_INT8_ISA: cpu_isa,
                Tag.DATASET_DIGEST: inputs.data.digest, Tag.CALIBRATION_DIGEST: inputs.calibration_digest,
                Tag.SOURCE_SHA256: self.source_sha256, Tag.TORCH_THREADS: str(torch_threads()),
                Tag.MALLOC: self.malloc,
                **inputs.input_tags(), **runs.process_tags(),
                **{Tag.VERSION_PREFIX + k: v for k, v in self.versions.items()}}
        if self.commit:
            tags[Tag.GIT_COMMIT] = self.commit
        if parent_run_id:
            tags[Tag.SWEEP_RUN_ID] = parent_run_id
        return tags

    def variant_params(self, spec: VariantSpec | None) -> dict:
        """A variant run's params (the FP32 reference's with `spec` None)."""
        P, inputs = Param, self.inputs
        common = {P.CALIBRATION_SIZE: len(inputs.calibration_indices), P.CALIBRATION_SEED: self.options.calibration_seed,
                  P.VALIDATION_SIZE: len(inputs.validation_indices),
                  P.INPUT_LAYOUT: inputs.transform.layout, P.PREPROCESSING: inputs.transform.preprocessing.value,
                  **inputs.input_params()}
        if spec is None:
            return {P.VARIANT: FP32, P.FRAMEWORK: ONNXRUNTIME, P.BACKEND: "onnxruntime-cpu",
                    P.WEIGHT_DTYPE: "float32", P.ACTIVATION_DTYPE: "float32", P.QUANT_FORMAT: "none",
                    P.PER_CHANNEL: False, P.CALIBRATION_METHOD: "none", P.WEIGHT_ROUNDING: "none",
                    P.QCONFIG: "none (FP32 reference)", P.INT8_MAC_SHARE: 0.0, **common}
        return {P.VARIANT: spec.name, P.FRAMEWORK: spec.framework, P.BACKEND: spec.config.backend,
                P.WEIGHT_DTYPE: spec.weight_dtype, P.ACTIVATION_DTYPE: spec.activation_dtype,
                P.QUANT_FORMAT: spec.quant_format, P.PER_CHANNEL: spec.config.per_channel,
                P.CALIBRATION_METHOD: spec.calibration_method, P.WEIGHT_ROUNDING: spec.config.weight_rounding,
                P.QCONFIG: spec.config.qconfig_summary(), **mixed_params(spec), **common}

    def int8_mac_share(self, spec: VariantSpec, float_layers: tuple[str, ...] | None = None) -> float | None:
        """The share of the model's MACs `spec`'s recipe runs in 8-bit integers (ptqflow.models.backends.mac_share),
        on the model the variants quantize, with `float_layers` (what the quantizer kept in float) or, without them,
        what the layers' timings keep (`self.float_layers`); None without the model."""
        if self.quantized_from is None:
            return None
        model = self.quantized_from()
        if self._mac_table is None or self._mac_table[0] is not model:
            self._mac_table = (model, MacTable(model))
        return self._mac_table[1].share(spec.config, self.float_layers(spec) if float_layers is None else float_layers)

    def log_int8_mac_share(self, spec: VariantSpec, float_layers: tuple[str, ...]) -> float | None:
        """Log the `int8_mac_share` param of a variant run once its model is made: the layers a backend keeps in
        float are known then (fbgemm's saturating depthwise layers are found by quantizing)."""
        share = self.int8_mac_share(spec, float_layers)
        if share is not None:
            records.log_params({Param.INT8_MAC_SHARE: share})
        return share

    def log_datasets(self, train: bool = False) -> None:
        """The test set as an MLflow dataset input of the active run (and, with `train`, the training set the
        calibration images come from), named after the dataset, with its source and digest."""
        data, source = self.inputs.data, str(self.inputs.data.root.resolve())
        tags = {"format": data.format, "classes": str(data.num_classes)}
        records.log_dataset(self.inputs.test.images, self.inputs.test.labels, source, f"{data.name}-test",
                            data.digest, Artifact.DATASET_CONTEXT_TEST, tags)
        if train:
            records.log_dataset(data.train.images, data.train.labels, source, f"{data.name}-train", data.digest,
                                Artifact.DATASET_CONTEXT_TRAIN, tags)

    def log_metrics(self, metrics: dict) -> None:
        """Log on the active run, each metric rounded to its precision (ptqflow.pipelines.shared.precision)."""
        records.log_metrics(precision.rounded(metrics, len(self.inputs.test)))

    def log_bench(self, bench: BenchResult, reference: BenchResult | None,
                  ended_run: VariantOutcome | None = None) -> None:
        """Timings, speedups over FP32 (`reference`) named by batch size, and their spread; a spread above
        CONTENDED_SPREAD sets the contended metric to 1 and tags the run with why its timings are not facts. On the
        active run, or on `ended_run`'s run and logged model (timed after its run ended)."""
        metrics, params, tags, _ = timing_record(bench, reference)
        if ended_run is not None:
            records.log_to_ended_run(ended_run.run_id, ended_run.model_uri, metrics, params, tags)
            return
        records.log_metrics(metrics)
        records.log_params(params)
        if tags:
            records.set_tags(tags)

    def onnx_requirements(self) -> list[str]:
        return [f"onnx=={self.versions['onnx']}", f"onnxruntime=={self.versions['onnxruntime']}",
                f"numpy=={self.versions['numpy']}"]

    def log_model(self, model: ModelToStore):
        """The runner's store: the variant's model becomes an MLflow logged model linked to the active run (named
        after the variant; its params, and the metrics logged after, are attached to it), then is downloaded back:
        the file evaluated, hashed and registered is byte for byte the one the artifact store holds."""
        spec, params = model.spec, self.variant_params(model.spec)
        model_dir = self.work_dir / spec.name / "mlflow_model"
        if model.module is not None:
            return logged_models.log_torchscript_model(
                model.module, spec.name, model_dir, model.example_input, model.example_output,
                [f"torch=={self.versions['torch']}", f"numpy=={self.versions['numpy']}"], params)
        return logged_models.log_onnx_model(model.quantized.path, spec.name, model_dir, model.example_input,
                                            model.example_output, self.onnx_requirements(), params,
                                            session_threads=model.latency_threads)


def timing_record(bench: BenchResult, reference: BenchResult | None,
                  recorded_tags: dict[str, str] | None = None) -> tuple[dict, dict, dict, list[str]]:
    """What a timing writes on its run: (metrics rounded to their precision, None values left out; params; tags;
    tags of `recorded_tags` an earlier timing left that this one contradicts, to delete). `reference` is FP32's
    timing when `bench` does not carry its own speedups."""
    metrics = precision.rounded(_bench_metrics(bench, reference))
    params = {Param.BENCH_THREADS: bench.threads, Param.BENCH_ROUNDS: bench.rounds,
              **({Param.LATENCY_THREADS: bench.latency_threads} if bench.latency_threads else {})}
    tags = _contended_tags(bench)
    stale = [Tag.BENCH_CONTENDED] if not tags and Tag.BENCH_CONTENDED in (recorded_tags or {}) else []
    return metrics, params, tags, stale


def _bench_metrics(bench: BenchResult, reference: BenchResult | None) -> dict:
    M = Metric
    metrics = {M.LATENCY_MS_B1_P50: bench.latency_ms_b1_p50, M.LATENCY_MS_B1_P90: bench.latency_ms_b1_p90,
               M.THROUGHPUT_IPS_B256: bench.throughput_ips_b256, M.SPREAD_B1: bench.spread_b1,
               M.SPREAD_B256: bench.spread_b256, M.BENCH_CONTENDED: int(bench.contended),
               M.SPEEDUP_VS_FP32_B1: speedup_b1(bench, reference),
               M.SPEEDUP_VS_FP32_B256: speedup_b256(bench, reference)}
    if bench.reference is not None:  # timed in rounds beside FP32: the FP32 side and the ratios' range
        b1, b256 = bench.speedup_b1_range or (None, None), bench.speedup_b256_range or (None, None)
        metrics.update({M.FP32_LATENCY_MS_B1_P50: bench.reference.latency_ms_b1_p50,
                        M.FP32_THROUGHPUT_IPS_B256: bench.reference.throughput_ips_b256,
                        M.SPEEDUP_VS_FP32_B1_MIN: b1[0], M.SPEEDUP_VS_FP32_B1_MAX: b1[1],
                        M.SPEEDUP_VS_FP32_B256_MIN: b256[0], M.SPEEDUP_VS_FP32_B256_MAX: b256[1]})
    return metrics


def _contended_tags(bench: BenchResult) -> dict[str, str]:
    from ptqflow.models.runtime.latency import CONTENDED_SPREAD

    if not bench.contended:
        return {}
    spreads = ", ".join(f"{name} p90/p50 {value:.2f}" for name, value in
                        (("batch-1", bench.spread_b1), ("batch-256", bench.spread_b256)) if value is not None)
    return {Tag.BENCH_CONTENDED: f"{spreads}: above {CONTENDED_SPREAD:g}, the machine was busy while timing; "
                                 "latency and throughput are not measurements of the model"}
