"""The public functions of fused_pool: check arguments, pick the backend, call its operator.

Semantics shared by every backend (``docs/semantics.md``): a token is valid where
``mask != 0``; padded values (NaN and Inf included) never reach an output or a gradient; a
sequence with no valid token pools to 0 with index -1 and zero gradient; ties go to the lowest
token index; accumulation is in float32 (float64 for float64 input) and outputs come back in the
input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _validate as v
from ._dispatch import ops as _ops_for


def masked_mean(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None
                ) -> Tensor:
    """Mean over valid tokens: ``x [B, L, D]`` (or packed ``[T, D]``) -> ``[B, D]``."""
    x, mask, cu = v.pool_input("masked_mean", x, mask, cu_seqlens)
    return _ops_for(x.device).masked_mean(x, mask, cu)


def _extremum(fn, x, mask, cu_seqlens, return_indices, largest):
    x, mask, cu = v.pool_input(fn, x, mask, cu_seqlens)
    values, indices = _ops_for(x.device).masked_extremum(x, mask, cu, largest)
    return (values, indices) if return_indices else values


def masked_max(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
               return_indices: bool = False):
    """Max over valid tokens -> ``[B, D]``; with ``return_indices`` also the int64 ``[B, D]``
    token positions (within the sequence; -1 for an empty sequence)."""
    return _extremum("masked_max", x, mask, cu_seqlens, return_indices, True)


def masked_min(x: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
               return_indices: bool = False):
    """Min over valid tokens -> ``[B, D]`` (and int64 indices, as ``masked_max``)."""
    return _extremum("masked_min", x, mask, cu_seqlens, return_indices, False)


def masked_kmax(x: Tensor, mask: Tensor | None = None, k: int = 1, *,
                cu_seqlens: Tensor | None = None, reduce: str = "none") -> Tensor:
    """The ``k`` largest valid values per feature.

    ``reduce="none"``: ``[B, k, D]`` in token order (k-max pooling of Kalchbrenner et al., 2014);
    a sequence with ``n < k`` valid tokens gives its ``n`` values, then zeros.
    ``reduce="mean"``: ``[B, D]``, the mean of those ``min(n, k)`` values (0 when ``n == 0``).
    ``k`` must be in ``[1, L]`` for padded input; packed input has no upper bound.
    """
    fn = "masked_kmax"
    if reduce not in ("none", "mean"):
        raise ValueError(f"{fn}: reduce must be 'none' or 'mean', got {reduce!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    x, mask, cu = v.pool_input(fn, x, mask, cu_seqlens)
    if k < 1 or (cu is None and k > x.shape[1]):
        bound = "" if cu is not None else f" and at most L = {x.shape[1]}"
        raise ValueError(f"{fn}: k must be at least 1{bound}, got k = {k} for x of shape "
                         f"{v.shape_str(x)}")
    values, indices = _ops_for(x.device).masked_kmax(x, mask, cu, k)
    if reduce == "none":
        return values
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = (indices >= 0).sum(1).clamp(min=1).to(acc)
    return (values.to(acc).sum(1) / count).to(x.dtype)


def masked_mean_max(x: Tensor, mask: Tensor | None = None, *,
                    cu_seqlens: Tensor | None = None) -> Tensor:
    """``cat([masked_mean, masked_max], -1)`` -> ``[B, 2D]``, in one pass over ``x``."""
    x, mask, cu = v.pool_input("masked_mean_max", x, mask, cu_seqlens)
    return _ops_for(x.device).masked_mean_max(x, mask, cu)[0]


def attention_pool(x: Tensor, scores: Tensor, mask: Tensor | None = None, *,
                   cu_seqlens: Tensor | None = None) -> Tensor:
    """``softmax(scores over valid tokens) @ x`` -> ``[B, D]``.

    ``scores`` is ``[B, L]`` or ``[B, L, H]`` (``[T]`` or ``[T, H]`` packed) with ``D % H == 0``:
    head ``h`` weights features ``h*D/H ... (h+1)*D/H - 1``. Padded scores are ignored, so they
    may hold anything; an empty sequence pools to 0.
    """
    fn = "attention_pool"
    x, mask, cu = v.pool_input(fn, x, mask, cu_seqlens)
    v.tensor(fn, "scores", scores, floating=True)
    lead = x.shape[:-1]
    if tuple(scores.shape[: len(lead)]) != tuple(lead) or scores.dim() not in (len(lead),
                                                                              len(lead) + 1):
        want = "[B, L] or [B, L, H]" if cu is None else "[T] or [T, H]"
        raise ValueError(f"{fn}: scores must be {want} matching x of shape {v.shape_str(x)}, "
                         f"got {v.shape_str(scores)}")
    v.same_device(fn, "scores", scores, x)
    if scores.dim() == len(lead):
        scores = scores.unsqueeze(-1)
    heads, d = scores.shape[-1], x.shape[-1]
    if heads < 1 or d % heads:
        raise ValueError(f"{fn}: the feature size D = {d} must be divisible by the number of "
                         f"heads H = {heads} (scores of shape {v.shape_str(scores)})")
    return _ops_for(x.device).attention_pool(x, scores, mask, cu)[0]


def weighted_layer_pool(hidden_states: Sequence[Tensor] | Tensor, weights, *,
                        layer_start: int = 0) -> Tensor:
    """``sum_i w_i h_i / sum_i w_i`` over ``hidden_states[layer_start:]`` -> ``[B, L, D]``.

    ``hidden_states`` is a sequence of ``[B, L, D]`` tensors (Hugging Face's
    ``output_hidden_states``) or one ``[N, B, L, D]`` tensor; it is never stacked.
    """
    fn = "weighted_layer_pool"
    layers = v.layer_list(fn, hidden_states, layer_start)
    weights = v.layer_weights(fn, weights, layers, layer_start)
    return _ops_for(layers[0].device).weighted_layer_pool(layers, weights)


def weighted_layer_mean(hidden_states: Sequence[Tensor] | Tensor, weights,
                        mask: Tensor | None = None, *, layer_start: int = 0) -> Tensor:
    """``masked_mean(weighted_layer_pool(hidden_states, weights, layer_start=...), mask)``
    -> ``[B, D]``, fused: each layer is read once and no ``[B, L, D]`` intermediate is made."""
    fn = "weighted_layer_mean"
    layers = v.layer_list(fn, hidden_states, layer_start)
    weights = v.layer_weights(fn, weights, layers, layer_start)
    _, mask, _ = v.pool_input(fn, layers[0], mask, None)
    return _ops_for(layers[0].device).weighted_layer_mean(layers, weights, mask)


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Same as ``torch.nn.functional.layer_norm``; statistics in float32 (float64)."""
    fn = "layer_norm"
    v.tensor(fn, "x", x, floating=True)
    shape = v.normalized_shape(fn, x, normalized_shape)
    weight = v.param(fn, "weight", weight, shape, x)
    bias = v.param(fn, "bias", bias, shape, x)
    return _ops_for(x.device).layer_norm(x, len(shape), weight, bias, v.eps_value(fn, eps))[0]


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """Same as ``torch.nn.functional.rms_norm`` (``eps=None``: ``torch.finfo(x.dtype).eps``)."""
    fn = "rms_norm"
    v.tensor(fn, "x", x, floating=True)
    shape = v.normalized_shape(fn, x, normalized_shape)
    weight = v.param(fn, "weight", weight, shape, x)
    eps = torch.finfo(x.dtype).eps if eps is None else v.eps_value(fn, eps)
    return _ops_for(x.device).rms_norm(x, len(shape), weight, eps)[0]


