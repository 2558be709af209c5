"""Quantize, evaluate and benchmark one variant at a time, without any experiment tracking.

Given a sweep's prepared inputs (the FP32 model, model-ready calibration images, the test split) the runner makes
each variant's model file (AdaRound weights first where the variant asks for them), evaluates it against the labels
and against the FP32 reference (accuracy, per-class accuracy, predictions, agreement, KL divergence, SQNR), times
it, and returns a plain `VariantResult`. It imports neither mlflow nor `tracking`: `ptqflow.pipelines.sweep.sweep` logs what it
returns as MLflow runs, `ptqflow.pipelines.api` returns it as it is (tests/test_layers.py checks the imports).

Where the model file is kept is the caller's choice: `run(spec, store=...)` hands the quantized file to `store`,
which returns the file to evaluate. The sweep's store logs it as an MLflow model and returns the copy downloaded
back, so the numbers are those of the stored bytes; without a store the quantizer's own file is used.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ptqflow.common.errors import failure_reason
from ptqflow.common.files import file_sha256, write_json_atomic
from ptqflow.models.backends.base import FloatModel, QuantizedModel, UnsupportedVariant
from ptqflow.models.runtime.latency import BenchConfig, BenchResult, RoundsResult
from ptqflow.models.graph.onnx_model import OnnxClassifier
from ptqflow.pipelines.data.dataset import Dataset, Split
from ptqflow.pipelines.variants.evaluation import EVAL_BATCH_SIZE, Evaluation, Fidelity, evaluate, fidelity, predict_scores
from ptqflow.pipelines.data.preprocessing import InputTransform
from ptqflow.pipelines.shared.progress import progress_task
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.ready_test import ReadyTestImages
from ptqflow.pipelines.variants.speed_kept import SpeedKept
from ptqflow.pipelines.variants.without_torch import conversion_error, spec_without_torch
from ptqflow.pipelines.variants.equalization_check import EQUALIZATION_DIR, EqualizationCheck, EqualizationChoice
from ptqflow.pipelines.variants.reference_pass import ReferencePass
from ptqflow.pipelines.variants.rounding_check import TWIN_DIR, RoundingCheck
from ptqflow.pipelines.variants.rounding_choice import RoundingChoice
from ptqflow.pipelines.variants.specs import FP32, ONNXRUNTIME, PYTORCH, VariantSpec, config_payload
from ptqflow.pipelines.variants.timing import ModelTimer
from ptqflow.pipelines.variants.weights import WeightSource

QCONFIG_FILE = "qconfig.json"  # the variant's full backend config, written beside its model file
MODEL_FILE_NAMES = {"torchscript": "model.pt", "onnx": "model.onnx"}  # the variant's model file, by format
BENCH_IMAGES = 256  # real test images, model-ready, reused by every benchmark
# The onnx2torch module (what the PyTorch variants start from) is checked against onnxruntime on the first N test
# images: a faulty conversion disagrees on far more than one in a thousand, and eager FP32 is the slowest model a
# sweep runs (16 s of resnet8_large_wide's 10,000 images). The variants themselves are measured on every image.
TORCH_CHECK_IMAGES = 1000


class PreparedInputs(Protocol):
    """What the runner reads of a sweep's inputs (ptqflow.pipelines.sweep.inputs.SweepInputs has it)."""

    data: Dataset  # any format ptqflow.pipelines.data.datasets loads
    model: OnnxClassifier
    transform: InputTransform
    calibration: np.ndarray  # model-ready float32
    validation: np.ndarray  # model-ready float32 training images outside the calibration set (may be empty)
    validation_indices: np.ndarray  # their indices in the training split
    test: Split

    @property
    def calibration_digest(self) -> str: ...


@dataclass(frozen=True)
class RunnerOptions:
    bench: bool = True  # measure batch-1 latency and batch-256 throughput of every model file
    # choose each variant's batch-1 threads right after quantization and store them with its model (ModelTimer);
    # a sweep that times its models at the end keeps this on while `bench` is off
    choose_threads: bool = True
    adaround_iterations: int = 1000  # AdaRound optimization steps per layer
    # equalization on or off per variant on the held-out images (EqualizationCheck) when its config does not ask
    # for it; off: each config's own setting
    choose_equalization: bool = False
    bench_config: BenchConfig = BenchConfig()
    # Per-layer diagnosis (ptqflow.models.diagnosis) of every variant on the first N test images right after it is made;
    # 0: none
    diagnose_images: int = 0


