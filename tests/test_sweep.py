"""End to end: a sweep on tiny fixtures into a real sqlite MLflow store, read back through MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, runs_by_name
from mlflow.tracking import MlflowClient

from ptqflow.pipelines.shared.precision import round_metric
from ptqflow.pipelines.variants.specs import DEFAULT_VARIANTS
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag, VersionTag

QUANTIZED_OK = ("pytorch-fx-int8", "pytorch-fx-int8-x86", "pytorch-fx-int8-onednn", "ort-int8", "ort-uint8",
                "ort-int8-u8s8")
# Top-1 agreement with FP32 that completed_sweep (tiny fitted CNN, 100 test images, AdaRound 20 steps) must reach.
# Measured: 0.71 for every int8-weight variant, 0.30 for ort-uint8. The tiny model's least-squares dense head has
# large, cancelling weights, so putting them on the int8 grid costs that much (nearest rounding: 0.72 and 0.30);
# per-tensor uint8 gives the head a coarse grid. Floors leave 10 of the 100 test images of margin.
AGREEMENT_FLOORS = {"fp32": 1.0, "pytorch-fx-int8": 0.6, "pytorch-fx-int8-x86": 0.6, "pytorch-fx-int8-onednn": 0.6,
                    "ort-int8": 0.6, "ort-int8-u8s8": 0.6, "ort-uint8": 0.2}


def _fp32_accuracy_with_onnxruntime(model_path, cifar_dir) -> float:
    """The FP32 model's accuracy on the fixture test set, computed directly (NHWC, raw 0..255 pixels)."""
    import onnxruntime as ort

    from ptqflow.pipelines.data.cifar import load_cifar10

    test = load_cifar10(cifar_dir).test
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    scores = session.run(None, {session.get_inputs()[0].name: test.images.transpose(0, 2, 3, 1).astype("float32")})[0]
    return float((scores.argmax(axis=1) == test.labels).mean())


def test_one_parent_and_a_child_run_per_variant(completed_sweep):
    result, _ = completed_sweep
    runs = runs_by_name()
    parents = [r for r in runs.values() if r.data.tags.get(Tag.ROLE) == Tag.ROLE_SWEEP]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert parents[0].info.status == "FINISHED"
    children = {name: r for name, r in runs.items() if r.data.tags.get(Tag.ROLE) == Tag.ROLE_VARIANT}
    assert set(children) == {"fp32", *DEFAULT_VARIANTS}
    for run in children.values():
        assert run.data.tags[Tag.MLFLOW_PARENT] == result.parent_run_id
        assert run.info.end_time is not None


@pytest.mark.parametrize("variant", ("fp32", *QUANTIZED_OK))
def test_variant_run_has_every_param_metric_artifact_and_tag(completed_sweep, cifar_dir, tiny_model, variant):
    run = runs_by_name()[variant]
    assert run.info.status == "FINISHED"
    assert set(Param.VARIANT_PARAMS) <= set(run.data.params)
    assert run.data.params[Param.VARIANT] == variant
    assert run.data.params[Param.CALIBRATION_SIZE] == str(CALIBRATION_SIZE)
    assert run.data.params[Param.INPUT_LAYOUT] == "NHWC"
    assert set(Metric.VARIANT_METRICS) <= set(run.data.metrics)
    # The logged numbers are the sweep's own, FP32's accuracy is the model's (computed here with onnxruntime), and
    # agreement reaches the measured floor (see AGREEMENT_FLOORS).
    outcome = {o.name: o for o in completed_sweep[0].outcomes}[variant]
    accuracy, agreement = run.data.metrics[Metric.ACCURACY], run.data.metrics[Metric.TOP1_AGREEMENT]
    assert accuracy == pytest.approx(outcome.evaluation.accuracy)
    assert agreement == pytest.approx(outcome.fidelity.top1_agreement)
    fp32_accuracy = _fp32_accuracy_with_onnxruntime(tiny_model, cifar_dir)
    assert agreement >= AGREEMENT_FLOORS[variant]
    if variant == "fp32":
        assert accuracy == pytest.approx(fp32_accuracy)
    # Where a variant agrees with FP32 both are right or both wrong, so accuracies differ by at most the disagreement.
    assert abs(accuracy - fp32_accuracy) <= 1.0 - agreement + 1e-9
    assert run.data.metrics[Metric.MODEL_SIZE_BYTES] > 0
    tags = run.data.tags
    assert tags[Tag.VARIANT] == variant and tags[Tag.STATUS] == Tag.STATUS_OK
    for package in ("torch", "onnx", "onnxruntime", "onnx2torch", "mlflow"):
        assert tags[Tag.VERSION_PREFIX + package]
    client = MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {Artifact.MODEL_FILE_DIR, Artifact.QCONFIG, Artifact.PER_CLASS_ACCURACY, Artifact.CONFUSION_MATRIX} <= top
    for metric in (Metric.LATENCY_MS_B1_P50, Metric.LATENCY_MS_B1_P90, Metric.THROUGHPUT_IPS_B256):
        assert run.data.metrics[metric] > 0
    assert run.data.metrics[Metric.LATENCY_MS_B1_P90] >= run.data.metrics[Metric.LATENCY_MS_B1_P50]
    assert int(run.data.params[Param.BENCH_THREADS]) >= 1
    model_files = [a.path for a in client.list_artifacts(run.info.run_id, Artifact.MODEL_FILE_DIR)]
    assert len(model_files) == 1
    assert model_files[0].endswith(".pt" if variant.startswith("pytorch") else ".onnx")
    per_class = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{Artifact.PER_CLASS_ACCURACY}"))
    assert len(per_class) == 10
    # The MLflow model is the run's logged model (named after the variant), not a copy among its artifacts.
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == variant and Artifact.LOGGED_MODEL_NAME not in top
    mlmodel = mlflow.artifacts.load_text(f"{logged.artifact_location}/MLmodel")
    assert ("pytorch:" if variant.startswith("pytorch") else "onnx:") in mlmodel
    # The batch-1 threads chosen for the file (one or all cores) are its runtime setting: on the run, and for an
    # ONNX file in its MLmodel's onnxruntime session options, which MLflow applies when it loads the model.
    from ptqflow.models.runtime.runners import cpu_threads

    threads = int(run.data.params[Param.LATENCY_THREADS])
    assert threads in {1, cpu_threads()} and outcome.latency_threads in (0, threads)
    if variant != "fp32" and not variant.startswith("pytorch"):
        import yaml

        options = yaml.safe_load(mlmodel)["flavors"]["onnx"]["onnx_session_options"]
        assert options == {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                           "graph_optimization_level": 99}
    assert "signature:" in mlmodel and "saved_input_example_info" in mlmodel
    [dataset_input] = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["sha256"] == tags[Tag.DATASET_DIGEST]


