"""ptqflow from Python: quantize an FP32 ONNX classifier into its int8/uint8 variants and get the numbers back.

    from ptqflow import quantize

    results = quantize("data/models/resnet8.onnx", "data/cifar-10-batches-py", variants=["ort-int8-u8s8"],
                       track=False, test_limit=1000)
    for r in results:  # fp32 first, then each variant
        print(r.name, r.status, r.accuracy, r.agreement, r.size_bytes, r.latency_ms, r.model_file)

`track=True` (the default) is `ptqflow sweep`: the same function (ptqflow.pipelines.sweep.sweep.run_sweep) with the
same runs, params, metrics, artifacts, registered versions and promotion gate, in the active MLflow tracking store
(MLFLOW_TRACKING_URI). `track=False` runs the same quantization, evaluation and benchmarks
(ptqflow.pipelines.variants.runner) without MLflow: no run, no registry, no mlflow.db or mlruns directory; nothing is
written but the model files, the preprocessed FP32 model and AdaRound's working files (and the AdaRound cache in
~/.cache/ptqflow, as for the sweep).

Model files go to `output_dir/<variant>/model.pt` (TorchScript) or `model.onnx`, next to the variant's
`qconfig.json`. Without `output_dir` they go to a temporary directory that lives as long as the returned result
(or until `result.cleanup()`). Every number is rounded as the sweep logs it (pipelines/shared/precision.py), so with
`track=True` the values equal the runs' metrics.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ptqflow.common.errors import ConfigError
from ptqflow.pipelines.shared.precision import round_metric
from ptqflow.pipelines.sweep.inputs import prepare_inputs
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.outcomes import VariantsFailed
from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.pipelines.variants.phases import PhaseTimer
from ptqflow.pipelines.variants.runner import VariantResult, VariantRunner
from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS
from ptqflow.tracking.keys import Metric

# Options that only mean something for tracked runs: refused with track=False rather than silently ignored.
# The diagnosis only makes files to log on the runs.
TRACKING_ONLY = ("experiment", "registered_model", "registered_onnx_model", "register", "run_name", "gate", "resume",
                 "diagnose", "diagnose_images")
_SET_BY_ARGUMENTS = ("model_path", "data_dir", "variants")


@dataclass(frozen=True)
class VariantReport:
    """One variant's outcome (the FP32 reference is one too, named fp32)."""

    name: str
    status: str  # ok, unsupported (the backend refuses the configuration) or failed
    reason: str  # why it is unsupported or failed; "reused run ..." for a variant a resumed sweep reused
    model_file: Path | None  # its model file (fp32: the model you passed); None when it did not run here
    accuracy: float | None  # top-1 accuracy on the test images
    agreement: float | None  # share of test images whose top-1 class equals FP32's
    size_bytes: int | None  # size of the model file
    latency_ms: float | None  # batch-1 p50 latency in ms; None with bench=False
    run_id: str | None = None  # its MLflow run (track=True)


