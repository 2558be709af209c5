"""Weight-side corrections applied to the FP32 model *before* quantization.

Main entry point: :func:`adaround_onnx` -- AdaRound (Nagel et al. 2020) layer-wise
rounding optimisation of every Conv / MatMul / Gemm weight of an ONNX model,
computed with torch on the onnx2torch conversion and written back into the ONNX
initializers as FP32 values that lie *exactly* on the target int8 grid.  A later
quantizer with the matching scheme (per-channel symmetric int8 for
onnxruntime per_channel=True / torch ``PerChannelMinMaxObserver(qint8,
per_channel_symmetric, quant_min=-127, quant_max=127)``; per-tensor asymmetric
uint8 for onnxruntime QUInt8 weights) then reproduces the optimised integers
bit-exactly, so the same corrected FP32 ONNX file improves both the onnxruntime
and the torch.ao FX variants.

Schemes (``scheme=``):
* ``"per_channel_sym_int8"``: scale_c = max|w_c| / 127, q in [-127, 127]
  (the channel's max-|w| element is kept fixed so re-quantization finds the same scale).
* ``"per_tensor_asym_uint8"``: onnxruntime's uint8 MinMax weight quantization,
  rmin = min(w, 0), rmax = max(w, 0), scale = (rmax - rmin) / 255,
  zp = round(-rmin / scale); min and max elements are snapped to q=0 / q=255.
* ``"per_tensor_sym_int8"``: scale = max|w| / 127.

Also: :func:`quantize_weights_like` (plain round-to-nearest snapping onto a scheme's grid).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.interrupts import checkpoint

__all__ = [
    "adaround_onnx",
    "adaround_module",
    "grid_params",
    "quantize_weights_like",
    "onnx_classifier_head_nodes",
]

_ZETA, _GAMMA = 1.1, -0.1
_PROGRESS_EVERY = 50  # iterations between progress reports (and stop checks)


# --------------------------------------------------------------------------- grids
def grid_params(w: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (scale, kmin, kmax) broadcastable to ``w`` (dim 0 = output channels).

    Values on the grid are ``scale * k`` with integer ``k`` in ``[kmin, kmax]``.
    """
    w = w.detach().double()
    if scheme == "per_channel_sym_int8":
        amax = w.abs().flatten(1).max(1)[0].clamp_min(1e-12)
        s = (amax / 127.0).view(-1, *[1] * (w.dim() - 1))
        return s, torch.full_like(s, -127.0), torch.full_like(s, 127.0)
    if scheme == "per_tensor_sym_int8":
        s = (w.abs().max().clamp_min(1e-12) / 127.0).reshape([1] * w.dim())
        return s, torch.full_like(s, -127.0), torch.full_like(s, 127.0)
    if scheme == "per_tensor_asym_uint8":
        rmin = min(float(w.min()), 0.0)
        rmax = max(float(w.max()), 0.0)
        s_ = np.float32((rmax - rmin) / 255.0) if rmax > rmin else np.float32(1.0)
        zp = float(np.clip(np.round(np.float32(-rmin) / s_), 0, 255))
        s = torch.full([1] * w.dim(), float(s_), dtype=torch.float64)
        return s, torch.full_like(s, -zp), torch.full_like(s, 255.0 - zp)
    raise ValueError(f"unknown scheme {scheme!r}")


def _anchor_mask(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Elements whose value defines the quantization range: kept at their nearest extreme."""
    if scheme == "per_channel_sym_int8":
        a = w.abs().flatten(1)
        m = torch.zeros_like(a, dtype=torch.bool)
        m[torch.arange(a.shape[0]), a.argmax(1)] = True
        return m.view_as(w)
    m = torch.zeros(w.numel(), dtype=torch.bool)
    if scheme == "per_tensor_sym_int8":
        m[w.abs().flatten().argmax()] = True
    else:
        m[w.flatten().argmax()] = True
        m[w.flatten().argmin()] = True
    return m.view_as(w)


def _snap_anchors(w: torch.Tensor, k: torch.Tensor, s, kmin, kmax, mask, scheme) -> torch.Tensor:
    k = k.clone()
    if scheme == "per_tensor_asym_uint8":
        kmin_b, kmax_b = kmin.expand_as(w), kmax.expand_as(w)
        k = torch.where(mask & (w >= 0) & (w == w.max()), kmax_b, k)
        k = torch.where(mask & (w <= 0) & (w == w.min()), kmin_b, k)
    else:
        k = torch.where(mask, torch.sign(w) * kmax.expand_as(w), k)
    return k


def quantize_weights_like(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``w`` on ``scheme``'s grid (FP32 result)."""
    s, kmin, kmax = grid_params(w, scheme)
    wd = w.detach().double()
    k = torch.clamp(torch.round(wd / s), kmin, kmax)
    k = _snap_anchors(wd, k, s, kmin, kmax, _anchor_mask(wd, scheme), scheme)
    return (k * s).to(w.dtype)


# --------------------------------------------------------------------------- AdaRound
def _h(v):
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _layer_fn(mod: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(mod, nn.Conv2d):
        return lambda x, w: F.conv2d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.Conv1d):
        return lambda x, w: F.conv1d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.Linear):
        return lambda x, w: F.linear(x, w, mod.bias)
    raise TypeError(type(mod))


