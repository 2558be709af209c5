"""AdaRound over a whole model: the layers to round in graph order, one walk of the FP32 model and the models being
rounded side by side that hands each layer its inputs and FP32 target, and the entry points for torch modules
(`adaround_schemes`, `adaround_module`)."""
from __future__ import annotations

import copy
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ptqflow.models.adaround.bias_correction import UNBOUNDED, correct_bias
from ptqflow.models.adaround.grids import quantize_weights_like
from ptqflow.models.adaround.optimize import Rounding, adaround_layers
from ptqflow.models.graph.fx_modules import is_depthwise, sole_reader_ranges

ROUNDED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the modules whose weights AdaRound rounds


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


def _walk_layers(gm_list: List[nn.Module], fp, x: torch.Tensor, order: List[Tuple[str, bool]], model_batch: int,
                 solve: Callable[[str, bool, List[torch.Tensor], torch.Tensor], None]) -> None:
    """Run the FP32 model `fp` and the models of `gm_list` being rounded side by side, node by node over all images
    (in chunks of `model_batch`), keeping only the values later nodes still need. At each layer of `order`, call
    solve(name, relu, [its input in each model of gm_list], its FP32 output), which rounds that layer's weight in
    each model; then continue with the rounded layers' outputs. One pass of each model in all, instead of two
    whole-model passes per layer. A model shares the FP32 model's values until its first rounded layer (wherever a
    node's inputs are the very same tensors)."""
    import torch.fx as fx

    gm0 = gm_list[0]
    nodes = list(gm0.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    targets = dict(order)
    remaining = set(targets)
    run_fp = fx.Interpreter(fp)
    runs_q = [fx.Interpreter(gm) for gm in gm_list]
    chunks = [x[i:i + model_batch] for i in range(0, x.shape[0], model_batch)]
    env_fp: List[dict] = [{} for _ in chunks]
    envs_q: List[List[dict]] = [[{} for _ in chunks] for _ in gm_list]
    placeholders = [node for node in nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"AdaRound needs a model with one input, this one has {len(placeholders)}")
    for i, node in enumerate(nodes):
        if not remaining or node.op == "output":
            break
        if node.op == "placeholder":
            for c, chunk in enumerate(chunks):
                env_fp[c][node] = chunk
                for env_q in envs_q:
                    env_q[c][node] = chunk
        elif node.op == "call_module" and node.target in remaining:
            src = node.args[0]
            x_qs = _gathered(envs_q, src, others=[env_fp])
            module_fp = fp.get_submodule(node.target)
            y, start = None, 0
            for ef in env_fp:  # the FP32 output, written chunk by chunk into one tensor; the chunks are views of it
                part = module_fp(ef[src])
                y = _like(part, x.shape[0]) if y is None else y
                ef[node] = y[start:start + len(part)]
                ef[node].copy_(part)
                start += len(part)
            solve(node.target, targets[node.target], x_qs, y)
            del x_qs, y  # what later nodes need stays in the environments
            remaining.discard(node.target)
            for gm, env_q in zip(gm_list, envs_q):
                module_q = gm.get_submodule(node.target)
                for eq in env_q:
                    eq[node] = module_q(eq[src])
        else:
            for c, ef in enumerate(env_fp):
                run_fp.env = ef
                value = run_fp.run_node(node)
                ef[node] = value
                for run_q, env_q in zip(runs_q, envs_q):
                    eq = env_q[c]
                    shared = node.op != "get_attr" and all(eq.get(a) is ef.get(a) for a in node.all_input_nodes)
                    q_value = value
                    if not shared:
                        run_q.env = eq
                        q_value = run_q.run_node(node)
                        if node.op == "get_attr" and isinstance(q_value, torch.Tensor) and \
                                isinstance(value, torch.Tensor) and q_value.shape == value.shape and \
                                torch.equal(q_value, value):
                            q_value = value
                    eq[node] = q_value
        for a in node.all_input_nodes:
            if last_use.get(a) == i:
                for c in range(len(chunks)):
                    env_fp[c].pop(a, None)
                    for env_q in envs_q:
                        env_q[c].pop(a, None)
    run_fp.env = {}
    for run_q in runs_q:
        run_q.env = {}


def _like(t: torch.Tensor, n: int) -> torch.Tensor:
    """An empty tensor of n rows shaped like t's rows, in t's memory format (channels-last stays channels-last)."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((n, *t.shape[1:]), dtype=t.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _gathered(envs: List[List[dict]], node, others: Sequence[List[dict]] = ()) -> List[torch.Tensor]:
    """For each environment of `envs` (one dict per chunk of images), the value of `node` over all chunks as one
    tensor. Its chunks are copied in one at a time and replaced by views of it, so the value is in memory once (plus
    a chunk). Environments holding the very same chunk tensors get the same tensor and the same views (they keep
    sharing), `others` too where they hold them."""
    groups: Dict[tuple, List[int]] = {}
    for k, env in enumerate(envs):
        groups.setdefault(tuple(id(e[node]) for e in env), []).append(k)
    wholes: List[torch.Tensor] = [torch.empty(0)] * len(envs)
    for members in groups.values():
        holders = [envs[k] for k in members]
        chunks = holders[0]
        whole = _like(chunks[0][node], sum(len(e[node]) for e in chunks))
        start = 0
        for c in range(len(chunks)):
            part = chunks[c][node]
            view = whole[start:start + len(part)]
            view.copy_(part)
            start += len(part)
            for env in (*holders, *others):
                if env[c].get(node) is part:
                    env[c][node] = view
            del part
        for k in members:
            wholes[k] = whole
    return wholes


def _rounding_order(gm: nn.Module, layers: Optional[List[str]]) -> List[Tuple[str, bool]]:
    """(module name, followed by a ReLU) of the Conv/Linear modules to round, in graph order."""
    import torch.fx as fx

    order = []
    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ROUNDED_LAYERS):
                relu = len(node.users) == 1 and next(iter(node.users)).op == "call_module" and isinstance(
                    gm.get_submodule(next(iter(node.users)).target), nn.ReLU)
                order.append((node.target, relu))
    else:
        order = [(n, False) for n, m in gm.named_modules() if isinstance(m, ROUNDED_LAYERS)]
    if layers is not None:
        order = [o for o in order if o[0] in layers]
    return order


def adaround_schemes(gm: nn.Module, calib: np.ndarray, schemes: Sequence[str], *,
                     iters: int = 1000, batch: int = 32, lam: float = 1.0, lr: float = 1e-2,
                     seed: int = 0, relu_aware: bool = False, images: Optional[int] = None,
                     layers: Optional[List[str]] = None,
                     verbose: bool = False, advance: Callable[..., None] = lambda n, total=None: None,
                     model_batch: int = 250, stop_early: bool = True, quadratic: bool = True,
                     workers: Optional[int] = None, trace: Optional[Callable[..., None]] = None,
                     bias_correction: bool = True,
                     ) -> Dict[str, Tuple[nn.Module, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]]:
    """AdaRound all Conv/Linear modules of ``gm`` (an FX graph, e.g. from ``prepare_graph``) for each of
    ``schemes``, sharing one FP32 pass. ``gm`` itself is not changed. Returns {scheme: (rounded copy of gm,
    {module name: (old weight, new weight)})}.

    Layers are processed in graph order; each layer's input comes from the model whose earlier layers are already
    rounded (per scheme), its target from the FP32 model. ``images``: use at most this many of ``calib``, evenly
    spaced (None: all; on ResNet8 500 of the sweep's 1000 cost ort-uint8 0.15 pp of agreement). ``relu_aware``:
    reconstruct a layer's output after the ReLU that follows it, on mini-batches (the default reconstructs every
    layer's own output, exactly over all images through its quadratic form: on ResNet8 as good, measured by the
    quantized variants' agreement with FP32, and several times faster).

    The schemes' problems at a layer are independent: their quadratic forms (large matrix products) are computed on
    ``workers`` threads (default: one per scheme, at most one per core), then optimised in one loop whose every op
    works on the stack of them (:func:`adaround_layers`, which says when torch runs one thread and when all of
    torch's threads). Each scheme's result is the one it gets alone, whatever the number of workers.

    ``bias_correction``: a depthwise convolution's bias then takes off each channel's mean error over the images
    (:func:`ptqflow.models.adaround.bias_correction.correct_bias`), before later layers see its output.
    """
    import torch.fx as fx
    from concurrent.futures import ThreadPoolExecutor

    schemes = list(dict.fromkeys(schemes))
    if images is not None and len(calib) > images:
        calib = calib[np.linspace(0, len(calib) - 1, images).round().astype(np.int64)]
    x = torch.from_numpy(np.ascontiguousarray(calib)).float()
    fp = copy.deepcopy(gm).eval()
    models = {scheme: copy.deepcopy(gm).eval() for scheme in schemes}
    order = _rounding_order(gm, layers)
    passed = sole_reader_ranges(gm, relu=True)  # what the activation after each layer passes on
    index = {name: i for i, (name, _) in enumerate(order)}
    changes: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {scheme: {} for scheme in schemes}
    advance(0, total=len(order) * iters * len(schemes))  # progress in optimisation steps over all layers
    if workers is None:
        workers = min(len(schemes), os.cpu_count() or 1)

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        def solve(name: str, relu: bool, x_ins: List[torch.Tensor], y_t: torch.Tensor) -> None:
            mods = [models[scheme].get_submodule(name) for scheme in schemes]
            problems = [Rounding(mod, x_in, y_t, scheme, relu and relu_aware, quadratic)
                        for mod, x_in, scheme in zip(mods, x_ins, schemes)]
            traces = [None if trace is None else functools.partial(trace, scheme=scheme, layer=name)
                      for scheme in schemes]
            with torch.enable_grad():
                new_ws = adaround_layers(problems, iters, batch, lam, lr, seed + index[name], advance, stop_early,
                                         traces, pool, threads)
            for scheme, mod, new_w, problem in zip(schemes, mods, new_ws, problems):
                old = mod.weight.detach().clone()
                mod.weight.data.copy_(new_w)
                changes[scheme][name] = (old, new_w)
                if bias_correction and is_depthwise(mod):
                    correct_bias(mod, problem.fn(problem.x_in, new_w), y_t, passed.get(name, UNBOUNDED))
                if verbose:
                    changed = float((quantize_weights_like(old, scheme) != new_w).float().mean())
                    print(f"adaround {scheme} {name}: changed {changed:.3f}")

        with torch.no_grad():
            if isinstance(gm, fx.GraphModule):
                _walk_layers([models[scheme] for scheme in schemes], fp, x, order, model_batch, solve)
            else:
                for name, relu in order:
                    y_t = _collect(fp, [name], x, model_batch)[name][1]
                    solve(name, relu, [_collect(models[scheme], [name], x, model_batch)[name][0]
                                       for scheme in schemes], y_t)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {scheme: (models[scheme], changes[scheme]) for scheme in schemes}


def adaround_module(gm: nn.Module, calib: np.ndarray, scheme: str = "per_channel_sym_int8",
                    **kw) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """AdaRound all Conv/Linear modules of ``gm`` (an FX graph, e.g. from ``prepare_graph``) in place, for one
    scheme; keyword arguments as :func:`adaround_schemes`. Returns {module name: (old weight, new weight)}."""
    _, changes = adaround_schemes(gm, calib, [scheme], **kw)[scheme]
    with torch.no_grad():
        for name, (_, new) in changes.items():
            gm.get_submodule(name).weight.data.copy_(new)
    return changes
