"""Argument checks shared by the public functions.

Every check raises a ``TypeError``/``ValueError`` whose message starts with the function's name and
names the argument and the shapes or dtypes involved, before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(t: Tensor) -> str:
    return str(tuple(t.shape))


def tensor(fn: str, name: str, t, *, floating: bool = False) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}"
        )
    return t


def same_device(fn: str, name: str, t: Tensor, x: Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {x_name} is on {x.device}")


def _skip_value_checks(t: Tensor) -> bool:
    """Reading cu_seqlens values needs a host sync, impossible while tracing or capturing."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def cu_seqlens_values(fn: str, cu: Tensor, total: int) -> None:
    if _skip_value_checks(cu):
        return
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(
            f"{fn}: cu_seqlens must start at 0 and end at T = x.shape[0] = {total}, got "
            f"cu_seqlens[0] = {values[0]} and cu_seqlens[-1] = {values[-1]}"
        )
    bad = next((i for i in range(1, len(values)) if values[i] < values[i - 1]), None)
    if bad is not None:
        raise ValueError(
            f"{fn}: cu_seqlens must be non-decreasing, but cu_seqlens[{bad}] = {values[bad]} < "
            f"cu_seqlens[{bad - 1}] = {values[bad - 1]}"
        )


def pool_input(
    fn: str, x, mask, cu_seqlens
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Check a pooled input and return ``(x, mask as bool or None, cu_seqlens)``.

    Padded layout: ``x [B, L, D]`` with ``mask [B, L]`` (any bool/integer/float dtype; valid where
    non-zero) or ``None``. Packed layout: ``x [T, D]`` with ``cu_seqlens [B + 1]``.
    """
    x = tensor(fn, "x", x, floating=True)
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError(f"{fn}: pass either mask or cu_seqlens, not both")
        cu = tensor(fn, "cu_seqlens", cu_seqlens)
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{fn}: cu_seqlens must be int32 or int64, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(
                f"{fn}: cu_seqlens must be 1-D [B + 1] with at least one entry, got shape "
                f"{shape_str(cu)}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"{fn}: with cu_seqlens, x must be packed [T, D] (2 dims), got shape {shape_str(x)}"
            )
        same_device(fn, "cu_seqlens", cu, x)
        cu_seqlens_values(fn, cu, x.shape[0])
        return x, None, cu
    if x.dim() != 3:
        raise ValueError(
            f"{fn}: x must be [B, L, D] (3 dims), or [T, D] with cu_seqlens, got shape "
            f"{shape_str(x)}"
        )
    if mask is None:
        return x, None, None
    mask = tensor(fn, "mask", mask)
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"{fn}: mask must have shape [B, L] = {tuple(x.shape[:2])} to match x of shape "
            f"{shape_str(x)}, got {shape_str(mask)}"
        )
    same_device(fn, "mask", mask, x)
    if mask.is_complex():
        raise TypeError(f"{fn}: mask must be bool, integer or real floating, got {mask.dtype}")
    return x, (mask if mask.dtype == torch.bool else mask != 0), None


def layer_list(fn: str, hidden_states, layer_start) -> list[Tensor]:
    """``hidden_states[layer_start:]`` as a list of ``[B, L, D]`` views, never a stacked copy."""
    if isinstance(layer_start, bool) or not isinstance(layer_start, int):
        raise TypeError(f"{fn}: layer_start must be an int, got {type(layer_start).__name__}")
    if isinstance(hidden_states, Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(
                f"{fn}: hidden_states as one tensor must be [N, B, L, D] (4 dims), got shape "
                f"{shape_str(hidden_states)}"
            )
        layers = list(hidden_states.unbind(0))
    elif isinstance(hidden_states, Sequence) and not isinstance(hidden_states, str):
        layers = list(hidden_states)
    else:
        raise TypeError(
            f"{fn}: hidden_states must be a sequence of [B, L, D] tensors or one [N, B, L, D] "
            f"tensor, got {type(hidden_states).__name__}"
        )
    if not 0 <= layer_start < len(layers):
        raise ValueError(
            f"{fn}: layer_start = {layer_start} must be in [0, {len(layers)}) for "
            f"{len(layers)} hidden states"
        )
    layers = layers[layer_start:]
    first = tensor(fn, f"hidden_states[{layer_start}]", layers[0], floating=True)
    if first.dim() != 3:
        raise ValueError(
            f"{fn}: each hidden state must be [B, L, D] (3 dims), got shape {shape_str(first)}"
        )
    for i, h in enumerate(layers[1:], layer_start + 1):
        tensor(fn, f"hidden_states[{i}]", h, floating=True)
        if h.shape != first.shape or h.dtype != first.dtype or h.device != first.device:
            raise ValueError(
                f"{fn}: hidden_states[{i}] is {h.dtype} {shape_str(h)} on {h.device}, but "
                f"hidden_states[{layer_start}] is {first.dtype} {shape_str(first)} on "
                f"{first.device}; all layers must match"
            )
    return layers


def layer_weights(fn: str, weights, layers: list[Tensor], layer_start: int) -> Tensor:
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float32, device=layers[0].device)
    tensor(fn, "weights", weights, floating=True)
    if weights.shape != (len(layers),):
        raise ValueError(
            f"{fn}: weights must be 1-D with one entry per layer in hidden_states[{layer_start}:] "
            f"({len(layers)}), got shape {shape_str(weights)}"
        )
    same_device(fn, "weights", weights, layers[0], "hidden_states")
    return weights


def normalized_shape(fn: str, x: Tensor, shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(not isinstance(s, int) for s in shape):
        raise ValueError(f"{fn}: normalized_shape must be an int or a non-empty sequence of ints")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{fn}: normalized_shape {list(shape)} must match the trailing dims of x, "
            f"got x of shape {shape_str(x)}"
        )
    return shape


def param(fn: str, name: str, p, shape: tuple[int, ...], x: Tensor) -> Tensor | None:
    if p is None:
        return None
    tensor(fn, name, p, floating=True)
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {shape_str(p)}")
    same_device(fn, name, p, x)
    return p


def eps_value(fn: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{fn}: eps must be a non-negative float, got {eps!r}")
    return float(eps)
