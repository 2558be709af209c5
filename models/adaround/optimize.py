"""AdaRound's optimisation of one layer's rounding: the rounding problem under one scheme, its reconstruction step
(through the quadratic form, or on mini-batches), the Adam loop with its early stop, and the thread count torch runs
it on."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ptqflow.common.interrupts import checkpoint
from ptqflow.models.adaround.grids import anchor_mask, grid_params, quantize_weights_like, snap_anchors
from ptqflow.models.adaround.quadratic import layer_fn, quadratic_form

_ZETA, _GAMMA = 1.1, -0.1
_PROGRESS_EVERY = 50  # iterations between progress reports (and stop checks)
# A layer whose weight has at least this many elements is optimised on every core, with one matrix product per
# scheme (the same product alone or beside other schemes, so each result stays the one it gets alone). Measured per
# step on two Xeon cores (both schemes): 160x1440 17.7 ms on one thread, 7.0 ms on two; 80x720 2.1 / 1.5 ms;
# 40x360 0.41 / 0.43 ms, where waking the second thread costs what it saves.
ALL_CORES_FROM = 50_000


def _h(v):
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class Rounding:
    """One layer's rounding problem under one scheme: its grid, the continuous rounding variable v's start, the
    objective, and (after optimisation) the rounded weight. See :func:`adaround_layer`."""

    def __init__(self, mod: nn.Module, x_in: torch.Tensor, y_target: torch.Tensor, scheme: str, relu_after: bool,
                 quadratic: bool):
        self.mod, self.x_in, self.y_target, self.scheme, self.relu_after = mod, x_in, y_target, scheme, relu_after
        w = self.w = mod.weight.detach()
        s, kmin, kmax = grid_params(w, scheme)
        self.s, self.kmin, self.kmax = s.float().expand_as(w), kmin.float().expand_as(w), kmax.float().expand_as(w)
        self.wf = torch.floor(w / self.s)
        rest = (w / self.s - self.wf).clamp(1e-4, 1 - 1e-4)
        self.v0 = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)
        self.fn = layer_fn(mod)
        self.n = x_in.shape[0]
        # d w_q / d h: the grid step where the clamp to [kmin, kmax] cannot bind (wf and wf + 1 both on the grid),
        # else 0 (only range-defining elements, snapped to their extreme at the end); times zg = d h / d sigmoid(v).
        self.dw_dh = (self.s * ((self.wf >= self.kmin) & (self.wf + 1 <= self.kmax))).mul_(_ZETA - _GAMMA)
        self.wants_form = quadratic and not relu_after
        self.form = None  # (H, g^T [w's shape], c) from compute_form, when the error is a quadratic

    def compute_form(self) -> None:
        if self.wants_form:
            form = quadratic_form(self.mod, self.fn, self.x_in, self.y_target)
            if form is not None:
                H, g, c = form
                self.form = (H, g.T.contiguous().view_as(self.w), c)

    def channel_errors(self, weight: torch.Tensor) -> torch.Tensor:
        """The reconstruction error of `weight` over all of x_in, per output channel (float64, without the
        constant every weight shares): an output channel's error depends on its own weight row only, so channels
        can take their rounding from different solutions."""
        if self.form is not None:
            H, gt, _ = self.form
            D = (weight - self.w).reshape(self.w.shape[0], -1).double()
            return ((D @ H.double() + 2 * gt.reshape_as(D).double()) * D).sum(1)
        target = F.relu(self.y_target) if self.relu_after else self.y_target
        return channel_reconstruction_error(self.fn, self.x_in, target, weight, self.relu_after,
                                            channel_dim=-1 if isinstance(self.mod, nn.Linear) else 1)

    @torch.no_grad()
    def rounded(self, v: torch.Tensor) -> torch.Tensor:
        """Round up where v >= 0, range-defining elements snapped to their extreme; each output channel takes
        round-to-nearest instead where that reconstructs it better: never worse than nearest on AdaRound's own
        objective over the whole calibration set, channel by channel (with a fixed lambda the rounding penalty can
        dominate a channel whose reconstruction error is small, or be too weak on a large one; a depthwise layer's
        channels, nine weights each, differ most)."""
        w, s = self.w.double(), self.s.double()
        k = torch.clamp(self.wf + (v >= 0).float(), self.kmin, self.kmax).double()
        k = snap_anchors(w, k, s, self.kmin.double(), self.kmax.double(), anchor_mask(w, self.scheme), self.scheme)
        rounded = (k * s).float()
        nearest = quantize_weights_like(self.w, self.scheme)
        better = self.channel_errors(rounded) <= self.channel_errors(nearest)
        return torch.where(better.view(-1, *[1] * (self.w.dim() - 1)), rounded, nearest)


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch's intra-op thread count set to `count` for the block, restored after."""
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _quadratic_stack(problems: List[Rounding], per_problem: bool = False):
    """The reconstruction step of same-shaped problems with quadratic forms, stacked on dim 0: given w_q [K, ...],
    (error / n of each or None, d error / d h * zg [K, ...]), one batched product for all, or one product per problem
    (`per_problem`: each problem's product then does not depend on the others, at any thread count). `keep(indices)`
    drops the others (problems that stopped)."""
    state = {"H": torch.stack([p.form[0] for p in problems]),
             "gt": torch.stack([p.form[1] for p in problems]),
             "w": torch.stack([p.w for p in problems]),
             "scale": torch.stack([p.dw_dh * (2 / p.n) for p in problems]),
             "c": [p.form[2] for p in problems], "n": [p.n for p in problems]}

    def reconstruction(wq: torch.Tensor, want_value: bool):
        K, out = wq.shape[0], wq.shape[1]
        D = wq - state["w"]
        if per_problem:
            M = torch.empty_like(D)
            for k in range(K):
                torch.mm(D[k].view(out, -1), state["H"][k], out=M[k].view(out, -1))
        else:
            M = torch.bmm(D.view(K, out, -1), state["H"]).view_as(D)
        values = None
        if want_value:
            per = ((M + 2 * state["gt"]) * D).flatten(1).sum(1)
            values = [(float(e) + c) / n for e, c, n in zip(per, state["c"], state["n"])]
        return values, M.add_(state["gt"]).mul_(state["scale"])

    def keep(indices: List[int]) -> None:
        for key in ("H", "gt", "w", "scale"):
            state[key] = state[key][indices]
        state["c"] = [state["c"][i] for i in indices]
        state["n"] = [state["n"][i] for i in indices]

    reconstruction.keep = keep
    return reconstruction


