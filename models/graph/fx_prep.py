"""Graph preparation of onnx2torch modules before torch.ao FX quantization.

``prepare_graph(module)`` returns an FP32-equivalent ``torch.fx.GraphModule``
(eval mode) in which onnx2torch-specific modules are replaced by native torch
modules/ops that the fbgemm/x86 FX backends know how to quantize:

* ``nn.Sequential`` sub-modules (onnx2torch wraps Pad+Conv into one) are inlined;
* ``OnnxPadStatic`` (constant 0) followed by ``Conv{1,2,3}d`` is folded into the
  conv: symmetric pads go into ``conv.padding``; asymmetric pads with
  ``pad_end >= pad_begin`` (TF "SAME" for stride 2) become a symmetric padding of
  ``pad_end`` plus ``pad_end - pad_begin`` leading zero taps in the kernel
  (exact; zero weights quantize to exactly zero with symmetric weight quant);
* ``MatMul(x, W-initializer) [+ Add(b-initializer)]`` and ``OnnxGemm`` on
  initializers -> ``nn.Linear`` (so the weight is quantized as a weight, per
  channel, instead of as a per-tensor quint8 activation);
* ``OnnxBinaryMathOperation`` Add/Sub/Mul on two tensors -> ``operator.*``
  (so FX fuses add+relu into quantized ``add_relu``); Div -> ``operator.truediv`` where an
  operand is floating point (onnx2torch's Div asks the tensors' dtype, which FX cannot trace);
* ``OnnxTranspose`` -> ``permute``; ``OnnxReshape`` with a constant shape ->
  ``reshape``; ``OnnxFlatten``/``OnnxGlobalAveragePoolWithKnownInputShape`` ->
  ``torch.flatten`` / ``nn.AdaptiveAvgPool{1,2,3}d``; ``ReduceMean`` with constant axes -> ``torch.mean``;
* HardSigmoid and HardSwish in every form exporters write them (ONNX HardSigmoid, ``x * HardSigmoid(x)``,
  Keras's ``relu6(x + 3) * (1/6)``, ``x * relu6(x + 3) / 6``) -> ``nn.Hardsigmoid`` / ``nn.Hardswish``
  (ptqflow.models.graph.fx_activations): one quantized op each, instead of an add, a clip and multiplies, each
  with its own scale;
* with ``example_input`` given, integer sub-graphs that only depend on input
  shapes (Shape->Gather->Concat->Pad ...) and do not depend on the batch size
  are constant-folded, so ``OnnxPadDynamic`` becomes foldable as well.

Softmax is left in the graph (the model still returns probabilities) and kept
in float by ``ptqflow.models.backends.fx_qconfig.qconfig_mapping`` (qconfig ``None`` for all softmax
flavours).

Default FX recipe (pytorch-fx-int8 with backend "fbgemm", pytorch-fx-int8-x86 with "x86")::

    from ptqflow.models.adaround.onnx import adaround_onnx
    onnx_model = adaround_onnx(onnx_model, calib_nhwc, "per_channel_sym_int8")  # weights on int8 grid
    gm = prepare_graph(onnx2torch.convert(onnx_model), example_input=calib[:2])
    torch.backends.quantized.engine = backend
    qm = qconfig_mapping(backend, activation_observer="percentile",      # 99.995, no reduce_range
                         float_modules=classifier_head(gm))              # pool+reshape+dense in float
    pm = prepare_fx(gm, qm, example_inputs=(x[:2],)); [pm(b) for b in calib batches of 100]
    q = convert_fx(pm); ts = torch.jit.trace(q, (x[:2],))
"""
from __future__ import annotations

import copy
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ptqflow.models.graph.fx_activations import hard_activations
from ptqflow.models.graph.fx_nodes import add_module, constant, module_calls, module_of

