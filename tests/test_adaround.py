"""AdaRound guards (issue 10 §7).

1. AdaRound beats round-to-nearest where it should: on the fitted tiny model, with the sweep's default number of
   steps, every conv layer reconstructs its FP32 output better on the calibration set, and the fake-quantized model
   agrees with FP32 at least as often on the test images (onnxruntime).
2. Both backends reproduce the integers AdaRound chose: the int8/uint8 weights inside the ONNX Runtime QDQ and
   QOperator models and inside the FX TorchScript models, times their scales, are the AdaRounded FP32 weights.
3. The fast path optimises the same thing (issue 13): the quadratic form is the reconstruction error, a layer is
   never worse than nearest on it, a settled layer stops early with the full schedule's result, and schemes
   computed together equal each computed alone.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import onnx
import pytest
import torch
from conftest import CALIBRATION_SIZE
from onnx import numpy_helper
from torch import nn

SCHEMES = ("per_channel_sym_int8", "per_tensor_asym_uint8")


def _sweep_default_iterations() -> int:
    from ptqflow.pipelines.sweep.options import SweepOptions

    return next(f.default for f in dataclasses.fields(SweepOptions) if f.name == "adaround_iterations")


# Part 1 runs AdaRound as the sweep does by default (1000 steps per layer): the numbers that ship are the ones guarded.
# A second or two per scheme on the tiny model.
COMPARISON_ITERATIONS = _sweep_default_iterations()
# Part 2 only needs AdaRound to move some weights off nearest rounding (asserted), so the backends have non-trivial
# integers to reproduce.
BACKEND_ITERATIONS = 200


# --------------------------------------------------------------------------- shared inputs
def _one_torch_thread():
    """AdaRound's many small steps on the tiny model: on a busy 2-core machine two torch threads made 200 steps take
    43 s instead of 4 s (spinning threads fighting for the cores). One thread, restored afterwards."""
    from ptqflow.models.adaround.optimize import torch_threads

    return torch_threads(1)


def _grid_steps_off(w: np.ndarray, scheme: str) -> float:
    """How far (in grid steps) the farthest element of `w` is from `scheme`'s grid as computed from `w` itself."""
    from ptqflow.models.adaround.grids import grid_params

    scale, _, _ = grid_params(torch.from_numpy(np.array(w)), scheme)
    k = w.astype(np.float64) / scale.numpy()
    return float(np.abs(k - np.round(k)).max())


def _integers_differing(a: np.ndarray, b: np.ndarray, original: np.ndarray, scheme: str) -> int:
    """How many grid integers differ between two roundings `a` and `b` of `original` (not float bits: the same
    integer can come out one float32 ulp apart)."""
    from ptqflow.models.adaround.grids import grid_params

    scale = grid_params(torch.from_numpy(np.array(original)), scheme)[0].numpy()
    return int((np.round(a.astype(np.float64) / scale) != np.round(b.astype(np.float64) / scale)).sum())


@pytest.fixture(scope="module")
def data(cifar_dir):
    """(calibration, calibration digest, test images), model-ready (NHWC float32 0..255) as the sweep builds them."""
    from ptqflow.pipelines.data.calibration import indices_digest, stratified_indices
    from ptqflow.pipelines.data.cifar import load_cifar10
    from ptqflow.pipelines.data.preprocessing import InputTransform

    dataset = load_cifar10(cifar_dir)
    transform = InputTransform("NHWC")
    indices = stratified_indices(dataset.train.labels, CALIBRATION_SIZE, seed=0)
    return transform(dataset.train.images[indices]), indices_digest(indices), transform(dataset.test.images)


def _graph_module(proto: onnx.ModelProto):
    """The torch graph AdaRound itself works on (ptqflow.models.adaround.onnx.adaround_onnx)."""
    import onnx2torch

    from ptqflow.models.graph.fx_prep import prepare_graph

    return prepare_graph(onnx2torch.convert(proto), fold_pad=False)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _conv_weight_names(proto: onnx.ModelProto) -> list[str]:
    return [node.input[1] for node in proto.graph.node if node.op_type == "Conv"]


def _predict(proto: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0].argmax(axis=1)


