"""Cross-layer equalization of MobileNet chains (issue 24 item 4): depthwise convolutions on either side of a pair,
ReLU6 written as Clip(0, 6) equalized only where calibration images stay below the bound, and the sweep option
(the per-variant choice on held-out images is tested with the rounding choice, tests/test_rounding_choice.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqflow.models.backends.equalization import HEADROOM, clip_maxima, equalize
from ptqflow.models.runtime.runners import OrtRunner

CHANNELS = 16


def _chain(activation: str, seed: int = 0, group: int = CHANNELS) -> onnx.ModelProto:
    """pointwise 3->16, activation, depthwise 3x3 (group 16; another group count makes it merely grouped),
    activation, pointwise 16->4, global average pool: weights with one channel far larger than the others."""
    rng = np.random.default_rng(seed)
    pw1 = rng.normal(0, 0.5, (CHANNELS, 3, 1, 1)).astype(np.float32)
    pw1[3] = np.abs(pw1[3]) * 20.0  # the outlier channel that sets the activation's range (and saturates ReLU6)
    dw = rng.normal(0, 0.5, (CHANNELS, CHANNELS // group, 3, 3)).astype(np.float32)
    dw[7] *= 0.05
    pw2 = rng.normal(0, 0.5, (4, CHANNELS, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((pw1, "pw1_w"), (dw, "dw_w"), (pw2, "pw2_w"))]
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), n) for n in ("pw1_b", "dw_b")]

    def act(source: str, name: str) -> list[onnx.NodeProto]:
        if activation == "Relu":
            return [helper.make_node("Relu", [source], [name], name=f"{name}_node")]
        return [helper.make_node("Clip", [source, "zero", "six"], [name], name=f"{name}_node")]

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes = [helper.make_node("Conv", ["x", "pw1_w", "pw1_b"], ["c1"], name="pw1"), *act("c1", "a1"),
             helper.make_node("Conv", ["a1", "dw_w", "dw_b"], ["c2"], name="dw", group=group, pads=[1, 1, 1, 1]),
             *act("c2", "a2"), helper.make_node("Conv", ["a2", "pw2_w"], ["c3"], name="pw2"),
             helper.make_node("GlobalAveragePool", ["c3"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["y"], name="flatten")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _images(count: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (count, 3, 8, 8)).astype(np.float32)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _outputs(model: onnx.ModelProto, images: np.ndarray, names: tuple[str, ...] = ("y",)) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n != "y")
    runner = OrtRunner(probe.SerializeToString())
    return runner.session.run(list(names), {runner.input_name: images})


def test_a_pointwise_depthwise_pointwise_chain_is_two_pairs_and_keeps_its_function():
    model = _chain("Relu")
    equalized, summary = equalize(model)
    assert summary.pairs == (("pw1", "dw"), ("dw", "pw2")) and not summary.skipped
    images = _images()
    np.testing.assert_allclose(_outputs(equalized, images)[0], _outputs(model, images)[0], rtol=1e-4, atol=1e-5)

    def spread(weights: np.ndarray) -> float:  # largest over smallest per-filter range
        ranges = np.abs(weights).reshape(weights.shape[0], -1).max(axis=1)
        return float(ranges.max() / ranges.min())

    # the depthwise filters, scaled from both sides, end up with far closer ranges than the outliers left them
    assert spread(_weight(equalized, "dw_w")) < spread(_weight(model, "dw_w")) / 3
    assert spread(_weight(equalized, "pw1_w")) < spread(_weight(model, "pw1_w")) / 3


def test_a_grouped_convolution_that_is_not_depthwise_is_left_alone_with_its_reason():
    model = _chain("Relu", group=4)
    equalized, summary = equalize(model)
    assert summary.pairs == ()
    assert {name for name, _ in summary.skipped} == {"pw1", "dw"}
    assert all("neither plain nor depthwise" in reason for _, reason in summary.skipped)
    assert [i.raw_data for i in equalized.graph.initializer] == [i.raw_data for i in model.graph.initializer]


def test_relu6_pairs_are_equalized_only_with_calibration_maxima_and_stay_below_the_bound():
    model, images = _chain("Clip"), _images(256)
    unchanged, summary = equalize(model)
    assert summary.pairs == () and len(summary.skipped) == 2
    assert all("Clip(0, 6)" in reason and "calibration" in reason for _, reason in summary.skipped)
    assert [i.raw_data for i in unchanged.graph.initializer] == [i.raw_data for i in model.graph.initializer]

    maxima = clip_maxima(model, images)
    assert set(maxima) == {"c1", "c2"} and maxima["c1"].shape == (CHANNELS,)
    equalized, summary = equalize(model, maxima=maxima)
    assert summary.pairs == (("pw1", "dw"), ("dw", "pw2"))
    held = {tensor: maxima[tensor] * HEADROOM >= 6.0 for tensor in ("c1", "c2")}
    assert summary.channels_held == sum(int(h.sum()) for h in held.values()) > 0  # the outlier channel saturates
    for pair, tensor in ((("pw1", "dw"), "c1"), (("dw", "pw2"), "c2")):
        scales = summary.scales[pair]
        np.testing.assert_array_equal(scales[held[tensor]], 1.0)  # a channel the clip bounds keeps its scale
        assert np.any(np.abs(scales[~held[tensor]] - 1.0) > 0.01)  # the others moved
    # rescaled channels stay below half the bound on these images, so the clip does the same as before
    after = dict(zip(("c1", "c2"), _outputs(equalized, images, ("c1", "c2"))))
    for tensor in ("c1", "c2"):
        rescaled = ~held[tensor]
        assert after[tensor].max(axis=(0, 2, 3))[rescaled].max() <= 6.0 / HEADROOM + 1e-4
    np.testing.assert_allclose(_outputs(equalized, images)[0], _outputs(model, images)[0], rtol=1e-4, atol=1e-5)


def test_the_sweep_option_fixes_equalization_or_leaves_it_to_the_held_out_images(tmp_path):
    from ptqflow.common.errors import ConfigError
    from ptqflow.pipelines.sweep.options import SweepOptions

    def options(**fields) -> SweepOptions:
        return SweepOptions(model_path=tmp_path / "model.onnx", data_dir=tmp_path, **fields)

    auto = options()
    assert auto.runner_options().choose_equalization
    assert not any(spec.config.equalization for spec in auto.specs())  # each variant starts from the model as given
    on, off = options(equalization="on"), options(equalization="off")
    assert all(spec.config.equalization for spec in on.specs()) and not on.runner_options().choose_equalization
    assert not any(spec.config.equalization for spec in off.specs()) and not off.runner_options().choose_equalization
    assert not options(validation_size=0).runner_options().choose_equalization  # no held-out images to choose on
    with pytest.raises(ConfigError, match="equalization"):
        options(equalization="sometimes")
