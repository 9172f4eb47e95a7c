"""The operator schemas every backend implements.

Each backend owns a ``torch.library`` namespace (``fused_pool_torch``, ``fused_pool_triton``,
``fused_pool_cpp``: the table in ``backends/__init__.py``) holding exactly these operators with
exactly these signatures. The C++ extension declares the same strings in ``TORCH_LIBRARY``;
``_ops.py`` registers one fake kernel and one autograd formula per forward operator for every
namespace, so a new backend only has to provide the kernels.

Conventions shared by all operators (the public functions in ``functional.py`` guarantee them):

* Pooled input comes in one of two layouts. Padded: ``x`` is ``[B, L, D]`` and ``mask`` is a
  bool ``[B, L]`` tensor or ``None`` (all valid); ``cu_seqlens`` is ``None``. Packed: ``x`` is
  ``[T, D]``, ``mask`` is ``None`` and ``cu_seqlens`` is an int32/int64 ``[B + 1]`` tensor of
  row offsets. ``x`` and ``mask`` may have any strides.
* The gradient passed to a pooling backward (``[B, D]``, ``[B, 2D]`` or ``[B, K, D]``) is
  contiguous; other gradients may have any strides.
* ``num_tokens`` in a backward is ``L`` (padded) or ``T`` (packed): the token extent of ``grad_x``.
* Indices are int64 positions *within the sequence* (``0 .. len - 1``), ``-1`` where no token
  exists.
* ``lse`` (attention), ``mean`` and ``rstd`` (norms) are float32 (float64 for float64 input) and are
  only meant for the matching backward.
* A backward returns a zero-size tensor for the gradient of an optional input that was ``None``.
"""

from __future__ import annotations

import torch

