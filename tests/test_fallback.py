"""Issue 11, section 3: the sensitivity-ranked fallback (`--target-agreement`, `--max-drop`), and the sweep side of
section 1 (the diagnosis logged on every int8 variant run), on the outlier-channel CNN of tests/test_diagnosis.py
(conv1's output channel x64, conv2's matching input channel x1/64, across a ReLU): every backend loses agreement on
the 64x-wide activation r1 between them, and only taking it out of 8 bits gives it back.

The search itself is tested on a made-up measure first (no model), then end to end in sweeps of the real backends.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from onnx import numpy_helper

from ptqflow.common.errors import ConfigError
from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE, all_runs
from ptqflow.models.diagnosis.records import Diagnosis, LayerDiagnosis
from ptqflow.models.backends.ort import OrtStaticConfig
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
from onnx_fixture import outlier_cnn
from ptqflow.pipelines.repair.fallback import FallbackSearch, FallbackTarget, Measurement, candidates
from ptqflow.pipelines.variants.specs import Upgrade, VariantSpec, apply_upgrades, upgrade_kinds
from ptqflow.tracking.keys import Artifact, Metric, Param, Tag

VARIANTS = ("pytorch-fx-int8", "ort-int8", "ort-uint8")
TARGET = 0.99  # the outlier model reaches 89-95% agreement on the fixture's 100 test images
# The sweeps that test the fallback turn equalization off: by default it is chosen per variant on held-out images,
# and it takes the outlier channel apart without any layer out of int8 (test_equalization_is_chosen_...).
OFF = "off"


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outlier") / "outlier.onnx"
    onnx.save(outlier_cnn(outlier=True), str(path))
    return path


# ---- the search on a made-up measure --------------------------------------------------------------------------
def _diagnosis() -> Diagnosis:
    """Two quantized convolutions, b reading a's output, and a float head."""
    rows = (LayerDiagnosis("a", "Conv", 0.5, 45.0, 30.0, 30.0, input_tensor="x", output_tensor="ya"),
            LayerDiagnosis("b", "Conv", 0.5, 45.0, 12.0, 11.0, input_tensor="ya", output_tensor="yb",
                           hint="activation range set by one channel"),
            LayerDiagnosis("head", "Gemm", 0.0, None, None, 11.0, quantized=False))
    return Diagnosis("onnxruntime", "made up", 100, rows)


def _measure(calls: list):
    """Agreement 0.90 as quantized; b's input in 16 bits: 0.94; a and b in FP32 (ya never quantized): 0.995; a in
    FP32: 0.91; b alone in FP32 changes nothing (ya is still quantized, by a)."""
    def measure(spec: VariantSpec, limit):
        config = spec.config
        calls.append((tuple(config.fp32_nodes), tuple(config.activation_16bit_tensors), limit))
        fp32, wide = set(config.fp32_nodes), set(config.activation_16bit_tensors)
        agreement = 0.995 if {"a", "b"} <= fp32 else 0.94 if "ya" in wide else 0.91 if "a" in fp32 else 0.90
        return Measurement(accuracy=0.8, agreement=agreement, logit_sqnr_db=20.0, images=limit or 1000)
    return measure