# --------------------------------------------------------------------------- 1. AdaRound vs nearest
def _nearest_onnx(proto: onnx.ModelProto, scheme: str) -> onnx.ModelProto:
    """Every Conv/MatMul/Gemm weight snapped to the nearest point of `scheme`'s grid (output channels on dim 0 in
    torch layout, as AdaRound and the backends see them)."""
    from ptqflow.models.adaround.grids import quantize_weights_like

    def nearest(w: np.ndarray) -> np.ndarray:
        return quantize_weights_like(torch.from_numpy(np.array(w)), scheme).numpy()

    out = copy.deepcopy(proto)
    inits = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
            a.name == "transB" and a.i for a in node.attribute))  # weight stored as [in, out]
        q = nearest(w.T).T if transposed else nearest(w)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q, dtype=np.float32),
                                                             node.input[1]))
    return out


def _layer_outputs(gm, images: np.ndarray) -> dict[str, torch.Tensor]:
    """Each Conv2d module's output on `images`, its input coming from the same model's (rounded) earlier layers."""
    outputs, hooks = {}, []
    for name, module in gm.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, inputs, output, name=name: outputs.__setitem__(name, output.detach())))
    with torch.no_grad():
        gm(torch.from_numpy(images))
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.fixture(scope="module")
def rounding(tiny_model, data):
    """scheme -> (fp32, AdaRound, nearest) ONNX models of the fitted tiny CNN; each scheme computed once."""
    from ptqflow.models.adaround.onnx import adaround_onnx

    fp32 = onnx.load(str(tiny_model))
    calibration = data[0]

    @functools.lru_cache(maxsize=None)
    def get(scheme: str):
        with _one_torch_thread():
            rounded = adaround_onnx(fp32, calibration, scheme, iters=COMPARISON_ITERATIONS)
        return fp32, rounded, _nearest_onnx(fp32, scheme)

    return get


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaround_reconstructs_every_conv_layer_better_than_nearest(rounding, data, scheme):
    fp32, adarounded, nearest = rounding(scheme)
    calibration = data[0]
    original, ada_w, near_w = _initializers(fp32), _initializers(adarounded), _initializers(nearest)
    for name in _conv_weight_names(fp32):
        # Both are on the grid, and AdaRound did choose differently from nearest (else the comparison is empty).
        assert _grid_steps_off(ada_w[name], scheme) < 1e-3, f"{name}: AdaRound's weights are not on the grid"
        assert _integers_differing(ada_w[name], near_w[name], original[name], scheme) > 0, \
            f"{name}: AdaRound chose nearest rounding everywhere"
    reference = _layer_outputs(_graph_module(fp32), calibration)
    ada_out = _layer_outputs(_graph_module(adarounded), calibration)
    near_out = _layer_outputs(_graph_module(nearest), calibration)
    assert len(reference) == len(_conv_weight_names(fp32)) == 2
    report = {}
    for layer, target in reference.items():
        # The conv's own output, and the same after the ReLU that follows every conv of this model (what AdaRound's
        # relu-aware objective measures). Both must improve.
        for form, f in (("output", lambda t: t), ("after relu", torch.relu)):
            ada = float((f(ada_out[layer]) - f(target)).pow(2).mean())
            near = float((f(near_out[layer]) - f(target)).pow(2).mean())
            report[f"{layer} {form}"] = (ada, near)
    worse = {k: v for k, v in report.items() if not v[0] < v[1]}
    assert not worse, f"AdaRound MSE not below nearest's ({scheme}, (adaround, nearest)): {worse}; all: {report}"


@pytest.mark.parametrize("scheme", [
    # Per-channel int8 failed this before AdaRound fell back to nearest for a layer it did not improve: the tiny
    # model's ill-conditioned dense head rounded worse than nearest and agreement fell to 0.41 vs nearest's 0.72.
    "per_channel_sym_int8",
    "per_tensor_asym_uint8",
])
def test_adaround_agrees_with_fp32_at_least_as_often_as_nearest(rounding, data, scheme):
    fp32, adarounded, nearest = rounding(scheme)
    test_images = data[2]
    reference = _predict(fp32, test_images)
    ada = float((_predict(adarounded, test_images) == reference).mean())
    near = float((_predict(nearest, test_images) == reference).mean())
    # Nearest rounding really costs agreement on this model (0.72 per-channel, 0.30 per-tensor uint8 when measured),
    # so the comparison below can go either way.
    assert near < 1.0
    assert ada >= near, f"{scheme}: top-1 agreement with FP32 {ada:.2f} with AdaRound < {near:.2f} with nearest"