def test_an_ort_file_that_runs_as_a_graph_already_evaluated_shares_its_scores(completed_sweep, cifar_dir, tmp_path):
    """ort-int8-u8s8 (QOperator) runs as ort-int8's graph (QDQ) in onnxruntime: evaluated once, its run says so,
    and the scores are those its own file gives."""
    import onnxruntime as ort

    from ptqflow.pipelines.data.cifar import load_cifar10

    runs = runs_by_name()
    int8, u8s8, uint8 = (runs[name].data.tags for name in ("ort-int8", "ort-int8-u8s8", "ort-uint8"))
    assert u8s8[Tag.ORT_GRAPH_SHA256] == int8[Tag.ORT_GRAPH_SHA256] != uint8[Tag.ORT_GRAPH_SHA256]
    assert u8s8[Tag.SCORES_FROM] == "ort-int8" and Tag.SCORES_FROM not in int8 and Tag.SCORES_FROM not in uint8
    outcome = {o.name: o for o in completed_sweep[0].outcomes}["ort-int8-u8s8"]
    logged = mlflow.artifacts.download_artifacts(run_id=runs["ort-int8-u8s8"].info.run_id,
                                                 artifact_path=Artifact.MODEL_FILE_DIR, dst_path=str(tmp_path))
    [model_file] = [path for path in Path(logged).iterdir() if path.suffix == ".onnx"]
    test = load_cifar10(cifar_dir).test
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    own = session.run(None, {session.get_inputs()[0].name: test.images.transpose(0, 2, 3, 1).astype("float32")})[0]
    assert np.array_equal(own.argmax(axis=1), outcome.evaluation.predictions)
    assert np.allclose(own, outcome.evaluation.scores, rtol=0, atol=1e-6)


def test_every_model_is_timed_against_the_same_fp32_rounds(completed_sweep):
    """The sweep times FP32 and every variant together at the end, in shared rounds: each variant's FP32 side is
    the FP32 run's own timing, and the numbers are on each run's logged model too (where the Models tab reads)."""
    runs = runs_by_name()
    fp32 = runs["fp32"].data
    assert fp32.params[Param.BENCH_ROUNDS] == "3" and fp32.metrics[Metric.SPEEDUP_VS_FP32_B1] == 1.0
    client = MlflowClient()
    for variant in QUANTIZED_OK:
        data = runs[variant].data
        assert data.params[Param.BENCH_ROUNDS] == "3"
        assert data.metrics[Metric.FP32_LATENCY_MS_B1_P50] == fp32.metrics[Metric.LATENCY_MS_B1_P50]
        assert data.metrics[Metric.FP32_THROUGHPUT_IPS_B256] == fp32.metrics[Metric.THROUGHPUT_IPS_B256]
        low, high = data.metrics[Metric.SPEEDUP_VS_FP32_B256_MIN], data.metrics[Metric.SPEEDUP_VS_FP32_B256_MAX]
        assert 0 < low <= data.metrics[Metric.SPEEDUP_VS_FP32_B256] <= high
        [output] = runs[variant].outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        model_metrics = {m.key: m.value for m in logged.metrics}
        assert model_metrics[Metric.LATENCY_MS_B1_P50] == data.metrics[Metric.LATENCY_MS_B1_P50]
        assert model_metrics[Metric.SPEEDUP_VS_FP32_B256] == data.metrics[Metric.SPEEDUP_VS_FP32_B256]
        assert logged.params[Param.BENCH_ROUNDS] == "3"


