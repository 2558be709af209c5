"""Every number true (issue 10): the champion compares like with like, each run records what really ran, and caches
and resume keys cover everything that shapes a result. Each test reads the record back from a real MLflow store."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import onnx
import pytest
from conftest import CALIBRATION_SIZE, runs_by_name, version_reason
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ptqflow.common.errors import ConfigError, TrackingError
from ptqflow.pipelines.shared.names import registered_name_for
from ptqflow.pipelines.registry.gate import Candidate, GatePolicy, decide
from ptqflow.pipelines.sweep.options import SweepOptions
from ptqflow.pipelines.sweep.sweep import run_sweep
from ptqflow.tracking.keys import Metric, Param, Tag, VersionTag

PASS_ALL = GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0, allow_slower=True)  # a tiny model runs int8 no faster
MEASURED = {VersionTag.FP32_MODEL_SHA256: "a" * 64, VersionTag.DATASET_DIGEST: "d" * 64,
            VersionTag.TEST_IMAGES: "10000", VersionTag.INPUT_LAYOUT: "NHWC", VersionTag.PREPROCESSING: "raw"}


def _tags(agreement: str, **overrides) -> dict[str, str]:
    return {**MEASURED, VersionTag.TOP1_AGREEMENT: agreement, VersionTag.ACCURACY_DELTA_PP: "0.0000", **overrides}


def _sweep(model, data, **options):
    return run_sweep(SweepOptions(model_path=model, data_dir=data, calibration_size=CALIBRATION_SIZE, bench=False,
                                  weight_rounding="nearest", **options))


# ---- 1. the gate compares like with like --------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,words", [
    (VersionTag.TEST_IMAGES, "100", "number of test images 100 vs 10000"),
    (VersionTag.FP32_MODEL_SHA256, "b" * 64, "FP32 model"),
    (VersionTag.DATASET_DIGEST, "e" * 64, "test set"),
    (VersionTag.INPUT_LAYOUT, "NCHW", "input layout NCHW vs NHWC"),
    (VersionTag.PREPROCESSING, "unit", "preprocessing unit vs raw"),
])
def test_a_version_measured_on_another_job_is_not_comparable(key, value, words):
    candidate = Candidate.from_tags("2", _tags("1.000000", **{key: value}))
    champion = Candidate.from_tags("1", _tags("0.980000"))
    decision = decide(candidate, champion, GatePolicy())
    assert not decision.promote
    assert decision.reason.startswith("not comparable with champion v1") and words in decision.reason


def test_a_champion_without_records_is_not_comparable():
    decision = decide(Candidate.from_tags("2", _tags("0.990000")), Candidate("1", 0.0, 0.98), GatePolicy())
    assert not decision.promote and "not recorded" in decision.reason


def test_ties_are_decided_on_the_recorded_values():
    # 0.98000004 and 0.98 are both recorded as 0.980000: a tie, so only a clear latency gain promotes (both timed
    # alike, so their latencies compare).
    timed = {VersionTag.LATENCY_CONTENDED: "no", VersionTag.CPU_MODEL: "Intel Xeon",
             VersionTag.CPU_INT8_ISA: "avx2,avx512_vnni", VersionTag.BENCH_THREADS: "2"}
    candidate = Candidate.from_tags("2", _tags(f"{0.98000004:.6f}", **{VersionTag.LATENCY_MS_B1: "0.1900"}, **timed))
    champion = Candidate.from_tags("1", _tags(f"{0.98:.6f}", **{VersionTag.LATENCY_MS_B1: "0.2000"}, **timed))
    decision = decide(candidate, champion, GatePolicy())
    assert not decision.promote and "does not beat" in decision.reason


def test_a_smaller_test_set_never_takes_the_champion(tracking_store, tiny_model, cifar_dir):
    _sweep(tiny_model, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)
    client = MlflowClient()
    v1 = client.get_model_version("resnet8-int8-onnx", "1")
    assert v1.tags[VersionTag.TEST_IMAGES] == "100" and v1.tags[VersionTag.FP32_MODEL_SHA256]
    _sweep(tiny_model, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL, test_limit=30)
    assert str(client.get_model_version_by_alias("resnet8-int8-onnx", "champion").version) == "1"
    v2 = client.get_model_version("resnet8-int8-onnx", "2").tags
    assert v2[VersionTag.PROMOTION_DECISION] == "rejected"
    assert "not comparable" in version_reason("resnet8-int8-onnx", "2")
    assert "number of test images 30 vs 100" in version_reason("resnet8-int8-onnx", "2")


@pytest.mark.parametrize("path,suffix,expected", [
    ("models/resnet8.onnx", "-int8", "resnet8-int8"),
    ("/x/resnet8_large_wide.onnx", "-int8-onnx", "resnet8_large_wide-int8-onnx"),
    ("/x/my model (v2)..onnx", "-int8", "my-model-v2-int8"),
    ("/x/@@@.onnx", "-int8", "model-int8"),
])
def test_default_registered_names_follow_the_model_file(path, suffix, expected):
    assert registered_name_for(path, suffix) == expected


def _other_model(tiny_model, directory, name: str):
    """The fixture model with one weight changed: another FP32 model (another SHA-256)."""
    model = onnx.load(str(tiny_model))
    init = next(i for i in model.graph.initializer if i.name == "b1")
    values = onnx.numpy_helper.to_array(init).copy()
    values[0] += 0.01
    init.CopyFrom(onnx.numpy_helper.from_array(values, "b1"))
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / name))
    return directory / name


def test_another_model_never_lands_in_a_default_named_registry_entry(tracking_store, tiny_model, cifar_dir):
    _sweep(tiny_model, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)
    client = MlflowClient()
    # Another file name: its own registered model.
    wide = _other_model(tiny_model, tracking_store / "m", "wide.onnx")
    _sweep(wide, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)
    assert [str(v.version) for v in client.search_model_versions("name = 'wide-int8-onnx'")] == ["1"]
    assert len(client.search_model_versions("name = 'resnet8-int8-onnx'")) == 1
    # Another model under the same file name: refused before any run starts.
    impostor = _other_model(tiny_model, tracking_store / "other", "resnet8.onnx")
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError, match="holds versions of another FP32 model.*--registered-onnx-model"):
        _sweep(impostor, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
    # Named explicitly, it goes where the user says, and the gate still compares only like with like.
    _sweep(impostor, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL, registered_onnx_model="resnet8-int8-onnx")
    v2 = client.get_model_version("resnet8-int8-onnx", "2").tags
    assert v2[VersionTag.PROMOTION_DECISION] == "rejected" and "FP32 model" in version_reason("resnet8-int8-onnx", "2")


def test_an_error_reading_the_champion_fails_the_gate_loudly(tracking_store, tiny_model, cifar_dir, monkeypatch):
    _sweep(tiny_model, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)

    def unavailable(self, name, alias):
        raise MlflowException("service unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
    with pytest.raises(TrackingError, match="cannot read @champion of resnet8-int8-onnx"):
        _sweep(tiny_model, cifar_dir, variants=("ort-int8-u8s8",), gate=PASS_ALL)
    monkeypatch.undo()
    # No half-decided version: nothing was registered by the failed sweep.
    assert len(MlflowClient().search_model_versions("name = 'resnet8-int8-onnx'")) == 1


# ---- 2. each FX variant measured on its own engine --------------------------------------------------------------
def test_each_fx_variant_runs_and_registers_under_its_own_engine(tracking_store, tiny_model, cifar_dir):
    _sweep(tiny_model, cifar_dir, variants=("pytorch-fx-int8", "pytorch-fx-int8-x86"), gate=PASS_ALL)
    runs = runs_by_name()
    assert runs["pytorch-fx-int8"].data.tags[Tag.QUANTIZED_ENGINE] == "fbgemm"
    assert runs["pytorch-fx-int8-x86"].data.tags[Tag.QUANTIZED_ENGINE] == "x86"
    version = MlflowClient().get_model_version("resnet8-int8", "1")
    expected = "fbgemm" if version.tags[VersionTag.VARIANT] == "pytorch-fx-int8" else "x86"
    assert version.tags[VersionTag.QUANTIZED_ENGINE] == expected


# ---- 3. caches and resume keys ----------------------------------------------------------------------------------
def test_resume_does_not_reuse_runs_made_by_other_ptqflow_code(tracking_store, tiny_model, cifar_dir, monkeypatch):
    first = _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False)
    same = _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False, resume=True)
    assert same.outcomes[1].run_id == first.outcomes[1].run_id
    # an uncommitted edit of ptqflow's source: the commit is the same, the code is not
    monkeypatch.setattr("ptqflow.pipelines.sweep.recording.source_digest", lambda: "0" * 64)
    after_fix = _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False, resume=True)
    assert after_fix.outcomes[1].run_id != first.outcomes[1].run_id
    assert runs_by_name()  # the store is readable
    run = MlflowClient().get_run(after_fix.outcomes[1].run_id)
    assert run.data.tags[Tag.INPUT_KEY] != first.outcomes[1].input_key
    assert run.data.tags[Tag.SOURCE_SHA256] == "0" * 64


def test_the_source_digest_changes_with_any_edit_of_the_package(tmp_path, monkeypatch):
    """A dirty tree or a wheel without git: the digest of the source files is the code's identity."""
    from ptqflow.pipelines.sweep.recording import SOURCE_PACKAGES, source_digest

    package = tmp_path / "h6pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "maths.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_digest(("h6pkg", "h6pkg.sub"))
    source_digest.cache_clear()
    assert source_digest(("h6pkg", "h6pkg.sub")) == before
    (package / "sub" / "maths.py").write_text("SCALE = 2\n")
    source_digest.cache_clear()
    assert source_digest(("h6pkg", "h6pkg.sub")) != before
    assert len(source_digest(SOURCE_PACKAGES)) == 64  # ptqflow's own, as installed here


