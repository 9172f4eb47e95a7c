"""Reference formulas of the ``norm`` family: LayerNorm, RMSNorm (and their fused residual-add
forms), InstanceNorm and masked InstanceNorm, forward and backward (one shared formula,
``_norm_backward``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._schema import acc_dtype
from ._layout import Padded

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


def _residual_sum(x: Tensor, residual: Tensor) -> Tensor:
    """``s = x + residual`` in the accumulation dtype (never rounded to x's dtype first)."""
    acc = acc_dtype(x.dtype)
    return x.to(acc) + residual.to(acc)


def _sum_output(s: Tensor, x: Tensor, return_residual: bool) -> Tensor:
    return s.to(x.dtype) if return_residual else x.new_empty(0)


def _add_sum_grad(gs: Tensor, grad_sum: Tensor | None, x: Tensor) -> Tensor:
    """The gradient of ``s`` (in the accumulation dtype) plus that of the returned sum."""
    if grad_sum is not None:
        gs = gs + grad_sum.to(gs.dtype)
    return gs.to(x.dtype)


def add_layer_norm(x, residual, normalized_ndim, weight, bias, eps, return_residual):
    """``layer_norm(s)`` with ``s = x + residual`` formed in float32 (float64): ``(y, s in x's
    dtype or zero-size, mean, rstd)``."""
    s = _residual_sum(x, residual)
    y, mean, rstd = layer_norm(s, normalized_ndim, weight, bias, eps)
    return y.to(x.dtype), _sum_output(s, x, return_residual), mean, rstd


def add_layer_norm_backward(grad, grad_sum, x, residual, normalized_ndim, weight, bias, mean,
                            rstd):
    """``(d s, dw, db)``: ``d s`` (the gradient of both ``x`` and ``residual``) is the LayerNorm
    gradient at the recomputed ``s`` plus ``grad_sum``."""
    gs, gw, gb = layer_norm_backward(grad, _residual_sum(x, residual), normalized_ndim, weight,
                                     bias, mean, rstd)
    return _add_sum_grad(gs, grad_sum, x), gw, gb


def add_rms_norm(x, residual, normalized_ndim, weight, eps, return_residual):
    """``rms_norm(s)`` with ``s = x + residual``: ``(y, s or zero-size, rstd)``."""
    s = _residual_sum(x, residual)
    y, rstd = rms_norm(s, normalized_ndim, weight, eps)
    return y.to(x.dtype), _sum_output(s, x, return_residual), rstd


def add_rms_norm_backward(grad, grad_sum, x, residual, normalized_ndim, weight, rstd):
    """``(d s, dw)``, as ``add_layer_norm_backward``."""
    gs, gw = rms_norm_backward(grad, _residual_sum(x, residual), normalized_ndim, weight, rstd)
    return _add_sum_grad(gs, grad_sum, x), gw


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
    p = Padded(x, mask, cu_seqlens)
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
    p = Padded(x, mask, cu_seqlens)
    v = p.vmask(p.x)
    g = torch.where(v, Padded(grad, mask, cu_seqlens).x.to(acc), 0)
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
    "layer_norm": layer_norm,
    "layer_norm_backward": layer_norm_backward,
    "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward,
    "add_layer_norm": add_layer_norm,
    "add_layer_norm_backward": add_layer_norm_backward,
    "add_rms_norm": add_rms_norm,
    "add_rms_norm_backward": add_rms_norm_backward,
    "instance_norm": instance_norm,
    "instance_norm_backward": instance_norm_backward,
    "masked_instance_norm": masked_instance_norm,
    "masked_instance_norm_backward": masked_instance_norm_backward,
}
