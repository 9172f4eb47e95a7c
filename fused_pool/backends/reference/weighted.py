"""Reference formulas of the ``weighted`` family: attention pooling (softmax over valid tokens,
one or more heads) and weighted-layer pooling / weighted-layer mean, forward and backward."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._schema import acc_dtype
from ._layout import Padded
from .pool import masked_mean, masked_mean_backward

# ----------------------------------------------------------------------------------------------
# Attention pooling
# ----------------------------------------------------------------------------------------------


def _heads(p: Padded, scores: Tensor, cu_seqlens: Tensor | None, acc: torch.dtype):
    """Scores as padded ``[B, Lp, H]`` in ``acc`` and x as ``[B, Lp, H, D/H]`` zeroed at padding."""
    s = Padded(scores, None, cu_seqlens).x if cu_seqlens is not None else scores
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
    p = Padded(x, mask, cu_seqlens)
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
    p = Padded(x, mask, cu_seqlens)
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
    return p.scatter(gx), Padded(scores, None, cu_seqlens).scatter(gs)


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


IMPLEMENTATIONS = {
    "attention_pool": attention_pool,
    "attention_pool_backward": attention_pool_backward,
    "weighted_layer_pool": weighted_layer_pool,
    "weighted_layer_pool_backward": weighted_layer_pool_backward,
    "weighted_layer_mean": weighted_layer_mean,
    "weighted_layer_mean_backward": weighted_layer_mean_backward,
}