@pytest.mark.parametrize("change", ["cpu", "isa", "torch_threads", "malloc"])
def test_resume_does_not_reuse_runs_made_on_another_cpu_or_thread_count(tracking_store, tiny_model, cifar_dir,
                                                                       monkeypatch, change):
    import torch

    from ptqflow.models.runtime.allocator import reuse_freed_memory

    first = _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False)
    tags = MlflowClient().get_run(first.outcomes[1].run_id).data.tags
    assert tags[Tag.MALLOC] == reuse_freed_memory()  # the setting the variants ran and were timed under
    model, isa = tags[Tag.CPU_MODEL], tags[Tag.CPU_INT8_ISA]
    other = {"cpu": (model + " (another)", isa), "isa": (model, "avx2" if isa != "avx2" else "none"),
             "torch_threads": (model, isa), "malloc": (model, isa)}[change]
    for module in ("ptqflow.models.runtime.machine", "ptqflow.pipelines.sweep.recording"):
        monkeypatch.setattr(f"{module}.cpu_description", lambda: other)
    if change == "malloc":  # timings taken under another allocator setting are not this one's
        monkeypatch.setattr("ptqflow.pipelines.sweep.recording.reuse_freed_memory", lambda: "another malloc")
    threads = torch.get_num_threads()
    if change == "torch_threads":
        torch.set_num_threads(threads + 1)
    try:
        again = _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert again.outcomes[1].run_id != first.outcomes[1].run_id and not again.outcomes[1].reason
    tags = MlflowClient().get_run(again.outcomes[1].run_id).data.tags
    assert (tags[Tag.CPU_MODEL], tags[Tag.CPU_INT8_ISA]) == other
    assert tags[Tag.TORCH_THREADS] == str(threads + 1 if change == "torch_threads" else threads)
    assert tags[Tag.MALLOC] == ("another malloc" if change == "malloc" else reuse_freed_memory())