# --------------------------------------------------------------------------- 2. backends reproduce the integers
@pytest.fixture(scope="module")
def adarounded(tiny_model, data, tmp_path_factory):
    """scheme -> (source FloatModel, AdaRounded FloatModel), made the way the sweep makes them."""
    from ptqflow.models.backends.base import FloatModel
    from ptqflow.models.graph.onnx_model import load_classifier

    calibration, digest, _ = data
    source = FloatModel.for_runtimes(load_classifier(tiny_model), tmp_path_factory.mktemp("adaround-work"))
    source = source.for_quantization()

    @functools.lru_cache(maxsize=None)
    def get(scheme: str):
        with _one_torch_thread():
            return source, source.with_adarounded_weights(scheme, calibration, digest, iterations=BACKEND_ITERATIONS)

    return get


def _assert_reproduces(what: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None,
                       expected: np.ndarray) -> None:
    """(q - zero_point) * scale must be `expected` to within a thousandth of a grid step (float32 products are
    not bit-exact), i.e. every integer is exactly the one `expected` lies on."""
    shape = [1] * q.ndim
    if axis is not None and np.ndim(scale) == 1:
        shape[axis] = -1
    scale = np.asarray(scale, np.float64).reshape(shape)
    zero_point = np.asarray(zero_point, np.int64).reshape(shape)
    assert q.shape == expected.shape, what
    step_error = np.abs((q.astype(np.int64) - zero_point) * scale - expected.astype(np.float64)) / scale
    assert step_error.max() < 1e-3, (f"{what}: {int((step_error >= 0.5).sum())} of {q.size} integers differ from "
                                     f"the AdaRounded weights (worst {step_error.max():.3f} grid steps)")


def _assert_adaround_moved_weights(source, rounded, scheme: str) -> None:
    """The AdaRounded conv weights differ from nearest rounding of the originals, so a backend that re-rounded the
    FP32 weights (or lost AdaRound's choice) would fail the integer checks. A layer may keep nearest rounding where
    AdaRound did not beat it on the calibration set (its fallback); at least one layer must carry AdaRound's own."""
    from ptqflow.models.adaround.grids import quantize_weights_like

    original, ada = _initializers(source.onnx.proto), _initializers(rounded.onnx.proto)
    differing = {}
    for name in _conv_weight_names(source.onnx.proto):
        nearest = quantize_weights_like(torch.from_numpy(np.array(original[name])), scheme).numpy()
        differing[name] = _integers_differing(nearest, ada[name], original[name], scheme)
    assert max(differing.values()) > 0, f"AdaRound chose nearest rounding everywhere: {differing}"


