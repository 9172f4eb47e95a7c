"""Registration of every backend's operators with ``torch.library``.

A backend provides kernels for the schemas in ``_schema.py`` (in Python via ``register_backend``,
or in C++ via ``TORCH_LIBRARY``); this module adds, once per namespace, what makes those kernels
usable from PyTorch: a fake (meta) kernel per operator so ``torch.compile`` can trace them, and an
autograd formula per forward operator that calls the same backend's ``*_backward`` operator.

``torch.library.define``/``impl`` are used rather than ``torch.library.custom_op``: the latter
wraps every call in extra Python, which costs several microseconds per call in eager mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._schema import SCHEMAS, acc_dtype, batch_size, grad_x_shape

_LIBRARIES: dict[str, torch.library.Library] = {}


def _grad_x(grad: Tensor, cu_seqlens: Tensor | None, num_tokens, d) -> Tensor:
    return grad.new_empty(grad_x_shape(grad.shape[0], num_tokens, d, cu_seqlens is not None))


# ----------------------------------------------------------------------------------------------
# Fake kernels: output metadata only. Every real kernel returns contiguous outputs.
# ----------------------------------------------------------------------------------------------

def _fake_masked_mean(x, mask, cu_seqlens):
    return x.new_empty(batch_size(x, cu_seqlens), x.shape[-1])


def _fake_masked_mean_backward(grad, mask, cu_seqlens, num_tokens):
    return _grad_x(grad, cu_seqlens, num_tokens, grad.shape[-1])


def _fake_masked_extremum(x, mask, cu_seqlens, largest):
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    return x.new_empty(b, d), x.new_empty(b, d, dtype=torch.int64)


def _fake_masked_kmax(x, mask, cu_seqlens, k):
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    return x.new_empty(b, k, d), x.new_empty(b, k, d, dtype=torch.int64)


def _fake_index_pool_backward(grad, indices, cu_seqlens, num_tokens):
    return _grad_x(grad, cu_seqlens, num_tokens, grad.shape[-1])


def _fake_masked_mean_max(x, mask, cu_seqlens):
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    return x.new_empty(b, 2 * d), x.new_empty(b, d, dtype=torch.int64)


def _fake_masked_mean_max_backward(grad, indices, mask, cu_seqlens, num_tokens):
    return _grad_x(grad, cu_seqlens, num_tokens, indices.shape[-1])


def _fake_attention_pool(x, scores, mask, cu_seqlens):
    b = batch_size(x, cu_seqlens)
    return x.new_empty(b, x.shape[-1]), x.new_empty(b, scores.shape[-1], dtype=acc_dtype(x.dtype))


def _fake_attention_pool_backward(grad, x, scores, mask, cu_seqlens, out, lse):
    return x.new_empty(x.shape), scores.new_empty(scores.shape)


def _fake_weighted_layer_pool(layers, weights):
    return layers[0].new_empty(layers[0].shape)


def _fake_weighted_layer_pool_backward(grad, layers, weights):
    return [h.new_empty(h.shape) for h in layers], weights.new_empty(weights.shape)


def _fake_weighted_layer_mean(layers, weights, mask):
    return layers[0].new_empty(layers[0].shape[0], layers[0].shape[2])


def _fake_weighted_layer_mean_backward(grad, layers, weights, mask):
    return [h.new_empty(h.shape) for h in layers], weights.new_empty(weights.shape)


def _stats(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def _param_grad(p: Tensor | None, x: Tensor) -> Tensor:
    return x.new_empty(0) if p is None else p.new_empty(p.shape)


def _fake_layer_norm(x, normalized_ndim, weight, bias, eps):
    stat = x.shape[: x.dim() - normalized_ndim]
    return x.new_empty(x.shape), _stats(x, stat), _stats(x, stat)


def _fake_layer_norm_backward(grad, x, normalized_ndim, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x), _param_grad(bias, x)


def _fake_rms_norm(x, normalized_ndim, weight, eps):
    return x.new_empty(x.shape), _stats(x, x.shape[: x.dim() - normalized_ndim])


def _fake_rms_norm_backward(grad, x, normalized_ndim, weight, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x)


def _sum_out(x: Tensor, return_residual: bool) -> Tensor:
    return x.new_empty(x.shape if return_residual else (0,))


def _fake_add_layer_norm(x, residual, normalized_ndim, weight, bias, eps, return_residual):
    stat = x.shape[: x.dim() - normalized_ndim]
    return (x.new_empty(x.shape), _sum_out(x, return_residual), _stats(x, stat),
            _stats(x, stat))


def _fake_add_layer_norm_backward(grad, grad_sum, x, residual, normalized_ndim, weight, bias,
                                  mean, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x), _param_grad(bias, x)


def _fake_add_rms_norm(x, residual, normalized_ndim, weight, eps, return_residual):
    stat = x.shape[: x.dim() - normalized_ndim]
    return x.new_empty(x.shape), _sum_out(x, return_residual), _stats(x, stat)


def _fake_add_rms_norm_backward(grad, grad_sum, x, residual, normalized_ndim, weight, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x)


def _fake_instance_norm(x, weight, bias, eps):
    stat = x.shape[:2]
    return x.new_empty(x.shape), _stats(x, stat), _stats(x, stat)


def _fake_instance_norm_backward(grad, x, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x), _param_grad(bias, x)


def _fake_masked_instance_norm(x, mask, cu_seqlens, weight, bias, eps):
    stat = (batch_size(x, cu_seqlens), x.shape[-1])
    return x.new_empty(x.shape), _stats(x, stat), _stats(x, stat)


def _fake_masked_instance_norm_backward(grad, x, mask, cu_seqlens, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _param_grad(weight, x), _param_grad(bias, x)


FAKES: dict[str, Callable] = {
    "masked_mean": _fake_masked_mean,
    "masked_mean_backward": _fake_masked_mean_backward,
    "masked_extremum": _fake_masked_extremum,
    "masked_kmax": _fake_masked_kmax,
    "index_pool_backward": _fake_index_pool_backward,
    "masked_mean_max": _fake_masked_mean_max,
    "masked_mean_max_backward": _fake_masked_mean_max_backward,
    "attention_pool": _fake_attention_pool,
    "attention_pool_backward": _fake_attention_pool_backward,
    "weighted_layer_pool": _fake_weighted_layer_pool,
    "weighted_layer_pool_backward": _fake_weighted_layer_pool_backward,
    "weighted_layer_mean": _fake_weighted_layer_mean,
    "weighted_layer_mean_backward": _fake_weighted_layer_mean_backward,
    "layer_norm": _fake_layer_norm,
    "layer_norm_backward": _fake_layer_norm_backward,
    "rms_norm": _fake_rms_norm,
    "rms_norm_backward": _fake_rms_norm_backward,
    "add_layer_norm": _fake_add_layer_norm,
    "add_layer_norm_backward": _fake_add_layer_norm_backward,
    "add_rms_norm": _fake_add_rms_norm,
    "add_rms_norm_backward": _fake_add_rms_norm_backward,
    "instance_norm": _fake_instance_norm,
    "instance_norm_backward": _fake_instance_norm_backward,
    "masked_instance_norm": _fake_masked_instance_norm,
    "masked_instance_norm_backward": _fake_masked_instance_norm_backward,
}


# ----------------------------------------------------------------------------------------------
# Autograd: (setup_context, backward) per forward op. `ops` is the backend's torch.ops namespace.
# ----------------------------------------------------------------------------------------------

def _num_tokens(x: Tensor, cu_seqlens: Tensor | None):
    return x.shape[1] if cu_seqlens is None else x.shape[0]


def _pool_setup(ctx, inputs, output):
    x, mask, cu_seqlens = inputs[:3]
    ctx.num_tokens = _num_tokens(x, cu_seqlens)
    indices = output[1] if isinstance(output, tuple) else None
    ctx.save_for_backward(mask, cu_seqlens, indices)


def _autograd(ops) -> dict[str, tuple[Callable, Callable]]:
    """Autograd formulas whose backward calls the ``*_backward`` op in namespace ``ops``.

    Gradients of pooled outputs are small ``[B, (k,) D]`` tensors and are made contiguous here so
    kernels may assume it; the gradients of ``[B, L, D]``-sized outputs are passed as they come.
    """

    def masked_mean(ctx, grad):
        mask, cu, _ = ctx.saved_tensors
        return ops.masked_mean_backward(grad.contiguous(), mask, cu, ctx.num_tokens), None, None

    def masked_extremum(ctx, grad, _gi):
        _, cu, idx = ctx.saved_tensors
        gx = ops.index_pool_backward(grad[:, None].contiguous(), idx[:, None], cu, ctx.num_tokens)
        return gx, None, None, None

    def masked_kmax(ctx, grad, _gi):
        _, cu, idx = ctx.saved_tensors
        return ops.index_pool_backward(grad.contiguous(), idx, cu, ctx.num_tokens), None, None, None

    def masked_mean_max(ctx, grad, _gi):
        mask, cu, idx = ctx.saved_tensors
        gx = ops.masked_mean_max_backward(grad.contiguous(), idx, mask, cu, ctx.num_tokens)
        return gx, None, None

    def attention_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def attention_pool(ctx, grad, _glse):
        x, scores, mask, cu, out, lse = ctx.saved_tensors
        gx, gs = ops.attention_pool_backward(grad.contiguous(), x, scores, mask, cu, out, lse)
        need = ctx.needs_input_grad
        return (gx if need[0] else None), (gs if need[1] else None), None, None

    def layers_setup(ctx, inputs, output):
        layers, weights = inputs[0], inputs[1]
        ctx.num_layers = len(layers)
        ctx.save_for_backward(*layers, weights, *inputs[2:])

    def weighted_layer_pool(ctx, grad):
        saved = ctx.saved_tensors
        layers, weights = list(saved[: ctx.num_layers]), saved[ctx.num_layers]
        grads, gw = ops.weighted_layer_pool_backward(grad, layers, weights)
        return grads, gw

    def weighted_layer_mean(ctx, grad):
        saved = ctx.saved_tensors
        n = ctx.num_layers
        layers, weights, mask = list(saved[:n]), saved[n], saved[n + 1]
        grads, gw = ops.weighted_layer_mean_backward(grad.contiguous(), layers, weights, mask)
        return grads, gw, None

    def _params(gw, gb, weight, bias):
        return (gw if weight is not None else None), (gb if bias is not None else None)

    def layer_norm_setup(ctx, inputs, output):
        x, nd, weight, bias, _ = inputs
        ctx.nd = nd
        ctx.save_for_backward(x, weight, bias, output[1], output[2])

    def layer_norm(ctx, grad, _gm, _gr):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb = ops.layer_norm_backward(grad, x, ctx.nd, weight, bias, mean, rstd)
        return gx, None, *_params(gw, gb, weight, bias), None

    def rms_norm_setup(ctx, inputs, output):
        x, nd, weight, _ = inputs
        ctx.nd = nd
        ctx.save_for_backward(x, weight, output[1])

    def rms_norm(ctx, grad, _gr):
        x, weight, rstd = ctx.saved_tensors
        gx, gw = ops.rms_norm_backward(grad, x, ctx.nd, weight, rstd)
        return gx, None, (gw if weight is not None else None), None

    # Fused residual add: one gradient, that of s = x + residual, serves both inputs (as for
    # torch's add). The gradient of the returned sum exists only when it was returned.
    def add_layer_norm_setup(ctx, inputs, output):
        x, residual, nd, weight, bias, _, return_residual = inputs
        ctx.nd, ctx.return_residual = nd, return_residual
        ctx.save_for_backward(x, residual, weight, bias, output[2], output[3])

    def _add_grads(ctx, gs):
        need = ctx.needs_input_grad
        return (gs if need[0] else None), (gs if need[1] else None)

    def add_layer_norm(ctx, grad, gsum, _gm, _gr):
        x, residual, weight, bias, mean, rstd = ctx.saved_tensors
        gsum = gsum if ctx.return_residual else None
        gs, gw, gb = ops.add_layer_norm_backward(grad, gsum, x, residual, ctx.nd, weight, bias,
                                                 mean, rstd)
        return *_add_grads(ctx, gs), None, *_params(gw, gb, weight, bias), None, None

    def add_rms_norm_setup(ctx, inputs, output):
        x, residual, nd, weight, _, return_residual = inputs
        ctx.nd, ctx.return_residual = nd, return_residual
        ctx.save_for_backward(x, residual, weight, output[2])

    def add_rms_norm(ctx, grad, gsum, _gr):
        x, residual, weight, rstd = ctx.saved_tensors
        gsum = gsum if ctx.return_residual else None
        gs, gw = ops.add_rms_norm_backward(grad, gsum, x, residual, ctx.nd, weight, rstd)
        return *_add_grads(ctx, gs), None, (gw if weight is not None else None), None, None

    def instance_norm_setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight, bias, output[1], output[2])

    def instance_norm(ctx, grad, _gm, _gr):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb = ops.instance_norm_backward(grad, x, weight, bias, mean, rstd)
        return gx, *_params(gw, gb, weight, bias), None

    def masked_instance_norm_setup(ctx, inputs, output):
        x, mask, cu, weight, bias, _ = inputs
        ctx.save_for_backward(x, mask, cu, weight, bias, output[1], output[2])

    def masked_instance_norm(ctx, grad, _gm, _gr):
        x, mask, cu, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gw, gb = ops.masked_instance_norm_backward(grad, x, mask, cu, weight, bias, mean, rstd)
        return gx, None, None, *_params(gw, gb, weight, bias), None

    return {
        "masked_mean": (_pool_setup, masked_mean),
        "masked_extremum": (_pool_setup, masked_extremum),
        "masked_kmax": (_pool_setup, masked_kmax),
        "masked_mean_max": (_pool_setup, masked_mean_max),
        "attention_pool": (attention_setup, attention_pool),
        "weighted_layer_pool": (layers_setup, weighted_layer_pool),
        "weighted_layer_mean": (layers_setup, weighted_layer_mean),
        "layer_norm": (layer_norm_setup, layer_norm),
        "rms_norm": (rms_norm_setup, rms_norm),
        "add_layer_norm": (add_layer_norm_setup, add_layer_norm),
        "add_rms_norm": (add_rms_norm_setup, add_rms_norm),
        "instance_norm": (instance_norm_setup, instance_norm),
        "masked_instance_norm": (masked_instance_norm_setup, masked_instance_norm),
    }


def _contiguous_outputs(fn: Callable) -> Callable:
    """Python kernels may produce outputs with the input's strides; fake kernels promise
    contiguous ones, and Inductor relies on that promise."""

    def wrapper(*args):
        out = fn(*args)
        if isinstance(out, Tensor):
            return out.contiguous()
        return tuple(
            [t.contiguous() for t in o] if isinstance(o, list) else o.contiguous() for o in out
        )

    wrapper.__name__ = fn.__name__
    return wrapper


def register_backend(
    ns: str,
    kernels: dict[str, Callable] | None = None,
    dispatch_keys: Sequence[str] = ("CompositeExplicitAutograd",),
) -> None:
    """Make the operators of namespace ``ns`` (a backend's: ``backends/__init__.py``) usable:
    define them (when ``kernels`` are given in Python; a C++ backend has defined them already),
    then add fake kernels and autograd.

    Idempotent: a namespace is registered once per process.
    """
    if ns in _LIBRARIES:
        return
    lib = torch.library.Library(ns, "DEF" if kernels is not None else "FRAGMENT")
    if kernels is not None:
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
            for key in dispatch_keys:
                lib.impl(name, _contiguous_outputs(kernels[name]), key)
    for name in SCHEMAS:
        torch.library.register_fake(f"{ns}::{name}", FAKES[name], lib=lib)
    ops = getattr(torch.ops, ns)
    for name, (setup, backward) in _autograd(ops).items():
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup, lib=lib)
    _LIBRARIES[ns] = lib