# name -> schema (without the name), by family (pool, weighted, norm). Forward ops first, each
# followed by its backward.
SCHEMAS: dict[str, str] = {
    # -- pool: mean, max/min, k-max, mean+max ---------------------------------------------------
    "masked_mean": "(Tensor x, Tensor? mask, Tensor? cu_seqlens) -> Tensor",
    "masked_mean_backward": (
        "(Tensor grad, Tensor? mask, Tensor? cu_seqlens, SymInt num_tokens) -> Tensor"
    ),
    # largest=True: max, False: min. Returns (values [B, D], indices int64 [B, D]).
    "masked_extremum": (
        "(Tensor x, Tensor? mask, Tensor? cu_seqlens, bool largest) -> (Tensor, Tensor)"
    ),
    # Returns (values [B, k, D] in token order, indices int64 [B, k, D]).
    "masked_kmax": "(Tensor x, Tensor? mask, Tensor? cu_seqlens, int k) -> (Tensor, Tensor)",
    # Backward of every index-selecting pool: grad and indices are [B, K, D].
    "index_pool_backward": (
        "(Tensor grad, Tensor indices, Tensor? cu_seqlens, SymInt num_tokens) -> Tensor"
    ),
    # Returns (cat([mean, max], -1) [B, 2D], argmax int64 [B, D]).
    "masked_mean_max": "(Tensor x, Tensor? mask, Tensor? cu_seqlens) -> (Tensor, Tensor)",
    "masked_mean_max_backward": (
        "(Tensor grad, Tensor indices, Tensor? mask, Tensor? cu_seqlens, SymInt num_tokens)"
        " -> Tensor"
    ),
    # -- weighted: attention, weighted layers ----------------------------------------------------
    # scores is [B, L, H] (padded) or [T, H] (packed). Returns (out [B, D], lse [B, H]).
    "attention_pool": (
        "(Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens) -> (Tensor, Tensor)"
    ),
    "attention_pool_backward": (
        "(Tensor grad, Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens, Tensor out,"
        " Tensor lse) -> (Tensor, Tensor)"
    ),
    # layers: N tensors [B, L, D] of one dtype; weights: [N].
    "weighted_layer_pool": "(Tensor[] layers, Tensor weights) -> Tensor",
    "weighted_layer_pool_backward": (
        "(Tensor grad, Tensor[] layers, Tensor weights) -> (Tensor[], Tensor)"
    ),
    "weighted_layer_mean": "(Tensor[] layers, Tensor weights, Tensor? mask) -> Tensor",
    "weighted_layer_mean_backward": (
        "(Tensor grad, Tensor[] layers, Tensor weights, Tensor? mask) -> (Tensor[], Tensor)"
    ),
    # -- norm -------------------------------------------------------------------------------------
    # Normalizes over the last `normalized_ndim` dims. Returns (y, mean, rstd), stats shaped
    # x.shape[:-normalized_ndim].
    "layer_norm": (
        "(Tensor x, int normalized_ndim, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    "layer_norm_backward": (
        "(Tensor grad, Tensor x, int normalized_ndim, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd) -> (Tensor, Tensor, Tensor)"
    ),
    "rms_norm": (
        "(Tensor x, int normalized_ndim, Tensor? weight, float eps) -> (Tensor, Tensor)"
    ),
    "rms_norm_backward": (
        "(Tensor grad, Tensor x, int normalized_ndim, Tensor? weight, Tensor rstd)"
        " -> (Tensor, Tensor)"
    ),
    # Fused residual add: the norm of s = x + residual (same shape and dtype), formed in the
    # accumulation dtype. Returns (y, sum, mean, rstd): `sum` is s in x's dtype when
    # return_residual, else a zero-size tensor. The backward recomputes s from x and residual
    # (not from a saved sum: forward then moves 3 tensors instead of 4) and returns one gradient,
    # that of s, which is the gradient of both x and residual; grad_sum (the gradient of the
    # returned sum, None when it was not returned) is added into it.
    "add_layer_norm": (
        "(Tensor x, Tensor residual, int normalized_ndim, Tensor? weight, Tensor? bias,"
        " float eps, bool return_residual) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "add_layer_norm_backward": (
        "(Tensor grad, Tensor? grad_sum, Tensor x, Tensor residual, int normalized_ndim,"
        " Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
    ),
    # Returns (y, sum, rstd), as add_layer_norm.
    "add_rms_norm": (
        "(Tensor x, Tensor residual, int normalized_ndim, Tensor? weight, float eps,"
        " bool return_residual) -> (Tensor, Tensor, Tensor)"
    ),
    "add_rms_norm_backward": (
        "(Tensor grad, Tensor? grad_sum, Tensor x, Tensor residual, int normalized_ndim,"
        " Tensor? weight, Tensor rstd) -> (Tensor, Tensor)"
    ),
    # x is [B, C, *]; stats are [B, C].
    "instance_norm": (
        "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)"
    ),
    "instance_norm_backward": (
        "(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    # x is [B, L, D] (+ mask) or [T, D] (+ cu_seqlens); stats are [B, D].
    "masked_instance_norm": (
        "(Tensor x, Tensor? mask, Tensor? cu_seqlens, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)"
    ),
    "masked_instance_norm_backward": (
        "(Tensor grad, Tensor x, Tensor? mask, Tensor? cu_seqlens, Tensor? weight, Tensor? bias,"
        " Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
    ),
}

#: The family of every operator: the file name of its implementation in every backend
#: (``backends/reference/<family>.py``, ``backends/triton_backend/<family>.py``,
#: ``csrc/cpu/<family>_cpu.cpp``, ``csrc/cuda/<family>_cuda.cu``) and of its tests
#: (``tests/test_<family>.py``).
FAMILIES: dict[str, tuple[str, ...]] = {
    "pool": ("masked_mean", "masked_mean_backward", "masked_extremum", "masked_kmax",
             "index_pool_backward", "masked_mean_max", "masked_mean_max_backward"),
    "weighted": ("attention_pool", "attention_pool_backward", "weighted_layer_pool",
                 "weighted_layer_pool_backward", "weighted_layer_mean",
                 "weighted_layer_mean_backward"),
    "norm": ("layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
             "add_layer_norm", "add_layer_norm_backward", "add_rms_norm",
             "add_rms_norm_backward", "instance_norm", "instance_norm_backward",
             "masked_instance_norm", "masked_instance_norm_backward"),
}

FORWARD_OPS: tuple[str, ...] = tuple(n for n in SCHEMAS if not n.endswith("_backward"))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and statistics) dtype of an input dtype: float64 stays float64, every
    other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_size(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """``B`` of a padded ``[B, L, D]`` or packed ``[T, D]`` (+ ``cu_seqlens [B + 1]``) input."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def grad_x_shape(b: int, num_tokens, d, packed: bool) -> tuple:
    """Shape of the gradient of a pooled input: ``[B, num_tokens, D]``, or ``[T, D]`` packed."""
    return (num_tokens, d) if packed else (b, num_tokens, d)