def test_the_gate_does_not_call_a_run_on_another_cpu_the_same_inputs(tracking_store, tiny_model, cifar_dir,
                                                                     monkeypatch):
    """TorchScript files differ byte for byte between runs: only the input key tells a re-run."""
    _sweep(tiny_model, cifar_dir, variants=("pytorch-fx-int8",), gate=PASS_ALL)
    assert version_reason("resnet8-int8", "1").startswith("passes the gate")
    other = ("Another CPU", "avx2")
    for module in ("ptqflow.models.runtime.machine", "ptqflow.pipelines.sweep.recording"):
        monkeypatch.setattr(f"{module}.cpu_description", lambda: other)
    _sweep(tiny_model, cifar_dir, variants=("pytorch-fx-int8",), gate=PASS_ALL)
    reason = version_reason("resnet8-int8", "2")
    assert reason and not reason.startswith("same inputs"), reason


def test_adaround_cache_misses_when_the_calibration_images_change(tmp_path, tiny_model, monkeypatch):
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    rng = np.random.default_rng(0)
    images_a = rng.uniform(0, 255, (40, 32, 32, 3)).astype(np.float32)
    images_b = np.ascontiguousarray(255 - images_a)  # the same indices, other pixels: another copy of the data

    def rounded(cache: str, images, context=None):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / cache))
        model = FloatModel(load_classifier(tiny_model), tmp_path / "work")
        return model.with_adarounded_weights("per_channel_sym_int8", images, "same-indices", iterations=20,
                                             context=context).onnx.path.read_bytes()

    warm_a = rounded("warm", images_a)
    warm_b = rounded("warm", images_b)  # same indices digest, warm cache
    empty_b = rounded("empty", images_b)
    assert warm_b == empty_b  # computed for images_b, not images_a's cached result (which may round the same)
    assert len(list((tmp_path / "warm" / "ptqflow" / "adaround").glob("*.onnx"))) == 2
    rounded("warm", images_a, context={"preprocessing": "unit"})
    assert len(list((tmp_path / "warm" / "ptqflow" / "adaround").glob("*.onnx"))) == 3


