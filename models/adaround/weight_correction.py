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

import contextlib
import copy
import functools
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqflow.common.interrupts import checkpoint

__all__ = [
    "adaround_onnx",
    "adaround_onnx_schemes",
    "adaround_module",
    "adaround_schemes",
    "grid_params",
    "quantize_weights_like",
    "onnx_classifier_head_nodes",
]

_ZETA, _GAMMA = 1.1, -0.1
_PROGRESS_EVERY = 50  # iterations between progress reports (and stop checks)
_ROUNDED = (nn.Conv1d, nn.Conv2d, nn.Linear)  # the modules whose weights AdaRound rounds
# A layer whose weight has at least this many elements is optimised on every core, with one matrix product per
# scheme (the same product alone or beside other schemes, so each result stays the one it gets alone). Measured per
# step on two Xeon cores (both schemes): 160x1440 17.7 ms on one thread, 7.0 ms on two; 80x720 2.1 / 1.5 ms;
# 40x360 0.41 / 0.43 ms, where waking the second thread costs what it saves.
_ALL_CORES_FROM = 50_000


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


def _patch_columns(mod: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """[m, d, positions]: the columns the layer's flattened weight [out, d] multiplies (a conv's input patches, per
    image; a Linear's input rows as one block, m = 1); None when the layer is not one dense matrix product (grouped
    conv, non-zero padding modes, a Linear over more than one batch dimension)."""
    if isinstance(mod, nn.Linear):
        return x.T.unsqueeze(0) if x.dim() == 2 else None
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or mod.groups != 1 or mod.padding_mode != "zeros" \
            or isinstance(mod.padding, str):
        return None
    kernel, stride, padding, dilation = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _is_same_conv(mod: nn.Module) -> bool:
    """A stride-1, undilated, ungrouped Conv2d with odd kernel and zero "same" padding k // 2."""
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros" \
        and not isinstance(mod.padding, str) and tuple(mod.stride) == (1, 1) and tuple(mod.dilation) == (1, 1) \
        and all(k % 2 == 1 and p == k // 2 for k, p in zip(mod.kernel_size, mod.padding))


def _gram_same_conv(x: torch.Tensor, kernel: Tuple[int, int], chunk: int = 64) -> torch.Tensor:
    """sum over images and positions of p p^T for the input patches p (unfold order: channel, row, column) of a
    stride-1 "same" conv, without unfolding. Block (offset d1, offset d2) of it is the correlation of the input with
    itself shifted by d2 - d1, F[s] = sum_u x[u] x[u + s]^T over the image (one product per shift, half of them by
    symmetry), minus the border rows and columns the patch element at offset d1 never reads (small products).
    About 3x fewer operations than the unfolded product for 3x3 kernels."""
    n, C, Hh, Ww = x.shape
    kh, kw = kernel
    all_rows, all_cols = (0, Hh), (0, Ww)

    def excluded(offset: int, size: int, k: int) -> Tuple[int, int]:
        """The image rows (or columns) the patch element at `offset` never reads: none for the centre."""
        pad = k // 2
        return (size + offset - pad, size) if offset < pad else (0, offset - pad)

    def patch_pairs():
        """Every pair of patch elements (a1, b1), (a2, b2), with the rows and columns the first never reads."""
        for a1 in range(kh):
            for b1 in range(kw):
                rows, cols = excluded(a1, Hh, kh), excluded(b1, Ww, kw)
                for a2 in range(kh):
                    for b2 in range(kw):
                        yield a1, b1, a2, b2, rows, cols, (a2 - a1, b2 - b1)

    # (rows, cols, shift) -> sum of x[u] x[u + shift]^T over u in rows x cols with u + shift inside the image
    terms: Dict[Tuple, torch.Tensor] = {}
    for _, _, _, _, rows, cols, shift in patch_pairs():
        terms[(all_rows, all_cols, max(shift, (-shift[0], -shift[1])))] = None
        for key in ((rows, all_cols, shift), (all_rows, cols, shift), (rows, cols, shift)):
            if key[0][0] < key[0][1] and key[1][0] < key[1][1]:
                terms[key] = None
    for key in terms:
        terms[key] = torch.zeros(C, C, dtype=x.dtype)
    for start in range(0, n, chunk):
        xs = x[start:start + chunk].contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # [m, H, W, C]
        for (rows, cols, (da, db)), total in terms.items():
            r0, r1 = max(rows[0], -da), min(rows[1], Hh - da)
            c0, c1 = max(cols[0], -db), min(cols[1], Ww - db)
            if r0 < r1 and c0 < c1:
                A = xs[:, r0:r1, c0:c1].reshape(-1, C)
                B = xs[:, r0 + da:r1 + da, c0 + db:c1 + db].reshape(-1, C)
                total.addmm_(A.T, B)

    H6 = torch.zeros(C, kh, kw, C, kh, kw, dtype=x.dtype)
    zero = torch.zeros(C, C, dtype=x.dtype)
    for a1, b1, a2, b2, rows, cols, shift in patch_pairs():
        block = terms[(all_rows, all_cols, shift)] if shift >= (0, 0) else \
            terms[(all_rows, all_cols, (-shift[0], -shift[1]))].T
        H6[:, a1, b1, :, a2, b2] = block - terms.get((rows, all_cols, shift), zero) \
            - terms.get((all_rows, cols, shift), zero) + terms.get((rows, cols, shift), zero)
    d = C * kh * kw
    return H6.reshape(d, d)


@torch.no_grad()
def _quadratic_form(mod, fn, x_in, y_target, chunk_elements: int = 1 << 20):
    """AdaRound's reconstruction error of a layer without a ReLU after it is a quadratic in the weight change
    D = W_q - W: sum over images and positions of |D p + r0|^2 with p the input patch and r0 = W p + b - y the error
    of the FP32 weights on these (already quantized) inputs. Returns (H, g, c) with H = sum p p^T [d, d],
    g = sum p r0^T [d, out] and c = sum |r0|^2, so the error is sum((D H + 2 g^T) * D) + c; or None when the layer
    is not a plain matrix product. H costs about as much as d / out forward passes of the layer over x_in (a third
    of that for stride-1 "same" convs, :func:`_gram_same_conv`); g is the weight gradient of a conv with output
    gradient r0. Unfolds in chunks of about `chunk_elements` values: small buffers are reused, large fresh ones
    cost page faults."""
    w = mod.weight.detach()
    out, d = w.shape[0], w[0].numel()
    probe = _patch_columns(mod, x_in[:1])
    if probe is None or probe.shape[1] != d:
        return None
    same = _is_same_conv(mod)
    step = max(1, chunk_elements // max(1, probe.numel()))
    block = step * max(1, 64 // step)  # images per forward pass of the layer (several unfold chunks)
    H = _gram_same_conv(x_in, mod.kernel_size) if same else torch.zeros(d, d)
    g = torch.zeros(d, out)
    c = 0.0
    for begin in range(0, x_in.shape[0], block):
        x = x_in[begin:begin + block]
        r0_block = fn(x, w) - y_target[begin:begin + block]
        c += float(torch.vdot(r0_block.reshape(-1), r0_block.reshape(-1)))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            dims = len(mod.stride)
            g += torch.ops.aten.convolution_backward(
                r0_block, x, w, None, list(mod.stride), list(mod.padding), list(mod.dilation), False, [0] * dims,
                mod.groups, [False, True, False])[1].reshape(out, d).T
        if same:
            continue
        for start in range(0, r0_block.shape[0], step):
            # [d, m * positions]: one long matrix product per chunk (a per-image product is short for 8x8 maps)
            p = _patch_columns(mod, x[start:start + step]).transpose(0, 1).reshape(d, -1)
            H.addmm_(p, p.T)
            if isinstance(mod, nn.Linear):
                g.addmm_(p, r0_block[start:start + step])
    return H, g, c


class _Rounding:
    """One layer's rounding problem under one scheme: its grid, the continuous rounding variable v's start, the
    objective, and (after optimisation) the rounded weight. See :func:`_adaround_layer`."""

    def __init__(self, mod: nn.Module, x_in: torch.Tensor, y_target: torch.Tensor, scheme: str, relu_after: bool,
                 quadratic: bool):
        self.mod, self.x_in, self.y_target, self.scheme, self.relu_after = mod, x_in, y_target, scheme, relu_after
        w = self.w = mod.weight.detach()
        s, kmin, kmax = grid_params(w, scheme)
        self.s, self.kmin, self.kmax = s.float().expand_as(w), kmin.float().expand_as(w), kmax.float().expand_as(w)
        self.wf = torch.floor(w / self.s)
        rest = (w / self.s - self.wf).clamp(1e-4, 1 - 1e-4)
        self.v0 = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)
        self.fn = _layer_fn(mod)
        self.n = x_in.shape[0]
        # d w_q / d h: the grid step where the clamp to [kmin, kmax] cannot bind (wf and wf + 1 both on the grid),
        # else 0 (only range-defining elements, snapped to their extreme at the end); times zg = d h / d sigmoid(v).
        self.dw_dh = (self.s * ((self.wf >= self.kmin) & (self.wf + 1 <= self.kmax))).mul_(_ZETA - _GAMMA)
        self.wants_form = quadratic and not relu_after
        self.form = None  # (H, g^T [w's shape], c) from compute_form, when the error is a quadratic

    def compute_form(self) -> None:
        if self.wants_form:
            form = _quadratic_form(self.mod, self.fn, self.x_in, self.y_target)
            if form is not None:
                H, g, c = form
                self.form = (H, g.T.contiguous().view_as(self.w), c)

    def objective(self, weight: torch.Tensor) -> float:
        """The reconstruction error of `weight` over all of x_in (the quadratic form in float64 when there is one)."""
        if self.form is not None:
            H, gt, c = self.form
            D = (weight - self.w).reshape(self.w.shape[0], -1).double()
            return float(((D @ H.double() + 2 * gt.reshape_as(D).double()) * D).sum()) + c
        target = F.relu(self.y_target) if self.relu_after else self.y_target
        return _reconstruction_error(self.fn, self.x_in, target, weight, self.relu_after)

    @torch.no_grad()
    def rounded(self, v: torch.Tensor) -> torch.Tensor:
        """Round up where v >= 0, range-defining elements snapped to their extreme; round-to-nearest instead when
        that reconstructs better: never worse than nearest on AdaRound's own objective over the whole calibration
        set (with a fixed lambda the rounding penalty can dominate a layer whose reconstruction error is small, or be
        too weak on a large one, and an ill-conditioned layer, e.g. a fitted dense head, then ends worse)."""
        w, s = self.w.double(), self.s.double()
        k = torch.clamp(self.wf + (v >= 0).float(), self.kmin, self.kmax).double()
        k = _snap_anchors(w, k, s, self.kmin.double(), self.kmax.double(), _anchor_mask(w, self.scheme), self.scheme)
        rounded = (k * s).float()
        nearest = quantize_weights_like(self.w, self.scheme)
        return nearest if self.objective(nearest) < self.objective(rounded) else rounded


@contextlib.contextmanager
def _torch_threads(count: int):
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


def _quadratic_stack(problems: List[_Rounding], per_problem: bool = False):
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


def _minibatch(problem: _Rounding, batch: int, seed: int):
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


def _optimize(problems: List[_Rounding], reconstruction, iters: int, lam: float, lr: float,
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


def _adaround_layer(mod, x_in, y_target, scheme, iters, batch, lam, lr, seed, relu_after=False,
                    advance: Callable[[int], None] = lambda n: None, stop_early: bool = True,
                    quadratic: bool = True, trace: Optional[Callable[..., None]] = None):
    """AdaRound one layer: optimise the rounding of ``mod``'s weight so that its output on ``x_in`` (the input the
    partially rounded model gives it) reconstructs ``y_target`` (the FP32 model's output there), after the ReLU
    that follows the layer when ``relu_after``. Returns the new weight, on ``scheme``'s grid.

    When the error is a quadratic in the weights (``quadratic``, no ReLU to reconstruct through, a plain matrix
    product) it is optimised exactly over all of x_in through its quadratic form (:func:`_quadratic_form`);
    otherwise on mini-batches of ``batch`` images (``seed``). See :func:`_optimize` for the loop and its early stop,
    :meth:`_Rounding.rounded` for the round-to-nearest guarantee."""
    problem = _Rounding(mod, x_in, y_target, scheme, relu_after, quadratic)
    problem.compute_form()
    reconstruction = _quadratic_stack([problem]) if problem.form is not None else _minibatch(problem, batch, seed)
    v, = _optimize([problem], reconstruction, iters, lam, lr, advance, stop_early, [trace])
    return problem.rounded(v)


def _adaround_layers(problems: List[_Rounding], iters, batch, lam, lr, seed, advance, stop_early,
                     traces: List[Optional[Callable[..., None]]], pool=None, threads: int = 1) -> List[torch.Tensor]:
    """:func:`_adaround_layer` for the same layer under several schemes at once: the quadratic forms on `pool`'s
    threads (large matrix products, which release the GIL), then one loop for all problems with a quadratic form
    (each op on the stack of them: half the Python and dispatch overhead of two loops, which on two threads would
    fight over the GIL), then the others one by one. Each result is the one the problem gets alone.

    Torch runs one thread for the forms and the final rounding (alone or on the pool: the same sums either way) and
    for the loops of small layers (their ops are small: a second torch thread spinning on a busy machine costs more
    than it gains); the loops of layers of at least ``_ALL_CORES_FROM`` weights run on `threads`."""
    with _torch_threads(1):
        if pool is not None and sum(p.wants_form for p in problems) > 1:
            for future in [pool.submit(p.compute_form) for p in problems]:
                future.result()
        else:
            for p in problems:
                p.compute_form()
    large = problems[0].w.numel() >= _ALL_CORES_FROM  # same-shaped: one layer under several schemes
    vs: Dict[int, torch.Tensor] = {}
    with _torch_threads(threads if large else 1):
        quad = [k for k, p in enumerate(problems) if p.form is not None]
        if quad:
            found = _optimize([problems[k] for k in quad],
                              _quadratic_stack([problems[k] for k in quad], per_problem=large), iters, lam, lr,
                              advance, stop_early, [traces[k] for k in quad])
            vs.update(zip(quad, found))
        for k, p in enumerate(problems):
            if k not in vs:
                vs[k], = _optimize([p], _minibatch(p, batch, seed), iters, lam, lr, advance, stop_early, [traces[k]])
    with _torch_threads(1):
        if pool is not None and len(problems) > 1:
            return [f.result() for f in [pool.submit(p.rounded, vs[k]) for k, p in enumerate(problems)]]
        return [p.rounded(vs[k]) for k, p in enumerate(problems)]


@torch.no_grad()
def _reconstruction_error(fn, x_in, target, weight, relu_after, chunk: int = 256) -> float:
    """Sum over x_in of |f(fn(x, weight)) - target|^2, f = ReLU when relu_after (target already after it)."""
    total = 0.0
    for start in range(0, x_in.shape[0], chunk):
        out = fn(x_in[start:start + chunk], weight)
        if relu_after:
            out = F.relu(out)
        diff = (out - target[start:start + chunk]).reshape(-1)
        total += float(torch.vdot(diff, diff))
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
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ROUNDED):
                relu = len(node.users) == 1 and next(iter(node.users)).op == "call_module" and isinstance(
                    gm.get_submodule(next(iter(node.users)).target), nn.ReLU)
                order.append((node.target, relu))
    else:
        order = [(n, False) for n, m in gm.named_modules() if isinstance(m, _ROUNDED)]
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
    works on the stack of them (:func:`_adaround_layers`, which says when torch runs one thread and when all of
    torch's threads). Each scheme's result is the one it gets alone, whatever the number of workers.
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
            problems = [_Rounding(mod, x_in, y_t, scheme, relu and relu_aware, quadratic)
                        for mod, x_in, scheme in zip(mods, x_ins, schemes)]
            traces = [None if trace is None else functools.partial(trace, scheme=scheme, layer=name)
                      for scheme in schemes]
            with torch.enable_grad():
                new_ws = _adaround_layers(problems, iters, batch, lam, lr, seed + index[name], advance, stop_early,
                                          traces, pool, threads)
            for scheme, mod, new_w in zip(schemes, mods, new_ws):
                old = mod.weight.detach().clone()
                mod.weight.data.copy_(new_w)
                changes[scheme][name] = (old, new_w)
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
    kwargs go to :func:`adaround_schemes`."""
    return adaround_onnx_schemes(onnx_model, calib, [scheme], round_head=round_head, **kw)[scheme]


def adaround_onnx_schemes(onnx_model, calib: np.ndarray, schemes: Sequence[str], *, round_head: bool = True, **kw):
    """:func:`adaround_onnx` for several schemes at once (one FP32 pass, the schemes' problems solved side by side):
    returns {scheme: ModelProto}, each the same as :func:`adaround_onnx` gives for that scheme alone."""
    from ptqflow.models.graph.fx_prep import classifier_head, prepare_graph
    from ptqflow.models.graph.onnx2torch_import import import_onnx2torch

    onnx2torch = import_onnx2torch()

    gm = prepare_graph(onnx2torch.convert(onnx_model), fold_pad=False)
    if not round_head:
        head = set(classifier_head(gm, include_pool=False))
        kw["layers"] = [name for name, m in gm.named_modules()
                        if isinstance(m, _ROUNDED) and name not in head]
    return {scheme: _replace_initializers(onnx_model, changes)
            for scheme, (_, changes) in adaround_schemes(gm, calib, schemes, **kw).items()}


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
    :func:`ptqflow.models.graph.rewrites.name_unnamed_nodes`)."""
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
                         "name them first (ptqflow.models.graph.rewrites.name_unnamed_nodes)")
    return out


