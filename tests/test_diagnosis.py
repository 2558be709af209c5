"""Issue 11, sections 1 and 2: the per-layer diagnosis and the repairs, on a CNN with a function-preserving outlier
channel (one conv's output channel x64 and the next conv's matching input channel x1/64, across a ReLU).

The model's first conv has every output channel at the same weight range and the second every input channel at the
same range, as a well-conditioned model would: the outlier is its only defect. Equalization is invariant to positive
per-channel rescaling of a pair, so it must give the outlier model and the clean one the same weights back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cifar_fixture import make_images
from onnx_fixture import FACTOR, OUTLIER_CHANNEL, WIDTH, outlier_cnn
from ptqflow.models.backends.base import FloatModel
from ptqflow.models.diagnosis.fx import diagnose_fx
from ptqflow.models.diagnosis.ort import diagnose_ort_config
from ptqflow.models.diagnosis.records import BAD_LOCAL_DB
from ptqflow.models.backends.equalization import equalize
from ptqflow.models.graph.layer_map import layer_table
from ptqflow.models.graph.onnx_model import load_classifier
from ptqflow.models.backends.ort import OrtStaticConfig
from ptqflow.models.backends.pytorch_fx import PytorchFxConfig
from ptqflow.pipelines.variants.specs import config_payload

# nearest rounding: AdaRound has its own tests, and the repairs must show without it; every convolution in int8
# (each speed check keeps the fixtures' 3-channel stems in FP32 on a CPU whose int8 kernels are slow for them:
# tests/test_speed_check.py, tests/test_fx_speed_check.py)
FX = PytorchFxConfig(weight_rounding="nearest", speed_check=False)
ORT = OrtStaticConfig(weight_rounding="nearest", speed_check=False)


@pytest.fixture(scope="module")
def images():
    """Model-ready NHWC images: 100 to calibrate, 400 to diagnose and measure agreement on."""
    rng = np.random.default_rng(0)
    pixels = make_images(np.repeat(np.arange(10), 50), rng).reshape(-1, 3, 32, 32)
    nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1).astype(np.float32))
    return nhwc[:100], nhwc[100:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"clean": FloatModel, "outlier": FloatModel}, as a sweep's quantizers start from them."""
    root = tmp_path_factory.mktemp("outlier")
    result = {}
    for name in ("clean", "outlier"):
        path = root / f"{name}.onnx"
        onnx.save(outlier_cnn(outlier=name == "outlier"), str(path))
        result[name] = FloatModel.for_runtimes(load_classifier(path), root / name).for_quantization()
    return result


def agreement(float_model: FloatModel, config, calibration, test, out_dir: Path) -> float:
    """Top-1 agreement with the FP32 model of `float_model` quantized with `config`, in its own runtime."""
    from ptqflow.models.backends import ort as quantize_ort
    from ptqflow.models.backends import pytorch_fx as quantize_pytorch
    from ptqflow.models.runtime.runners import OrtRunner, TorchRunner

    if isinstance(config, PytorchFxConfig):
        quantized = quantize_pytorch.quantize(float_model, config, calibration, out_dir)
        runner = TorchRunner.from_torchscript(quantized.path, config.backend)
    else:
        quantized = quantize_ort.quantize(float_model, config, calibration, out_dir)
        runner = OrtRunner(quantized.path)
    reference = OrtRunner(float_model.onnx.path).predict(test)
    return float(np.mean(reference.argmax(axis=1) == runner.predict(test).argmax(axis=1)))


# ---- equalization ---------------------------------------------------------------------------------------------
def test_equalization_is_function_preserving_and_undoes_the_outlier(images, tmp_path):
    from ptqflow.models.backends.equalization import equalize_file
    from ptqflow.models.runtime.runners import OrtRunner

    _, test = images
    outlier = outlier_cnn(outlier=True)
    onnx.save(outlier, str(tmp_path / "outlier.onnx"))
    path, summary = equalize_file(tmp_path / "outlier.onnx", tmp_path / "equalized.onnx")
    equalized = onnx.load(str(path))
    assert summary.pairs == (("conv1", "conv2"),)
    assert summary.max_scale / summary.min_scale > FACTOR / 2  # the outlier channel got its own scale
    before = OrtRunner(outlier.SerializeToString()).predict(test)
    after = OrtRunner(equalized.SerializeToString()).predict(test)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-6)
    # invariant to the outlier's rescaling: the same weights as the equalized clean model
    clean, _ = equalize(outlier_cnn(outlier=False))
    weights = {init.name: numpy_helper.to_array(init) for init in clean.graph.initializer}
    for init in equalized.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(init), weights[init.name], rtol=1e-4, atol=1e-7)
    # the input model is left alone, and names stay (weight-by-name tools must still pair them)
    assert {i.name for i in equalized.graph.initializer} == {i.name for i in outlier.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(outlier.graph.initializer[0]),
                                  numpy_helper.to_array(outlier_cnn(outlier=True).graph.initializer[0]))