def test_adaround_ahead_computes_the_schemes_together_and_the_variants_find_them(tmp_path, tiny_model, monkeypatch):
    """The sweep asks for all its AdaRound grids at once (one FP32 pass, schemes side by side); each variant's
    with_adarounded_weights then reads its scheme from the cache, the same file computing it alone gives."""
    import ptqflow.models.adaround.onnx as adaround_onnx
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    images = np.random.default_rng(0).uniform(0, 255, (40, 32, 32, 3)).astype(np.float32)
    schemes = ["per_channel_sym_int8", "per_tensor_asym_uint8"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "together"))
    model = FloatModel(load_classifier(tiny_model), tmp_path / "work")
    calls = []
    compute = adaround_onnx.adaround_onnx_schemes
    monkeypatch.setattr(adaround_onnx, "adaround_onnx_schemes",
                        lambda proto, calib, wanted, **kw: calls.append(list(wanted)) or compute(proto, calib, wanted,
                                                                                                 **kw))
    assert model.adaround_ahead(schemes, images, "digest", iterations=20, round_head=False) == schemes
    assert model.adaround_ahead(schemes, images, "digest", iterations=20, round_head=False) == []  # cached
    together = {s: model.with_adarounded_weights(s, images, "digest", iterations=20, round_head=False)
                for s in schemes}
    assert calls == [schemes]  # the variants computed nothing
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "alone"))
    for scheme in schemes:
        alone = FloatModel(load_classifier(tiny_model), tmp_path / "work-alone").with_adarounded_weights(
            scheme, images, "digest", iterations=20, round_head=False)
        assert alone.onnx.path.read_bytes() == together[scheme].onnx.path.read_bytes(), scheme
    assert calls == [schemes, schemes[:1], schemes[1:]]


