"""The ``"torch"`` backend: a pure-PyTorch implementation of every operator in ``_schema.py``.

This is the ground truth the kernels are tested against. It is written to be obviously right,
not fast: every op first turns its input into a padded ``[B, L, D]`` tensor plus a bool ``valid``
mask (packed ``cu_seqlens`` input is gathered into that form), then applies the formula with
``torch.where`` so that padded values, NaN and Inf included, are never used. Arithmetic runs in
float32 for half/bfloat16/float32 input and in float64 for float64 input; outputs are cast back.

Each backward is written out explicitly (not derived by autograd) so kernel authors can read the
formula they must match; ``gradcheck`` in the tests checks every one against finite differences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Padded:
    """``x`` viewed as padded ``[B, Lp, D]`` with a bool ``valid [B, Lp]`` (``Lp >= 1``).

    Padded input is used as is. Packed input (``cu_seqlens``) is gathered row by row; ``scatter``
    maps a padded gradient back onto the packed ``[T, D]`` layout.
    """

    def __init__(self, x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None):
        if cu_seqlens is None:
            b, length = x.shape[0], x.shape[1]
            self.rows = None
            valid = (
                torch.ones(b, length, dtype=torch.bool, device=x.device)
                if mask is None
                else mask.to(torch.bool)
            )
            xp = x
        else:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
            lengths = cu[1:] - cu[:-1]
            lmax = int(lengths.max()) if lengths.numel() else 0
            pos = torch.arange(lmax, device=x.device)
            valid = pos[None, :] < lengths[:, None]
            rows = cu[:-1, None] + pos[None, :]
            self.rows = torch.where(valid, rows, 0)
            xp = x[self.rows] if x.shape[0] > 0 else x.new_zeros(*self.rows.shape, x.shape[1])
        # An all-padded column keeps every reduction well defined when L == 0.
        if xp.shape[1] == 0:
            xp = xp.new_zeros(xp.shape[0], 1, *xp.shape[2:])
            valid = valid.new_zeros(valid.shape[0], 1)
        self.x = xp
        self.valid = valid
        self.count = valid.sum(1)  # [B] int64
        self.num_tokens = x.shape[1] if cu_seqlens is None else x.shape[0]

    def vmask(self, t: Tensor) -> Tensor:
        """``valid`` broadcast against a ``[B, Lp, ...]`` tensor ``t``."""
        return self.valid.reshape(*self.valid.shape, *([1] * (t.dim() - 2)))

    def scatter(self, gp: Tensor) -> Tensor:
        """A padded ``[B, Lp, ...]`` gradient (zero at padding) in the input's layout."""
        if self.rows is None:
            return gp[:, : self.num_tokens]
        out = gp.new_zeros(self.num_tokens, *gp.shape[2:])
        out[self.rows[self.valid]] = gp[self.valid]
        return out


def _zeros_like_grad(num_tokens: int, grad: Tensor, padded: bool) -> Tensor:
    b, d = grad.shape[0], grad.shape[-1]
    shape = (b, num_tokens, d) if padded else (num_tokens, d)
    return grad.new_zeros(shape)


# ----------------------------------------------------------------------------------------------
# Mean
# ----------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    """``out[b, d] = sum_{t valid} x[b, t, d] / n_b``; 0 where ``n_b == 0``."""
    p = _Padded(x, mask, cu_seqlens)
    acc = acc_dtype(x.dtype)
    total = torch.where(p.vmask(p.x), p.x.to(acc), 0).sum(1)
    return (total / p.count.clamp(min=1)[:, None].to(acc)).to(x.dtype)


def masked_mean_backward(
    grad: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, num_tokens: int
) -> Tensor:
    """``grad_x[b, t, d] = grad[b, d] / n_b`` at valid tokens, 0 elsewhere."""
    gx = _zeros_like_grad(num_tokens, grad, cu_seqlens is None)
    p = _Padded(gx, mask, cu_seqlens)
    acc = acc_dtype(grad.dtype)
    scaled = grad.to(acc) / p.count.clamp(min=1)[:, None].to(acc)  # [B, D]
    gp = torch.where(p.vmask(p.x), scaled[:, None, :], 0).to(grad.dtype)
    return p.scatter(gp)


# ----------------------------------------------------------------------------------------------
# Max / min / k-max
# ----------------------------------------------------------------------------------------------