@dataclass(frozen=True)
class ModelToStore:
    """A quantized model file on its way to where it is kept, with what a model store records beside it."""

    spec: VariantSpec
    quantized: QuantizedModel
    engine: str  # torch quantized engine the file runs under ("" for ONNX)
    module: object | None  # the loaded TorchScript module (None for ONNX)
    example_input: np.ndarray  # one model-ready test image
    example_output: np.ndarray  # the model's scores for it
    latency_threads: int = 0  # the batch-1 threads chosen for it (0: none chosen), stored as a runtime setting


Store = Callable[[ModelToStore], Path]  # keeps the file; returns the kept copy, which is evaluated


@dataclass
class VariantResult:
    """One variant's numbers and file; the FP32 reference is one too (spec None)."""

    name: str
    framework: str
    spec: VariantSpec | None = None  # None for the FP32 reference
    status: str = "ok"  # ok, unsupported or failed
    reason: str = ""  # why it is unsupported or failed
    evaluation: Evaluation | None = None
    fidelity: Fidelity | None = None  # against the FP32 reference
    bench: BenchResult | None = None  # None when benchmarking is off
    model_file: Path | None = None  # the model file (for a variant: byte for byte the stored copy)
    model_sha256: str = ""
    size_bytes: int | None = None
    quantized_engine: str = ""  # torch quantized engine of a TorchScript file
    calibration_images: int = 0  # calibration images the backend's observers saw
    torch_agreement: float | None = None  # FP32 only: top-1 agreement of the onnx2torch module with onnxruntime
    torch_check_images: int = 0  # FP32 only: on the first this many test images
    diagnosis: object | None = None  # ptqflow.models.diagnosis.records.Diagnosis, with RunnerOptions.diagnose_images
    diagnosis_error: str = ""  # why the diagnosis failed (the variant itself is fine)
    ort_graph_sha256: str = ""  # onnxruntime: the graph its session runs, names aside (ptqflow.models.graph.onnx_model.graph_digest)
    scores_from: str = ""  # the variant evaluated before it with the same ort_graph_sha256, whose test scores these are
    kept_float: dict = field(default_factory=dict)  # layers the backend could not quantize, left in float: name -> why
    rounding_choice: RoundingChoice | None = None  # AdaRound against nearest on held-out images; spec is the kept one
    equalization_choice: EqualizationChoice | None = None  # equalization on against off on held-out images
    engine_departures: dict = field(default_factory=dict)  # FX: layers the int8 engine computed wrongly: name -> share
    latency_threads: int = 0  # the batch-1 threads chosen for its model file and stored with it (0: none chosen)
    bias_corrected_channels: int = 0  # depthwise channels whose bias AdaRound's bias correction moved
    fusion_fallback: str = ""  # FX: the backend's fusion patterns left out, and why