try:  # onnx2torch is optional at import time (prepare_graph also works on plain torch modules)
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    import_onnx2torch()
    from onnx2torch.node_converters.binary_math_operations import _onnx_div  # ONNX Div: true or integer division
    from onnx2torch.node_converters import (
        OnnxBinaryMathOperation,
        OnnxFlatten,
        OnnxGemm,
        OnnxGlobalAveragePoolWithKnownInputShape,
        OnnxMatMul,
        OnnxPadDynamic,
        OnnxPadStatic,
        OnnxReduceStaticAxes,
        OnnxReshape,
        OnnxSoftmaxV1V11,
        OnnxTranspose,
    )
except ImportError:  # pragma: no cover
    OnnxBinaryMathOperation = OnnxFlatten = OnnxGemm = OnnxMatMul = OnnxPadDynamic = ()  # type: ignore
    OnnxPadStatic = OnnxReduceStaticAxes = OnnxReshape = OnnxSoftmaxV1V11 = OnnxTranspose = ()  # type: ignore
    OnnxGlobalAveragePoolWithKnownInputShape = ()  # type: ignore
    _onnx_div = None

__all__ = ["prepare_graph", "classifier_head", "FnModule", "SOFTMAX_TYPES", "SOFTMAX_FUNCS", "untraceable_modules"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SOFTMAX_TYPES: tuple = tuple(t for t in (nn.Softmax, nn.LogSoftmax, OnnxSoftmaxV1V11) if isinstance(t, type))
SOFTMAX_FUNCS = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
_BINOPS = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul}


# --------------------------------------------------------------------------- helpers
def _finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


# --------------------------------------------------------------------------- passes
def _inline_sequential(gm: fx.GraphModule) -> bool:
    changed = False
    for node, m in module_calls(gm):
        if isinstance(m, nn.Sequential) and len(node.args) == 1 and not node.kwargs:
            cur = node.args[0]
            with gm.graph.inserting_before(node):
                for i, child in enumerate(m):
                    name = add_module(gm, f"{node.target}_{i}", child)
                    cur = gm.graph.call_module(name, (cur,))
            node.replace_all_uses_with(cur)
            gm.graph.erase_node(node)
            changed = True
    return changed


def _simple_ops(gm: fx.GraphModule) -> None:
    g = gm.graph
    for node, m in module_calls(gm):
        new = None
        with g.inserting_before(node):
            if OnnxTranspose and isinstance(m, OnnxTranspose) and m.perm is not None:
                new = g.call_method("permute", (node.args[0], *[int(p) for p in m.perm]))
            elif OnnxBinaryMathOperation and isinstance(m, OnnxBinaryMathOperation) and not (
                m.broadcast == 1 and m.axis is not None
            ) and m.math_op_function in _BINOPS and len(node.args) == 2:
                new = g.call_function(_BINOPS[m.math_op_function], tuple(node.args))
            elif OnnxBinaryMathOperation and isinstance(m, OnnxBinaryMathOperation) and not (
                m.broadcast == 1 and m.axis is not None
            ) and m.math_op_function is _onnx_div and len(node.args) == 2 and any(
                _is_floating(gm, arg) for arg in node.args
            ):
                new = g.call_function(operator.truediv, tuple(node.args))
            elif OnnxReshape and isinstance(m, OnnxReshape) and len(node.args) == 2:
                shape = constant(gm, node.args[1])
                if shape is not None and shape.dim() == 1:
                    s = [int(v) for v in shape.tolist()]
                    x = node.args[0]
                    if len(s) == 2 and s[0] in (0, -1) and s[1] == -1:
                        new = g.call_function(torch.flatten, (x, 1))
                    else:
                        dims = [g.call_method("size", (x, i)) if v == 0 else v for i, v in enumerate(s)]
                        new = g.call_method("reshape", (x, *dims))
            elif OnnxFlatten and isinstance(m, OnnxFlatten) and m.axis == 1:
                new = g.call_function(torch.flatten, (node.args[0], 1))
            elif OnnxGlobalAveragePoolWithKnownInputShape and isinstance(
                m, OnnxGlobalAveragePoolWithKnownInputShape
            ) and len(m._x_dims) in (1, 2, 3):
                pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[len(m._x_dims)]
                name = add_module(gm, f"{node.target}_gap", pool(1))
                new = g.call_module(name, (node.args[0],))
            elif OnnxReduceStaticAxes and isinstance(m, OnnxReduceStaticAxes) and m.operation_type == "ReduceMean" \
                    and m.axes and len(node.args) == 1:
                # torch.mean, which classifier_head knows as pooling (a Keras/TFLite head pools with ReduceMean)
                new = g.call_function(torch.mean, (node.args[0],), {"dim": list(m.axes), "keepdim": m.keepdims})
        if new is not None:
            node.replace_all_uses_with(new)
            g.erase_node(node)