def _minibatch(problem: Rounding, batch: int, seed: int):
    """The reconstruction step of a problem without a quadratic form, on mini-batches of `batch` images from a
    random offset (a slice, no gather), the ReLU's target computed once; same interface as :func:`_quadratic_stack`
    for a stack of one."""
    gen = torch.Generator().manual_seed(seed)
    n, fn, relu_after = problem.n, problem.fn, problem.relu_after
    bsz = min(batch, n)
    x_in = problem.x_in
    y_loss = F.relu(problem.y_target) if relu_after else problem.y_target
    grad_scale = problem.dw_dh * (2 / bsz)

    def reconstruction(wq: torch.Tensor, want_value: bool):
        start = int(torch.randint(0, n - bsz + 1, (1,), generator=gen))
        xb, yb = x_in[start:start + bsz], y_loss[start:start + bsz]
        with torch.enable_grad():
            wl = wq[0].detach().requires_grad_(True)
            o = fn(xb, wl)
        r = F.relu(o.detach()) if relu_after else o.detach()
        diff = r - yb
        grad_o = torch.ops.aten.threshold_backward(diff, r, 0) if relu_after else diff
        grad, = torch.autograd.grad(o, wl, grad_o)
        values = [float(torch.vdot(diff.reshape(-1), diff.reshape(-1))) / bsz] if want_value else None
        return values, grad.mul_(grad_scale).unsqueeze(0)

    reconstruction.keep = lambda indices: None
    return reconstruction