def _adaround_layer(mod, x_in, y_target, scheme, iters, batch, lam, lr, seed, relu_after=False,
                    advance: Callable[[int], None] = lambda n: None):
    w = mod.weight.detach()
    s, kmin, kmax = grid_params(w, scheme)
    s, kmin, kmax = s.float(), kmin.float(), kmax.float()
    wf = torch.floor(w / s)
    rest = (w / s - wf).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).clone().requires_grad_(True)
    mask = _anchor_mask(w.double(), scheme)
    fn = _layer_fn(mod)
    opt = torch.optim.Adam([v], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = x_in.shape[0]
    warm = int(0.2 * iters)
    for it in range(iters):
        if it % _PROGRESS_EVERY == 0:
            checkpoint()
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        xb, yb = x_in[idx], y_target[idx]
        wq = s * torch.clamp(wf + _h(v), kmin, kmax)
        out = fn(xb, wq)
        if relu_after:
            out, yb = F.relu(out), F.relu(yb)
        rec = (out - yb).pow(2).flatten(1).sum(1).mean()
        if it < warm:
            loss = rec
        else:
            beta = 20 + (2 - 20) * (it - warm) / max(1, iters - warm)
            loss = rec + lam * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % _PROGRESS_EVERY == 0:
            advance(_PROGRESS_EVERY)
    if iters % _PROGRESS_EVERY:
        advance(iters % _PROGRESS_EVERY)
    with torch.no_grad():
        k = torch.clamp(wf + (v >= 0).float(), kmin, kmax).double()
        k = _snap_anchors(w.double(), k, s.double(), kmin.double(), kmax.double(), mask, scheme)
        rounded = (k * s.double()).float()
        # Never worse than round-to-nearest on AdaRound's own objective over the whole calibration set: with a fixed
        # lambda the rounding penalty can dominate a layer whose reconstruction error is small (or be too weak on a
        # large one), and an ill-conditioned layer (e.g. a fitted dense head) then ends up worse than nearest.
        nearest = quantize_weights_like(w, scheme)
        if _reconstruction_error(fn, x_in, y_target, nearest, relu_after) < \
                _reconstruction_error(fn, x_in, y_target, rounded, relu_after):
            return nearest
        return rounded


@torch.no_grad()
def _reconstruction_error(fn, x_in, y_target, weight, relu_after, chunk: int = 256) -> float:
    total = 0.0
    for start in range(0, x_in.shape[0], chunk):
        out, y = fn(x_in[start:start + chunk], weight), y_target[start:start + chunk]
        if relu_after:
            out, y = F.relu(out), F.relu(y)
        total += float((out - y).double().pow(2).sum())
    return total


@torch.no_grad()
def _collect(gm, names, x, bs=250):
    """Inputs and outputs of the named modules for data x."""
    store: Dict[str, List] = {n: [[], []] for n in names}
    hooks = []
    for n in names:
        def hook(m, inp, out, n=n):
            store[n][0].append(inp[0].detach())
            store[n][1].append(out.detach())
        hooks.append(gm.get_submodule(n).register_forward_hook(hook))
    for i in range(0, x.shape[0], bs):
        gm(x[i:i + bs])
    for h in hooks:
        h.remove()
    return {n: (torch.cat(a), torch.cat(b)) for n, (a, b) in store.items()}


def _walk_layers(gm, fp, x: torch.Tensor, order: List[Tuple[str, bool]], model_batch: int,
                 solve: Callable[[str, bool, torch.Tensor, torch.Tensor], None]) -> None:
    """Run the FP32 model `fp` and the model `gm` being rounded side by side, node by node over all images (in
    chunks of `model_batch`), keeping only the values later nodes still need. At each layer of `order`, call
    solve(name, relu, input from gm, FP32 output), which rounds gm's weight; then continue with the rounded layer's
    output. One pass of each model in all, instead of two whole-model passes per layer. Until the first rounded
    layer (and wherever inputs are the same tensors) the two models share their values."""
    import torch.fx as fx

    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    targets = dict(order)
    remaining = set(targets)
    run_fp, run_q = fx.Interpreter(fp), fx.Interpreter(gm)
    chunks = [x[i:i + model_batch] for i in range(0, x.shape[0], model_batch)]
    env_fp: List[dict] = [{} for _ in chunks]
    env_q: List[dict] = [{} for _ in chunks]
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"AdaRound needs a model with one input, this one has {len(placeholders)}")
    for i, node in enumerate(nodes):
        if not remaining or node.op == "output":
            break
        if node.op == "placeholder":
            for ef, eq, chunk in zip(env_fp, env_q, chunks):
                ef[node] = eq[node] = chunk
        elif node.op == "call_module" and node.target in remaining:
            src = node.args[0]
            x_q = torch.cat([eq[src] for eq in env_q])
            module_fp = fp.get_submodule(node.target)
            y_parts = [module_fp(ef[src]) for ef in env_fp]
            solve(node.target, targets[node.target], x_q, torch.cat(y_parts))
            remaining.discard(node.target)
            module_q = gm.get_submodule(node.target)
            for ef, eq, y in zip(env_fp, env_q, y_parts):
                ef[node] = y
                eq[node] = module_q(eq[src])
        else:
            for ef, eq in zip(env_fp, env_q):
                run_fp.env = ef
                value = run_fp.run_node(node)
                ef[node] = value
                shared = node.op != "get_attr" and all(eq.get(a) is ef.get(a) for a in node.all_input_nodes)
                if not shared:
                    run_q.env = eq
                    q_value = run_q.run_node(node)
                    same_attr = node.op == "get_attr" and isinstance(q_value, torch.Tensor) and \
                        isinstance(value, torch.Tensor) and q_value.shape == value.shape and \
                        torch.equal(q_value, value)
                    value = value if same_attr else q_value
                eq[node] = value
        for a in node.all_input_nodes:
            if last_use.get(a) == i:
                for ef, eq in zip(env_fp, env_q):
                    ef.pop(a, None)
                    eq.pop(a, None)
    run_fp.env = run_q.env = {}