def test_equalization_leaves_a_relu_with_two_readers_alone():
    model = outlier_cnn(outlier=True)
    # r1 also feeds a residual Add: rescaling its channels would change the Add's input
    model.graph.node.insert(4, helper.make_node("Add", ["c2", "r1_pooled"], ["c2_res"], name="residual"))
    model.graph.node.insert(4, helper.make_node("MaxPool", ["r1"], ["r1_pooled"], kernel_shape=[2, 2],
                                                strides=[2, 2], name="pool_r1"))
    model.graph.node[6].input[0] = "c2_res"  # relu2 now reads the sum
    onnx.checker.check_model(model)
    equalized, summary = equalize(model)
    assert summary.pairs == ()
    assert summary.skipped and summary.skipped[0][0] == "conv1" and "read by 2 nodes" in summary.skipped[0][1]
    assert [i.raw_data for i in equalized.graph.initializer] == [i.raw_data for i in model.graph.initializer]


def test_layer_table_names_layers_by_onnx_node_with_their_macs():
    layers = {layer.name: layer for layer in layer_table(outlier_cnn(outlier=False))}
    assert list(layers) == ["conv1", "conv2", "dense"]
    assert layers["conv1"].nodes == ("conv1", "relu1") and layers["conv1"].output == "r1"
    assert layers["conv2"].input == "r1" and layers["conv2"].weight == "w2"
    assert layers["conv1"].macs == WIDTH * 32 * 32 * 3 * 3 * 3
    assert layers["conv2"].macs == WIDTH * 16 * 16 * WIDTH * 3 * 3
    assert layers["dense"].macs == 10 * WIDTH * 8 * 8


# ---- diagnosis ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diagnoses(models, images, tmp_path_factory):
    """{(model, backend): Diagnosis} of the default-like configs on both models."""
    calibration, test = images
    work = tmp_path_factory.mktemp("diagnoses")
    result = {}
    for name, model in models.items():
        result[(name, "fx")] = diagnose_fx(model, model, FX, calibration, test)
        result[(name, "ort")] = diagnose_ort_config(model, model, ORT, calibration, test, work / name)
    return result


@pytest.mark.parametrize("backend", ["fx", "ort"])
def test_diagnosis_ranks_the_outlier_activation_worst(diagnoses, backend):
    diagnosis = diagnoses[("outlier", backend)]
    worst = diagnosis.worst_first()[0]
    assert (worst.layer, worst.op_type, worst.input_tensor) == ("conv2", "Conv", "r1")
    assert worst.outlier_channel == OUTLIER_CHANNEL and worst.input_range_ratio > FACTOR / 4
    assert worst.local_sqnr_db < BAD_LOCAL_DB
    assert "one channel" in worst.hint and "equalization" in worst.hint and "r1" in worst.hint
    clean = diagnoses[("clean", backend)].row("conv2")
    assert clean.local_sqnr_db > worst.local_sqnr_db + 10 and not clean.hint
    # accumulated at conv2's output includes conv1's loss too; weights are quantized per channel and fine
    assert worst.accumulated_sqnr_db <= worst.local_sqnr_db + 0.5
    assert worst.weight_sqnr_db > 35
    dense = diagnosis.row("dense")  # the float head stays FP32: compared, but no weight or local SQNR
    assert not dense.quantized and dense.local_sqnr_db is None and dense.accumulated_sqnr_db is not None
    assert "classifier head" in dense.float_reason  # the table says why it is in float
    assert sum(r.mac_share for r in diagnosis.layers) == pytest.approx(1.0)


def test_both_backends_measure_the_same_thing(diagnoses):
    """Local SQNR has one meaning on both backends (FP32 input, the layer's own input quantization included)."""
    for name in ("clean", "outlier"):
        fx, ort = diagnoses[(name, "fx")], diagnoses[(name, "ort")]
        for layer in ("conv1", "conv2"):
            assert fx.row(layer).local_sqnr_db == pytest.approx(ort.row(layer).local_sqnr_db, abs=1.0)
            assert fx.row(layer).weight_sqnr_db == pytest.approx(ort.row(layer).weight_sqnr_db, abs=0.1)


