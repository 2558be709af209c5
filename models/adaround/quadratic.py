"""A rounded layer as a function of its weight: its output, the input patches its flattened weight multiplies, and
the quadratic form of its reconstruction error in the weight change (exact over all calibration images)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def layer_fn(mod: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
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


def gram_same_conv(x: torch.Tensor, kernel: Tuple[int, int], chunk: int = 64) -> torch.Tensor:
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
def quadratic_form(mod, fn, x_in, y_target, chunk_elements: int = 1 << 20):
    """AdaRound's reconstruction error of a layer without a ReLU after it is a quadratic in the weight change
    D = W_q - W: sum over images and positions of |D p + r0|^2 with p the input patch and r0 = W p + b - y the error
    of the FP32 weights on these (already quantized) inputs. Returns (H, g, c) with H = sum p p^T [d, d],
    g = sum p r0^T [d, out] and c = sum |r0|^2, so the error is sum((D H + 2 g^T) * D) + c; or None when the layer
    is not a plain matrix product. H costs about as much as d / out forward passes of the layer over x_in (a third
    of that for stride-1 "same" convs, :func:`gram_same_conv`); g is the weight gradient of a conv with output
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
    H = gram_same_conv(x_in, mod.kernel_size) if same else torch.zeros(d, d)
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