def test_the_search_ranks_by_end_to_end_effect_and_tries_16_bits_first():
    calls = []
    spec = VariantSpec("ort-int8", "onnxruntime", OrtStaticConfig(weight_rounding="nearest"))
    steps_opened = []
    search = FallbackSearch(_measure(calls), FallbackTarget(agreement=0.99), reference_accuracy=0.8,
                            ranking_images=200,
                            step_scope=lambda *opened: _recording(steps_opened, *opened))
    start = Measurement(0.8, 0.90, 18.0, 1000)
    result = search.run(spec, start, _diagnosis(), inputs={"a": (), "b": ("a",), "head": ("b",)})
    # candidates: the quantized layers, worst local SQNR first; fp32+inputs only where a quantized layer feeds it
    assert [r.candidate.layer for r in result.ranked] == ["b", "a"]
    assert result.ranked[0].candidate.inputs_from == ("a",)
    assert set(result.ranked[0].measured) == {"int16", "fp32", "fp32+inputs"}
    assert set(result.ranked[1].measured) == {"int16", "fp32"}
    assert all(limit == 200 for *_, limit in calls[:5])  # ranking on the ranking images
    # greedy: the 16-bit inputs first in the order they ranked (b's helps, a's adds nothing but stays), then FP32 in
    # its ranking order: b with the layer feeding it (better than b alone), replacing both 16-bit upgrades, reaches it
    assert [(s.change.label, s.decision) for s in result.steps] == [
        ("b:int16(ya)", "added"), ("a:int16(x)", "added"), ("b:fp32+inputs(a)", "added")]
    assert [n for n, *_ in steps_opened] == [1, 2, 3]
    assert [u.label for u in result.steps[1].upgrades] == ["b:int16(ya)", "a:int16(x)"]
    assert all(limit is None for *_, limit in calls[5:])  # steps on the full test set
    assert result.reached and result.final.agreement == 0.995 and result.best_step == 3
    assert result.upgrades == (Upgrade("b", "fp32+inputs", inputs_from=("a",)),)
    mixed = result.mixed_spec(spec)
    assert mixed.name == "ort-int8-mixed" and mixed.mixed.of == "ort-int8" and mixed.mixed.reached
    assert mixed.config.fp32_nodes == ("b", "a") and mixed.config.activation_16bit_tensors == ()
    assert "reached" in result.summary() and "ort-int8-mixed" in result.summary()
    assert json.loads(result.to_json())["steps"][2]["layers"] == [{"layer": "b", "kind": "fp32+inputs",
                                                                   "inputs_from": ["a"]}]


def _recording(opened: list, number, change, upgrades):
    from contextlib import contextmanager

    @contextmanager
    def scope():
        opened.append((number, change, upgrades))
        yield lambda step: None

    return scope()


def test_an_unreachable_target_keeps_the_config_that_came_closest():
    spec = VariantSpec("ort-int8", "onnxruntime", OrtStaticConfig(weight_rounding="nearest"))
    start = Measurement(0.8, 0.90, 18.0, 1000)

    def measure(variant: VariantSpec, limit):  # b's 16-bit input helps; any FP32 layer helps less
        config = variant.config
        agreement = 0.92 if config.fp32_nodes else 0.93 if "ya" in config.activation_16bit_tensors else 0.90
        return Measurement(0.8, agreement, 20.0, limit or 1000)

    result = FallbackSearch(measure, FallbackTarget(agreement=0.99), 0.8).run(spec, start, _diagnosis(), inputs={})
    # every candidate was tried, 16 bits first; FP32 in ranking order (a tie: the worse local SQNR first)
    assert [s.change.label for s in result.steps] == ["b:int16(ya)", "a:int16(x)", "b:fp32", "a:fp32"]
    assert not result.reached and result.final.agreement == 0.93 and result.best_step == 1
    assert "not reached" in result.summary() and "best attempt recorded as ort-int8-mixed" in result.summary()
    mixed = result.mixed_spec(spec)
    assert mixed.config.activation_16bit_tensors == ("ya",) and not mixed.config.fp32_nodes
    assert not mixed.mixed.reached
    # nothing closer than the variant itself: no -mixed variant
    nothing = FallbackSearch(lambda variant, limit: replace(start, images=limit or 1000), FallbackTarget(0.99),
                             0.8).run(spec, start, _diagnosis(), inputs={})
    assert nothing.steps and nothing.upgrades == () and nothing.final == start and nothing.mixed_spec(spec) is None
    assert "no upgrade" in nothing.summary() and "no ort-int8-mixed variant" in nothing.summary()


def test_when_a_round_of_candidates_runs_out_the_next_is_ranked():
    spec = VariantSpec("ort-int8", "onnxruntime", OrtStaticConfig(weight_rounding="nearest"))
    calls = []
    # one candidate a round, and nothing feeds b: b alone gets to 0.94 at best; a in FP32 too reaches the target
    result = FallbackSearch(_measure(calls), FallbackTarget(agreement=0.99), 0.8, candidates=1).run(
        spec, Measurement(0.8, 0.90, 18.0, 1000), _diagnosis(), inputs={})
    assert [r.candidate.layer for r in result.ranked] == ["b", "a"]
    assert [s.change.label for s in result.steps] == ["b:int16(ya)", "b:fp32", "a:int16(x)", "a:fp32"]
    assert result.reached and result.best_step == 4 and [u.label for u in result.upgrades] == ["b:fp32", "a:fp32"]
    assert [limit for *_, limit in calls] == [1000, 1000, None, None, 1000, 1000, None, None]


