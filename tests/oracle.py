"""Independent oracles for the tests: one Python loop per sequence, plain torch ops.

Nothing here shares code with ``fused_pool``. Each function takes the public API's inputs and a
compute ``dtype``: float64 gives the reference, the input's own dtype gives "plain torch's own
error" for the tolerance policy. All functions are differentiable through torch autograd (the
selection oracles through ``gather`` at the expected index, so ties follow the contract).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def segments(x, mask=None, cu_seqlens=None):
    """``[(token positions, rows [n, D])]`` per sequence; positions are within the sequence."""
    out = []
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        for b in range(len(cu) - 1):
            pos = torch.arange(cu[b + 1] - cu[b], device=x.device)
            out.append((pos, x[cu[b]:cu[b + 1]]))
        return out
    for b in range(x.shape[0]):
        keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device) if mask is None \
            else mask[b] != 0
        pos = keep.nonzero().flatten()
        out.append((pos, x[b, pos]))
    return out


def _stack(rows, d, like):
    return torch.stack(rows) if rows else like.new_zeros(0, d)


def mean(x, mask=None, cu_seqlens=None, *, dtype=torch.float64):
    d = x.shape[-1]
    rows = [s.to(dtype).mean(0) if len(s) else x.new_zeros(d, dtype=dtype)
            for _, s in segments(x, mask, cu_seqlens)]
    return _stack(rows, d, x.to(dtype))


def _first_extreme(s, largest):
    """Index of the max (min) per column of s [n, D]: NaN counts as extreme, lowest index wins."""
    n = s.shape[0]
    best = []
    for d in range(s.shape[1]):
        col = s[:, d].tolist()
        j_best = 0
        for j in range(1, n):
            a, b = col[j], col[j_best]
            if math.isnan(b):
                break
            if math.isnan(a) or (a > b if largest else a < b):
                j_best = j
        best.append(j_best)
    return torch.tensor(best, dtype=torch.int64, device=s.device)


def extremum(x, mask=None, cu_seqlens=None, *, largest=True, dtype=torch.float64):
    """(values [B, D] in ``dtype``, indices [B, D] within the sequence, -1 if empty)."""
    d = x.shape[-1]
    vals, idxs = [], []
    for pos, s in segments(x, mask, cu_seqlens):
        if len(s) == 0:
            vals.append(x.new_zeros(d, dtype=dtype))
            idxs.append(torch.full((d,), -1, dtype=torch.int64, device=x.device))
            continue
        j = _first_extreme(s.detach().double(), largest)
        vals.append(s.to(dtype).gather(0, j[None])[0])
        idxs.append(pos[j])
    return _stack(vals, d, x.to(dtype)), torch.stack(idxs) if idxs else \
        torch.zeros(0, d, dtype=torch.int64)


def _kmax_rank(col, k):
    """Positions of the k largest entries of a list, NaN first (as torch.topk), equal values by
    lower position, returned in position order."""
    def key(j):
        v = col[j]
        return (0, 0.0, j) if math.isnan(v) else (1, -v, j)
    return sorted(sorted(range(len(col)), key=key)[:k])


def kmax(x, mask=None, cu_seqlens=None, *, k, reduce="none", dtype=torch.float64):
    """(values [B, k, D] or [B, D] in ``dtype``, indices [B, k, D] within the sequence)."""
    d = x.shape[-1]
    vals, idxs = [], []
    for pos, s in segments(x, mask, cu_seqlens):
        local = torch.full((k, d), -1, dtype=torch.int64, device=x.device)
        for c, col in enumerate(s.detach().double().t().tolist()):
            chosen = _kmax_rank(col, k)
            local[: len(chosen), c] = torch.tensor(chosen, dtype=torch.int64)
        if len(s):
            v = torch.where(local >= 0, s.to(dtype).gather(0, local.clamp(min=0)), 0)
            idxs.append(torch.where(local >= 0, pos[local.clamp(min=0)], -1))
        else:
            v = x.new_zeros(k, d, dtype=dtype)
            idxs.append(local)
        if reduce == "mean":
            v = v.sum(0) / max(min(k, len(s)), 1)
        vals.append(v)
    shape = (k, d) if reduce == "none" else (d,)
    if not vals:
        return x.new_zeros(0, *shape, dtype=dtype), torch.zeros(0, k, d, dtype=torch.int64)
    return torch.stack(vals), torch.stack(idxs)


def mean_max(x, mask=None, cu_seqlens=None, *, dtype=torch.float64):
    return torch.cat([mean(x, mask, cu_seqlens, dtype=dtype),
                      extremum(x, mask, cu_seqlens, dtype=dtype)[0]], -1)


def attention(x, scores, mask=None, cu_seqlens=None, *, dtype=torch.float64):
    d = x.shape[-1]
    if scores.dim() == x.dim() - 1:
        scores = scores.unsqueeze(-1)
    h = scores.shape[-1]
    rows = []
    seg_x = segments(x, mask, cu_seqlens)
    seg_s = segments(scores, mask, cu_seqlens)
    for (_, s), (_, sc) in zip(seg_x, seg_s):
        if len(s) == 0:
            rows.append(x.new_zeros(d, dtype=dtype))
            continue
        p = torch.softmax(sc.to(dtype), 0)  # [n, H]
        xs = s.to(dtype).reshape(len(s), h, d // h)
        rows.append((p[..., None] * xs).sum(0).reshape(d))
    return _stack(rows, d, x.to(dtype))


def weighted_layers(layers, weights, *, dtype=torch.float64):
    w = weights.to(dtype)
    total = sum(w[i] * h.to(dtype) for i, h in enumerate(layers))
    return total / w.sum()


def weighted_layer_mean(layers, weights, mask=None, *, dtype=torch.float64):
    """The mean over valid tokens of each layer, then weighted: padding is never touched."""
    w = weights.to(dtype)
    return sum(w[i] * mean(h, mask, dtype=dtype) for i, h in enumerate(layers)) / w.sum()


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def layer_norm(x, shape, weight, bias, eps, *, dtype=torch.float64):
    return F.layer_norm(x.to(dtype), shape, _cast(weight, dtype), _cast(bias, dtype), eps)


def rms_norm(x, shape, weight, eps, *, dtype=torch.float64):
    xs = x.to(dtype)
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = xs * torch.rsqrt(xs.pow(2).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight.to(dtype)


def instance_norm(x, weight, bias, eps, *, dtype=torch.float64):
    return F.instance_norm(x.to(dtype), weight=_cast(weight, dtype), bias=_cast(bias, dtype),
                           eps=eps)


def masked_instance_norm(x, mask, weight, bias, eps, cu_seqlens=None, *, dtype=torch.float64):
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    segs = segments(x, mask, cu_seqlens)
    starts = cu_seqlens.tolist() if cu_seqlens is not None else None
    pieces = []
    for b, (pos, s) in enumerate(segs):
        if len(s) == 0:
            continue
        s = s.to(dtype)
        y = (s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + eps)
        if weight is not None:
            y = y * weight.to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        pieces.append((b, pos, y))
    # Assemble out of place so autograd sees every piece.
    for b, pos, y in pieces:
        if starts is None:
            out = out.index_put((torch.full_like(pos, b), pos), y)
        else:
            out = out.index_put((pos + starts[b],), y)
    return out
