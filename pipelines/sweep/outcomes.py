"""What a sweep ends with: each variant's outcome (its result and where it was recorded), the sweep's result, the
speed ratios against FP32, the comparison table's rows, and an outcome read back from a finished run."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ptqflow.common.errors import PtqflowError
from ptqflow.models.runtime.latency import BenchResult
from ptqflow.pipelines.reports import comparison as report
from ptqflow.pipelines.shared import precision
from ptqflow.pipelines.variants.evaluation import Evaluation, Fidelity
from ptqflow.pipelines.variants.runner import VariantResult
from ptqflow.pipelines.variants.specs import FP32, VariantSpec
from ptqflow.tracking import logged_models
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag


@dataclass
class VariantOutcome(VariantResult):
    """A variant's result (ptqflow.pipelines.variants.runner) and where the sweep recorded it."""

    run_id: str = ""
    input_key: str | None = None  # Sweep.input_key of its spec, set once the variant runs or is reused
    model_file_in_artifacts: str = ""  # the model file's path inside the logged MLflow model
    model_uri: str = ""  # registers the variant's model: models:/<logged model id> (runs:/<run>/model before)
    # why a failed variant failed: callers that must tell a backend's failure from ptqflow's (tune) read it
    error: BaseException | None = field(default=None, repr=False, compare=False)
    int8_mac_share: float | None = None  # the run's int8_mac_share param, once logged

    @classmethod
    def of(cls, result: VariantResult, **recorded) -> "VariantOutcome":
        return cls(**{f.name: getattr(result, f.name) for f in fields(VariantResult)}, **recorded)


@dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[VariantOutcome]
    rows: list[report.VariantRow]
    registered: list = field(default_factory=list)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    test_images: int = 0  # the number of test images every accuracy and agreement is a share of

    @property
    def failed(self) -> list[VariantOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class VariantsFailed(PtqflowError):
    """Some variants failed unexpectedly; the others were logged. Ends the parent run FAILED."""

    exit_code = 1

    def __init__(self, result: SweepResult):
        names = ", ".join(f"{o.name} ({o.reason})" for o in result.failed)
        super().__init__(f"{len(result.failed)} variant(s) failed: {names}; the other runs are logged "
                         f"under sweep run {result.parent_run_id}")
        self.result = result


def speedup_b1(bench: BenchResult | None, reference: BenchResult | None) -> float | None:
    """FP32's batch-1 p50 latency over this one: > 1 is faster. A bench timed in rounds beside FP32 carries its
    own (the median of the per-round ratios); otherwise the ratio to the sweep's FP32 run."""
    if bench is not None and bench.speedup_b1 is not None:
        return bench.speedup_b1
    if bench is None or reference is None or not bench.latency_ms_b1_p50:
        return None
    return reference.latency_ms_b1_p50 / bench.latency_ms_b1_p50


def speedup_b256(bench: BenchResult | None, reference: BenchResult | None) -> float | None:
    """This batch-256 throughput over FP32's: > 1 is faster; None for a model whose batch is fixed at 1. Like
    speedup_b1, the bench's own per-round ratio first."""
    if bench is not None and bench.speedup_b256 is not None:
        return bench.speedup_b256
    if bench is None or reference is None or not bench.throughput_ips_b256 or not reference.throughput_ips_b256:
        return None
    return bench.throughput_ips_b256 / reference.throughput_ips_b256


def outcome_of_run(spec: VariantSpec, run) -> VariantOutcome:
    """`spec`'s outcome as a finished variant run recorded it (what --resume reuses, what tune registers)."""
    from ptqflow.tracking.recovery import load_json_artifact

    M, T = Metric, Tag
    m, tags = run.data.metrics, run.data.tags
    bench = None
    if M.LATENCY_MS_B1_P50 in m:
        bench = BenchResult(m[M.LATENCY_MS_B1_P50], m[M.LATENCY_MS_B1_P90], m.get(M.THROUGHPUT_IPS_B256),
                            int(run.data.params.get(Param.BENCH_THREADS, 0)), m.get(M.SPREAD_B256),
                            rounds=int(run.data.params.get(Param.BENCH_ROUNDS, 1)),
                            speedup_b1=m.get(M.SPEEDUP_VS_FP32_B1), speedup_b256=m.get(M.SPEEDUP_VS_FP32_B256))
    per_class = load_json_artifact(run.info.run_id, Artifact.PER_CLASS_ACCURACY)
    return VariantOutcome(
        spec.name, spec.framework, spec, run_id=run.info.run_id, input_key=tags.get(T.INPUT_KEY),
        evaluation=Evaluation(m[M.ACCURACY], per_class, None, None),
        fidelity=Fidelity(m[M.TOP1_AGREEMENT], m.get(M.KL_DIVERGENCE, float("nan")), m.get(M.SQNR_DB, float("nan"))),
        model_file_in_artifacts=tags.get(T.MODEL_FILE_IN_MODEL, ""), model_sha256=tags.get(T.MODEL_FILE_SHA256, ""),
        quantized_engine=tags.get(T.QUANTIZED_ENGINE, ""), reason=f"{report.REUSED_REASON} {run.info.run_id[:8]}",
        model_uri=logged_models.logged_model_uri(run) or "",
        bench=bench, size_bytes=int(m[M.MODEL_SIZE_BYTES]),
        int8_mac_share=float(run.data.params[Param.INT8_MAC_SHARE]) if Param.INT8_MAC_SHARE in run.data.params else None)


def comparison_row(o: VariantOutcome, params: dict, reference: VariantResult, fp32_size_bytes: int,
                   test_images: int) -> report.VariantRow:
    """`o` as a row of the comparison table, each number rounded as its run's metric records it; `params` are the
    variant's run params (RunRecorder.variant_params)."""
    P = Param
    size = o.size_bytes or (fp32_size_bytes if o.name == FP32 else None)
    M, n = Metric, test_images

    def rounded(key, value):  # as the run's metric records it
        return precision.round_metric(key, value, n)

    return report.VariantRow(
        variant=o.name, framework=params[P.FRAMEWORK], backend=params[P.BACKEND],
        weight_dtype=params[P.WEIGHT_DTYPE], activation_dtype=params[P.ACTIVATION_DTYPE],
        quant_format=params[P.QUANT_FORMAT], per_channel=params[P.PER_CHANNEL],
        calibration_method=params[P.CALIBRATION_METHOD], status=o.status,
        accuracy=rounded(M.ACCURACY, o.evaluation.accuracy) if o.evaluation else None,
        accuracy_delta_pp=(rounded(M.ACCURACY_DELTA_PP,
                                   100 * (o.evaluation.accuracy - reference.evaluation.accuracy))
                           if o.evaluation else None),
        top1_agreement=rounded(M.TOP1_AGREEMENT, o.fidelity.top1_agreement) if o.fidelity else None,
        model_size_bytes=size,
        compression_ratio=rounded(M.COMPRESSION_RATIO, fp32_size_bytes / size) if size else None,
        reason=o.reason, run_id=o.run_id,
        latency_ms_b1_p50=rounded(M.LATENCY_MS_B1_P50, o.bench.latency_ms_b1_p50) if o.bench else None,
        speedup_b1_vs_fp32=rounded(M.SPEEDUP_VS_FP32_B1, speedup_b1(o.bench, reference.bench)),
        speedup_b256_vs_fp32=rounded(M.SPEEDUP_VS_FP32_B256, speedup_b256(o.bench, reference.bench)),
        contended=o.bench.contended if o.bench else None,
        int8_mac_share=(o.int8_mac_share if getattr(o, "int8_mac_share", None) is not None
                        else float(params[P.INT8_MAC_SHARE]) if P.INT8_MAC_SHARE in params else None))