def test_targets_and_kinds():
    for bad in (1.01, 0.0, -0.5, True, "0.99"):
        with pytest.raises(ConfigError, match="--target-agreement"):
            FallbackTarget(agreement=bad)
    with pytest.raises(ConfigError, match="--max-drop"):
        FallbackTarget(max_drop_pp=-0.1)
    both = FallbackTarget(agreement=0.99, max_drop_pp=0.5)
    assert both.describe() == "top-1 agreement >= 99% and accuracy drop <= 0.5 pp"
    assert both.shortfall(accuracy=0.795, agreement=0.99, reference_accuracy=0.80) == 0  # 0.5 pp: allowed
    assert both.shortfall(accuracy=0.79, agreement=0.99, reference_accuracy=0.80) == pytest.approx(0.005)
    assert both.shortfall(accuracy=0.80, agreement=0.985, reference_accuracy=0.80) == pytest.approx(0.005)
    assert not FallbackTarget().active
    assert upgrade_kinds(PytorchFxConfig()) == ("fp32", "fp32+inputs")
    assert upgrade_kinds(OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8")) == ("fp32",
                                                                                                  "fp32+inputs")
    assert upgrade_kinds(OrtStaticConfig()) == ("int16", "fp32", "fp32+inputs")
    with pytest.raises(ValueError, match="no 16-bit activations"):
        apply_upgrades(PytorchFxConfig(), (Upgrade("conv2", "int16", tensors=("r1",)),))
    wide = apply_upgrades(OrtStaticConfig(), (Upgrade("add", "int16", tensors=("a", "b")),))
    assert wide.activation_16bit_tensors == ("a", "b")
    assert Upgrade("add", "int16", tensors=("a", "b")).label == "add:int16(a+b)"
    fx = apply_upgrades(PytorchFxConfig(fp32_modules=("conv1",)), (Upgrade("conv2", "fp32+inputs",
                                                                           inputs_from=("conv1",)),))
    assert fx.fp32_modules == ("conv1", "conv2")
    assert [c.layer for c in candidates(_diagnosis(), limit=1)] == ["b"]
    # a layer without a local SQNR (FX cannot shadow a quantized add_relu) is never filtered out
    residual = LayerDiagnosis("add", "Add", 0.0, None, None, 9.0, input_tensor="yb", output_tensor="z")
    assert [c.layer for c in candidates(replace(_diagnosis(), layers=_diagnosis().layers + (residual,)),
                                        limit=1)] == ["b", "add"]


def test_input_layers_and_float_weights_of_fp32_layers(tmp_path):
    """A layer's inputs come from the layers before it; a layer kept in FP32 computes with its FP32 weights, not the
    AdaRound grid's (the float head does the same)."""
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.layer_map import input_layers
    from ptqflow.models.graph.onnx_model import load_classifier

    model = outlier_cnn(outlier=True)
    assert input_layers(model) == {"conv1": (), "conv2": ("conv1",), "dense": ()}  # AveragePool requantizes
    onnx.save(model, str(tmp_path / "outlier.onnx"))
    float_model = FloatModel.for_runtimes(load_classifier(tmp_path / "outlier.onnx"), tmp_path / "work")
    calibration = np.random.default_rng(0).uniform(0, 255, (20, 32, 32, 3)).astype(np.float32)
    config = OrtStaticConfig(fp32_nodes=("conv2",))
    source = float_model.for_config(config, calibration, "digest", iterations=2)
    rounded = float_model.for_config(replace(config, fp32_nodes=()), calibration, "digest", iterations=2)
    weights = {name: {i.name: numpy_helper.to_array(i) for i in m.onnx.proto.graph.initializer}
               for name, m in (("original", float_model), ("source", source), ("rounded", rounded))}
    np.testing.assert_array_equal(weights["source"]["w2"], weights["original"]["w2"])
    np.testing.assert_array_equal(weights["source"]["w1"], weights["rounded"]["w1"])
    assert not np.array_equal(weights["rounded"]["w2"], weights["original"]["w2"])
    assert float_model.for_config(config, calibration, "digest", iterations=2) is source  # made once