def _is_floating(gm: fx.GraphModule, arg: Any) -> bool:
    """Whether a node's value is floating point, as far as the graph says: a Python float, a float initializer, or a
    dtype recorded when the graph ran on the example input (_fold_shape_constants)."""
    if isinstance(arg, float):
        return True
    value = constant(gm, arg)
    if value is not None:
        return value.is_floating_point()
    dtype = arg.meta.get("dtype") if isinstance(arg, fx.Node) else None
    return dtype is not None and dtype.is_floating_point


def untraceable_modules(gm: fx.GraphModule) -> dict[str, str]:
    """The call_module targets FX cannot trace through (an onnx2torch forward with Python control flow on tensors),
    each with the tracer's reason. prepare_fx keeps them as leaves: they run in float, between a dequantize and a
    quantize, and the rest of the graph is quantized as usual."""
    untraceable = {}
    for node, m in module_calls(gm):
        if not type(m).__module__.startswith("onnx2torch."):
            continue
        try:
            fx.Tracer().trace(m)
        except Exception as exc:  # noqa: BLE001 - TraceError, or any error the forward raises on a Proxy
            untraceable[str(node.target)] = f"{type(m).__name__}: {type(exc).__name__}: {str(exc).strip()[:200]}"
    return untraceable


def _linear_from(gm, node, weight_in_out: torch.Tensor, bias: Optional[torch.Tensor], name: str, x):
    w = weight_in_out.t().contiguous()  # [out, in]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.reshape(-1).to(w.dtype))
    mname = add_module(gm, name, lin)
    with gm.graph.inserting_before(node):
        return gm.graph.call_module(mname, (x,))


def _matmul_to_linear(gm: fx.GraphModule) -> None:
    g = gm.graph
    for node, m in module_calls(gm):
        is_mm = OnnxMatMul and isinstance(m, OnnxMatMul)
        if not is_mm and node.op == "call_function" and node.target in (torch.matmul, operator.matmul):
            is_mm = True
        if is_mm and len(node.args) == 2:
            W = constant(gm, node.args[1])
            if W is None or W.dim() != 2 or not W.is_floating_point():
                continue
            bias, add_node = None, None
            users = list(node.users)
            if len(users) == 1:
                u = users[0]
                um = module_of(gm, u)
                is_add = (OnnxBinaryMathOperation and isinstance(um, OnnxBinaryMathOperation)
                          and um.math_op_function is torch.add) or (
                    u.op == "call_function" and u.target in (operator.add, torch.add))
                if is_add and len(u.args) == 2:
                    other = u.args[1] if u.args[0] is node else u.args[0]
                    b = constant(gm, other)
                    if b is not None and b.numel() == W.shape[1] and b.dim() <= 2 and b.shape[-1] == W.shape[1]:
                        bias, add_node = b, u
            anchor = add_node or node
            new = _linear_from(gm, anchor, W, bias, f"{node.target}_linear", node.args[0])
            anchor.replace_all_uses_with(new)
            if add_node is not None:
                g.erase_node(add_node)
            g.erase_node(node)
        elif OnnxGemm and isinstance(m, OnnxGemm) and not m.trans_a and len(node.args) >= 2:
            W = constant(gm, node.args[1])
            C = constant(gm, node.args[2]) if len(node.args) > 2 else None
            if W is None or W.dim() != 2 or (len(node.args) > 2 and C is None):
                continue
            Wio = (W.t() if m.trans_b else W) * m.alpha
            if C is not None:
                if C.numel() != Wio.shape[1]:
                    continue
                C = C.reshape(-1) * m.beta
            new = _linear_from(gm, node, Wio, C, f"{node.target}_linear", node.args[0])
            node.replace_all_uses_with(new)
            g.erase_node(node)