def adaround_module(gm: nn.Module, calib: np.ndarray, scheme: str = "per_channel_sym_int8", *,
                    iters: int = 1000, batch: int = 32, lam: float = 1.0, lr: float = 1e-2,
                    seed: int = 0, relu_aware: bool = True, layers: Optional[List[str]] = None,
                    verbose: bool = False, advance: Callable[..., None] = lambda n, total=None: None,
                    model_batch: int = 250) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """AdaRound all Conv/Linear modules of ``gm`` (an FX graph, e.g. from ``prepare_graph``) in place.

    Layers are processed in graph order; each layer's input comes from the model
    whose earlier layers are already rounded, its target from the FP32 model.
    Returns {module name: (old weight, new weight)}.
    """
    import torch.fx as fx

    x = torch.from_numpy(np.ascontiguousarray(calib)).float()
    fp = copy.deepcopy(gm).eval()
    gm.eval()
    order = []
    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv1d, nn.Conv2d, nn.Linear)):
                relu = len(node.users) == 1 and next(iter(node.users)).op == "call_module" and isinstance(
                    gm.get_submodule(next(iter(node.users)).target), nn.ReLU)
                order.append((node.target, relu))
    else:
        order = [(n, False) for n, m in gm.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    if layers is not None:
        order = [o for o in order if o[0] in layers]
    index = {name: i for i, (name, _) in enumerate(order)}
    changes = {}
    advance(0, total=len(order) * iters)  # progress in optimisation steps over all layers

    def solve(name: str, relu: bool, x_in: torch.Tensor, y_t: torch.Tensor) -> None:
        mod = gm.get_submodule(name)
        with torch.enable_grad():
            new_w = _adaround_layer(mod, x_in, y_t, scheme, iters, batch, lam, lr, seed + index[name],
                                    relu_after=relu and relu_aware, advance=advance)
        old = mod.weight.detach().clone()
        mod.weight.data.copy_(new_w)
        changes[name] = (old, new_w)
        if verbose:
            print(f"adaround {name}: changed {(quantize_weights_like(old, scheme) != new_w).float().mean():.3f}")

    with torch.no_grad():
        if isinstance(gm, fx.GraphModule):
            _walk_layers(gm, fp, x, order, model_batch, solve)
        else:
            for name, relu in order:
                solve(name, relu, _collect(gm, [name], x, model_batch)[name][0],
                      _collect(fp, [name], x, model_batch)[name][1])
    return changes


def _replace_initializers(onnx_model, changes) -> "onnx.ModelProto":
    """Write torch weights back into the ONNX initializers, matched by value (W or W^T)."""
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(onnx_model)
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {n: numpy_helper.to_array(i) for n, i in inits.items()}
    for name, (old, new) in changes.items():
        old_np, new_np = old.numpy(), new.numpy()
        done = False
        for iname, arr in arrays.items():
            if arr.dtype != np.float32:
                continue
            if arr.shape == old_np.shape and np.array_equal(arr, old_np):
                rep = new_np
            elif arr.ndim == 2 and arr.shape == old_np.T.shape and np.array_equal(arr, old_np.T):
                rep = np.ascontiguousarray(new_np.T)
            else:
                continue
            inits[iname].CopyFrom(numpy_helper.from_array(rep.astype(np.float32), iname))
            done = True
        if not done:
            raise RuntimeError(f"could not find the ONNX initializer of {name}")
    return model


def adaround_onnx(onnx_model, calib: np.ndarray, scheme: str = "per_channel_sym_int8", *,
                  round_head: bool = True, **kw):
    """AdaRound the weights of ``onnx_model`` (onnx.ModelProto) on ``calib`` (model-input layout,
    e.g. NHWC float32 0..255); returns a new ModelProto whose Conv/MatMul/Gemm weight
    initializers lie on ``scheme``'s grid.  ``round_head=False`` leaves the classifier head's
    weights in FP32 (for backends that keep the head float: a grid only adds error there).
    kwargs go to :func:`adaround_module`."""
    import onnx2torch
    from models.graph_prep import classifier_head, prepare_graph

    gm = prepare_graph(onnx2torch.convert(onnx_model), fold_pad=False)
    if not round_head:
        head = set(classifier_head(gm, include_pool=False))
        kw["layers"] = [name for name, m in gm.named_modules()
                        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and name not in head]
    return _replace_initializers(onnx_model, adaround_module(gm, calib, scheme, **kw))


# --------------------------------------------------------------------------- onnxruntime recipe helpers
def onnx_classifier_head_nodes(onnx_model) -> List[str]:
    """Names of the ONNX nodes of the classifier head, to pass as ``nodes_to_exclude`` to
    ``quantize_static`` (compute them on the model actually quantized, i.e. *after*
    ``quant_pre_process``, which renames/fuses e.g. MatMul+Add -> Gemm 'MatMulAddFusion').

    Walks back from the graph outputs through Softmax/Reshape/Flatten/... to the first
    MatMul/Gemm/Conv (included) and on through the pooling / reshape nodes feeding it
    (GlobalAveragePool, AveragePool, ReduceMean, Reshape, Flatten, Squeeze, Transpose).
    Keeping these in float (weights already on the int8 grid via :func:`adaround_onnx`)
    avoids 8-bit logits (ties under argmax) and re-quantization of the pooled features.

    Raises ValueError when a head node has no name: ``nodes_to_exclude`` matches by name, and an empty name would
    exclude every unnamed node of the model (name them first with
    :func:`models.onnx_rewrites.name_unnamed_nodes`)."""
    nodes = list(onnx_model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    compute = {"MatMul", "Gemm", "Conv"}
    passthrough = {"Softmax", "LogSoftmax", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Add",
                   "Transpose", "Cast"}
    pools = {"GlobalAveragePool", "AveragePool", "ReduceMean", "Reshape", "Flatten", "Squeeze", "Transpose"}
    out: List[str] = []
    todo = [producer[o.name] for o in onnx_model.graph.output if o.name in producer]
    seen = set()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type in compute:
            out.append(n.name)
            up = [producer[i] for i in n.input[:1] if i in producer]
            while up:
                u = up.pop()
                if u.op_type in pools:
                    out.append(u.name)
                    up.extend(producer[i] for i in u.input[:1] if i in producer)
            continue
        if n.op_type in passthrough:
            out.append(n.name)
            todo.extend(producer[i] for i in n.input if i in producer)
    if "" in out:
        raise ValueError("the classifier head has unnamed nodes, which nodes_to_exclude cannot select; "
                         "name them first (models.onnx_rewrites.name_unnamed_nodes)")
    return out


