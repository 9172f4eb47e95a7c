"""Reference formulas of the ``pool`` family: masked mean, max/min, k-max, mean+max, and the
index-scatter backward shared by every selecting pool. Shapes and conventions: ``_schema.py``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._schema import acc_dtype
from ._layout import Padded, zeros_like_grad

# ----------------------------------------------------------------------------------------------
# Mean
# ----------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    """``out[b, d] = sum_{t valid} x[b, t, d] / n_b``; 0 where ``n_b == 0``."""
    p = Padded(x, mask, cu_seqlens)
    acc = acc_dtype(x.dtype)
    total = torch.where(p.vmask(p.x), p.x.to(acc), 0).sum(1)
    return (total / p.count.clamp(min=1)[:, None].to(acc)).to(x.dtype)


def masked_mean_backward(
    grad: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, num_tokens: int
) -> Tensor:
    """``grad_x[b, t, d] = grad[b, d] / n_b`` at valid tokens, 0 elsewhere."""
    gx = zeros_like_grad(num_tokens, grad, cu_seqlens is None)
    p = Padded(gx, mask, cu_seqlens)
    acc = acc_dtype(grad.dtype)
    scaled = grad.to(acc) / p.count.clamp(min=1)[:, None].to(acc)  # [B, D]
    gp = torch.where(p.vmask(p.x), scaled[:, None, :], 0).to(grad.dtype)
    return p.scatter(gp)


# ----------------------------------------------------------------------------------------------
# Max / min / k-max
# ----------------------------------------------------------------------------------------------


def _extremum(p: Padded, largest: bool) -> tuple[Tensor, Tensor]:
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
    return _extremum(Padded(x, mask, cu_seqlens), largest)


def masked_kmax(
    x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest valid values per feature, listed in token order.

    Selection ranks by value (NaN above everything, as ``torch.topk`` does), ties going to the
    lower token index. Rows with ``n < k`` valid tokens give their ``n`` values then zeros, with
    index -1 in the unused slots.
    """
    p = Padded(x, mask, cu_seqlens)
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
    gx = zeros_like_grad(num_tokens, grad, cu_seqlens is None)
    p = Padded(gx, None, cu_seqlens)
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


IMPLEMENTATIONS = {
    "masked_mean": masked_mean,
    "masked_mean_backward": masked_mean_backward,
    "masked_extremum": masked_extremum,
    "masked_kmax": masked_kmax,
    "index_pool_backward": index_pool_backward,
    "masked_mean_max": masked_mean_max,
    "masked_mean_max_backward": masked_mean_max_backward,
}