def test_delta_and_agreement_are_relative_to_the_fp32_run(completed_sweep):
    runs = runs_by_name()
    fp32 = runs["fp32"].data.metrics[Metric.ACCURACY]
    for name in QUANTIZED_OK:
        m = runs[name].data.metrics
        # Both are stored rounded to what the measurement supports (pipelines/shared/precision.py).
        assert m[Metric.ACCURACY_DELTA_PP] == round_metric(Metric.ACCURACY_DELTA_PP,
                                                           100 * (m[Metric.ACCURACY] - fp32))
        assert m[Metric.COMPRESSION_RATIO] == round_metric(
            Metric.COMPRESSION_RATIO, runs["fp32"].data.metrics[Metric.MODEL_SIZE_BYTES] / m[Metric.MODEL_SIZE_BYTES])


def test_uint8_pytorch_variant_is_recorded_as_unsupported_with_the_reason(completed_sweep):
    run = runs_by_name()["pytorch-fx-uint8"]
    assert run.info.status == "FAILED"
    assert run.data.tags[Tag.STATUS] == Tag.STATUS_UNSUPPORTED
    assert "quint8" in run.data.tags[Tag.REASON] or "QUInt8" in run.data.tags[Tag.REASON]
    assert run.data.params[Param.WEIGHT_DTYPE] == "uint8"