def test_a_sweep_computes_its_adaround_grids_in_one_go(tracking_store, tiny_model, cifar_dir, monkeypatch):
    """Variants on two grids (int8 per channel for FX and ORT int8, uint8 per tensor for ORT uint8): the sweep asks
    for both before the first variant, in one call, and no variant computes a grid of its own."""
    import ptqflow.models.adaround.onnx as adaround_onnx

    calls = []
    compute = adaround_onnx.adaround_onnx_schemes
    monkeypatch.setattr(adaround_onnx, "adaround_onnx_schemes",
                        lambda proto, calib, wanted, **kw: calls.append(list(wanted)) or compute(proto, calib, wanted,
                                                                                                 **kw))
    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    bench=False, register=False, variants=("pytorch-fx-int8", "ort-int8", "ort-uint8"),
                                    adaround_iterations=11))  # an iteration count no other test caches
    assert not result.failed
    assert calls == [["per_channel_sym_int8", "per_tensor_asym_uint8"]]
    runs = runs_by_name()
    assert all(runs[name].data.params[Param.WEIGHT_ROUNDING] == "adaround"
               for name in ("pytorch-fx-int8", "ort-int8", "ort-uint8"))


# ---- 4. params say what ran -------------------------------------------------------------------------------------
def _qconfig(run) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/qconfig.json"))


def test_a_conflicting_param_is_refused_loudly_and_an_equal_one_passes(tracking_store):
    """MLflow cannot change a param: a second value must stop the writer, not vanish. The same value as `mlflow run`
    writes it ("1000.0", a path with a trailing slash) is the same param."""
    from ptqflow.tracking import records

    with mlflow.start_run() as run:
        mlflow.log_params({Param.CALIBRATION_SIZE: "1000.0", Param.DATA_DIR: "data/cifar/"})  # as `mlflow run` does
        records.log_params({Param.CALIBRATION_SIZE: 1000, Param.DATA_DIR: "data/cifar", Param.BENCH_THREADS: 2})
        with pytest.raises(TrackingError, match=r"calibration_size='1000.0', not '500'"):
            records.log_params({Param.CALIBRATION_SIZE: 500, Param.CALIBRATION_SEED: 0})
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params[Param.CALIBRATION_SIZE] == "1000.0" and params[Param.BENCH_THREADS] == "2"
    assert Param.CALIBRATION_SEED not in params  # nothing of a refused batch is written


def test_a_store_that_stops_answering_stops_the_sweep_with_the_resume_line(monkeypatch):
    """Whatever was being logged when the server went away (a variant's params, a plot drawn in the background), the
    sweep ends with the one line naming --resume; refusals that already say what to do stand as they are."""
    from processes import HOST, free_port

    from ptqflow.pipelines.sweep.variant_runs import sweep_stopped_by_tracking
    from ptqflow.tracking import records

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{HOST}:{free_port()}")  # nobody listens there
    with pytest.raises(TrackingError) as lost_plot:
        records.log_bytes_to_run("0" * 32, b"png", "confusion_matrix.png")
    with pytest.raises(MlflowException) as lost_param:
        MlflowClient().log_param("0" * 32, "a", 1)
    for exc, words in ((lost_plot.value, "cannot log confusion_matrix.png"),
                       (lost_param.value, "tracking failed while recording ort-int8")):
        stopped = sweep_stopped_by_tracking(exc, "recording ort-int8")
        assert words in str(stopped) and "run it again with --resume" in str(stopped), stopped
        assert "\n" not in str(stopped)
        assert sweep_stopped_by_tracking(RuntimeError("x"), "y") is None
    conflict = TrackingError("run r already has calibration_size='1000', not '500'")
    assert sweep_stopped_by_tracking(conflict, "recording ort-int8") is conflict


def test_minmax_calibration_records_no_percentile(tracking_store, tiny_model, cifar_dir):
    _sweep(tiny_model, cifar_dir, variants=("ort-int8",), register=False, ort_calibration_method="MinMax")
    run = runs_by_name()["ort-int8"]
    assert run.data.params[Param.CALIBRATION_METHOD] == "MinMax"
    assert "percentile" not in run.data.params[Param.QCONFIG].lower()
    assert "CalibPercentile" not in json.dumps(_qconfig(run))