@pytest.mark.parametrize("quant_format,dtype,per_channel,scheme", [
    ("QDQ", "int8", True, "per_channel_sym_int8"),
    ("QOperator", "uint8", False, "per_tensor_asym_uint8"),
])
def test_onnxruntime_reproduces_the_adarounded_integers(adarounded, data, tmp_path, quant_format, dtype,
                                                        per_channel, scheme):
    from ptqflow.models.backends.ort import OrtStaticConfig, quantize

    source, rounded = adarounded(scheme)
    # every convolution in int8, however fast its kernel here: the integers of each are what is checked
    config = OrtStaticConfig(quant_format=quant_format, activation_dtype=dtype, weight_dtype=dtype,
                             per_channel=per_channel, speed_check=False)
    assert config.adaround_scheme == scheme
    _assert_adaround_moved_weights(source, rounded, scheme)
    quantized = onnx.load(str(quantize(rounded, config, data[0], tmp_path).path))
    expected = _initializers(rounded.onnx.proto)
    inits = _initializers(quantized)
    producers = {o: n for n in quantized.graph.node for o in n.output}
    checked = []
    for node in quantized.graph.node:
        if node.op_type == "Conv":  # QDQ: the weight comes from a DequantizeLinear of an int8 initializer
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            q_name, scale_name, zp_name = dq.input
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        elif node.op_type == "QLinearConv":
            q_name, scale_name, zp_name = node.input[3:6]
            axis = 0
        else:
            continue
        name = q_name.removesuffix("_quantized")
        q = inits[q_name]
        assert q.dtype == np.dtype(dtype) and np.ndim(inits[scale_name]) == (1 if per_channel else 0)
        _assert_reproduces(f"{quant_format} {name}", q, inits[scale_name], inits[zp_name], axis, expected[name])
        checked.append(name)
    assert sorted(checked) == sorted(_conv_weight_names(rounded.onnx.proto))
    # The classifier head stays float (float_head): its weights are the AdaRounded floats, untouched.
    heads = [n for n in quantized.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert heads
    for node in heads:
        weight = inits[node.input[1]]
        assert weight.dtype == np.float32 and np.array_equal(weight, expected[node.input[1]])


@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
def test_fx_reproduces_the_adarounded_integers(adarounded, data, tmp_path, backend):
    from ptqflow.models.backends.pytorch_fx import PytorchFxConfig, quantize

    scheme = "per_channel_sym_int8"
    source, rounded = adarounded(scheme)
    config = PytorchFxConfig(backend=backend, speed_check=False)  # every conv in int8, whatever it costs here
    assert config.adaround_scheme == scheme
    _assert_adaround_moved_weights(source, rounded, scheme)
    path = quantize(rounded, config, data[0], tmp_path).path
    expected = dict(_graph_module(rounded.onnx.proto).named_modules())
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend  # TorchScript repacks its weights for the engine current at load
    try:
        module = torch.jit.load(str(path), map_location="cpu")
        checked, float_linears = [], []
        for name, sub in module.named_modules():
            if hasattr(sub, "_packed_params"):
                assert "Conv" in sub.original_name, f"{name} ({sub.original_name}) is quantized but not a conv"
                weight, _ = torch.ops.quantized.conv2d_unpack(sub._packed_params)
                source_name = name.removesuffix("_padfold")
                want = expected[source_name].weight.detach().numpy()
                q = weight.int_repr().numpy()
                if q.shape != want.shape:
                    # graph_prep folded an asymmetric pad into the conv by growing the kernel with leading zeros
                    kh, kw = want.shape[2:]
                    assert not q[..., :-kh, :].any() and not q[..., :, :-kw].any(), name
                    q = q[..., -kh:, -kw:]
                assert weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
                assert weight.q_per_channel_axis() == 0
                _assert_reproduces(f"FX {backend} {name}", q, weight.q_per_channel_scales().numpy(),
                                   weight.q_per_channel_zero_points().numpy(), 0, want)
                checked.append(source_name)
            elif sub.original_name == "Linear":
                float_linears.append((name, sub))
    finally:
        torch.backends.quantized.engine = previous
    assert sorted(checked) == sorted(n for n, m in expected.items() if isinstance(m, nn.Conv2d))
    # The classifier head stays a float Linear whose weight is the AdaRounded float weight.
    assert float_linears
    for name, sub in float_linears:
        assert torch.equal(sub.weight.detach(), expected[name].weight.detach()), name


# --------------------------------------------------------------------------- 3. the fast path optimises the same thing
def _layer_problem(module: nn.Module, shape, seed: int = 0):
    """Random inputs for `module` and its FP32 outputs, perturbed inputs as a partly rounded model would give."""
    generator = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(*shape, generator=generator)
    x_q = x_fp + 0.05 * torch.randn(*shape, generator=generator)
    with torch.no_grad():
        return x_q, module(x_fp)


LAYERS = {
    "conv stride 2 pad 1": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (40, 6, 9, 9)),
    "conv 1x1": (lambda: nn.Conv2d(6, 8, 1), (40, 6, 5, 5)),
    "conv 3x3 same": (lambda: nn.Conv2d(6, 8, 3, padding=1), (70, 6, 7, 9)),  # the shifted-correlation Gram matrix
    "conv 5x3 same": (lambda: nn.Conv2d(3, 4, (5, 3), padding=(2, 1)), (70, 3, 6, 4)),
    "conv1d dilated": (lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2), (40, 4, 11)),
    "linear": (lambda: nn.Linear(12, 7), (200, 12)),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_the_quadratic_form_is_the_reconstruction_error(layer):
    """A layer without a ReLU after it is optimised on sum((D H + 2 g^T) * D) + c: that must be the error its output
    makes over all images, for any weight (here: nearest rounding)."""
    from ptqflow.models.adaround.grids import quantize_weights_like
    from ptqflow.models.adaround.optimize import reconstruction_error
    from ptqflow.models.adaround.quadratic import layer_fn, quadratic_form

    torch.manual_seed(0)
    make, shape = LAYERS[layer]
    module = make().eval()
    x_q, y = _layer_problem(module, shape)
    fn = layer_fn(module)
    H, g, c = quadratic_form(module, fn, x_q, y, chunk_elements=2000)  # several chunks
    w = module.weight.detach()
    for scheme in SCHEMES:
        q = quantize_weights_like(w, scheme)
        D = (q - w).reshape(w.shape[0], -1).double()
        quadratic = float(((D @ H.double() + 2 * g.T.double()) * D).sum()) + c
        direct = reconstruction_error(fn, x_q, y, q, relu_after=False)
        assert quadratic == pytest.approx(direct, rel=1e-4), (layer, scheme)