@dataclass
class QuantizeResult:
    """The reports by variant name, in order (fp32 first); iterating yields the reports."""

    variants: dict[str, VariantReport]
    output_dir: Path  # where the model files are
    parent_run_id: str | None = None  # the sweep's MLflow parent run (track=True)
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> VariantReport:
        return self.variants[name]

    def __iter__(self) -> Iterator[VariantReport]:
        return iter(self.variants.values())

    def __len__(self) -> int:
        return len(self.variants)

    def cleanup(self) -> None:
        """Remove the temporary output directory now (nothing happens for an `output_dir` you chose)."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def quantize(model: str | Path, data: str | Path, variants: str | list[str] | tuple[str, ...] | None = None,
             track: bool = True, output_dir: str | Path | None = None, **options) -> QuantizeResult:
    """Quantize the FP32 ONNX classifier `model` into `variants` (default: all; [] for FP32 only), calibrated and
    evaluated on the dataset `data` (any format `ptqflow sweep --data-dir` reads: CIFAR-10/100 pickles, an image
    folder, an .npz file; `data_format` says which when detection should not).

    `options` are those of ptqflow.pipelines.sweep.options.SweepOptions, e.g. calibration_size=1000, calibration_seed=0,
    test_limit=None (all test images), bench=True, weight_rounding=None ("adaround" or "nearest" for every
    variant), equalization="auto" (chosen per variant on held-out images; "on" or "off" for every variant),
    speed_check=True (FP32 where a layer's int8 kernel is slower here), adaround_iterations=1000, input_layout, preprocessing, ort_per_channel, ort_calibration_method,
    target_agreement=None and max_drop_pp=None (a variant that misses them is followed by its `<variant>-mixed`
    repair, ptqflow.pipelines.repair.fallback), ranking_images=1000, fallback_candidates=8; and with track=True also experiment,
    registered_model, registered_onnx_model, register, gate (a ptqflow.pipelines.registry.gate.GatePolicy), resume, run_name,
    diagnose=True and diagnose_images=256 (per-layer diagnosis logged on each variant run). Bad input raises
    ptqflow.common.errors.PtqflowError (ConfigError, DataError, ModelError ...); a variant that fails is reported with status
    "failed" and its reason."""
    sweep_options = _sweep_options(model, data, variants, track, options)
    scratch = tempfile.TemporaryDirectory(prefix="ptqflow-api-") if output_dir is None else None
    out = Path(scratch.name) if scratch else Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if track:
            try:
                swept = run_sweep(sweep_options, work_dir=out)
            except VariantsFailed as exc:  # the other variants are logged; the failures are in the reports
                swept = exc.result
            reports = [_report(o, swept.test_images, o.run_id) for o in swept.outcomes]
            parent_run_id = swept.parent_run_id
        else:
            results, test_images = _run_untracked(sweep_options, out)
            reports = [_report(r, test_images) for r in results]
            parent_run_id = None
    except BaseException:
        if scratch:
            scratch.cleanup()
        raise
    return QuantizeResult({r.name: r for r in reports}, out, parent_run_id, scratch)


def _sweep_options(model, data, variants, track: bool, options: dict) -> SweepOptions:
    allowed = {f.name for f in fields(SweepOptions)} - set(_SET_BY_ARGUMENTS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"quantize() has no option {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")
    tracking_only = sorted(set(options) & set(TRACKING_ONLY))
    if not track and tracking_only:
        raise ConfigError(f"{', '.join(tracking_only)} only apply to tracked runs: pass track=True or leave "
                          f"{'it' if len(tracking_only) == 1 else 'them'} out")
    if variants is None:
        variants = DEFAULT_VARIANTS
    elif isinstance(variants, str):
        variants = (variants,)
    return SweepOptions(model_path=Path(model), data_dir=Path(data), variants=tuple(variants), **options)


def _run_untracked(options: SweepOptions, work_dir: Path) -> tuple[list[VariantResult], int]:
    """What the sweep computes, without the sweep's MLflow runs: the reference, then every variant."""
    from ptqflow.pipelines.repair.fallback import repair_untracked

    specs = options.specs()  # an unknown variant is refused before anything is loaded
    timer = PhaseTimer()
    inputs = prepare_inputs(options)
    runner = VariantRunner(inputs, work_dir, replace(options.runner_options(), diagnose_images=0), timer)
    runner.convert(specs, reference_meanwhile=True)
    results = [runner.run_reference()]
    runner.adaround_ahead(specs)
    for spec in specs:
        results.append(runner.run_safely(spec))
        # a variant that misses target_agreement / max_drop_pp: its `-mixed` repair right after it
        mixed = repair_untracked(runner, results[-1], options.fallback_target(), options.fallback_candidates,
                                 options.ranking_images)
        if mixed is not None:
            results.append(runner.run_safely(mixed))
    return results, len(inputs.test)


def _report(result: VariantResult, test_images: int, run_id: str | None = None) -> VariantReport:
    """The result's numbers as the sweep logs them (ptqflow.pipelines.shared.precision)."""
    M = Metric
    return VariantReport(
        name=result.name, status=result.status, reason=result.reason,
        model_file=result.model_file if result.model_file and result.model_file.is_file() else None,
        accuracy=round_metric(M.ACCURACY, result.evaluation.accuracy, test_images) if result.evaluation else None,
        agreement=(round_metric(M.TOP1_AGREEMENT, result.fidelity.top1_agreement, test_images)
                   if result.fidelity else None),
        size_bytes=int(result.size_bytes) if result.size_bytes is not None else None,
        latency_ms=round_metric(M.LATENCY_MS_B1_P50, result.bench.latency_ms_b1_p50) if result.bench else None,
        run_id=run_id or None)
