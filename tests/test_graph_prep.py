"""Unit tests of ptqflow.models.graph.fx_prep / ptqflow.models.adaround on small ONNX graphs (no /work/shared)."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
onnx2torch = pytest.importorskip("onnx2torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptqflow.models.backends.fx_qconfig import TOPK_ROWS, kth_largest, qconfig_mapping  # noqa: E402
from ptqflow.models.graph.fx_prep import classifier_head, prepare_graph  # noqa: E402

warnings.filterwarnings("ignore")
RNG = np.random.default_rng(0)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _convert(m):
    return onnx2torch.convert(m).eval()


def _targets(gm):
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def _check_equal(module, gm, x):
    with torch.no_grad():
        a, b = module(x), gm(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def _quantize(gm, x, backend="x86", float_head=False):
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    qm = qconfig_mapping(backend, float_modules=classifier_head(gm) if float_head else ())
    pm = prepare_fx(gm, qm, example_inputs=(x,))
    with torch.no_grad():
        pm(x)
    q = convert_fx(pm)
    tq = torch.jit.trace(q, (x,))
    return q, tq


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 0.3


def test_matmul_add_softmax_to_linear():
    m = _model(
        [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "b"], ["logits"], name="add"),
         helper.make_node("Softmax", ["logits"], ["y"], name="sm", axis=-1)],
        [_vi("x", [4, 8])], [_vi("y", [4, 5])], [_init("W", _w(8, 5)), _init("b", _w(5))])
    mod = _convert(m)
    gm = prepare_graph(mod)
    names = _targets(gm)
    assert "Linear" in names and "OnnxMatMul" not in names and "OnnxBinaryMathOperation" not in names
    assert not any(n.target in (torch.matmul,) for n in gm.graph.nodes)
    x = torch.randn(4, 8)
    _check_equal(mod, gm, x)
    # softmax stays float: the quantized graph dequantizes before it and returns probabilities
    q, tq = _quantize(gm, x)
    sm_node = [n for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target), torch.nn.Softmax)]
    assert sm_node and sm_node[0].args[0].target == "dequantize"
    out = tq(x)
    assert out.dtype == torch.float32 and torch.allclose(out.sum(1), torch.ones(4), atol=1e-5)


def test_asymmetric_pad_folded_into_conv_nhwc():
    # NHWC input, Transpose, TF-"SAME" stride-2 conv: Pad end-only, then Conv without pads
    m = _model(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
         helper.make_node("Pad", ["t", "pads"], ["p"], mode="constant"),
         helper.make_node("Conv", ["p", "W", "B"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["y"])],
        [_vi("x", [2, 8, 8, 3])], [_vi("y", [2, 4, 4, 4])],
        [_init("pads", np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)), _init("W", _w(4, 3, 3, 3)),
         _init("B", _w(4))])
    mod = _convert(m)
    gm = prepare_graph(mod)
    names = _targets(gm)
    assert not any("Pad" in n for n in names), names
    convs = [gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].padding == (1, 1) and convs[0].kernel_size == (4, 4)
    assert not any(n.op == "call_module" and "Transpose" in type(gm.get_submodule(n.target)).__name__
                   for n in gm.graph.nodes)
    x = torch.rand(2, 8, 8, 3) * 255
    _check_equal(mod, gm, x)
    q, tq = _quantize(gm, x)
    assert any(type(mm).__module__.startswith("torch.ao.nn.intrinsic.quantized") and "ConvReLU2d" in type(mm).__name__
               for mm in q.modules())


def test_symmetric_pad_folded_and_static_pad_op():
    m = _model(
        [helper.make_node("Pad", ["x"], ["p"], mode="constant", pads=[0, 0, 1, 2, 0, 0, 1, 2]),
         helper.make_node("Conv", ["p", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 1, 0])],
        [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 2, 8, 8])], [_init("W", _w(2, 3, 3, 3))], opset=10)
    mod = _convert(m)
    gm = prepare_graph(mod)
    convs = [mm for mm in gm.modules() if isinstance(mm, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].padding == (2, 2) and convs[0].kernel_size == (3, 3)
    assert not any("Pad" in n for n in _targets(gm))
    _check_equal(mod, gm, torch.randn(1, 3, 6, 6))


def test_nonzero_pad_value_not_folded():
    m = _model(
        [helper.make_node("Pad", ["x", "pads", "v"], ["p"], mode="constant"),
         helper.make_node("Conv", ["p", "W"], ["y"], kernel_shape=[3, 3])],
        [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 2, 6, 6])],
        [_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), _init("v", np.array(2.0, np.float32)),
         _init("W", _w(2, 3, 3, 3))])
    mod = _convert(m)
    gm = prepare_graph(mod)
    assert any("Pad" in n for n in _targets(gm))
    _check_equal(mod, gm, torch.randn(1, 3, 6, 6))


def test_pad_from_shape_ops_folded_with_example_input():
    # pads computed from Shape(x): end pad = 9 - H  (= 1 for 8x8 inputs), as exported by PyTorch
    m = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
         helper.make_node("Sub", ["nine", "h"], ["e"]),
         helper.make_node("Unsqueeze", ["e", "ax0"], ["e1"]),
         helper.make_node("Concat", ["zeros6", "e1", "e1"], ["pads"], axis=0),
         helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
         helper.make_node("Conv", ["p", "W"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
        [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 2, 4, 4])],
        [_init("i2", np.array(2, np.int64)), _init("nine", np.array(9, np.int64)),
         _init("ax0", np.array([0], np.int64)), _init("zeros6", np.zeros(6, np.int64)),
         _init("W", _w(2, 3, 3, 3))])
    mod = _convert(m)
    x = torch.randn(3, 3, 8, 8)
    gm0 = prepare_graph(mod)  # without example input: kept, still equal
    _check_equal(mod, gm0, x)
    gm = prepare_graph(mod, example_input=x)
    assert not any("Pad" in n or "Shape" in n for n in _targets(gm)), _targets(gm)
    _check_equal(mod, gm, x)
    _check_equal(mod, gm, torch.randn(5, 3, 8, 8))  # batch size is not baked in


def test_gemm_bn_gap_flatten_model():
    # PyTorch-export style: Conv, BatchNormalization, Relu, GlobalAveragePool, Flatten, Gemm(transB)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "Wd", "bd"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = [_init("W", _w(4, 3, 3, 3)), _init("g", np.abs(_w(4)) + 0.5), _init("beta", _w(4)),
             _init("mean", _w(4)), _init("var", np.abs(_w(4)) + 0.5), _init("Wd", _w(10, 4)),
             _init("bd", _w(1, 10))]  # 2-D bias: onnx2torch keeps OnnxGemm
    m = _model(nodes, [_vi("x", [2, 3, 8, 8])], [_vi("y", [2, 10])], inits)
    mod = _convert(m)
    gm = prepare_graph(mod)
    names = _targets(gm)
    assert "Linear" in names and "OnnxGemm" not in names, names
    assert not any("OnnxGlobalAveragePool" in n for n in names)
    x = torch.randn(2, 3, 8, 8)
    _check_equal(mod, gm, x)
    assert not gm.training
    q, tq = _quantize(gm, x, backend="fbgemm", float_head=True)
    with torch.no_grad():
        assert torch.allclose(tq(x), q(x))
    # head kept float -> output is a float Linear on dequantized features
    assert any(type(mm) is torch.nn.Linear for mm in q.modules())
    assert not any(type(mm).__name__.startswith("BatchNorm") for mm in q.modules())  # fused into conv


def test_residual_add_becomes_quantized_add_relu():
    m = _model(
        [helper.make_node("Conv", ["x", "W1"], ["a"], kernel_shape=[1, 1]),
         helper.make_node("Relu", ["a"], ["ar"]),
         helper.make_node("Conv", ["ar", "W2"], ["b"], kernel_shape=[1, 1]),
         helper.make_node("Add", ["ar", "b"], ["s"]),
         helper.make_node("Relu", ["s"], ["y"])],
        [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 3, 4, 4])], [_init("W1", _w(3, 3, 1, 1)), _init("W2", _w(3, 3, 1, 1))])
    mod = _convert(m)
    gm = prepare_graph(mod)
    x = torch.randn(1, 3, 4, 4)
    _check_equal(mod, gm, x)
    q, _ = _quantize(gm, x)
    assert any(n.target is torch.ops.quantized.add_relu for n in q.graph.nodes)


def _conv_relu_dense_model():
    """Conv (W) + ReLU + Flatten + MatMul (Wd): two layers for AdaRound."""
    return _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]),
         helper.make_node("MatMul", ["f", "Wd"], ["y"])],
        [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 5])], [_init("W", _w(4, 3, 3, 3)), _init("Wd", _w(64, 5))])


def test_adaround_grid_and_onnx_roundtrip():
    from ptqflow.models.adaround.grids import grid_params, quantize_weights_like
    from ptqflow.models.adaround.onnx import adaround_onnx

    w = torch.randn(4, 3, 3, 3)
    for scheme in ("per_channel_sym_int8", "per_tensor_asym_uint8", "per_tensor_sym_int8"):
        wq = quantize_weights_like(w, scheme)
        s, kmin, kmax = grid_params(wq, scheme)  # re-derived range must give the same grid
        k = wq.double() / s
        assert torch.allclose(k, k.round(), atol=1e-3) and (k.round() >= kmin).all() and (k.round() <= kmax).all()
    m = _conv_relu_dense_model()
    calib = RNG.standard_normal((16, 3, 4, 4)).astype(np.float32)
    m2 = adaround_onnx(m, calib, "per_channel_sym_int8", iters=20, batch=8)
    W2 = numpy_helper.to_array([i for i in m2.graph.initializer if i.name == "W"][0])
    s = np.abs(W2).reshape(4, -1).max(1) / 127
    k = W2 / s[:, None, None, None]
    assert np.allclose(k, np.round(k), atol=1e-3)
    Wd2 = numpy_helper.to_array([i for i in m2.graph.initializer if i.name == "Wd"][0])
    kd = Wd2 / (np.abs(Wd2).max(0) / 127)[None, :]  # MatMul weight: per output column
    assert np.allclose(kd, np.round(kd), atol=1e-3)


def test_classifier_head_kept_float_and_onnx_head_nodes():
    from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes

    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4], name="pool"),
         helper.make_node("Reshape", ["p", "shape"], ["f"], name="reshape"),
         helper.make_node("MatMul", ["f", "Wd"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "bd"], ["l"], name="bias"),
         helper.make_node("Softmax", ["l"], ["y"], axis=-1, name="sm")],
        [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 5])],
        [_init("W", _w(4, 3, 3, 3)), _init("shape", np.array([-1, 4], np.int64)), _init("Wd", _w(4, 5)),
         _init("bd", _w(5))])
    assert set(onnx_classifier_head_nodes(m)) == {"pool", "reshape", "mm", "bias", "sm"}
    mod = _convert(m)
    gm = prepare_graph(mod)
    x = torch.randn(2, 3, 4, 4)
    head = classifier_head(gm)
    assert any(isinstance(gm.get_submodule(h), torch.nn.Linear) for h in head)
    assert any(isinstance(gm.get_submodule(h), torch.nn.AvgPool2d) for h in head)
    _check_equal(mod, gm, x)
    q, tq = _quantize(gm, x, float_head=True)
    # conv+relu quantized, then dequantize -> float pool -> float reshape -> float Linear -> softmax
    assert any("ConvReLU2d" in type(mm).__name__ for mm in q.modules())
    lin = [n for n in q.graph.nodes if n.op == "call_module" and type(q.get_submodule(n.target)) is torch.nn.Linear]
    assert len(lin) == 1
    assert not any(n.op == "call_function" and n.target is torch.quantize_per_tensor
                   for n in q.graph.nodes if n.name.startswith("quantize_per_tensor") and n.args[0] in lin[0].all_input_nodes)
    with torch.no_grad():
        assert torch.allclose(tq(x), mod(x), atol=0.05)


@pytest.mark.parametrize("iters", [20, 120])
def test_adaround_reports_progress_in_steps_over_all_layers(iters):
    """AdaRound is the longest step of a cold sweep: its bar counts optimisation steps, with the total known."""
    from ptqflow.models.adaround.onnx import adaround_onnx

    m = _conv_relu_dense_model()
    calls = []
    adaround_onnx(m, RNG.standard_normal((16, 3, 4, 4)).astype(np.float32), "per_channel_sym_int8", iters=iters,
                  batch=8, advance=lambda n, total=None: calls.append((n, total)))
    assert calls[0] == (0, 2 * iters)  # two layers
    assert sum(n for n, _ in calls) == 2 * iters
    # Reported every 50 steps during a layer, plus the rest at its end: the bar moves while a layer runs.
    assert len(calls) == 1 + 2 * (1 + (iters - 1) // 50)


@pytest.mark.parametrize("values", ["relu", "negated_relu", "normal", "few_levels", "sorted", "one_outlier_row"])
@pytest.mark.parametrize("k", [1, 7, 83])
def test_kth_largest_is_exactly_topk(values, k):
    """The percentile observer's k-th largest equals torch.topk's on the shapes calibration feeds it: ties at zero
    (ReLU), few distinct levels, sorted values (all the top k in one row) and a length not a multiple of the rows."""
    generator = torch.Generator().manual_seed(k)
    n = 64 * TOPK_ROWS * 83 + 5
    x = {"relu": torch.relu(torch.randn(n, generator=generator)),
         "negated_relu": -torch.relu(torch.randn(n, generator=generator)),
         "normal": torch.randn(n, generator=generator),
         "few_levels": torch.randint(0, 3, (n,), generator=generator).float(),
         "sorted": torch.sort(torch.randn(n, generator=generator)).values,
         "one_outlier_row": torch.cat([torch.zeros(n - 3 * k), torch.full((3 * k,), 5.0)])}[values]
    for tensor in (x, -x):
        assert torch.equal(kth_largest(tensor, k), torch.topk(tensor, k).values.min())


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_pooling_is_part_of_the_float_head(keepdims):
    """Keras and TFLite exports pool with ReduceMean over H and W: it belongs to the float head like
    GlobalAveragePool (a quantized mean re-rounds the pooled features onto the grid of its input; on a
    MobileNetV1-style export that cost the FX variants 0.5-1.4 points of agreement)."""
    from ptqflow.models.adaround.onnx import onnx_classifier_head_nodes

    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=keepdims, name="mean"),
         *([helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flat")] if keepdims else []),
         helper.make_node("Gemm", ["f" if keepdims else "p", "Wd", "bd"], ["l"], transB=1, name="dense")],
        [_vi("x", [2, 3, 6, 6])], [_vi("l", [2, 5])],
        [_init("W", _w(4, 3, 3, 3)), _init("Wd", _w(5, 4)), _init("bd", _w(5))])
    assert {"mean", "dense"} <= set(onnx_classifier_head_nodes(m))
    mod = _convert(m)
    gm = prepare_graph(mod)
    x = torch.rand(2, 3, 6, 6) * 4
    head = classifier_head(gm)
    _check_equal(mod, gm, x)
    assert any(getattr(gm.get_submodule(h), "fn", None) is torch.mean for h in head), head
    q, tq = _quantize(gm, x, float_head=True)
    means = [n for n in q.graph.nodes if n.target is torch.mean]
    assert len(means) == 1
    # the mean reads the dequantized convolution output: it runs in float
    source = means[0].args[0]
    assert source.op == "call_method" and source.target == "dequantize", source
    with torch.no_grad():
        assert tq(x).shape == mod(x).shape == (2, 5)


def _keras_style_export(path: Path, opset: int) -> Path:
    """A torch.onnx.export of a Keras-style small CNN: TF "same" padding at stride 2 written as ZeroPad2d (exported
    at opset 11 as a Pad whose amounts are computed by ConstantOfShape/Concat/Slice/Cast nodes), a 1x1 convolution as
    the classifier and `x.reshape(x.shape[0], classes)` (Shape -> Gather -> Unsqueeze -> Concat) before softmax."""
    from torch import nn

    class KerasStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, 2), nn.ReLU6())
            self.depthwise = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, 2, groups=8), nn.ReLU6())
            self.pool = nn.AvgPool2d(4)
            self.classifier = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            x = self.classifier(self.pool(self.depthwise(self.stem(x))))
            return torch.softmax(x.reshape(x.shape[0], 3), 1)

    torch.manual_seed(0)
    torch.onnx.export(KerasStyle().eval(), torch.rand(1, 3, 16, 16), str(path), opset_version=opset, dynamo=False)
    return path


def test_plain_export_pads_and_batch_reshape_become_static(tmp_path):
    """The computed pad amounts fold into the convolutions, and the batch-carrying reshape becomes reshape(-1, 3):
    FX quantized the integer shape arithmetic like activations before ("Quantize only works on Float Tensor, got
    Long"), and a Pad it could not fold stayed an unquantized op between int8 layers."""
    m = onnx.load(str(_keras_style_export(tmp_path / "keras_style.onnx", opset=11)))
    assert {"Pad", "Shape", "Cast"} <= {n.op_type for n in m.graph.node}
    mod = _convert(m)
    x = torch.rand(1, 3, 16, 16)
    gm = prepare_graph(mod, example_input=x)
    assert not any(("Pad" in t or "Shape" in t or "Gather" in t or "Concat" in t) for t in _targets(gm)), _targets(gm)
    assert [n.args[1:] for n in gm.graph.nodes if n.target == "reshape"] == [(-1, 3)]
    _check_equal(mod, gm, x)
    _check_equal(mod, gm, torch.rand(4, 3, 16, 16))  # the batch size is not baked in
    _, tq = _quantize(gm, x, float_head=True)
    with torch.no_grad():
        assert tq(x).shape == (1, 3)


def test_what_follows_a_conv_classifier_stays_float(tmp_path):
    """Conv 1x1 -> Reshape -> Softmax (the head of Keras and TFLite MobileNets): the reshape and softmax after the
    classifier belong to the float head. Before, FX re-quantized the float logits at the reshape (percentile-clipped)
    and the probabilities at the output: probabilities on an 8-bit grid, mean KL from FP32 0.26 nats on a 96x96
    MobileNetV1 against 0.001 after."""
    mod = _convert(onnx.load(str(_keras_style_export(tmp_path / "keras_style.onnx", opset=13))))
    x = torch.rand(1, 3, 16, 16)
    gm = prepare_graph(mod, example_input=x)
    head = classifier_head(gm)
    assert len(head) >= 4, head  # pool, classifier, reshape, softmax
    q, tq = _quantize(gm, x, float_head=True)
    assert not [n for n in q.graph.nodes if n.target is torch.quantize_per_tensor
                and any(u.op == "output" for u in n.users)]
    images = torch.rand(200, 3, 16, 16)
    with torch.no_grad():
        probabilities = torch.cat([tq(images[i:i + 1]) for i in range(len(images))])
        reference = mod(images)
    assert len(torch.unique(probabilities)) > 256  # not on an 8-bit grid
    assert (probabilities.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_every_conv_shape_is_known_in_a_plain_opset_11_export(tmp_path):
    """ONNX shape inference knows no shape after a Pad whose amounts are computed; the speed check then timed no
    layer of such a model (a 96x96 MobileNetV1 kept its 40 µs int8 stem, 13 µs in FP32) and the MAC share was
    unknown. tensor_shapes falls back on onnxruntime's symbolic shape inference."""
    from ptqflow.models.backends.speed_check import conv_shapes
    from ptqflow.models.graph.layer_map import tensor_shapes

    m = onnx.load(str(_keras_style_export(tmp_path / "keras_style.onnx", opset=11)))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    shapes = tensor_shapes(m)
    assert [shapes[c.output[0]] for c in convs] == [[1, 8, 8, 8], [1, 8, 4, 4], [1, 3, 1, 1]]
    assert len(conv_shapes(m)) == 3


def test_a_model_whose_batch_of_one_is_baked_in_prepares_at_that_batch():
    """TFLite conversions with a fixed batch of 1 reshape to constant shapes such as [1, 4]: graph preparation ran
    the model at batch 2 and 3 to find batch-independent shape values and failed ("shape '[1, 4]' is invalid for
    input of size 8"), so every FX variant of such a model failed."""
    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Reshape", ["p", "shape"], ["f"]),
         helper.make_node("Gemm", ["f", "Wd", "bd"], ["l"], transB=1),
         helper.make_node("Softmax", ["l"], ["y"], axis=1)],
        [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 5])],
        [_init("W", _w(4, 3, 3, 3)), _init("shape", np.array([1, 4], np.int64)), _init("Wd", _w(5, 4)),
         _init("bd", _w(5))])
    mod = _convert(m)
    x = torch.rand(1, 3, 8, 8)
    gm = prepare_graph(mod, example_input=x)
    _check_equal(mod, gm, x)
    _, tq = _quantize(gm, x, float_head=True)
    with torch.no_grad():
        assert tq(x).shape == (1, 5)