def test_parent_run_has_comparison_table_and_calibration_digest(completed_sweep):
    result, _ = completed_sweep
    parent = MlflowClient().get_run(result.parent_run_id)
    md = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/{Artifact.COMPARISON_MD}")
    csv_text = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/{Artifact.COMPARISON_CSV}")
    for name in ("fp32", *DEFAULT_VARIANTS):
        assert name in md and name in csv_text
    html = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/{Artifact.COMPARISON_HTML}")
    assert "<table" in html and "pytorch-fx-int8" in html
    local = mlflow.artifacts.download_artifacts(f"runs:/{result.parent_run_id}/plots")
    from pathlib import Path

    pngs = {p.name: p.read_bytes() for p in Path(local).glob("*.png")}
    expected = {Path(a).name for a in (Artifact.PLOT_ACCURACY_VS_SIZE, Artifact.PLOT_ACCURACY_VS_LATENCY,
                                       Artifact.PLOT_PER_CLASS, Artifact.PLOT_AGREEMENT)}
    assert set(pngs) == expected
    assert all(data.startswith(b"\x89PNG") for data in pngs.values())
    indices = json.loads(mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/{Artifact.CALIBRATION_INDICES}"))
    assert len(indices["indices"]) == CALIBRATION_SIZE
    assert parent.data.tags[Tag.CALIBRATION_DIGEST] == indices["sha256"]
    assert parent.data.metrics[Metric.VARIANTS_OK] == len(QUANTIZED_OK)
    assert parent.data.metrics[Metric.VARIANTS_UNSUPPORTED] == 1


def test_every_int8_variant_run_has_its_diagnosis_and_the_sweep_compares_them(completed_sweep):
    """Issue 11, section 1: with the default options each int8 variant's run has its per-layer table (CSV, JSON)
    and SQNR plot under diagnosis/, made on the first 256 test images (here all 100), and the sweep run a plot
    comparing the variants layer by layer."""
    result, _ = completed_sweep
    client = MlflowClient()
    quantized = [o for o in result.outcomes if o.status == "ok" and o.name != "fp32"]
    assert {o.name for o in quantized} == set(QUANTIZED_OK)
    for outcome in quantized:
        assert {a.path for a in client.list_artifacts(outcome.run_id, "diagnosis")} == {
            Artifact.DIAGNOSIS_CSV, Artifact.DIAGNOSIS_JSON, Artifact.DIAGNOSIS_PLOT}
        payload = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/{Artifact.DIAGNOSIS_JSON}"))
        assert payload["variant"] == outcome.name and payload["run_id"] == outcome.run_id
        assert payload["images"] == min(256, result.test_images)
        # every convolution quantized, or kept in FP32 by a speed check (onnxruntime's, or FX's: "fbgemm int8 kernel
        # slower here") with its timings
        rows = {row["layer"]: row for row in payload["layers"]}
        assert all(rows[name]["quantized"] or "int8 kernel slower here: " in rows[name]["float_reason"]
                   for name in ("Conv_1", "Conv_3"))
        assert Tag.DIAGNOSIS_ERROR not in client.get_run(outcome.run_id).data.tags
    assert [a.path for a in client.list_artifacts(result.parent_run_id, "diagnosis")] == [
        Artifact.DIAGNOSIS_BACKENDS_PLOT]
    assert result.phase_seconds["diagnose"] > 0


def test_best_int8_models_are_registered_with_verifiable_tags(completed_sweep):
    result, _ = completed_sweep
    client = MlflowClient()
    for name, framework in (("resnet8-int8", "pytorch"), ("resnet8-int8-onnx", "onnxruntime")):
        mv = client.get_model_version(name, "1")
        tags = mv.tags
        assert tags[VersionTag.VARIANT].startswith("pytorch-fx-int8" if framework == "pytorch" else "ort-")
        source = client.get_run(mv.run_id)
        assert float(tags[VersionTag.ACCURACY]) == pytest.approx(source.data.metrics[Metric.ACCURACY])
        assert len(tags[VersionTag.SHA256]) == 64
        assert "agreement" in mv.description and mv.run_id in mv.description
        assert "@champion" in client.get_registered_model(name).description


def test_registered_torchscript_reproduces_logged_accuracy_with_plain_jit_load(completed_sweep, cifar_dir, tmp_path):
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.tracking.registry import download, resolve

    version = resolve("resnet8-int8", version="1")
    model_dir = download(version, tmp_path)
    module = torch.jit.load(str(model_dir / version.tags[VersionTag.MODEL_FILE]))
    test = load_cifar10(cifar_dir).test
    x = torch.from_numpy(test.images.transpose(0, 2, 3, 1).astype("float32"))
    accuracy = (module(x).argmax(1).numpy() == test.labels).mean()
    assert accuracy == pytest.approx(float(version.tags[VersionTag.ACCURACY]), abs=1e-4)


def test_pull_by_version_verifies_and_reevaluates(completed_sweep, cifar_dir, tmp_path):
    from ptqflow.pipelines.registry.pull import pull

    result = pull("resnet8-int8", "1", None, tmp_path, cifar_dir)
    assert result.model_file.is_file()
    assert result.accuracy == pytest.approx(result.logged_accuracy, abs=1e-4)
    onnx_result = pull("resnet8-int8-onnx", "1", None, tmp_path / "onnx", cifar_dir)
    assert onnx_result.model_file.suffix == ".onnx"
    # each loaded on the batch-1 threads its version records, copied from its run
    from mlflow.tracking import MlflowClient

    for pulled, name in ((result, "resnet8-int8"), (onnx_result, "resnet8-int8-onnx")):
        version = MlflowClient().get_model_version(name, "1")
        recorded = MlflowClient().get_run(version.run_id).data.params[Param.LATENCY_THREADS]
        assert pulled.latency_threads == int(version.tags[VersionTag.LATENCY_THREADS]) == int(recorded)


def test_pull_refuses_a_file_changed_after_registration(completed_sweep, tmp_path, monkeypatch):
    from ptqflow.common.errors import IntegrityError
    from ptqflow.pipelines.registry.pull import pull
    from ptqflow.tracking import registry

    real_download = registry.download

    def tampering_download(version, destination):
        model_dir = real_download(version, destination)
        target = model_dir / version.tags[VersionTag.MODEL_FILE]
        target.write_bytes(target.read_bytes() + b"tampered")
        return model_dir

    loaded = []
    monkeypatch.setattr(registry, "download", tampering_download)
    monkeypatch.setattr("ptqflow.models.runtime.runners.load_runner", lambda path: loaded.append(path))
    with pytest.raises(IntegrityError, match="SHA-256"):
        pull("resnet8-int8", "1", None, tmp_path, None)
    assert loaded == []  # never loaded


def test_second_sweep_adds_version_2_and_leaves_version_1_alone(completed_sweep, cifar_dir, tiny_model):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    client = MlflowClient()
    before = client.get_model_version("resnet8-int8", "1")
    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("pytorch-fx-int8",), registered_onnx_model="unused",
                                    adaround_iterations=ADAROUND_ITERATIONS))
    assert [v.version for v in result.registered] == ["2"]
    after = client.get_model_version("resnet8-int8", "1")
    assert after.tags == before.tags and after.source == before.source
    assert client.get_model_version("resnet8-int8", "2").run_id != before.run_id