def _extremum(p: _Padded, largest: bool) -> tuple[Tensor, Tensor]:
    """Max (or min) over valid tokens with the lowest index winning ties; NaN wins over numbers
    (as ``torch.max`` propagates it). Empty rows give value 0 and index -1."""
    fill = float("-inf") if largest else float("inf")
    xf = torch.where(p.vmask(p.x), p.x, fill)
    ext = xf.amax(1) if largest else xf.amin(1)  # NaN propagates
    hit = p.vmask(p.x) & ((p.x == ext[:, None]) | (p.x.isnan() & ext[:, None].isnan()))
    # argmax of a 0/1 tensor returns the first maximal position: the lowest index wins.
    idx = hit.to(torch.uint8).argmax(1)
    nonempty = (p.count > 0)[:, None]
    values = torch.where(nonempty, ext, 0).to(p.x.dtype)
    return values, torch.where(nonempty, idx, -1)


def masked_extremum(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, largest: bool
) -> tuple[Tensor, Tensor]:
    """Per-feature max (``largest``) or min over valid tokens, and its token index."""
    return _extremum(_Padded(x, mask, cu_seqlens), largest)


def masked_kmax(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest valid values per feature, listed in token order.

    Selection ranks by value (NaN above everything, as ``torch.topk`` does), ties going to the
    lower token index. Rows with ``n < k`` valid tokens give their ``n`` values then zeros, with
    index -1 in the unused slots.
    """
    p = _Padded(x, mask, cu_seqlens)
    xp, valid = p.x, p.vmask(p.x).expand_as(p.x)
    if xp.shape[1] < k:  # packed input whose longest sequence is shorter than k
        extra = k - xp.shape[1]
        xp = torch.cat([xp, xp.new_zeros(xp.shape[0], extra, xp.shape[2])], 1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], extra, valid.shape[2])], 1)
    # Two stable sorts give the order (valid first, then value descending, then index ascending).
    by_value = torch.sort(
        torch.where(valid, xp, float("-inf")), dim=1, descending=True, stable=True
    ).indices
    by_valid = torch.sort(
        valid.gather(1, by_value).to(torch.uint8), dim=1, descending=True, stable=True
    ).indices
    top = by_value.gather(1, by_valid)[:, :k]  # token indices, rank order
    used = torch.arange(k, device=x.device)[None, :, None] < p.count[:, None, None]
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(used, top, big), dim=1).values  # token order, unused last
    idx = torch.where(idx == big, -1, idx)
    values = torch.where(idx >= 0, xp.gather(1, idx.clamp(min=0)), 0)
    return values.to(x.dtype), idx


def index_pool_backward(
    grad: Tensor, indices: Tensor, cu_seqlens: Tensor | None, num_tokens: int
) -> Tensor:
    """``grad_x[b, indices[b, j, d], d] += grad[b, j, d]`` for every ``indices >= 0``."""
    gx = _zeros_like_grad(num_tokens, grad, cu_seqlens is None)
    p = _Padded(gx, None, cu_seqlens)
    gp = torch.zeros_like(p.x)
    used = indices >= 0
    gp.scatter_add_(1, indices.clamp(min=0), torch.where(used, grad, 0))
    return p.scatter(gp)


# ----------------------------------------------------------------------------------------------
# Mean + max
# ----------------------------------------------------------------------------------------------


def masked_mean_max(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``cat([masked_mean, masked_max], -1)`` and the argmax."""
    values, idx = masked_extremum(x, mask, cu_seqlens, True)
    return torch.cat([masked_mean(x, mask, cu_seqlens), values], -1), idx


def masked_mean_max_backward(
    grad: Tensor,
    indices: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    num_tokens: int,
) -> Tensor:
    d = indices.shape[-1]
    g_mean = masked_mean_backward(grad[:, :d], mask, cu_seqlens, num_tokens)
    g_max = index_pool_backward(grad[:, None, d:], indices[:, None], cu_seqlens, num_tokens)
    return g_mean + g_max


# ----------------------------------------------------------------------------------------------
# Attention pooling
# ----------------------------------------------------------------------------------------------


def _heads(p: _Padded, scores: Tensor, cu_seqlens: Tensor | None, acc: torch.dtype):
    """Scores as padded ``[B, Lp, H]`` in ``acc`` and x as ``[B, Lp, H, D/H]`` zeroed at padding."""
    s = _Padded(scores, None, cu_seqlens).x if cu_seqlens is not None else scores
    if s.shape[1] < p.x.shape[1]:  # L == 0 was padded to one column
        s = s.new_zeros(s.shape[0], p.x.shape[1], s.shape[2])
    h = s.shape[-1]
    b, lp, d = p.x.shape
    xz = torch.where(p.vmask(p.x), p.x.to(acc), 0).reshape(b, lp, h, d // h)
    return s.to(acc), xz


def attention_pool(
    x: Tensor, scores: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``out[b, h*Dh + e] = sum_t softmax_t(scores[b, :, h])[t] * x[b, t, h*Dh + e]`` over valid t.

    Returns ``(out, lse)`` with ``lse[b, h] = log sum_t exp(scores[b, t, h])`` (-inf for an
    empty row, whose output is 0).
    """
    acc = acc_dtype(x.dtype)
    p = _Padded(x, mask, cu_seqlens)
    s, xz = _heads(p, scores, cu_seqlens, acc)
    s = torch.where(p.vmask(s), s, float("-inf"))
    nonempty = (p.count > 0)[:, None]
    m = torch.where(nonempty, s.amax(1), 0)  # [B, H]
    e = torch.exp(s - m[:, None])  # 0 at padding
    denom = e.sum(1)
    prob = e / torch.where(nonempty, denom, 1)[:, None]
    out = (prob[..., None] * xz).sum(1).reshape(p.x.shape[0], p.x.shape[2])
    lse = torch.where(nonempty, m + denom.log(), float("-inf"))
    return out.to(x.dtype), lse


def attention_pool_backward(
    grad: Tensor,
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor]:
    """With ``p = softmax(scores)`` and ``c[t] = <grad_h, x[t]_h>`` per head:
    ``grad_x[t]_h = p[t] * grad_h`` and ``grad_scores[t] = p[t] * (c[t] - sum_u p[u] c[u])``.

    ``out`` is not needed here (``sum_u p[u] c[u]`` is recomputed in full precision); kernels
    may use ``<grad_h, out_h>`` instead.
    """
    del out
    acc = acc_dtype(x.dtype)
    p = _Padded(x, mask, cu_seqlens)
    s, xz = _heads(p, scores, cu_seqlens, acc)
    valid = p.vmask(s)
    prob = torch.where(valid, torch.exp(torch.where(valid, s, 0) - lse[:, None].to(acc)), 0)
    b, h = lse.shape
    gh = grad.to(acc).reshape(b, 1, h, p.x.shape[2] // h)
    c = (gh * xz).sum(-1)  # [B, Lp, H]
    delta = (prob * c).sum(1, keepdim=True)
    gs = prob * (c - delta)
    gx = (prob[..., None] * gh).reshape(p.x.shape)
    gx = torch.where(p.vmask(gx), gx, 0).to(x.dtype)
    gs = gs.to(scores.dtype)
    if cu_seqlens is None:
        return gx[:, : x.shape[1]], gs[:, : scores.shape[1]]
    return p.scatter(gx), _Padded(scores, None, cu_seqlens).scatter(gs)


# ----------------------------------------------------------------------------------------------
# Weighted layers
# ----------------------------------------------------------------------------------------------


def _normalized_weights(weights: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(dtype)
    w = weights.to(acc)
    total = w.sum()
    return w / total, total


def weighted_layer_pool(layers: list[Tensor], weights: Tensor) -> Tensor:
    """``out = sum_i w_i * layers[i] / sum_i w_i``, accumulated layer by layer (no stack)."""
    acc = acc_dtype(layers[0].dtype)
    w, _ = _normalized_weights(weights, layers[0].dtype)
    out = torch.zeros(layers[0].shape, dtype=acc, device=layers[0].device)
    for i, h in enumerate(layers):
        out += w[i] * h.to(acc)
    return out.to(layers[0].dtype)


def _weights_grad(c: Tensor, w: Tensor, total: Tensor, dtype: torch.dtype) -> Tensor:
    """d/dw_j of sum_i w_i c_i / sum_i w_i, given c_j = <grad, layer_j>: (c_j - <w/S, c>) / S."""
    return ((c - (w * c).sum()) / total).to(dtype)


def weighted_layer_pool_backward(
    grad: Tensor, layers: list[Tensor], weights: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``grad_layer_i = grad * w_i / S`` and ``grad_w_j = (<grad, h_j> - <grad, out>) / S``."""
    acc = acc_dtype(layers[0].dtype)
    w, total = _normalized_weights(weights, layers[0].dtype)
    g = grad.to(acc)
    grads = [(w[i] * g).to(h.dtype) for i, h in enumerate(layers)]
    c = torch.stack([(g * h.to(acc)).sum() for h in layers]) if layers else w.new_zeros(0)
    return grads, _weights_grad(c, w, total, weights.dtype)


def weighted_layer_mean(layers: list[Tensor], weights: Tensor, mask: Tensor | None) -> Tensor:
    """``masked_mean(weighted_layer_pool(layers, weights), mask)``: ``sum_i (w_i / S) mean_i``."""
    acc = acc_dtype(layers[0].dtype)
    w, _ = _normalized_weights(weights, layers[0].dtype)
    out = torch.zeros(layers[0].shape[0], layers[0].shape[2], dtype=acc, device=w.device)
    for i, h in enumerate(layers):
        out += w[i] * masked_mean(h.to(acc), mask, None)
    return out.to(layers[0].dtype)


def weighted_layer_mean_backward(
    grad: Tensor, layers: list[Tensor], weights: Tensor, mask: Tensor | None
) -> tuple[list[Tensor], Tensor]:
    acc = acc_dtype(layers[0].dtype)
    w, total = _normalized_weights(weights, layers[0].dtype)
    g = grad.to(acc)
    g_mean = masked_mean_backward(g, mask, None, layers[0].shape[1])  # [B, L, D] in acc
    grads = [(w[i] * g_mean).to(h.dtype) for i, h in enumerate(layers)]
    c = torch.stack([(g * masked_mean(h.to(acc), mask, None)).sum() for h in layers])
    return grads, _weights_grad(c, w, total, weights.dtype)


# ----------------------------------------------------------------------------------------------
# Norms. Each reduces x over groups; `_norm_backward` is the one shared formula.
# ----------------------------------------------------------------------------------------------


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, shape) -> Tensor:
    y = xhat
    if weight is not None:
        y = y * weight.to(xhat.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(xhat.dtype).reshape(shape)
    return y


def _norm_backward(gxhat: Tensor, xhat: Tensor, rstd: Tensor, dims, count, centered: bool):
    """dx for ``xhat = (x - mean) * rstd`` (``centered``) or ``x * rstd``, reduced over ``dims``
    of ``count`` elements: ``rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))``."""
    proj = (gxhat * xhat).sum(dims, keepdim=True) / count
    gx = gxhat - xhat * proj
    if centered:
        gx = gx - gxhat.sum(dims, keepdim=True) / count
    return rstd * gx


def _sum_batch(t: Tensor, normalized_ndim: int) -> Tensor:
    """Sum over the leading (non-normalized) dims; ``sum(())`` would reduce everything."""
    lead = tuple(range(t.dim() - normalized_ndim))
    return t.sum(lead) if lead else t


def layer_norm(x, normalized_ndim, weight, bias, eps):
    """``y = (x - mean) * rstd * w + b`` over the last ``normalized_ndim`` dims (biased var)."""
    acc = acc_dtype(x.dtype)
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xa = x.to(acc)
    mean = xa.mean(dims, keepdim=True)
    var = ((xa - mean) ** 2).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    y = _affine((xa - mean) * rstd, weight, bias, x.shape[x.dim() - normalized_ndim:])
    stat_shape = x.shape[: x.dim() - normalized_ndim]
    return y.to(x.dtype), mean.reshape(stat_shape), rstd.reshape(stat_shape)


def layer_norm_backward(grad, x, normalized_ndim, weight, bias, mean, rstd):
    acc = acc_dtype(x.dtype)
    nd = normalized_ndim
    dims = tuple(range(x.dim() - nd, x.dim()))
    shape = x.shape[x.dim() - nd:]
    stat = (*mean.shape, *([1] * nd))
    g = grad.to(acc)
    xhat = (x.to(acc) - mean.reshape(stat)) * rstd.reshape(stat)
    gxhat = g if weight is None else g * weight.to(acc).reshape(shape)
    count = max(1, shape.numel())
    gx = _norm_backward(gxhat, xhat, rstd.reshape(stat), dims, count, True).to(x.dtype)
    gw = _sum_batch(g * xhat, nd).to(weight.dtype) if weight is not None else x.new_zeros(0)
    gb = _sum_batch(g, nd).to(bias.dtype) if bias is not None else x.new_zeros(0)
    return gx, gw, gb


def rms_norm(x, normalized_ndim, weight, eps):
    """``y = x * rstd * w`` with ``rstd = 1 / sqrt(mean(x^2) + eps)`` over the last dims."""
    acc = acc_dtype(x.dtype)
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xa = x.to(acc)
    rstd = torch.rsqrt((xa * xa).mean(dims, keepdim=True) + eps)
    y = _affine(xa * rstd, weight, None, x.shape[x.dim() - normalized_ndim:])
    return y.to(x.dtype), rstd.reshape(x.shape[: x.dim() - normalized_ndim])


def rms_norm_backward(grad, x, normalized_ndim, weight, rstd):
    acc = acc_dtype(x.dtype)
    nd = normalized_ndim
    dims = tuple(range(x.dim() - nd, x.dim()))
    shape = x.shape[x.dim() - nd:]
    r = rstd.reshape(*rstd.shape, *([1] * nd))
    g = grad.to(acc)
    xhat = x.to(acc) * r
    gxhat = g if weight is None else g * weight.to(acc).reshape(shape)
    gx = _norm_backward(gxhat, xhat, r, dims, max(1, shape.numel()), False).to(x.dtype)
    gw = _sum_batch(g * xhat, nd).to(weight.dtype) if weight is not None else x.new_zeros(0)
    return gx, gw


def instance_norm(x, weight, bias, eps):
    """Per (sample, channel) of ``x [B, C, *]``: ``(x - mean) * rstd * w[c] + b[c]``."""
    acc = acc_dtype(x.dtype)
    b, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    xa = x.to(acc).reshape(b, c, s)
    mean = xa.mean(2, keepdim=True)
    rstd = torch.rsqrt(((xa - mean) ** 2).mean(2, keepdim=True) + eps)
    y = _affine((xa - mean) * rstd, weight, bias, (c, 1))
    return y.reshape(x.shape).to(x.dtype), mean.reshape(b, c), rstd.reshape(b, c)


def instance_norm_backward(grad, x, weight, bias, mean, rstd):
    acc = acc_dtype(x.dtype)
    b, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    g = grad.to(acc).reshape(b, c, s)
    r = rstd.reshape(b, c, 1)
    xhat = (x.to(acc).reshape(b, c, s) - mean.reshape(b, c, 1)) * r
    gxhat = g if weight is None else g * weight.to(acc).reshape(c, 1)
    count = max(1, g.shape[2])
    gx = _norm_backward(gxhat, xhat, r, (2,), count, True).reshape(x.shape).to(x.dtype)
    gw = (g * xhat).sum((0, 2)).to(weight.dtype) if weight is not None else x.new_zeros(0)
    gb = g.sum((0, 2)).to(bias.dtype) if bias is not None else x.new_zeros(0)
    return gx, gw, gb


def masked_instance_norm(x, mask, cu_seqlens, weight, bias, eps):
    """Per (sequence, feature), over valid tokens only: ``(x - mean) * rstd * w[d] + b[d]``;
    padded positions output 0. An empty sequence has mean 0 and rstd ``1 / sqrt(eps)``."""
    acc = acc_dtype(x.dtype)
    p = _Padded(x, mask, cu_seqlens)
    v = p.vmask(p.x)
    n = p.count.clamp(min=1)[:, None, None].to(acc)
    xa = torch.where(v, p.x.to(acc), 0)
    mean = xa.sum(1, keepdim=True) / n
    var = torch.where(v, (xa - mean) ** 2, 0).sum(1, keepdim=True) / n
    rstd = torch.rsqrt(var + eps)
    y = torch.where(v, _affine((xa - mean) * rstd, weight, bias, (1, 1, -1)), 0).to(x.dtype)
    y = p.scatter(y) if cu_seqlens is not None else y[:, : x.shape[1]]
    return y, mean[:, 0], rstd[:, 0]


def masked_instance_norm_backward(grad, x, mask, cu_seqlens, weight, bias, mean, rstd):
    acc = acc_dtype(x.dtype)
    p = _Padded(x, mask, cu_seqlens)
    v = p.vmask(p.x)
    g = torch.where(v, _Padded(grad, mask, cu_seqlens).x.to(acc), 0)
    r = rstd[:, None, :]
    xhat = torch.where(v, (p.x.to(acc) - mean[:, None, :]) * r, 0)
    gxhat = g if weight is None else g * weight.to(acc)
    n = p.count.clamp(min=1)[:, None, None].to(acc)
    gx = torch.where(v, _norm_backward(gxhat, xhat, r, (1,), n, True), 0).to(x.dtype)
    gx = p.scatter(gx) if cu_seqlens is not None else gx[:, : x.shape[1]]
    gw = (g * xhat).sum((0, 1)).to(weight.dtype) if weight is not None else x.new_zeros(0)
    gb = g.sum((0, 1)).to(bias.dtype) if bias is not None else x.new_zeros(0)
    return gx, gw, gb


IMPLEMENTATIONS = {
    name: globals()[name]
    for name in (
        "masked_mean", "masked_mean_backward", "masked_extremum", "masked_kmax",
        "index_pool_backward", "masked_mean_max", "masked_mean_max_backward", "attention_pool",
        "attention_pool_backward", "weighted_layer_pool", "weighted_layer_pool_backward",
        "weighted_layer_mean", "weighted_layer_mean_backward", "layer_norm",
        "layer_norm_backward", "rms_norm", "rms_norm_backward", "instance_norm",
        "instance_norm_backward", "masked_instance_norm", "masked_instance_norm_backward",
    )
}