def _pad_spec(m: nn.Module) -> Optional[list]:
    """Torch-format pads [last_begin, last_end, prev_begin, prev_end, ...] of a zero constant pad."""
    if OnnxPadStatic and isinstance(m, OnnxPadStatic):
        if m.mode != "constant" or float(m.constant_value) != 0.0:
            return None
        return [int(p) for p in m.pads]
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        if getattr(m, "value", 0.0) != 0.0:
            return None
        return [int(p) for p in m.padding]
    return None


def _fold_pad_into_conv(gm: fx.GraphModule) -> None:
    g = gm.graph
    for node, m in module_calls(gm):
        pads = _pad_spec(m)
        if pads is None and OnnxPadDynamic and isinstance(m, OnnxPadDynamic) and m.mode == "constant":
            p = constant(gm, node.args[1]) if len(node.args) > 1 else None
            cv = constant(gm, node.args[2]) if len(node.args) > 2 else None
            if p is not None and (cv is None or float(cv.reshape(-1)[0]) == 0.0) and not (
                len(node.args) > 2 and cv is None and node.args[2] is not None
            ):
                onnx_p = [int(v) for v in p.tolist()]
                half = len(onnx_p) // 2
                b, e = onnx_p[:half][::-1], onnx_p[half:][::-1]
                pads = [v for pair in zip(b, e) for v in pair]
        if pads is None or len(node.users) != 1:
            continue
        conv_node = next(iter(node.users))
        conv = module_of(gm, conv_node)
        if not isinstance(conv, _CONV) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        nsp = conv.weight.dim() - 2
        # pads beyond spatial dims (batch/channel) must be zero
        if len(pads) > 2 * nsp and any(pads[2 * nsp:]):
            continue
        pads = pads + [0] * (2 * nsp - len(pads))
        begin = [pads[2 * (nsp - 1 - i)] for i in range(nsp)]  # per spatial dim, in order H, W...
        end = [pads[2 * (nsp - 1 - i) + 1] for i in range(nsp)]
        if any(b_ > e_ for b_, e_ in zip(begin, end)):
            continue
        if any(b_ != e_ for b_, e_ in zip(begin, end)) and any(d != 1 for d in conv.dilation):
            continue
        new_pad = [conv.padding[i] + end[i] for i in range(nsp)]
        lead = [end[i] - begin[i] for i in range(nsp)]
        new_conv = copy.deepcopy(conv)
        if any(lead):
            w = conv.weight.detach()
            wpad = []
            for i in reversed(range(nsp)):
                wpad += [lead[i], 0]
            new_w = F.pad(w, wpad)
            new_conv.weight = nn.Parameter(new_w)
            new_conv.kernel_size = tuple(new_w.shape[2:])
        new_conv.padding = tuple(new_pad)
        new_conv._reversed_padding_repeated_twice = [p for p in reversed(new_pad) for _ in range(2)]
        name = add_module(gm, f"{conv_node.target}_padfold", new_conv)
        with g.inserting_before(conv_node):
            nn_ = g.call_module(name, (node.args[0],))
        conv_node.replace_all_uses_with(nn_)
        g.erase_node(conv_node)
        g.erase_node(node)


def _max_pool_pads(gm: fx.GraphModule) -> None:
    """An asymmetric MaxPool converts as a -inf constant pad before it, which FX observes and quantizes (an
    infinite range: every value then is wrong). Replicating the edge instead gives the same maxima whenever each pad
    is narrower than the window (every window that covers a padded pixel also covers the edge pixel it copies), and
    keeps the observed range the input's."""
    for node, m in module_calls(gm):
        users = list(node.users)
        pool = module_of(gm, users[0]) if len(users) == 1 else None
        if not (OnnxPadStatic and isinstance(m, OnnxPadStatic) and m.mode == "constant"
                and float(m.constant_value) == -math.inf and isinstance(pool, nn.MaxPool2d) and len(m.pads) == 4
                and not pool.ceil_mode and pool.dilation in (1, (1, 1), [1, 1])):
            continue
        kernel = pool.kernel_size if isinstance(pool.kernel_size, (tuple, list)) else (pool.kernel_size,) * 2
        pads = [int(p) for p in m.pads]  # torch order: left, right, top, bottom
        if max(pads[:2]) < kernel[1] and max(pads[2:]) < kernel[0]:
            gm.add_submodule(node.target, nn.ReplicationPad2d(pads))