def _residual(fn: str, x: Tensor, residual) -> Tensor:
    v.tensor(fn, "residual", residual, floating=True)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"{fn}: residual must have the shape and dtype of x, got residual "
                         f"{residual.dtype} {v.shape_str(residual)} and x {x.dtype} "
                         f"{v.shape_str(x)}")
    v.same_device(fn, "residual", residual, x)
    return residual


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5, *,
                   return_residual: bool = False):
    """``F.layer_norm(x + residual, normalized_shape, weight, bias, eps)`` in one pass.

    ``x`` and ``residual`` have one shape and dtype (any strides). The sum is formed in float32
    (float64 for float64 input) and never rounded before it is normalized; with
    ``return_residual=True`` it is returned too, in the input dtype: ``(y, x + residual)`` (for
    pre-LN blocks, whose next residual stream is that sum). Gradients reach ``x``, ``residual``
    (the same tensor: that of the sum), ``weight`` and ``bias``, and flow through the returned
    sum.
    """
    fn = "add_layer_norm"
    v.tensor(fn, "x", x, floating=True)
    residual = _residual(fn, x, residual)
    shape = v.normalized_shape(fn, x, normalized_shape)
    weight = v.param(fn, "weight", weight, shape, x)
    bias = v.param(fn, "bias", bias, shape, x)
    rr = bool(return_residual)
    y, s, _, _ = _ops_for(x.device).add_layer_norm(x, residual, len(shape), weight, bias,
                                                   v.eps_value(fn, eps), rr)
    return (y, s) if rr else y


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
                 eps: float | None = None, *, return_residual: bool = False):
    """``F.rms_norm(x + residual, normalized_shape, weight, eps)`` in one pass (``eps=None``:
    ``torch.finfo(x.dtype).eps``); the sum and ``return_residual`` as ``add_layer_norm``."""
    fn = "add_rms_norm"
    v.tensor(fn, "x", x, floating=True)
    residual = _residual(fn, x, residual)
    shape = v.normalized_shape(fn, x, normalized_shape)
    weight = v.param(fn, "weight", weight, shape, x)
    eps = torch.finfo(x.dtype).eps if eps is None else v.eps_value(fn, eps)
    rr = bool(return_residual)
    y, s, _ = _ops_for(x.device).add_rms_norm(x, residual, len(shape), weight, eps, rr)
    return (y, s) if rr else y