def test_a_variant_without_an_adaround_grid_does_not_claim_adaround(tracking_store, tiny_model, cifar_dir):
    # uint8 weights per channel: AdaRound has no matching grid, so the quantizer's own rounding ran.
    run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                           bench=False, register=False, variants=("ort-uint8", "ort-int8"), ort_per_channel=True,
                           adaround_iterations=10))
    runs = runs_by_name()
    uint8, int8 = runs["ort-uint8"], runs["ort-int8"]
    assert uint8.data.params[Param.WEIGHT_ROUNDING] == "nearest"
    assert "adaround" not in uint8.data.params[Param.QCONFIG] and _qconfig(uint8)["config"]["weight_rounding"] == "nearest"
    assert int8.data.params[Param.WEIGHT_ROUNDING] == "adaround"


def test_onnxruntime_calibrates_on_every_calibration_image(tracking_store, tiny_model, cifar_dir):
    # 110 images: 100 would be one batch of 100 and a short one of 10 that used to be dropped.
    run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=110, bench=False,
                           register=False, variants=("ort-int8", "pytorch-fx-int8-x86"), weight_rounding="nearest"))
    for name, run in runs_by_name().items():
        if name.startswith(("ort-", "pytorch-")):
            assert run.data.params[Param.CALIBRATION_SIZE] == "110"
            assert run.data.metrics[Metric.CALIBRATION_IMAGES_USED] == 110


def test_runs_record_the_cpu_and_its_int8_instructions(tracking_store, tiny_model, cifar_dir):
    from ptqflow.models.runtime.machine import INT8_ISA_FLAGS, _cpuinfo_fields

    _sweep(tiny_model, cifar_dir, variants=("ort-uint8",), register=False)
    tags = runs_by_name()["ort-uint8"].data.tags
    assert tags[Tag.CPU_MODEL]
    assert tags[Tag.CPU_INT8_ISA] == "none" or set(tags[Tag.CPU_INT8_ISA].split(",")) <= set(INT8_ISA_FLAGS)
    model, flags = _cpuinfo_fields("processor: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512_vnni sse\n")
    assert model == "AMD EPYC 9R14" and {"avx2", "avx512_vnni"} <= flags


def test_fp32_reference_is_recorded_with_copy_of_the_data(tmp_path, cifar_dir):
    """A copy of the data directory has the same dataset digest (the gate compares by content, not by path)."""
    from ptqflow.pipelines.data.cifar import load_cifar10

    copy = tmp_path / "copy"
    shutil.copytree(cifar_dir, copy)
    assert load_cifar10(copy).digest == load_cifar10(cifar_dir).digest