@pytest.mark.parametrize("kernel,shape", [((3, 3), (70, 5, 7, 9)), ((5, 3), (3, 2, 6, 4)), ((1, 1), (4, 3, 2, 2))])
def test_the_shifted_gram_matrix_is_the_unfolded_one(kernel, shape):
    from ptqflow.models.adaround.quadratic import gram_same_conv

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = torch.nn.functional.unfold(x, kernel, padding=(kernel[0] // 2, kernel[1] // 2))
    p = p.transpose(0, 1).reshape(p.shape[1], -1)
    assert torch.allclose(gram_same_conv(x, kernel, chunk=32), p @ p.T, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("relu_after", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_layer_is_never_worse_than_nearest_on_its_objective(scheme, relu_after):
    """Even when the optimisation is hopeless (4 steps, a rounding penalty 1000x too strong), the rounding returned
    reconstructs the layer's FP32 output over the calibration inputs at least as well as round-to-nearest."""
    from ptqflow.models.adaround.grids import quantize_weights_like
    from ptqflow.models.adaround.optimize import adaround_layer, reconstruction_error
    from ptqflow.models.adaround.quadratic import layer_fn

    torch.manual_seed(1)
    module = nn.Conv2d(6, 8, 3, padding=1).eval()
    x_q, y = _layer_problem(module, (40, 6, 6, 6))
    fn = layer_fn(module)
    target = torch.relu(y) if relu_after else y
    for iters, lam in ((4, 1000.0), (200, 1.0)):
        with _one_torch_thread():
            rounded = adaround_layer(module, x_q, y, scheme, iters, 8, lam, 1e-2, 0, relu_after=relu_after)
        nearest = quantize_weights_like(module.weight.detach(), scheme)
        assert reconstruction_error(fn, x_q, target, rounded, relu_after) <= \
            reconstruction_error(fn, x_q, target, nearest, relu_after) * (1 + 1e-6), (iters, lam)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_depthwise_layer_is_never_worse_than_nearest_in_any_channel(scheme):
    """A depthwise layer's channels (nine weights each) are separate problems: every channel's rounding
    reconstructs its FP32 output at least as well as round-to-nearest, and the layer as a whole does too, with the
    hopeless and the normal optimisation alike."""
    from ptqflow.models.adaround.grids import quantize_weights_like
    from ptqflow.models.adaround.optimize import adaround_layer, channel_reconstruction_error
    from ptqflow.models.adaround.quadratic import layer_fn

    torch.manual_seed(2)
    module = nn.Conv2d(8, 8, 3, padding=1, groups=8).eval()
    x_q, y = _layer_problem(module, (40, 8, 6, 6))
    fn = layer_fn(module)
    for iters, lam in ((4, 1000.0), (200, 1.0)):
        with _one_torch_thread():
            rounded = adaround_layer(module, x_q, y, scheme, iters, 8, lam, 1e-2, 0)
        nearest = quantize_weights_like(module.weight.detach(), scheme)
        ours = channel_reconstruction_error(fn, x_q, y, rounded, False)
        theirs = channel_reconstruction_error(fn, x_q, y, nearest, False)
        assert ours.shape == (8,) and bool((ours <= theirs * (1 + 1e-9)).all()), (iters, lam, ours, theirs)
        assert float(ours.sum()) <= float(theirs.sum())
    assert not torch.equal(rounded, nearest)  # the normal optimisation does move some channel off nearest


@pytest.mark.parametrize("relu_after", [False, True])
def test_a_layer_stops_once_its_rounding_is_settled(relu_after):
    """An easy layer (FP32 inputs, weights a hundredth of a grid step from grid points) has every h(v) at exactly 0
    or 1 soon after the warm-up: it stops there, and its rounding is the one the full schedule gives."""
    from ptqflow.models.adaround.grids import grid_params, quantize_weights_like
    from ptqflow.models.adaround.optimize import adaround_layer

    torch.manual_seed(2)
    module = nn.Conv2d(4, 4, 3, padding=1).eval()
    scheme = "per_channel_sym_int8"
    with torch.no_grad():
        w = module.weight
        step = grid_params(w, scheme)[0].float()
        w.copy_(quantize_weights_like(w, scheme) + 0.01 * step * torch.randn(w.shape).sign())
    x = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x)
    checks = []
    iters = 2000
    with _one_torch_thread():
        early = adaround_layer(module, x, y, scheme, iters, 8, 1.0, 1e-2, 0, relu_after=relu_after,
                               trace=lambda **k: checks.append(k))
        full = adaround_layer(module, x, y, scheme, iters, 8, 1.0, 1e-2, 0, relu_after=relu_after,
                              stop_early=False)
    assert checks and checks[-1]["saturated"] == 1.0 and checks[-1]["it"] < iters // 2, checks[-3:]
    assert torch.equal(early, full)


def test_schemes_together_equal_each_scheme_alone(tiny_model, data):
    """The sweep computes both grids in one walk on two worker threads: the result is each scheme's own."""
    from ptqflow.models.adaround.onnx import adaround_onnx, adaround_onnx_schemes

    fp32 = onnx.load(str(tiny_model))
    calibration = data[0][:50]
    together = adaround_onnx_schemes(fp32, calibration, SCHEMES, iters=150, round_head=False, workers=2)
    for scheme in SCHEMES:
        alone = adaround_onnx(fp32, calibration, scheme, iters=150, round_head=False)
        a, b = _initializers(together[scheme]), _initializers(alone)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), scheme


def test_a_large_layer_on_all_threads_gets_its_result_alone_or_beside_another_scheme():
    """A layer of at least ALL_CORES_FROM weights runs its loop on torch's threads, with one matrix product per scheme:
    beside another scheme on the pool (as the sweep runs it) it gets exactly the rounding it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ptqflow.models.adaround.grids import quantize_weights_like
    from ptqflow.models.adaround.optimize import ALL_CORES_FROM, Rounding, adaround_layers

    torch.manual_seed(4)
    module = nn.Conv2d(160, 48, 3, padding=1).eval()  # 48 x 1440 = 69,120 weights
    assert module.weight.numel() >= ALL_CORES_FROM
    x_q, y = _layer_problem(module, (24, 160, 6, 6))
    iters = 120
    threads = 2

    def problems(schemes):
        return [Rounding(copy.deepcopy(module), x_q, y, scheme, False, True) for scheme in schemes]

    with ThreadPoolExecutor(2) as pool:
        together = adaround_layers(problems(SCHEMES), iters, 8, 1.0, 1e-2, 0, lambda n: None, True, [None, None],
                                   pool, threads)
    for scheme, beside in zip(SCHEMES, together):
        alone, = adaround_layers(problems([scheme]), iters, 8, 1.0, 1e-2, 0, lambda n: None, True, [None], None,
                                 threads)
        assert torch.equal(alone, beside), scheme
        assert not torch.equal(alone, quantize_weights_like(module.weight.detach(), scheme)), \
            "AdaRound moved nothing: the check is empty"


def test_the_adaround_cache_key_covers_torch_threads():
    """A large layer's products sum in another order on another number of threads: another thread count is another
    cache entry."""
    from ptqflow.models.backends.base import adaround_cache_key
    from ptqflow.models.adaround.optimize import torch_threads

    calibration = np.zeros((2, 3, 4, 4), np.float32)
    with torch_threads(1):
        one = adaround_cache_key("model", calibration, "indices", SCHEMES[0], 1000)
    with torch_threads(2):
        two = adaround_cache_key("model", calibration, "indices", SCHEMES[0], 1000)
    assert one != two