def instance_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5) -> Tensor:
    """``x [B, C, *]`` normalized per (sample, channel) over the remaining dims: the same as
    ``torch.nn.functional.instance_norm`` with input statistics (``use_input_stats=True``)."""
    fn = "instance_norm"
    v.tensor(fn, "x", x, floating=True)
    if x.dim() < 3:
        raise ValueError(f"{fn}: x must be [B, C, *] with at least 3 dims, got shape "
                         f"{v.shape_str(x)}")
    if math.prod(x.shape[2:]) == 1:
        raise ValueError(f"{fn}: expected more than 1 spatial element per channel, got x of "
                         f"shape {v.shape_str(x)}")
    weight = v.param(fn, "weight", weight, (x.shape[1],), x)
    bias = v.param(fn, "bias", bias, (x.shape[1],), x)
    return _ops_for(x.device).instance_norm(x, weight, bias, v.eps_value(fn, eps))[0]


def masked_instance_norm(x: Tensor, mask: Tensor | None = None, weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-5, *,
                         cu_seqlens: Tensor | None = None) -> Tensor:
    """``x [B, L, D]`` (or packed ``[T, D]``): each (sequence, feature) normalized over its valid
    tokens, ``(x - mean) * rstd * weight[d] + bias[d]``; padded positions are 0."""
    fn = "masked_instance_norm"
    x, mask, cu = v.pool_input(fn, x, mask, cu_seqlens)
    weight = v.param(fn, "weight", weight, (x.shape[-1],), x)
    bias = v.param(fn, "bias", bias, (x.shape[-1],), x)
    return _ops_for(x.device).masked_instance_norm(x, mask, cu, weight, bias,
                                                   v.eps_value(fn, eps))[0]
