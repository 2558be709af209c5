"""The int8 grids AdaRound rounds onto: each scheme's scale and integer range, the range-defining (anchor) elements
kept at their extreme, and plain round-to-nearest snapping onto a grid."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


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


def anchor_mask(w: torch.Tensor, scheme: str) -> torch.Tensor:
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


def snap_anchors(w: torch.Tensor, k: torch.Tensor, s, kmin, kmax, mask, scheme) -> torch.Tensor:
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
    k = snap_anchors(wd, k, s, kmin, kmax, anchor_mask(wd, scheme), scheme)
    return (k * s).to(w.dtype)
