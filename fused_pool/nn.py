"""Drop-in ``torch.nn`` modules built on the fused functions.

Pooling modules keep the call of the Kaggle-style heads they replace,
``forward(last_hidden_state, attention_mask)``, and give the same numbers without their bugs
(padding that leaks NaN, ``-1e4``/``1e-4`` fills, NaN for all-padded rows). The norm modules
subclass their ``torch.nn`` counterparts, so constructor arguments, parameters and ``state_dict``
keys are exactly torch's and ``load_state_dict`` works both ways.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as fpf  # not `F`: that name means torch.nn.functional to a reader


class MeanPooling(nn.Module):
    """``[B, L, D]`` + mask ``[B, L]`` -> ``[B, D]``: mean over valid tokens."""

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return fpf.masked_mean(last_hidden_state, attention_mask)


class MaxPooling(nn.Module):
    """``[B, L, D]`` + mask -> ``[B, D]``: max over valid tokens."""

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return fpf.masked_max(last_hidden_state, attention_mask)


class MinPooling(nn.Module):
    """``[B, L, D]`` + mask -> ``[B, D]``: min over valid tokens."""

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return fpf.masked_min(last_hidden_state, attention_mask)


class KMaxPooling(nn.Module):
    """``[B, L, D]`` + mask -> ``[B, k, D]`` (token order) or, with ``reduce="mean"``,
    ``[B, D]``: the k largest valid values per feature."""

    def __init__(self, k: int, reduce: str = "none"):
        super().__init__()
        if reduce not in ("none", "mean"):
            raise ValueError(f"KMaxPooling: reduce must be 'none' or 'mean', got {reduce!r}")
        self.k, self.reduce = k, reduce

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return fpf.masked_kmax(last_hidden_state, attention_mask, self.k, reduce=self.reduce)

    def extra_repr(self) -> str:
        return f"k={self.k}, reduce={self.reduce!r}"


class MeanMaxPooling(nn.Module):
    """``[B, L, D]`` + mask -> ``[B, 2D]``: ``cat([mean, max], -1)`` in one pass."""

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return fpf.masked_mean_max(last_hidden_state, attention_mask)


class AttentionPooling(nn.Module):
    """Learned attention pooling: scores from Linear -> LayerNorm -> GELU -> Linear(in_dim, H),
    then ``attention_pool``. ``num_heads`` H > 1 gives each of H feature groups its own weights.
    Parameter names match the common ``self.attention = nn.Sequential(...)`` head."""

    def __init__(self, in_dim: int, num_heads: int = 1):
        super().__init__()
        if num_heads < 1 or in_dim % num_heads:
            raise ValueError(f"AttentionPooling: in_dim = {in_dim} must be divisible by "
                             f"num_heads = {num_heads}")
        self.num_heads = num_heads
        self.attention = nn.Sequential(
            nn.Linear(in_dim, in_dim),
            LayerNorm(in_dim),
            nn.GELU(),
            nn.Linear(in_dim, num_heads),
        )

    def forward(self, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        scores = self.attention(last_hidden_state)
        return fpf.attention_pool(last_hidden_state, scores, attention_mask)


class WeightedLayerPooling(nn.Module):
    """Learnable weighted average of ``all_hidden_states[layer_start:]`` -> ``[B, L, D]``.

    ``forward(all_hidden_states)`` takes the tuple a Hugging Face model returns with
    ``output_hidden_states=True`` (``num_hidden_layers + 1`` tensors), without stacking it.
    """

    def __init__(self, num_hidden_layers: int, layer_start: int = 4,
                 layer_weights: Tensor | None = None):
        super().__init__()
        self.num_hidden_layers, self.layer_start = num_hidden_layers, layer_start
        count = num_hidden_layers + 1 - layer_start
        if count < 1:
            raise ValueError(f"WeightedLayerPooling: layer_start = {layer_start} leaves no layer "
                             f"of num_hidden_layers + 1 = {num_hidden_layers + 1}")
        self.layer_weights = (layer_weights if layer_weights is not None
                              else nn.Parameter(torch.ones(count, dtype=torch.float)))

    def forward(self, all_hidden_states) -> Tensor:
        return fpf.weighted_layer_pool(all_hidden_states, self.layer_weights,
                                     layer_start=self.layer_start)


class ConcatPooling(nn.Module):
    """``cat([h[:, 0] for h in last k hidden states, last layer first], -1)`` -> ``[B, k*D]``."""

    def __init__(self, last_k: int = 4):
        super().__init__()
        if last_k < 1:
            raise ValueError(f"ConcatPooling: last_k must be at least 1, got {last_k}")
        self.last_k = last_k

    def forward(self, all_hidden_states) -> Tensor:
        if len(all_hidden_states) < self.last_k:
            raise ValueError(f"ConcatPooling: needs at least last_k = {self.last_k} hidden "
                             f"states, got {len(all_hidden_states)}")
        return torch.cat([all_hidden_states[-i][:, 0] for i in range(1, self.last_k + 1)], -1)


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by ``fused_pool.layer_norm``."""

    def forward(self, input: Tensor) -> Tensor:
        return fpf.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by ``fused_pool.rms_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        return fpf.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class AddLayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` of ``x + residual``, computed by ``fused_pool.add_layer_norm``:
    ``forward(x, residual)`` equals ``LayerNorm(...)(x + residual)``. Constructor, parameters
    and ``state_dict`` keys are ``torch.nn.LayerNorm``'s. ``return_residual=True`` makes
    ``forward`` return ``(y, x + residual)``."""

    def __init__(self, *args, return_residual: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.return_residual = return_residual

    def forward(self, x: Tensor, residual: Tensor):
        return fpf.add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias,
                                  self.eps, return_residual=self.return_residual)


class AddRMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` of ``x + residual``, computed by ``fused_pool.add_rms_norm``
    (constructor and ``state_dict`` keys of ``torch.nn.RMSNorm``; ``return_residual`` as
    ``AddLayerNorm``)."""

    def __init__(self, *args, return_residual: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.return_residual = return_residual

    def forward(self, x: Tensor, residual: Tensor):
        return fpf.add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps,
                                return_residual=self.return_residual)


class InstanceNorm1d(nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` (input statistics only) computed by
    ``fused_pool.instance_norm``; ``[B, C, L]`` or unbatched ``[C, L]`` input."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None):
        if track_running_stats:
            raise ValueError("InstanceNorm1d: track_running_stats=True is not supported; "
                             "fused_pool normalizes with input statistics only (use "
                             "torch.nn.InstanceNorm1d for running statistics)")
        super().__init__(num_features, eps, momentum, affine, False, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 2:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return fpf.instance_norm(input, self.weight, self.bias, self.eps)


class MaskedInstanceNorm(nn.Module):
    """``[B, L, D]`` + mask: each (sequence, feature) normalized over its valid tokens, with an
    optional per-feature affine ``weight``/``bias`` of shape ``[D]``; padded positions are 0."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        if affine:
            kw = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                cu_seqlens: Tensor | None = None) -> Tensor:
        return fpf.masked_instance_norm(x, mask, self.weight, self.bias, self.eps,
                                      cu_seqlens=cu_seqlens)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