def _optimize(problems: List[Rounding], reconstruction, iters: int, lam: float, lr: float,
              advance: Callable[[int], None], stop_early: bool,
              traces: Optional[List[Optional[Callable[..., None]]]] = None) -> List[torch.Tensor]:
    """AdaRound's optimisation of the rounding variables v of same-shaped `problems` stacked on dim 0 (independent
    problems: every op is elementwise or per problem, so each gets exactly what it gets alone). Returns each final v.

    The gradients of h(v), the clamps and the rounding regulariser are written out by hand and Adam's update
    (torch.optim.Adam's formula) is applied in place: the arithmetic autograd would do, in fewer ops. A problem
    stops (``stop_early``) once every one of its h(v) is exactly 0 or 1: no gradient reaches its v any more, so its
    rounding is final; it leaves the stack. ``traces[k](it=, rec=, saturated=, flips=)`` at each check."""
    zg = _ZETA - _GAMMA
    alive = list(range(len(problems)))
    traces = traces or [None] * len(problems)
    traced = any(t is not None for t in traces)
    stack = lambda name: torch.stack([getattr(problems[k], name) for k in alive])  # noqa: E731
    v, wf, s, kmin, kmax = stack("v0").clone(), stack("wf"), stack("s"), stack("kmin"), stack("kmax")
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    warm = int(0.2 * iters)
    finals: Dict[int, torch.Tensor] = {}
    reported = 0
    previous: Dict[int, torch.Tensor] = {}
    recs = [float("nan")] * len(problems)
    for it in range(iters):
        if it % _PROGRESS_EVERY == 0:
            checkpoint()
            if it > warm and (stop_early or traced):
                hv = _h(v).flatten(1)
                saturated = ((hv == 0) | (hv == 1)).float().mean(1).tolist()
                up = v.flatten(1) >= 0
                stopped = []
                for row, k in enumerate(alive):
                    if traces[k] is not None:
                        flips = -1 if k not in previous else int((up[row] != previous[k]).sum())
                        previous[k] = up[row]
                        traces[k](it=it, rec=recs[k], saturated=saturated[row], flips=flips)
                    if stop_early and saturated[row] == 1.0:
                        stopped.append(row)
                if stopped:
                    for row in stopped:
                        finals[alive[row]] = v[row].clone()
                    advance((iters - it) * len(stopped))
                    rows = [row for row in range(len(alive)) if row not in stopped]
                    alive = [alive[row] for row in rows]
                    if not alive:
                        break
                    v, wf, s, kmin, kmax, m1, m2 = (t[rows] for t in (v, wf, s, kmin, kmax, m1, m2))
                    reconstruction.keep(rows)
        sg = torch.sigmoid(v)
        hr = sg.mul(zg).add_(_GAMMA)
        h = hr.clamp(0, 1)
        wq = (wf + h).clamp_(kmin, kmax).mul_(s)
        values, gk = reconstruction(wq, traced and (it + 1) % _PROGRESS_EVERY == 0)
        if values is not None:
            for k, value in zip(alive, values):
                recs[k] = value
        if it >= warm:
            beta = 20 + (2 - 20) * (it - warm) / max(1, iters - warm)
            # d/dh of lam * (1 - |a|^beta), a = 2h - 1: -2 lam beta a |a|^(beta - 2); times zg like the rest
            a = h.mul_(2).sub_(1)
            gk.addcmul_(a, a.abs().pow_(beta - 2), value=-2 * lam * beta * zg)
        # through h = clamp(hr, 0, 1) and d sigmoid(v) / d v = sg (1 - sg)
        gv = torch.ops.aten.hardtanh_backward(gk, hr, 0.0, 1.0).mul_(sg.sub_(sg * sg))
        # torch.optim.Adam's update (amsgrad off, no weight decay)
        step = it + 1
        m1.lerp_(gv, 1 - beta1)
        m2.mul_(beta2).addcmul_(gv, gv, value=1 - beta2)
        denom = m2.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
        v.addcdiv_(m1, denom, value=-lr / (1 - beta1 ** step))
        if (it + 1) % _PROGRESS_EVERY == 0:
            advance(_PROGRESS_EVERY * len(alive))
            reported = it + 1
    else:
        if iters > reported:
            advance((iters - reported) * len(alive))
    for row, k in enumerate(alive):
        finals.setdefault(k, v[row])
    return [finals[k] for k in range(len(problems))]