class VariantRunner:
    """Makes and measures variants of one FP32 model on one set of prepared inputs, in `work_dir`."""

    def __init__(self, inputs: PreparedInputs, work_dir: Path, options: RunnerOptions = RunnerOptions(),
                 timer: PhaseTimer | None = None):
        self.inputs = inputs
        self.work_dir = work_dir
        self.options = options
        self.timer = timer or PhaseTimer()
        self.float_model = FloatModel.for_runtimes(inputs.model, work_dir)  # the FP32 reference, as the user gave it
        # What the variants quantize starts as the float model; the convert phase replaces it with the same function
        # with BatchNormalization folded and every node named (AdaRound's grid must be the one the backends see, so
        # no backend folds after it).
        self.weights = WeightSource(self.float_model, inputs.calibration, inputs.calibration_digest,
                                    {"layout": inputs.transform.layout,
                                     "preprocessing": inputs.transform.preprocessing.value},
                                    options.adaround_iterations, self.timer)
        self.example_input = inputs.transform(inputs.test.images[:1])
        self.eval_batch = inputs.model.input.batch_size or EVAL_BATCH_SIZE  # a fixed batch dimension (1) is used everywhere
        self.bench_images = inputs.transform(inputs.test.images[:BENCH_IMAGES])
        self._timing: ModelTimer | None = None
        self._validation_reference: Evaluation | None = None  # FP32 on the held-out images (selection_reference)
        self.reference: Evaluation | None = None
        self.torch_error: str | None = None  # why onnx2torch cannot convert the model (convert() finds out)
        self.ort_diagnoses: dict = {}  # diagnose_ort_config's memo: a QDQ file diagnosed once per runner
        # onnxruntime graph digest -> (variant, its test scores): a file that onnxruntime optimizes into a graph
        # already evaluated (ort-int8's QDQ and ort-int8-u8s8's QOperator) gives the same scores, so it is not run again
        self._evaluated_graphs: dict[str, tuple[str, np.ndarray]] = {}
        self.test_images = ReadyTestImages(inputs.test.images, inputs.transform)
        self.reference_pass = ReferencePass()  # the FP32 reference's onnxruntime scores while convert() runs
        self.rounding_check = RoundingCheck(inputs, self.weights, self.float_model, self.eval_batch, self.timer)
        self.equalization_check = EqualizationCheck(inputs, self.weights, self.rounding_check, self.timer)
        # the layers each FX spec's speed check keeps in float, as the MAC share counts them
        self.speed_kept = SpeedKept(lambda: self.quantization_source, inputs.calibration)

    @property
    def timing(self) -> ModelTimer:
        """The model timer for the current options' bench config (a caller may replace the options)."""
        if self._timing is None or self._timing.config != self.options.bench_config:
            self._timing = ModelTimer(self.float_model.onnx.path, self.bench_images, self.options.bench_config,
                                      self.timer, throughput=not self.inputs.model.input.batch_size)
        return self._timing

    @property
    def quantization_source(self) -> FloatModel:
        """The FP32 model every variant quantizes (before its own equalization and AdaRound)."""
        return self.weights.source

    def round_on(self, images: np.ndarray, digest: str) -> None:
        """AdaRound reconstructs on these model-ready images instead of the calibration set (WeightSource.round_on)."""
        self.weights.round_on(images, digest)

    def share_reference(self, other: "VariantRunner") -> None:
        """Compare variants with `other`'s FP32 reference (same model and test set), without evaluating it again."""
        self.reference = other.reference

    def convert(self, specs: list[VariantSpec], reference_meanwhile: bool = False) -> None:
        """Each backend's starting point, made once for all variants (the convert phase). `reference_meanwhile`:
        the FP32 reference's onnxruntime pass over the test set runs on a second thread during the conversion, and
        run_reference() takes its scores: the conversion is one core of Python and torch, onnxruntime runs without
        the GIL (ResNet8: the two took 3.0-3.1 s together, 3.6-4.3 s one after the other)."""
        if reference_meanwhile:
            images, transform = self.test_images.batches_source()  # made here, not on both threads at once
            self.reference_pass.start(lambda cancelled: self._reference_onnxruntime_scores(images, transform,
                                                                                            cancelled))
        try:
            with self.timer.phase("convert"):
                self.torch_error = conversion_error(self.float_model)  # None: onnx2torch converts it
                if specs:
                    self.weights.source = self.float_model.for_quantization()
                    self.quantization_source.prepare(
                        torch=not self.torch_error and any(spec.framework == PYTORCH for spec in specs),
                        onnxruntime=any(spec.framework == ONNXRUNTIME for spec in specs))
        except BaseException:
            self.stop_reference()
            raise

    def stop_reference(self) -> None:
        """Stop the FP32 reference pass convert(reference_meanwhile=True) started, if run_reference() has not taken
        it: it ends before its next batch; returns once it has. For a caller that fails before run_reference()."""
        self.reference_pass.stop()

    def _reference_onnxruntime_scores(self, images, transform, cancelled: threading.Event | None = None):
        from ptqflow.models.runtime.runners import OrtRunner

        return predict_scores(OrtRunner(self.float_model.onnx.path), images, transform, "FP32 onnxruntime",
                              self.eval_batch, cancelled)

    # ---- FP32 reference ------------------------------------------------------------------------------------
    def run_reference(self) -> VariantResult:
        """FP32 through onnxruntime (the reference every variant is compared with) and through the onnx2torch
        module (its agreement checks the conversion the PyTorch backends start from)."""
        from ptqflow.models.runtime.runners import TorchRunner

        test, names = self.inputs.test, self.inputs.data.class_names
        with self.timer.phase("evaluate"):
            images, transform = self.test_images.batches_source()
            ort_scores = self.reference_pass.take()
            if ort_scores is None:
                ort_scores = self._reference_onnxruntime_scores(images, transform)
            checked = 0 if self.torch_error else min(len(test), TORCH_CHECK_IMAGES)
            torch_scores = predict_scores(TorchRunner(self.float_model.torch_module), images[:checked], transform,
                                          "FP32 onnx2torch", self.eval_batch) if checked else None
        self.reference = evaluate(ort_scores, test.labels, names)
        torch_agreement = fidelity(evaluate(ort_scores[:checked], test.labels[:checked], names),
                                   evaluate(torch_scores, test.labels[:checked], names)).top1_agreement \
            if checked else None
        bench = self.timing.bench_reference() if self.options.bench else None
        return VariantResult(FP32, ONNXRUNTIME, evaluation=self.reference,
                             fidelity=Fidelity(1.0, 0.0, float("inf")), bench=bench, model_file=self.inputs.model.path,
                             model_sha256=self.inputs.model.sha256, size_bytes=self.inputs.model.size_bytes,
                             torch_agreement=torch_agreement, torch_check_images=checked)

    # ---- one variant ---------------------------------------------------------------------------------------
    def run(self, spec: VariantSpec, store: Store | None = None) -> VariantResult:
        """Quantize, keep (`store`), evaluate and time one variant; run_reference() first. Raises
        UnsupportedVariant when the backend refuses the configuration, and whatever else goes wrong."""
        from ptqflow.models.runtime.runners import TorchRunner

        if self.reference is None:
            raise RuntimeError("run_reference() must run before any variant: variants are compared with it")
        variant_dir = self.work_dir / spec.name
        spec, source, quantized, choices = self._quantize_checked(spec, variant_dir)
        write_json_atomic(variant_dir / QCONFIG_FILE, config_payload(spec.config))
        # TorchScript int8 modules repack their weights for the engine that is current when they load, so fbgemm
        # and x86 variants are loaded, evaluated and timed under the engine they were built for.
        engine = spec.config.backend if quantized.format == "torchscript" else ""
        threads = self.timing.choose_threads(quantized.path, engine) if self.options.choose_threads else 0
        model_file = store(self._to_store(spec, quantized, engine, threads)) if store else quantized.path
        graph, scores_from = "", ""
        with self.timer.phase("evaluate"):
            if engine:
                runner = TorchRunner.from_torchscript(model_file, engine)
            else:
                runner, graph = ort_session(model_file, self.work_dir, spec.name)
            if graph in self._evaluated_graphs:
                scores_from, scores = self._evaluated_graphs[graph]
            else:
                images, transform = self.test_images.batches_source()
                scores = predict_scores(runner, images, transform, f"evaluating {spec.name}", self.eval_batch)
                if graph:
                    self._evaluated_graphs[graph] = (spec.name, scores)
        evaluation = evaluate(scores, self.inputs.test.labels, self.inputs.data.class_names)
        public = variant_dir / MODEL_FILE_NAMES[quantized.format]
        if model_file != public:
            shutil.copyfile(model_file, public)  # same bytes as the stored file
        diagnosis, diagnosis_error = None, ""
        if self.options.diagnose_images:
            try:
                diagnosis = self.diagnose(spec, quantized, model_file, source)
            except Exception as exc:  # noqa: BLE001 - a diagnosis that fails says why; the variant stands
                diagnosis_error = failure_reason(exc)
        bench = self.timing.bench(model_file, engine, spec.name, threads) if self.options.bench else None
        for checked in (TWIN_DIR, EQUALIZATION_DIR):  # the candidates, kept or not, are copied by now
            shutil.rmtree(variant_dir / checked, ignore_errors=True)
        return VariantResult(spec.name, spec.framework, spec, evaluation=evaluation,
                             fidelity=fidelity(self.reference, evaluation), bench=bench, model_file=public,
                             model_sha256=file_sha256(public), size_bytes=public.stat().st_size,
                             quantized_engine=engine, calibration_images=quantized.calibration_images,
                             diagnosis=diagnosis, diagnosis_error=diagnosis_error, ort_graph_sha256=graph,
                             scores_from=scores_from, kept_float=quantized.kept_float,
                             rounding_choice=choices[0], equalization_choice=choices[1],
                             engine_departures=quantized.engine_departures,
                             latency_threads=threads, bias_corrected_channels=source.bias_corrected_channels,
                             fusion_fallback=quantized.fusion_fallback)

    def _quantize_checked(self, spec: VariantSpec, variant_dir: Path):
        """(spec, source, quantized, (rounding choice, equalization choice)) of the recipe kept: equalization on or
        off chosen first (RunnerOptions.choose_equalization), then AdaRound or nearest, both on held-out images."""
        candidate, equalization_choice, forced = None, None, None
        if self.torch_error:
            spec, forced = spec_without_torch(spec, self.torch_error)
        if self.options.choose_equalization:
            spec, equalization_choice, candidate = self.equalization_check.check(spec, variant_dir)
        if candidate is not None and candidate.spec == spec:  # nearest rounding asked: the kept candidate is it
            return spec, candidate.source, candidate.quantized, (None, equalization_choice)
        source = self.weights.for_spec(spec)
        with self.timer.phase("quantize"), \
                progress_task(f"calibrating {spec.name}", total=len(self.inputs.calibration)) as advance:
            quantized = spec.quantize(source, self.inputs.calibration, variant_dir, advance)
        spec, source, quantized, rounding_choice = self.rounding_check.check(spec, source, quantized, variant_dir,
                                                                             twin=candidate)
        return spec, source, quantized, (rounding_choice or forced, equalization_choice)

    def diagnose(self, spec: VariantSpec, quantized: QuantizedModel | None = None, model_file: Path | None = None,
                 source: FloatModel | None = None, images: int | None = None):
        """The per-layer diagnosis (ptqflow.models.diagnosis) of `spec` on the first `images` test images (default
        RunnerOptions.diagnose_images, else ptqflow.models.diagnosis.records.DEBUG_IMAGES), against the FP32 model before AdaRound.
        FX reuses the graphs `quantized` was traced from; ONNX Runtime QDQ diagnoses `model_file` (the stored
        file); QOperator goes through its QDQ twin. Without `quantized`, the variant is quantized again."""
        from ptqflow.models.diagnosis.fx import diagnose_fx
        from ptqflow.models.diagnosis.ort import diagnose_ort_config
        from ptqflow.models.diagnosis.records import DEBUG_IMAGES
        from ptqflow.models.backends.pytorch_fx import PytorchFxConfig

        count = images or self.options.diagnose_images or DEBUG_IMAGES
        ready, transform = self.test_images.batches_source()
        test = transform(ready[:count])
        source = source or self.weights.for_spec(spec)
        batch = self.inputs.model.input.batch_size or 64
        with self.timer.phase("diagnose"), progress_task(f"diagnosing {spec.name}", total=1) as advance:
            if isinstance(spec.config, PytorchFxConfig):
                graphs = quantized.graphs if quantized is not None else None
                diagnosis = diagnose_fx(self.quantization_source, source, spec.config, self.inputs.calibration, test,
                                        graphs=graphs, batch_size=batch)
            else:
                qdq = (model_file or quantized.path) if quantized is not None and spec.quant_format == "QDQ" else None
                with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=f".{spec.name}-diagnosis-") as scratch:
                    diagnosis = diagnose_ort_config(self.quantization_source, source, spec.config,
                                                    self.inputs.calibration, test, Path(scratch), qdq_path=qdq,
                                                    batch_size=batch, memo=self.ort_diagnoses)
            advance()
        return diagnosis

    def measure(self, spec: VariantSpec, limit: int | None = None,
                on: str = "test") -> tuple[Evaluation, Fidelity]:
        """Quantize `spec` and evaluate it on the first `limit` images (all with None) of the test set, or with
        `on="validation"` of the held-out training images, against their labels and the FP32 reference on the same
        images: how the fallback search (ptqflow.pipelines.repair.fallback) compares configs. The model file is thrown
        away; nothing is stored, timed or shown as progress."""
        from ptqflow.models.runtime.runners import OrtRunner, TorchRunner

        reference = self.selection_reference(on)
        labels = self.inputs.test.labels if on == "test" else self._validation_labels()
        count = len(labels) if limit is None else min(limit, len(labels))
        images, transform = (self.test_images.batches_source() if on == "test"
                             else (self.inputs.validation, lambda batch: batch))
        source = self.weights.for_spec(spec, progress=False)  # computed (and cached) for the variant itself
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix=f".{spec.name}-measure-") as scratch:
            with self.timer.phase("quantize"):
                quantized = spec.quantize(source, self.inputs.calibration, Path(scratch))
            engine = spec.config.backend if quantized.format == "torchscript" else ""
            runner = TorchRunner.from_torchscript(quantized.path, engine) if engine else OrtRunner(quantized.path)
            outputs = []
            with self.timer.phase("evaluate"):
                for start in range(0, count, self.eval_batch):
                    batch = transform(images[start:min(start + self.eval_batch, count)])
                    outputs.append(np.asarray(runner.predict(batch), dtype=np.float32).reshape(len(batch), -1))
            scores = np.concatenate(outputs)
        names = self.inputs.data.class_names
        evaluation = evaluate(scores, labels[:count], names)
        if count < len(labels):
            reference = evaluate(reference.scores[:count], labels[:count], names)
        return evaluation, fidelity(reference, evaluation)

    def selection_reference(self, on: str = "test") -> Evaluation:
        """The FP32 reference on the test set, or (`on="validation"`) on the held-out training images, scored once."""
        if self.reference is None:
            raise RuntimeError("run_reference() must run before any variant: variants are compared with it")
        if on == "test":
            return self.reference
        if self._validation_reference is None:
            self._validation_reference = evaluate(self.rounding_check.fp32_scores(), self._validation_labels(),
                                                  self.inputs.data.class_names)
        return self._validation_reference

    def _validation_labels(self) -> np.ndarray:
        return self.inputs.data.train.labels[self.inputs.validation_indices]

    def run_safely(self, spec: VariantSpec, store: Store | None = None) -> VariantResult:
        """run(), with a refused configuration as status `unsupported` and any other error as `failed` (the reason
        says which); Ctrl-C still stops."""
        try:
            return self.run(spec, store)
        except UnsupportedVariant as exc:
            return VariantResult(spec.name, spec.framework, spec, status="unsupported", reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is its result; the others still run
            return VariantResult(spec.name, spec.framework, spec, status="failed", reason=failure_reason(exc))

    def adaround_ahead(self, specs: list[VariantSpec]) -> None:
        """The AdaRound grids `specs` will ask for, computed ahead and together (WeightSource.adaround_ahead); none
        without onnx2torch's module."""
        if not self.torch_error:
            self.weights.adaround_ahead(specs)

    def _to_store(self, spec: VariantSpec, quantized: QuantizedModel, engine: str, threads: int) -> ModelToStore:
        from ptqflow.models.runtime.runners import OrtRunner, set_quantized_engine

        if not engine:
            example_out = OrtRunner(quantized.path).predict(self.example_input)
            return ModelToStore(spec, quantized, engine, None, self.example_input, example_out, threads)
        import torch

        set_quantized_engine(engine)
        module = torch.jit.load(str(quantized.path))
        with torch.no_grad():  # a float head keeps parameters that require grad
            example_out = module(torch.from_numpy(self.example_input)).numpy()
        return ModelToStore(spec, quantized, engine, module, self.example_input, example_out, threads)

    def bench_together(self, models: list[tuple[str, Path, str, int]]) -> RoundsResult:
        """Time the FP32 reference and every (name, model file, torch engine or "", batch-1 threads or 0) in shared
        rounds (ModelTimer.bench_together)."""
        return self.timing.bench_together(models)


def ort_session(model_file: Path, work_dir: Path, name: str):
    """An onnxruntime session of `model_file` (ptqflow.models.runtime.runners.OrtRunner) and the digest of the graph
    it runs after onnxruntime's optimizations (ptqflow.models.graph.onnx_model.graph_digest), written to a scratch
    directory in `work_dir`; "" when that graph cannot be read."""
    import onnx

    from ptqflow.models.graph.onnx_model import graph_digest
    from ptqflow.models.runtime.runners import OrtRunner

    with tempfile.TemporaryDirectory(dir=work_dir, prefix=f".{name}-optimized-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        runner = OrtRunner(model_file, optimized_copy=optimized)
        try:
            return runner, graph_digest(onnx.load(str(optimized)))
        except Exception:  # noqa: BLE001 - without a digest the variant is simply evaluated itself
            return runner, ""
