"""What the MLflow UI shows of a sweep, checked in the store it reads (no browser): the experiment's kind and saved
runs-table view, each variant's MLflow logged model with its metrics and params, registration from the logged model,
run names that tell sweeps apart, and version descriptions that say what the gate decided and why."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, version_reason
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptqflow.pipelines.cli.app import app
from ptqflow.pipelines.shared.precision import share_decimals
from ptqflow.pipelines.registry.gate import GatePolicy
from ptqflow.tracking.keys import ExperimentTag, Metric, Param, Tag, VersionTag

EXPERIMENT = "resnet8-quantization"
MODEL = "resnet8-int8"
VARIANTS = ("pytorch-fx-int8", "ort-uint8")  # plus fp32, the reference
ALWAYS_PASS = GatePolicy(max_accuracy_drop_pp=100, min_agreement=0.0, allow_slower=True)  # the tiny model agrees on few images
# What the Models tab compares: attached to every variant's logged model.
MODEL_METRICS = (Metric.ACCURACY, Metric.ACCURACY_DELTA_PP, Metric.TOP1_AGREEMENT, Metric.MODEL_SIZE_BYTES,
                 Metric.LATENCY_MS_B1_P50)
MODEL_PARAMS = (Param.VARIANT, Param.FRAMEWORK, Param.WEIGHT_DTYPE, Param.ACTIVATION_DTYPE, Param.QUANT_FORMAT,
                Param.CALIBRATION_SIZE, Param.BENCH_THREADS)
RUN_NAME = re.compile(r"^resnet8 · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d · (\d+) imgs$")


def _sweep(tiny_model, cifar_dir):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    return run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                  adaround_iterations=ADAROUND_ITERATIONS, variants=VARIANTS, gate=ALWAYS_PASS))


@pytest.fixture()
def two_sweeps(tracking_store, tiny_model, cifar_dir):
    """The same sweep twice: version 1 takes @champion, version 2 (same inputs, a re-run) is rejected."""
    return _sweep(tiny_model, cifar_dir), _sweep(tiny_model, cifar_dir)


def test_sweeps_as_the_mlflow_ui_shows_them(two_sweeps, tmp_path):
    first, second = two_sweeps
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)

    # A "Model training" experiment (MLflow's experiment-kind tag), with ptqflow's runs-table view saved on it in
    # the format the UI's "Views" menu reads: a JSON envelope whose state names metric and param columns.
    assert experiment.tags[ExperimentTag.KIND] == ExperimentTag.KIND_MODEL_DEVELOPMENT == "custom_model_development"
    view = json.loads(experiment.tags[ExperimentTag.SAVED_VIEW_PREFIX + ExperimentTag.RUNS_VIEW_ID])
    assert view["name"] == ExperimentTag.RUNS_VIEW_NAME and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    for column in (f"metrics.`{Metric.ACCURACY}`", f"metrics.`{Metric.TOP1_AGREEMENT}`",
                   f"metrics.`{Metric.LATENCY_MS_B1_P50}`", "attributes.`Models`"):
        assert column in columns

    # Two sweeps of the same model get names that tell them apart: model, start time, test images.
    names = [client.get_run(r.parent_run_id).info.run_name for r in (first, second)]
    assert names[0] != names[1], names
    test_images = int(client.get_run(first.outcomes[0].run_id).data.metrics[Metric.TEST_IMAGES])
    for name in names:
        match = RUN_NAME.match(name)
        assert match and int(match.group(1)) == test_images, name

    # Every variant run logged one MLflow logged model, named after the variant, with the run's metrics and params.
    for result in (first, second):
        ok = [o for o in result.outcomes if o.status == "ok"]
        assert {o.name for o in ok} == {"fp32", *VARIANTS}
        for outcome in ok:
            run = client.get_run(outcome.run_id)
            [model] = client.search_logged_models([experiment.experiment_id],
                                                  filter_string=f"source_run_id = '{outcome.run_id}'")
            assert model.name == outcome.name and outcome.model_uri == f"models:/{model.model_id}"
            assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
            metrics = {m.key: m.value for m in model.metrics}
            for key in MODEL_METRICS:
                assert metrics[key] == pytest.approx(run.data.metrics[key]), (outcome.name, key)
            for key in MODEL_PARAMS:
                assert model.params[key] == run.data.params[key], (outcome.name, key)
            # The model is the logged model, not a copy among the run's artifacts; the bare file stays there.
            artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
            assert "model" not in artifacts and "model_file" in artifacts

    # Versions are registered from the logged model, and their sha256 is that of the file inside it.
    for version, result in (("1", first), ("2", second)):
        mv = client.get_model_version(MODEL, version)
        best = next(o for o in result.outcomes if o.run_id == mv.run_id)
        assert mv.source == best.model_uri and mv.source.startswith("models:/m-")
        assert mv.run_id == best.run_id  # the version's own run_id, set by MLflow from the logged model
        local = mlflow.artifacts.download_artifacts(artifact_uri=best.model_uri, dst_path=str(tmp_path / version))
        from ptqflow.common.files import file_sha256

        assert file_sha256(f"{local}/{mv.tags[VersionTag.MODEL_FILE]}") == mv.tags[VersionTag.SHA256]
        # Few, short tags: policy, reason and source run are in the description or the version itself.
        assert not {VersionTag.PROMOTION_POLICY, VersionTag.PROMOTION_REASON, VersionTag.SOURCE_RUN_ID} & set(mv.tags)
        # 23: the gate also needs how the latency was timed (contended, CPU model, int8 ISA, threads), the speedup
        # over FP32 at batch 1 (median and largest over the rounds) and the int8 MAC share on each version; pull,
        # serve and bench its batch-1 threads (latency_threads)
        assert len(mv.tags) <= 23 and all(len(value) <= 64 for value in mv.tags.values())
        test_images = int(mv.tags[VersionTag.TEST_IMAGES])
        assert len(mv.tags[VersionTag.ACCURACY].split(".")[1]) == share_decimals(test_images)

    # The description opens with the decision and its reason in a sentence, then what the version measured.
    v1, v2 = (client.get_model_version(MODEL, v) for v in ("1", "2"))
    assert v1.tags[VersionTag.PROMOTION_DECISION] == "promoted" and v2.tags[VersionTag.PROMOTION_DECISION] == "rejected"
    reason = version_reason(MODEL, "2")
    assert reason.startswith("same inputs as champion v1")
    assert v1.description.startswith(f"Promoted to @champion: {version_reason(MODEL, '1')}.")
    assert v2.description.startswith(f"Rejected: {reason}.")
    first_paragraph, rest = v2.description.split("\n\n", 1)
    assert "Gate: accuracy drop <= 100 pp, agreement >= 0" in first_paragraph
    assert "agreement with FP32" in rest and v2.run_id in rest

    # `ptqflow models` lists each version and says why each was promoted or rejected.
    runner = CliRunner()
    listed = runner.invoke(app, ["models", MODEL])
    assert listed.exit_code == 0, listed.output
    assert f"{MODEL} v2 rejected: {reason}" in listed.stdout, listed.stdout
    assert f"{MODEL} v1 promoted: {version_reason(MODEL, '1')}" in listed.stdout

    # Moving the alias by hand replaces the decision sentence and keeps the rest of the description.
    promoted = runner.invoke(app, ["promote", MODEL, "2", "--alias", "champion"])
    assert promoted.exit_code == 0, promoted.output
    after = client.get_model_version(MODEL, "2").description
    assert after.startswith("Manual decision: @champion set by hand with `ptqflow promote`.")
    assert "Rejected: " not in after and after.endswith(rest)


def test_pull_and_resume_use_the_logged_model(tracking_store, tiny_model, cifar_dir, tmp_path):
    """`pull` finds the file at the version's model_file path and checks its sha256; a resumed sweep registers
    the logged model of the run it reuses."""
    from ptqflow.pipelines.registry.pull import pull
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    options = dict(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                   adaround_iterations=ADAROUND_ITERATIONS, variants=("ort-int8",), bench=False, gate=ALWAYS_PASS)
    first = run_sweep(SweepOptions(**options))
    resumed = run_sweep(SweepOptions(**options, resume=True))
    client = MlflowClient()
    original = next(o for o in first.outcomes if o.name == "ort-int8")
    reused = next(o for o in resumed.outcomes if o.name == "ort-int8")
    assert reused.run_id == original.run_id and reused.model_uri == original.model_uri
    v1, v2 = (client.get_model_version("resnet8-int8-onnx", v) for v in ("1", "2"))
    assert v1.source == v2.source == original.model_uri
    assert v2.tags[VersionTag.PROMOTION_DECISION] == "rejected"
    pulled = pull("resnet8-int8-onnx", "2", None, tmp_path, data_dir=cifar_dir)
    assert pulled.sha256 == v2.tags[VersionTag.SHA256] and pulled.model_file.name == "model.onnx"
    assert pulled.accuracy == pytest.approx(float(v2.tags[VersionTag.ACCURACY]), abs=1e-4)
    assert client.get_run(reused.run_id).data.tags[Tag.MODEL_FILE_IN_MODEL] == v2.tags[VersionTag.MODEL_FILE]


def test_decision_sentence_keeps_reason_and_policy():
    from ptqflow.tracking.aliases import decision_sentence

    sentence = decision_sentence("rejected", "agreement 0.9500 is below 0.97", "agreement >= 0.97")
    assert sentence == "Rejected: agreement 0.9500 is below 0.97. Gate: agreement >= 0.97."
    promoted = decision_sentence("promoted", "no champion yet", "none", alias="best")
    assert promoted == "Promoted to @best: no champion yet."