def _fold_shape_constants(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Replace nodes whose value does not depend on input *values* nor on the batch size by constants. A model
    whose batch size is baked in (it only runs at the example's) is compared across input values alone."""

    def run(x):
        env = {}

        class Rec(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                env[n] = r
                return r

        Rec(gm).run(x)
        return env

    x1 = example_input[:1]
    try:
        ea = run(torch.cat([x1, x1], 0))
        eb = run(torch.cat([x1 * 0.5 + 1.0, x1 * 2.0 - 3.0, x1], 0))  # different values and batch size
    except RuntimeError:  # the model's batch size is baked in (a Reshape to [1, n] of a TFLite conversion)
        ea, eb = run(example_input), run(example_input * 0.5 + 1.0)  # different values only
    for n, value in ea.items():  # what _simple_ops needs to know of a value it cannot trace: its dtype
        if isinstance(value, torch.Tensor):
            n.meta["dtype"] = value.dtype

    def same(a, b):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
        if isinstance(a, (int, float, bool)) and type(a) is type(b):
            return a == b
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            return all(same(u, v) for u, v in zip(a, b))
        return False

    static = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
              and n in ea and n in eb and same(ea[n], eb[n])
              and isinstance(ea[n], torch.Tensor) and not ea[n].is_floating_point()}
    g = gm.graph

    def constant(base: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        name = add_module(gm, f"folded_{base}", nn.Module())
        gm.get_submodule(name).register_buffer("value", value)
        with g.inserting_before(before):
            return g.get_attr(f"{name}.value")

    for n in list(g.nodes):
        if n in static and any(u not in static for u in n.users):
            n.replace_all_uses_with(constant(n.name, ea[n].clone(), n))
    for n, shape in _batch_carrying_reshapes(gm, static, ea, eb):
        n.replace_input_with(n.args[1], constant(f"{n.name}_shape", shape, n))
    gm.graph.eliminate_dead_code()


def _batch_carrying_reshapes(gm: fx.GraphModule, static: set, ea: dict, eb: dict):
    """(Reshape node, constant shape) for each Reshape whose shape is computed from the batch size, as
    `x.view(x.size(0), -1)` exports (Shape -> Gather -> Unsqueeze -> Concat): its output shape differs between the
    two example batches in one dimension only, so that dimension becomes -1 and the others their values. FX would
    otherwise quantize the integer shape arithmetic like activations."""
    for n, m in module_calls(gm):
        if not (OnnxReshape and isinstance(m, OnnxReshape) and len(n.args) == 2 and isinstance(n.args[1], fx.Node)
                and n.args[1] not in static and isinstance(ea.get(n), torch.Tensor)
                and isinstance(eb.get(n), torch.Tensor)):
            continue
        a, b = list(ea[n].shape), list(eb[n].shape)
        varying = [i for i, (u, v) in enumerate(zip(a, b)) if u != v]
        if len(a) == len(b) and len(varying) == 1:
            a[varying[0]] = -1
            yield n, torch.tensor(a, dtype=torch.int64)


def prepare_graph(
    module: nn.Module,
    example_input: Optional[torch.Tensor] = None,
    *,
    fold_pad: bool = True,
) -> fx.GraphModule:
    """FP32-equivalent FX graph ready for ``prepare_fx`` (module is deep-copied, result in eval mode).

    ``example_input`` (optional, any batch size) enables folding of shape-only
    integer sub-graphs (e.g. Pad amounts computed from Shape ops).
    """
    gm = copy.deepcopy(module).eval()
    if not isinstance(gm, fx.GraphModule):
        gm = fx.symbolic_trace(gm)
    while _inline_sequential(gm):
        pass
    _finish(gm)
    if example_input is not None:
        with torch.no_grad():
            _fold_shape_constants(gm, example_input)
        _finish(gm)
    _matmul_to_linear(gm)
    _finish(gm)
    _simple_ops(gm)
    _finish(gm)
    hard_activations(gm)
    _finish(gm)
    if fold_pad:
        _fold_pad_into_conv(gm)
        _finish(gm)
    _max_pool_pads(gm)
    _finish(gm)
    return gm.eval()


_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.Flatten)
_PASSTHROUGH_FNS = (torch.flatten, torch.reshape, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean)
_PASSTHROUGH_METHODS = ("reshape", "view", "flatten", "squeeze", "mean")


def _float_call(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """A shape or pooling function/method call on one tensor, wrapped into a named module (FnModule) so that it can
    be kept float by module name; None for any other node."""
    passthrough = ((node.op == "call_method" and node.target in _PASSTHROUGH_METHODS)
                   or (node.op == "call_function" and node.target in _PASSTHROUGH_FNS + SOFTMAX_FUNCS))
    if not passthrough or len(node.all_input_nodes) != 1 or any(isinstance(a, fx.Node) for a in node.args[1:]):
        return None
    fn = node.target if node.op == "call_function" else _method_caller(node.target)
    name = add_module(gm, f"head_{node.name}", FnModule(fn, tuple(node.args[1:]), dict(node.kwargs)))
    with gm.graph.inserting_before(node):
        wrapped = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(wrapped)
    gm.graph.erase_node(node)
    return wrapped


def _pool_before(gm: fx.GraphModule, dense: fx.Node) -> list:
    """Names of the pooling and reshaping modules (wrapped where needed) that feed the head's dense layer."""
    names, up = [], list(dense.all_input_nodes)
    while up:
        u = up.pop()
        um = module_of(gm, u)
        if isinstance(um, (*_POOLS, FnModule)):
            names.append(u.target)
            up.extend(u.all_input_nodes)
            continue
        wrapped = _float_call(gm, u)
        if wrapped is not None:
            names.append(wrapped.target)
            up.extend(wrapped.all_input_nodes)
    return names


def classifier_head(gm: fx.GraphModule, include_pool: bool = True) -> list:
    """Names of the modules of the classifier head: the Linear/Conv module(s) producing the
    model output, what follows them to the output (softmax, flatten, reshape, ...: a Keras or TFLite head ends
    Conv 1x1 -> Reshape -> Softmax, and FX would otherwise quantize the logits and the probabilities) and, with
    ``include_pool``, the pooling modules feeding them (through flatten/reshape).  Pass to
    ``qconfig_mapping(float_modules=...)`` to keep them in float: 8-bit logits tie under
    argmax, and a quantized global average pool re-rounds the pooled features onto the
    (coarse) grid of its input, costing ~1 point of top-1 agreement on ResNet8.
    Quantize the head's weights beforehand (``ptqflow.models.adaround``) to keep an
    int8-weight head computed with float accumulation (= onnxruntime QDQ numerics)."""
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    todo, seen, heads, tail = list(out.all_input_nodes), set(), [], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        m = module_of(gm, n)
        if isinstance(m, (nn.Linear, *_CONV)):
            heads.append(n.target)
            if include_pool:
                heads.extend(_pool_before(gm, n))
            continue
        tail.append(n)
        todo.extend(n.all_input_nodes)
    if heads:  # what follows the dense layer(s) to the output
        for n in tail:
            if n.op == "call_module":
                heads.append(n.target)
            elif n.op in ("call_method", "call_function"):
                wrapped = _float_call(gm, n)
                if wrapped is not None:
                    heads.append(wrapped.target)
    _finish(gm)
    return heads


class _MethodCaller:
    def __init__(self, name):
        self.name = name

    def __call__(self, x, *args, **kwargs):
        return getattr(x, self.name)(*args, **kwargs)


def _method_caller(name):
    return _MethodCaller(name)


class FnModule(nn.Module):
    """``fn(x, *args, **kwargs)`` as a module (addressable by name in a QConfigMapping)."""

    def __init__(self, fn, args=(), kwargs=None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)