# ---- 5. graph rewrites that hold on every model -----------------------------------------------------------------
def _fitted_batchnorm_cnn(cifar_dir):
    """onnx_fixture.batchnorm_cnn (NCHW, Conv + unfolded BatchNormalization, like a torch.onnx export) with its
    Gemm head least-squares fitted to the fixture's training images, so predictions are not near-ties."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnx_fixture import batchnorm_cnn

    from ptqflow.pipelines.data.cifar import load_cifar10

    model = batchnorm_cnn(depthwise=False)
    train = load_cifar10(cifar_dir).train
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["flat"], {"x": train.images.astype(np.float32)})[0].astype(np.float64)
    design = np.hstack([features, np.ones((len(features), 1))])
    targets = np.eye(10)[train.labels] * 8.0 - 4.0
    # A ridge fit: 8 features fitted with almost no regularization give huge, cancelling head weights that no
    # 8-bit grid can hold, which would test the head's conditioning rather than BatchNormalization folding.
    ridge = 1e-2 * np.trace(design.T @ design) / design.shape[1]
    solution = np.linalg.lstsq(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ targets, rcond=None)[0]
    for init in model.graph.initializer:
        if init.name == "wd":
            init.CopyFrom(numpy_helper.from_array(solution[:-1].T.astype(np.float32).copy(), "wd"))
        elif init.name == "bd":
            init.CopyFrom(numpy_helper.from_array(solution[-1].astype(np.float32), "bd"))
    return model


def test_unfolded_batchnorm_is_folded_before_adaround_and_every_variant_agrees(tracking_store, cifar_dir):
    from ptqflow.models.graph.rewrites import fold_batch_norms

    model = _fitted_batchnorm_cnn(cifar_dir)
    (tracking_store / "bn").mkdir()
    (tracking_store / "folded").mkdir()
    onnx.save(model, str(tracking_store / "bn" / "bn_resnet.onnx"))
    onnx.save(fold_batch_norms(model)[0], str(tracking_store / "folded" / "bn_resnet.onnx"))
    variants = ("pytorch-fx-int8", "pytorch-fx-int8-x86", "ort-int8", "ort-uint8", "ort-int8-u8s8")
    agreements = {}
    for kind in ("bn", "folded"):
        result = run_sweep(SweepOptions(model_path=tracking_store / kind / "bn_resnet.onnx", data_dir=cifar_dir,
                                        calibration_size=CALIBRATION_SIZE, bench=False, register=False,
                                        variants=variants, adaround_iterations=50))
        parent = MlflowClient().get_run(result.parent_run_id)
        assert parent.data.params[Param.BATCHNORMS_FOLDED] == ("2" if kind == "bn" else "0")
        assert parent.data.params[Param.CHANNEL_CONSTANTS_FOLDED] == "0"
        assert result.outcomes[0].evaluation.accuracy >= 0.5  # the fitted head really classifies (chance: 0.1)
        for outcome in result.outcomes[1:]:
            assert outcome.status == "ok", outcome.reason
            assert MlflowClient().get_run(outcome.run_id).data.params[Param.WEIGHT_ROUNDING] == "adaround"
        agreements[kind] = {o.name: o.fidelity.top1_agreement for o in result.outcomes[1:]}
    # Folding inside ptqflow is exactly folding beforehand: AdaRound's grid is the one every backend quantizes
    # on (before, onnxruntime's pre-processing folded BatchNormalization after AdaRound and broke its grid).
    assert agreements["bn"] == agreements["folded"]
    # 100 test images of a weak fixture model (72% accurate): each disagreement is one point.
    assert min(agreements["bn"].values()) >= 0.95, agreements


def test_a_model_with_batch_fixed_at_1_sweeps_registers_and_pulls(tracking_store, cifar_dir, tmp_path):
    from onnx_fixture import fit_dense_head, tiny_cnn

    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.pipelines.registry.pull import pull

    train = load_cifar10(cifar_dir).train
    path = tracking_store / "fixed.onnx"
    model = fit_dense_head(tiny_cnn(), train.images.transpose(0, 2, 3, 1).astype(np.float32), train.labels)
    for value_info in (*model.graph.input, *model.graph.output):  # then fix the batch dimension at 1
        value_info.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    result = run_sweep(SweepOptions(model_path=path, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("pytorch-fx-int8-x86", "ort-int8"), adaround_iterations=20,
                                    gate=PASS_ALL))
    assert [o.status for o in result.outcomes] == ["ok", "ok", "ok"]
    for outcome in result.outcomes:
        assert outcome.bench.latency_ms_b1_p50 > 0 and outcome.bench.throughput_ips_b256 is None
    assert Metric.THROUGHPUT_IPS_B256 not in runs_by_name()["ort-int8"].data.metrics
    for name in ("fixed-int8", "fixed-int8-onnx"):
        pulled = pull(name, None, "champion", tmp_path / name, cifar_dir)
        assert pulled.accuracy == pytest.approx(pulled.logged_accuracy, abs=1e-4)


def test_a_model_with_batch_fixed_above_1_is_refused_before_any_run(tracking_store, cifar_dir):
    from onnx_fixture import tiny_cnn

    from ptqflow.common.errors import ModelError

    path = tracking_store / "fixed8.onnx"
    onnx.save(tiny_cnn(batch=8), str(path))
    with pytest.raises(ModelError, match="batch dimension is fixed at 8"):
        _sweep(path, cifar_dir)
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0