def test_diagnosis_files_are_worst_first(diagnoses):
    diagnosis = diagnoses[("outlier", "ort")]
    lines = diagnosis.to_csv().splitlines()
    assert lines[0].startswith("layer,op_type,mac_share,weight_sqnr_db,local_sqnr_db,accumulated_sqnr_db")
    assert lines[1].startswith("conv2,Conv,")
    payload = json.loads(diagnosis.to_json())
    assert payload["backend"] == "onnxruntime" and payload["images"] == 400
    assert [row["layer"] for row in payload["layers"]][0] == "conv2"


def test_diagnosis_round_trips_through_its_json_and_plots_worst_first(diagnoses):
    from ptqflow.models.diagnosis.records import Diagnosis
    from ptqflow.pipelines.reports.diagnosis import backend_comparison_figure, layer_sqnr_figure

    diagnosis = diagnoses[("outlier", "fx")]
    assert Diagnosis.from_dict(json.loads(diagnosis.to_json())) == diagnosis
    figure = layer_sqnr_figure(diagnosis, "outlier")
    ax = figure.axes[0]
    assert ax.get_yticklabels()[0].get_text().startswith("conv2")  # worst on top
    assert {patch.get_gid() for patch in ax.patches} >= {"local", "accumulated"}
    assert "bad-limit" in {line.get_gid() for line in ax.get_lines()}
    compared = backend_comparison_figure({"fx": diagnosis, "ort": diagnoses[("outlier", "ort")]}, "both")
    gids = {line.get_gid() for ax in compared.axes for line in ax.get_lines()}
    assert {"local:fx", "local:ort", "accumulated:fx", "accumulated:ort", "bad-limit"} <= gids


@pytest.mark.parametrize("config", [replace(FX, fp32_modules=("conv2",)), replace(ORT, fp32_nodes=("conv2",))],
                         ids=["fx", "ort"])
def test_a_layer_kept_in_fp32_is_shown_as_such(models, images, tmp_path, config):
    calibration, test = images
    if isinstance(config, PytorchFxConfig):
        diagnosis = diagnose_fx(models["outlier"], models["outlier"], config, calibration, test[:64])
    else:
        diagnosis = diagnose_ort_config(models["outlier"], models["outlier"], config, calibration, test[:64], tmp_path)
    conv2 = diagnosis.row("conv2")
    assert not conv2.quantized and conv2.local_sqnr_db is None and conv2.weight_sqnr_db is None and not conv2.hint
    assert conv2.float_reason == "kept in FP32 by the recipe (its FP32 layers)"
    assert diagnosis.row("conv1").quantized and diagnosis.worst_first()[0].layer == "conv1"


def test_a_qoperator_variant_is_diagnosed_through_its_qdq_twin(models, images, tmp_path):
    calibration, test = images
    config = OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8", weight_dtype="int8",
                             weight_rounding="nearest", speed_check=False)
    diagnosis = diagnose_ort_config(models["outlier"], models["outlier"], config, calibration, test[:64], tmp_path)
    assert diagnosis.method.startswith("QDQ twin of this QOperator model")
    assert diagnosis.worst_first()[0].layer == "conv2"



def test_a_twin_identical_to_a_diagnosed_qdq_file_reuses_its_diagnosis(models, images, tmp_path):
    calibration, test = images
    model = models["outlier"]
    qdq = OrtStaticConfig(quant_format="QDQ", activation_dtype="uint8", weight_dtype="int8",
                          weight_rounding="nearest", speed_check=False)
    qoperator = replace(qdq, quant_format="QOperator")
    memo = {}
    first = diagnose_ort_config(model, model, qdq, calibration, test[:64], tmp_path / "a", memo=memo)
    reused = diagnose_ort_config(model, model, qoperator, calibration, test[:64], tmp_path / "b", memo=memo)
    assert len(memo) == 1  # the twin hashed to the diagnosed file
    assert reused.layers == first.layers and reused.method.startswith("QDQ twin of this QOperator model")
    assert first.method.startswith("onnxruntime.quantization.qdq_loss_debug")
    # the same result as diagnosing the twin on its own
    assert diagnose_ort_config(model, model, qoperator, calibration, test[:64], tmp_path / "c").layers == first.layers
    # other bytes (per-tensor weights) or other images are diagnosed anew
    diagnose_ort_config(model, model, replace(qoperator, per_channel=not qdq.per_channel), calibration, test[:64],
                        tmp_path / "d", memo=memo)
    diagnose_ort_config(model, model, qoperator, calibration, test[:32], tmp_path / "e", memo=memo)
    assert len(memo) == 3