# ---- end to end -----------------------------------------------------------------------------------------------
# The sweeps that need every layer in int8 (the outlier channel costs each backend) turn the speed check off: on a
# CPU whose int8 kernel is slow for the 3-channel stem, the check keeps that layer in FP32 and the repair is moot.
def test_target_agreement_repairs_every_variant_that_misses_it(tracking_store, outlier_model, cifar_dir):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking import records
    from ptqflow.tracking import runs

    result = run_sweep(SweepOptions(model_path=outlier_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    adaround_iterations=ADAROUND_ITERATIONS, variants=VARIANTS, bench=False,
                                    target_agreement=TARGET, ranking_images=50, equalization=OFF,
                                    speed_check=False))
    by_name = {o.name: o for o in result.outcomes}
    assert list(by_name) == ["fp32", *(name for v in VARIANTS for name in (v, f"{v}-mixed"))]
    client = MlflowClient()
    for variant in VARIANTS:
        base, mixed = by_name[variant], by_name[f"{variant}-mixed"]
        assert base.fidelity.top1_agreement < TARGET  # the outlier channel costs every backend
        assert mixed.status == "ok" and mixed.fidelity.top1_agreement >= TARGET, variant
        # the -mixed variant: its params and qconfig.json name the upgraded layers, the outlier's reader among them
        qconfig = json.loads(records.download_text(mixed.run_id, Artifact.QCONFIG))
        fallback = qconfig["fallback"]
        assert fallback["of"] == variant and fallback["reached"] and fallback["target"] == "top-1 agreement >= 99%"
        assert "conv2" in {layer["layer"] for layer in fallback["layers"]}
        in_config = qconfig["config"].get("fp32_nodes", qconfig["config"].get("fp32_modules"))
        assert "conv2" in in_config + qconfig["config"].get("activation_16bit_tensors", [])
        run = client.get_run(mixed.run_id)
        assert run.data.params[Param.FALLBACK_OF] == variant and "conv2:" in run.data.params[Param.FALLBACK_LAYERS]
        assert run.data.tags[Tag.ROLE] == Tag.ROLE_VARIANT and run.data.tags[Tag.STATUS] == Tag.STATUS_OK
        # the search: one finished child run of the variant's run per step; the last one is the -mixed config
        steps = sorted(runs.child_runs(base.run_id), key=lambda r: int(r.data.params[Param.FALLBACK_STEP]))
        assert steps and all(step.info.status == "FINISHED" for step in steps)
        assert {step.data.tags[Tag.ROLE] for step in steps} == {Tag.ROLE_FALLBACK_STEP}
        assert {step.data.tags[Tag.STEP_DECISION] for step in steps} == {Tag.STEP_ADDED}
        search = json.loads(records.download_text(base.run_id, Artifact.FALLBACK_SEARCH))
        assert search["reached"] and search["best_step"] == len(steps)
        # chosen on held-out training images, never on the test set the -mixed variant is then measured on
        assert search["selected_on"] == "validation" and "held-out training images" in search["summary"]
        assert all(Metric.HELD_OUT_IMAGES in step.data.metrics and Metric.TEST_IMAGES not in step.data.metrics
                   for step in steps)
        assert search["final"]["images"] == int(steps[-1].data.metrics[Metric.HELD_OUT_IMAGES]) > 0
        assert search["ranking"][0]["layer"] == "conv2" and search["ranking_images"] == 50
        assert steps[-1].data.params[Param.FALLBACK_LAYERS] == run.data.params[Param.FALLBACK_LAYERS]
        assert steps[-1].data.metrics[Metric.TOP1_AGREEMENT] == run.data.metrics[Metric.TOP1_AGREEMENT]
        assert "reached" in client.get_run(base.run_id).data.tags[Tag.FALLBACK]
        # every int8 variant, -mixed included, has its diagnosis
        assert {a.path for a in client.list_artifacts(mixed.run_id, "diagnosis")} == {
            Artifact.DIAGNOSIS_CSV, Artifact.DIAGNOSIS_JSON, Artifact.DIAGNOSIS_PLOT}
    # ONNX Runtime QDQ tries 16-bit activations before FP32
    first = min(runs.child_runs(by_name["ort-int8"].run_id), key=lambda r: int(r.data.params[Param.FALLBACK_STEP]))
    assert first.data.params[Param.FALLBACK_CHANGE] == "conv2:int16(r1)"
    # -mixed variants are registered under names of their own, never the int8 ones (uint8 weights are not registered)
    assert {(v.name, v.tags["variant"]) for v in result.registered} == {
        ("outlier-int8", "pytorch-fx-int8"), ("outlier-int8-onnx", "ort-int8"),
        ("outlier-mixed", "pytorch-fx-int8-mixed"), ("outlier-mixed-onnx", "ort-int8-mixed")}
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params[Param.TARGET_AGREEMENT] == str(TARGET)
    assert Param.TARGET_MAX_DROP_PP not in parent.data.params
    assert {r.info.status for r in all_runs()} == {"FINISHED"}