def adaround_layer(mod, x_in, y_target, scheme, iters, batch, lam, lr, seed, relu_after=False,
                   advance: Callable[[int], None] = lambda n: None, stop_early: bool = True,
                   quadratic: bool = True, trace: Optional[Callable[..., None]] = None):
    """AdaRound one layer: optimise the rounding of ``mod``'s weight so that its output on ``x_in`` (the input the
    partially rounded model gives it) reconstructs ``y_target`` (the FP32 model's output there), after the ReLU
    that follows the layer when ``relu_after``. Returns the new weight, on ``scheme``'s grid.

    When the error is a quadratic in the weights (``quadratic``, no ReLU to reconstruct through, a plain matrix
    product) it is optimised exactly over all of x_in through its quadratic form (:func:`quadratic_form`);
    otherwise on mini-batches of ``batch`` images (``seed``). See :func:`_optimize` for the loop and its early stop,
    :meth:`Rounding.rounded` for the round-to-nearest guarantee."""
    problem = Rounding(mod, x_in, y_target, scheme, relu_after, quadratic)
    problem.compute_form()
    reconstruction = _quadratic_stack([problem]) if problem.form is not None else _minibatch(problem, batch, seed)
    v, = _optimize([problem], reconstruction, iters, lam, lr, advance, stop_early, [trace])
    return problem.rounded(v)


def adaround_layers(problems: List[Rounding], iters, batch, lam, lr, seed, advance, stop_early,
                    traces: List[Optional[Callable[..., None]]], pool=None, threads: int = 1) -> List[torch.Tensor]:
    """:func:`adaround_layer` for the same layer under several schemes at once: the quadratic forms on `pool`'s
    threads (large matrix products, which release the GIL), then one loop for all problems with a quadratic form
    (each op on the stack of them: half the Python and dispatch overhead of two loops, which on two threads would
    fight over the GIL), then the others one by one. Each result is the one the problem gets alone.

    Torch runs one thread for the forms and the final rounding (alone or on the pool: the same sums either way) and
    for the loops of small layers (their ops are small: a second torch thread spinning on a busy machine costs more
    than it gains); the loops of layers of at least ``ALL_CORES_FROM`` weights run on `threads`."""
    with torch_threads(1):
        if pool is not None and sum(p.wants_form for p in problems) > 1:
            for future in [pool.submit(p.compute_form) for p in problems]:
                future.result()
        else:
            for p in problems:
                p.compute_form()
    large = problems[0].w.numel() >= ALL_CORES_FROM  # same-shaped: one layer under several schemes
    vs: Dict[int, torch.Tensor] = {}
    with torch_threads(threads if large else 1):
        quad = [k for k, p in enumerate(problems) if p.form is not None]
        if quad:
            found = _optimize([problems[k] for k in quad],
                              _quadratic_stack([problems[k] for k in quad], per_problem=large), iters, lam, lr,
                              advance, stop_early, [traces[k] for k in quad])
            vs.update(zip(quad, found))
        for k, p in enumerate(problems):
            if k not in vs:
                vs[k], = _optimize([p], _minibatch(p, batch, seed), iters, lam, lr, advance, stop_early, [traces[k]])
    with torch_threads(1):
        if pool is not None and len(problems) > 1:
            return [f.result() for f in [pool.submit(p.rounded, vs[k]) for k, p in enumerate(problems)]]
        return [p.rounded(vs[k]) for k, p in enumerate(problems)]


@torch.no_grad()
def channel_reconstruction_error(fn, x_in, target, weight, relu_after, channel_dim: int = 1,
                                 chunk: int = 256) -> torch.Tensor:
    """Per output channel (`channel_dim` of the layer's output), the sum over x_in of |f(fn(x, weight)) - target|^2,
    f = ReLU when relu_after (target already after it); float64."""
    total = None
    for start in range(0, x_in.shape[0], chunk):
        out = fn(x_in[start:start + chunk], weight)
        if relu_after:
            out = F.relu(out)
        diff = (out - target[start:start + chunk]).double()
        part = diff.movedim(channel_dim, 0).reshape(diff.shape[channel_dim], -1).pow(2).sum(1)
        total = part if total is None else total + part
    return total


def reconstruction_error(fn, x_in, target, weight, relu_after, chunk: int = 256) -> float:
    """Sum over x_in of |f(fn(x, weight)) - target|^2, f = ReLU when relu_after (target already after it)."""
    return float(channel_reconstruction_error(fn, x_in, target, weight, relu_after, chunk=chunk).sum())