# ---- repairs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [FX, ORT], ids=["fx", "ort"])
def test_repairs_restore_agreement(models, images, tmp_path, config):
    calibration, test = images
    fp32_layers = {"fp32_modules" if isinstance(config, PytorchFxConfig) else "fp32_nodes": ("conv1", "conv2")}
    measured = {label: agreement(models[model], cfg, calibration, test, tmp_path / label) for label, model, cfg in (
        ("clean", "clean", config),
        ("outlier", "outlier", config),
        ("equalized", "outlier", replace(config, equalization=True)),
        ("fp32 layers", "outlier", replace(config, **fp32_layers)),
    )}
    assert measured["outlier"] < measured["clean"] - 0.03, measured  # the outlier costs agreement
    assert measured["equalized"] >= measured["clean"] - 0.01, measured
    assert measured["equalized"] >= measured["outlier"] + 0.03, measured
    assert measured["fp32 layers"] >= measured["outlier"] + 0.03, measured


def test_16_bit_activations_on_the_outlier_tensor_improve_agreement(models, images, tmp_path):
    calibration, test = images
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime warns that it moves the model to opset 21
    plain = agreement(models["outlier"], ORT, calibration, test, tmp_path / "int8")
    wide = agreement(models["outlier"], replace(ORT, activation_16bit_tensors=("r1",)), calibration, test,
                     tmp_path / "int16")
    assert wide >= plain + 0.02, (plain, wide)
    # no 8-bit rounding between conv1 and conv2: conv1's own output (before the Relu, if that is kept) is 16-bit too
    quantized = onnx.load(str(tmp_path / "int16" / "model.onnx"))
    zero_points = {i.name: i.data_type for i in quantized.graph.initializer}
    widths = {node.input[0]: zero_points[node.input[2]] for node in quantized.graph.node
              if node.op_type == "QuantizeLinear"}
    conv1 = next(node for node in quantized.graph.node if node.name == "conv1")
    assert widths[conv1.output[0]] == widths["r1"] == TensorProto.INT16
    assert widths.get("c1", TensorProto.INT16) == TensorProto.INT16
    assert widths["x_nchw"] == TensorProto.INT8  # converted to 16 bits for conv1, but rounded to 8 bits first


def test_repairs_are_recorded_in_the_config(tmp_path):
    ort = replace(ORT, equalization=True, activation_16bit_tensors=("r1",), fp32_nodes=("conv2",))
    fx = replace(FX, equalization=True, fp32_modules=("conv2",))
    for config, keys in ((ort, ("equalization", "activation_16bit_tensors", "fp32_nodes")),
                         (fx, ("equalization", "fp32_modules"))):
        payload = json.loads(json.dumps(config_payload(config)))  # what qconfig.json holds
        assert {k: payload[k] for k in keys} == {k: json.loads(json.dumps(asdict(config)[k])) for k in keys}
        assert type(config).from_dict(payload) == config
        assert "equalization" in config.qconfig_summary() and "FP32 layers: conv2" in config.qconfig_summary()
    assert "16-bit activations: r1" in ort.qconfig_summary()


def test_bad_repair_options_are_refused(models, images, tmp_path):
    calibration, _ = images
    from ptqflow.models.backends import ort as quantize_ort
    from ptqflow.models.backends import pytorch_fx as quantize_pytorch

    with pytest.raises(ValueError, match="needs quant_format QDQ"):
        OrtStaticConfig(quant_format="QOperator", activation_16bit_tensors=("r1",))
    with pytest.raises(ValueError, match="no node named 'conv9'"):
        quantize_ort.quantize(models["clean"], replace(ORT, fp32_nodes=("conv9",)), calibration, tmp_path / "a")
    with pytest.raises(ValueError, match="no node named 'conv9'"):
        quantize_pytorch.quantize(models["clean"], replace(FX, fp32_modules=("conv9",)), calibration, tmp_path / "b")
    with pytest.raises(ValueError, match="no activation tensor 'nope'"):
        quantize_ort.quantize(models["clean"], replace(ORT, activation_16bit_tensors=("nope",)), calibration,
                              tmp_path / "c")


def test_equalization_comes_before_adaround(models, images):
    calibration, _ = images
    config = PytorchFxConfig(equalization=True)  # adaround by default
    source = models["outlier"].for_config(config, calibration, "digest", iterations=2)
    assert source.equalization is not None and source.equalization.pairs == (("conv1", "conv2"),)
    assert source.adaround_scheme == "per_channel_sym_int8"
    rounded = models["outlier"].with_adarounded_weights("per_channel_sym_int8", calibration, "digest", iterations=2)
    with pytest.raises(ValueError, match="before AdaRound"):
        rounded.ready_for(config)