def test_an_asymmetric_max_pool_quantizes_without_its_infinite_pad():
    """onnx2torch writes a MaxPool with asymmetric pads (Keras "same" pooling) as a -inf constant pad before it;
    FX observed the -inf and every quantized value after it was wrong (relative error 1.7). The pad replicates the
    edge instead: the same maxima in float, and a quantized error of a few percent."""
    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
         helper.make_node("Conv", ["p", "W2"], ["y"], kernel_shape=[1, 1])],
        [_vi("x", [2, 3, 8, 8])], [_vi("y", [2, 4, 4, 4])],
        [_init("W", _w(4, 3, 3, 3)), _init("W2", _w(4, 4, 1, 1))])
    mod = _convert(m)
    x = torch.randn(2, 3, 8, 8)
    gm = prepare_graph(mod, example_input=x)
    assert "ReplicationPad2d" in _targets(gm), _targets(gm)
    _check_equal(mod, gm, x)
    q, _ = _quantize(gm, x)
    with torch.no_grad():
        reference, quantized = mod(x), q(x)
    assert float((reference - quantized).abs().max() / reference.abs().max()) < 0.1


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_an_asymmetric_average_pool_converts_and_quantizes(count_include_pad):
    """onnx2torch refuses an AveragePool padded more at one end ("AvgPool with non symmetrical padding is not
    implemented"), which stopped the whole sweep at its FP32 conversion. ptqflow's conversion writes it as a zero
    Pad, the pool unpadded and, when padding does not count, a constant Mul by each window's coverage: the same
    function, which FX then quantizes."""
    import onnxruntime as ort

    from ptqflow.models.graph.onnx2torch_import import convert

    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0],
                          count_include_pad=count_include_pad),
         helper.make_node("Conv", ["p", "W2"], ["y"], kernel_shape=[1, 1])],
        [_vi("x", [2, 3, 9, 8])], [_vi("y", [2, 4, 4, 4])],
        [_init("W", _w(4, 3, 3, 3)), _init("W2", _w(4, 4, 1, 1))], opset=11)
    with pytest.raises(NotImplementedError, match="non symmetrical"):
        onnx2torch.convert(m)
    x = torch.rand(2, 3, 9, 8)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    mod = convert(m).eval()
    with torch.no_grad():
        np.testing.assert_allclose(mod(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    gm = prepare_graph(mod, example_input=x)
    _check_equal(mod, gm, x)
    q, _ = _quantize(gm, x)
    with torch.no_grad():
        reference, quantized = mod(x), q(x)
    assert float((reference - quantized).abs().max() / reference.abs().max()) < 0.1


def test_global_max_pool_converts_and_quantizes():
    """onnx2torch has no GlobalMaxPool (Keras GlobalMaxPooling2D): ptqflow's converter pools with
    AdaptiveMaxPool2d, which FX quantizes like the other pools."""
    import onnxruntime as ort

    from ptqflow.models.graph.onnx2torch_import import convert

    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalMaxPool", ["r"], ["p"]),
         helper.make_node("Conv", ["p", "W2"], ["y"], kernel_shape=[1, 1])],
        [_vi("x", [2, 3, 8, 8])], [_vi("y", [2, 4, 1, 1])],
        [_init("W", _w(4, 3, 3, 3)), _init("W2", _w(4, 4, 1, 1))])
    x = torch.rand(2, 3, 8, 8)
    expected = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    mod = convert(m).eval()
    assert "AdaptiveMaxPool2d" in _targets(mod)
    with torch.no_grad():
        np.testing.assert_allclose(mod(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    gm = prepare_graph(mod, example_input=x)
    q, _ = _quantize(gm, x)
    with torch.no_grad():
        reference, quantized = mod(x), q(x)
    assert float((reference - quantized).abs().max() / reference.abs().max()) < 0.1