def test_a_target_out_of_reach_is_one_line_and_leaves_no_run_running(tracking_store, outlier_model, cifar_dir,
                                                                      monkeypatch, capsys):
    """When the backend refuses every config the search makes (here: this test, on all the selection images), every
    step is recorded as refused, the variant keeps no -mixed variant, one line says so and every run ends FINISHED."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.pipelines.variants.runner import VariantRunner
    from ptqflow.tracking import runs

    measure = VariantRunner.measure

    def refuse_full_set(self, spec, limit=None, on="test"):
        upgraded = spec.config.fp32_nodes or spec.config.activation_16bit_tensors  # not the variant's own start
        if limit is None and upgraded:
            from ptqflow.models.backends.base import UnsupportedVariant

            raise UnsupportedVariant("refused by the test")  # as a backend says it (an error of ours would stop it)
        return measure(self, spec, limit, on)

    monkeypatch.setattr(VariantRunner, "measure", refuse_full_set)
    result = run_sweep(SweepOptions(model_path=outlier_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    weight_rounding="nearest", variants=("ort-int8",), bench=False,
                                    target_agreement=TARGET, ranking_images=50, register=False, equalization=OFF))
    by_name = {o.name: o for o in result.outcomes}
    assert list(by_name) == ["fp32", "ort-int8"]
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("! ort-int8: "))
    assert "top-1 agreement >= 99% not reached" in line and "no ort-int8-mixed variant" in line
    steps = runs.child_runs(by_name["ort-int8"].run_id)
    assert steps and {s.data.tags[Tag.STEP_DECISION] for s in steps} == {Tag.STEP_REFUSED}
    assert {s.data.tags[Tag.REASON] for s in steps} == {"UnsupportedVariant: refused by the test"}
    assert "not reached" in MlflowClient().get_run(by_name["ort-int8"].run_id).data.tags[Tag.FALLBACK]
    assert {r.info.status for r in all_runs()} == {"FINISHED"}  # nothing left RUNNING


def test_a_bad_target_is_one_line_before_anything_runs(tracking_store, outlier_model, cifar_dir):
    from typer.testing import CliRunner

    from ptqflow.pipelines.cli.app import app

    for option, value in (("--target-agreement", "1.01"), ("--max-drop", "-1")):
        invoked = CliRunner().invoke(app, ["sweep", "--model", str(outlier_model), "--data-dir", str(cifar_dir),
                                           option, value, "--no-bench"])
        assert invoked.exit_code == 2, invoked.output
        assert invoked.stderr.count("\n") == 1 and invoked.stderr.startswith(f"error: {option} ")
    assert all_runs() == []


def test_the_python_api_repairs_without_tracking(outlier_model, cifar_dir, tmp_path, monkeypatch):
    from ptqflow.pipelines.api import quantize

    monkeypatch.chdir(tmp_path)
    results = quantize(outlier_model, cifar_dir, variants=["ort-uint8"], track=False, output_dir=tmp_path / "out",
                       calibration_size=CALIBRATION_SIZE, weight_rounding="nearest", bench=False,
                       target_agreement=TARGET, ranking_images=50, equalization=OFF, speed_check=False)
    assert list(results.variants) == ["fp32", "ort-uint8", "ort-uint8-mixed"]
    assert results["ort-uint8"].agreement < TARGET <= results["ort-uint8-mixed"].agreement
    config = json.loads((tmp_path / "out" / "ort-uint8-mixed" / "qconfig.json").read_text())
    assert "conv2" in config["fp32_nodes"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no measured configs left
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    with pytest.raises(ConfigError, match="diagnose only appl"):
        quantize(outlier_model, cifar_dir, track=False, diagnose=False)


def test_a_failing_diagnosis_leaves_the_variant_standing(tracking_store, outlier_model, cifar_dir, monkeypatch):
    import ptqflow.models.diagnosis.ort
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    def fail(*args, **kwargs):
        raise RuntimeError("no layer table today")

    monkeypatch.setattr(ptqflow.models.diagnosis.ort, "diagnose_ort_config", fail)
    result = run_sweep(SweepOptions(model_path=outlier_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    weight_rounding="nearest", variants=("ort-uint8",), bench=False, register=False))
    outcome = {o.name: o for o in result.outcomes}["ort-uint8"]
    run = MlflowClient().get_run(outcome.run_id)
    assert outcome.status == "ok" and run.data.tags[Tag.STATUS] == Tag.STATUS_OK
    assert run.data.tags[Tag.DIAGNOSIS_ERROR] == "RuntimeError: no layer table today"
    assert not MlflowClient().list_artifacts(outcome.run_id, "diagnosis")
    assert not MlflowClient().list_artifacts(result.parent_run_id, "diagnosis")  # nothing to compare


def test_resume_reuses_the_search_and_the_mixed_variant(tracking_store, outlier_model, cifar_dir, capsys, tmp_path):
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep

    options = SweepOptions(model_path=outlier_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                           weight_rounding="nearest", variants=("ort-uint8",), bench=False, target_agreement=TARGET,
                           ranking_images=50, register=False, equalization=OFF, speed_check=False)
    first = {o.name: o for o in run_sweep(options).outcomes}

    def steps() -> int:
        return sum(r.data.tags.get(Tag.ROLE) == Tag.ROLE_FALLBACK_STEP for r in all_runs())

    searched = steps()
    assert searched >= 1
    capsys.readouterr()
    second = {o.name: o for o in run_sweep(replace(options, resume=True)).outcomes}
    assert "ort-uint8: reused the fallback search of run" in capsys.readouterr().err
    for name in ("ort-uint8", "ort-uint8-mixed"):
        assert second[name].run_id == first[name].run_id and second[name].reason.startswith("reused run")
    assert steps() == searched  # no second search
    # other search options: the search runs again, recorded on a new run of the third sweep; the first sweep's
    # variant run keeps its own search record and gains no step runs
    client, reused = MlflowClient(), first["ort-uint8"].run_id

    def record_of(run_id: str, where: Path) -> tuple:
        path = client.download_artifacts(run_id, Artifact.FALLBACK_SEARCH, str(where))
        return client.get_run(run_id).data.tags[Tag.FALLBACK], Path(path).read_text()

    def children(run_id: str) -> list:
        return [r for r in all_runs() if r.data.tags.get(Tag.MLFLOW_PARENT) == run_id]

    before, steps_before = record_of(reused, tmp_path / "before"), len(children(reused))
    result = run_sweep(replace(options, resume=True, ranking_images=40))
    third = {o.name: o for o in result.outcomes}
    assert steps() > searched and third["ort-uint8"].run_id == reused
    assert record_of(reused, tmp_path / "after") == before and len(children(reused)) == steps_before
    search_run, = [r for r in children(result.parent_run_id) if r.data.tags[Tag.ROLE] == Tag.ROLE_FALLBACK_SEARCH]
    assert search_run.data.tags[Tag.FALLBACK_VARIANT_RUN] == reused
    assert json.loads(record_of(search_run.info.run_id, tmp_path / "new")[1])["options"]["ranking_images"] == 40
    assert len(children(search_run.info.run_id)) == steps() - searched
    # those options again: the search run of the third sweep is found and reused, nothing is searched again
    searched = steps()
    capsys.readouterr()
    fourth = run_sweep(replace(options, resume=True, ranking_images=40))
    assert f"reused the fallback search of run {search_run.info.run_id}" in capsys.readouterr().err
    assert steps() == searched and not [r for r in children(fourth.parent_run_id)
                                        if r.data.tags[Tag.ROLE] == Tag.ROLE_FALLBACK_SEARCH]


def test_only_the_backends_own_errors_are_recorded_as_refusals():
    """A config the backend library refuses (UnsupportedVariant, or an error raised in onnxruntime's own code) is a
    refused candidate or step; an error of ptqflow's own (a KeyError in its code) stops the search instead of being
    recorded as the backend's refusal."""
    import onnxruntime

    from ptqflow.models.backends.base import UnsupportedVariant, backend_error

    spec = VariantSpec("ort-int8", "onnxruntime", OrtStaticConfig(weight_rounding="nearest"))
    start = Measurement(0.8, 0.90, 18.0, 1000)

    def library_refuses(variant: VariantSpec, limit):
        if variant.config.fp32_nodes:
            raise UnsupportedVariant("no FP32 nodes today")
        onnxruntime.InferenceSession(b"not a model", providers=["CPUExecutionProvider"])

    result = FallbackSearch(library_refuses, FallbackTarget(agreement=0.99), 0.8).run(spec, start, _diagnosis(),
                                                                                      inputs={})
    assert result.ranked and all(not r.measured and r.refused for r in result.ranked)
    reasons = {reason for r in result.ranked for reason in r.refused.values()}
    assert "UnsupportedVariant: no FP32 nodes today" in reasons
    assert any(reason.startswith(("InvalidProtobuf", "Fail", "InvalidArgument")) for reason in reasons), reasons

    def ptqflow_bug(variant: VariantSpec, limit):
        return {}["agreement"]  # what a bug in ptqflow's measuring code raises, not the library

    with pytest.raises(KeyError, match="agreement"):
        FallbackSearch(ptqflow_bug, FallbackTarget(agreement=0.99), 0.8).run(spec, start, _diagnosis(), inputs={})
    assert not backend_error(KeyError("agreement")) and backend_error(UnsupportedVariant("no"))


def test_equalization_is_chosen_where_it_repairs_the_outlier_channel_with_every_layer_in_int8(tracking_store,
                                                                                              outlier_model, cifar_dir):
    """What the fallback needs layers out of int8 for, the default sweep does by equalizing conv1 and conv2 (the
    outlier channel x64 / x1/64 is undone), chosen on held-out images and recorded on each run."""
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking import records

    result = run_sweep(SweepOptions(model_path=outlier_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    adaround_iterations=ADAROUND_ITERATIONS, variants=VARIANTS, bench=False,
                                    diagnose=False, register=False, target_agreement=TARGET, ranking_images=50,
                                    speed_check=False))
    by_name = {o.name: o for o in result.outcomes}
    assert list(by_name) == ["fp32", *VARIANTS]  # no variant needed a -mixed repair
    for name in VARIANTS:
        run = MlflowClient().get_run(by_name[name].run_id)
        params, metrics = run.data.params, run.data.metrics
        assert params[Param.EQUALIZATION_KEPT] == "on" and by_name[name].fidelity.top1_agreement >= TARGET, name
        assert metrics[Metric.VALIDATION_AGREEMENT_EQUALIZED] >= metrics[Metric.VALIDATION_AGREEMENT_UNEQUALIZED]
        assert "equalization on" in run.data.tags[Tag.EQUALIZATION_CHOICE]
        qconfig = json.loads(records.download_text(run.info.run_id, Artifact.QCONFIG))
        assert qconfig["config"]["equalization"] is True  # the model file's recipe