# ---- ptqflow diagnose -------------------------------------------------------------------------------------------
def test_diagnose_command_reads_a_sweep_back_and_logs_the_tables(tracking_store, tiny_model, cifar_dir, tmp_path):
    """One small sweep (an FX, a QDQ and a QOperator variant); `diagnose` on the sweep run finds each variant's model,
    data, calibration and config from the runs, prints the tables, writes and logs the files; a registered version
    names its source run."""
    from conftest import ADAROUND_ITERATIONS, CALIBRATION_SIZE
    from typer.testing import CliRunner

    from ptqflow.pipelines.cli.app import app
    from ptqflow.pipelines.sweep.options import SweepOptions
    from ptqflow.pipelines.sweep.sweep import run_sweep
    from ptqflow.tracking import records
    from ptqflow.tracking.keys import Artifact

    result = run_sweep(SweepOptions(model_path=tiny_model, data_dir=cifar_dir, calibration_size=CALIBRATION_SIZE,
                                    variants=("pytorch-fx-int8", "ort-int8", "ort-uint8"), bench=False,
                                    adaround_iterations=ADAROUND_ITERATIONS))
    out = tmp_path / "out"
    invoked = CliRunner().invoke(app, ["diagnose", result.parent_run_id, "--images", "64", "--output", str(out),
                                       "--log", "--adaround-iterations", str(ADAROUND_ITERATIONS)])
    assert invoked.exit_code == 0, invoked.output
    for variant in ("pytorch-fx-int8", "ort-int8", "ort-uint8"):
        assert f"{variant} (run " in invoked.stdout
    assert "Conv_1" in invoked.stdout and "Conv_3" in invoked.stdout
    assert "the diagnosis is the logged model's" in invoked.stdout  # FX re-quantized exactly
    assert "QDQ twin" in invoked.stdout
    by_variant = {o.name: o for o in result.outcomes}
    for variant in ("pytorch-fx-int8", "ort-int8", "ort-uint8"):
        run_id = by_variant[variant].run_id
        directory = out / f"{variant}-{run_id[:8]}"
        assert sorted(p.name for p in directory.iterdir()) == ["layer_sqnr.png", "layers.csv", "layers.json"]
        logged = json.loads(records.download_text(run_id, Artifact.DIAGNOSIS_JSON))
        assert logged["variant"] == variant and logged["images"] == 64
        assert {row["layer"] for row in logged["layers"]} == {"Conv_1", "Conv_3", "MatMul_7"}
        assert records.download_text(run_id, Artifact.DIAGNOSIS_CSV) == (directory / "layers.csv").read_text()
    assert (out / f"sweep-{result.parent_run_id[:8]}-backends.png").is_file()
    assert records.download_artifact(result.parent_run_id, Artifact.DIAGNOSIS_BACKENDS_PLOT, tmp_path / "dl").is_file()
    # a registered version diagnoses the run it came from
    version = next(v for v in result.registered if v.name.endswith("-onnx"))
    again = CliRunner().invoke(app, ["diagnose", f"{version.name}/{version.version}", "--images", "32", "--output",
                                     str(tmp_path / "again"), "--adaround-iterations", str(ADAROUND_ITERATIONS)])
    assert again.exit_code == 0, again.output
    assert f"{version.tags['variant']} (run {version.run_id[:8]})" in again.stdout
    # the FP32 run is the reference, not something to diagnose
    refused = CliRunner().invoke(app, ["diagnose", by_variant["fp32"].run_id])
    assert refused.exit_code != 0 and "FP32 reference" in refused.stderr


def test_uint8_weights_are_dequantized_without_wrapping_around(models, images, tmp_path):
    """onnxruntime's create_weight_matching subtracts a uint8 zero point in uint8; the diagnosis must not report the
    wrapped-around values as weight noise (ort-uint8 on ResNet8 read -17 dB)."""
    calibration, test = images
    # every convolution in int8, whatever this CPU's kernels cost (the speed check could keep them all in FP32)
    config = OrtStaticConfig(quant_format="QOperator", activation_dtype="uint8", weight_dtype="uint8",
                             per_channel=False, weight_rounding="nearest", speed_check=False)
    diagnosis = diagnose_ort_config(models["clean"], models["clean"], config, calibration, test[:64], tmp_path)
    weights = [row.weight_sqnr_db for row in diagnosis.layers if row.weight_sqnr_db is not None]
    assert weights and min(weights) > 20  # 8-bit per-tensor weights of a small CNN: well above 20 dB
    assert not any("weights lose precision" in row.hint for row in diagnosis.layers)
