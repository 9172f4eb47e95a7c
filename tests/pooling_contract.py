"""The contract every pooling op meets (forward and gradients against the float64 oracle,
gradcheck, packed == padded, padding never leaks, empty rows, strided views, zero sizes,
no_grad), written once for the ops of two families: ``test_pool.py`` and ``test_weighted.py``
import these tests with ``from .pooling_contract import *`` and define the ``op`` fixture
(a ``PoolOp``) that parametrizes them; ``tgt`` (conftest.py) runs them on every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from .helpers import (
    FLOAT_DTYPES,
    assert_policy,
    leaf,
    make_mask,
    max_err,
    pack,
    poison,
    poison_padding,
    rand,
)

__all__ = [
    "PoolOp",
    "test_forward_matches_oracle", "test_backward_matches_oracle", "test_gradcheck_float64",
    "test_gradcheck_float64_packed", "test_packed_equals_padded", "test_padding_never_leaks",
    "test_empty_rows_are_zero", "test_non_contiguous_views", "test_zero_sizes",
    "test_no_grad_and_inference_mode",
]


@dataclass
class PoolOp:
    name: str
    run: Callable  # (x, mask, cu_seqlens, *extras) -> Tensor
    ref: Callable  # (x, mask, cu_seqlens, *extras, dtype=) -> Tensor
    heads: int = 0  # > 0: takes scores [B, L, heads] as an extra token-aligned input
    exact: bool = False  # selection ops: values must equal the input's exactly
    kwargs: dict = field(default_factory=dict)


def pool_dims(op: PoolOp, d: int) -> int:
    """Round D to a multiple of the op's head count."""
    return d if op.heads <= 1 else max(op.heads, d - d % op.heads)


def pool_inputs(op: PoolOp, tgt, b, length, d, dtype, *, kind="holes", pad=float("nan"),
            mask_dtype=torch.bool):
    d = pool_dims(op, d)
    mask = make_mask(b, length, tgt.device, kind=kind, dtype=mask_dtype)
    x = poison_padding(rand(b, length, d, dtype=dtype, device=tgt.device), mask, pad)
    extras = []
    if op.heads:
        s = rand(b, length, op.heads, dtype=dtype, device=tgt.device)
        extras.append(poison_padding(s, mask, pad))
    return x, mask, extras


def _shapes(tgt):
    if tgt.interpreted:
        return [(3, 5, 3), (2, 1, 7), (2, 4, 33)]
    return [(3, 7, 5), (2, 1, 3), (4, 9, 127), (2, 6, 769), (1, 3, 1), (2, 150, 6)]


def _check(op, out, x, mask, cu, extras, dtype, what):
    ref = op.ref(x, mask, cu, *extras, dtype=torch.float64)
    low = op.ref(x, mask, cu, *extras, dtype=dtype)
    if op.exact:
        assert out.dtype == dtype
        assert max_err(out, ref) == 0, f"{what}: selection must be exact"
    else:
        assert_policy(out, ref, low, dtype, what)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_oracle(tgt, op, dtype):
    for b, length, d in _shapes(tgt):
        for kind, pad in (("holes", float("nan")), ("prefix", float("inf")),
                          ("left", float("-inf"))):
            x, mask, extras = pool_inputs(op, tgt, b, length, d, dtype, kind=kind, pad=pad)
            poison(tgt.device)
            out = op.run(x, mask, None, *extras)
            assert out.dtype == dtype and out.device == x.device
            _check(op, out, x, mask, None, extras, dtype, f"{op.name} {b}x{length}x{d} {kind}")


def _ref_grads(op, x, mask, extras, proj, dtype):
    """The oracle's gradients computed in ``dtype`` (None where every sequence is empty)."""
    ins = [leaf(t, dtype) for t in (x, *extras)]
    r = op.ref(ins[0], mask, None, *ins[1:], dtype=dtype)
    if not r.requires_grad:
        return [None] * len(ins)
    return torch.autograd.grad(r, ins, proj.to(r.dtype), allow_unused=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_oracle(tgt, op, dtype):
    shapes = _shapes(tgt)[:3]
    for b, length, d in shapes:
        x, mask, extras = pool_inputs(op, tgt, b, length, d, dtype)
        inputs = [leaf(x), *[leaf(e) for e in extras]]
        out = op.run(inputs[0], mask, None, *inputs[1:])
        # The upstream gradient as the op sees it (rounded to its dtype), for every reference.
        proj = rand(*out.shape, dtype=torch.float64, device=tgt.device).to(dtype)
        got = torch.autograd.grad(out, inputs, proj.to(out.dtype))

        ref = _ref_grads(op, x, mask, extras, proj, torch.float64)
        low = _ref_grads(op, x, mask, extras, proj, dtype)
        for i, (g, r, lo) in enumerate(zip(got, ref, low)):
            r = torch.zeros_like(g, dtype=torch.float64) if r is None else r
            lo = torch.zeros_like(g) if lo is None else lo
            assert g.dtype == inputs[i].dtype
            assert torch.isfinite(g).all(), f"{op.name}: non-finite gradient (padding leaked?)"
            assert_policy(g, r, lo, dtype, f"{op.name} grad[{i}] {b}x{length}x{d}")


def test_gradcheck_float64(tgt, op):
    x, mask, extras = pool_inputs(op, tgt, 3, 4, 6, torch.float64, pad=0.5)
    inputs = (leaf(x), *[leaf(e) for e in extras])
    assert torch.autograd.gradcheck(lambda *a: op.run(a[0], mask, None, *a[1:]), inputs)


def test_gradcheck_float64_packed(tgt, op):
    x, mask, extras = pool_inputs(op, tgt, 3, 4, 6, torch.float64, kind="prefix", pad=0.5)
    xp, cu = pack(x, mask)
    inputs = (leaf(xp), *[leaf(pack(e, mask)[0]) for e in extras])
    assert torch.autograd.gradcheck(lambda *a: op.run(a[0], None, cu, *a[1:]), inputs)


def test_packed_equals_padded(tgt, op):
    dtype = torch.float32
    x, mask, extras = pool_inputs(op, tgt, 4, 6, 7, dtype, kind="prefix")
    xp, cu = pack(x, mask)
    extras_p = [pack(e, mask)[0] for e in extras]
    padded_in = [leaf(x), *[leaf(e) for e in extras]]
    packed_in = [leaf(xp), *[leaf(e) for e in extras_p]]
    out_pad = op.run(padded_in[0], mask, None, *padded_in[1:])
    out_pack = op.run(packed_in[0], None, cu, *packed_in[1:])
    torch.testing.assert_close(out_pack, out_pad, rtol=1e-6, atol=1e-6)
    proj = rand(*out_pad.shape, device=tgt.device)
    g_pad = torch.autograd.grad(out_pad, padded_in, proj)
    g_pack = torch.autograd.grad(out_pack, packed_in, proj)
    for gp, gk in zip(g_pad, g_pack):
        torch.testing.assert_close(gk, pack(gp, mask)[0], rtol=1e-6, atol=1e-6)
    for cu64 in (cu.long(),):  # int64 offsets give the same result
        torch.testing.assert_close(op.run(xp, None, cu64, *extras_p), out_pad,
                                   rtol=1e-6, atol=1e-6)


def test_padding_never_leaks(tgt, op):
    """NaN, +Inf, -Inf or huge values in padding: identical outputs and gradients."""
    x, mask, extras = pool_inputs(op, tgt, 3, 6, 6, torch.float32, pad=0.0)
    results = []
    for pad in (0.0, float("nan"), float("inf"), float("-inf"), 3e38, -3e38):
        ins = [leaf(poison_padding(t, mask, pad)) for t in (x, *extras)]
        out = op.run(ins[0], mask, None, *ins[1:])
        g = torch.autograd.grad(out, ins, torch.ones_like(out))
        assert all((gi[~mask] == 0).all() for gi in g), f"{op.name}: gradient at padding"
        results.append((out.detach(), g))
    for out, g in results[1:]:
        assert torch.equal(out, results[0][0]), f"{op.name}: padding changed the output"
        for a, b in zip(g, results[0][1]):
            assert torch.equal(a, b), f"{op.name}: padding changed a gradient"


def test_empty_rows_are_zero(tgt, op):
    x, _, extras = pool_inputs(op, tgt, 3, 5, 6, torch.float32, pad=1.0)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=tgt.device)
    mask[1, 2] = True
    ins = [leaf(poison_padding(t, mask)) for t in (x, *extras)]
    out = op.run(ins[0], mask, None, *ins[1:])
    assert (out[[0, 2]] == 0).all() and torch.isfinite(out).all()
    g = torch.autograd.grad(out, ins, torch.ones_like(out))
    for gi in g:
        assert torch.isfinite(gi).all() and (gi[[0, 2]] == 0).all()


def test_non_contiguous_views(tgt, op):
    d = pool_dims(op, 6)
    base = rand(4, 10, 2 * d, device=tgt.device)
    views = {
        "token_stride": base[:, ::2, :d],
        "transposed": base[:, :5, :d].transpose(0, 1).contiguous().transpose(0, 1),
        "feature_stride": base[:, :5, ::2][..., :d],
    }
    mask_base = make_mask(4, 10, tgt.device)
    mask = mask_base[:, ::2]  # a non-contiguous mask too
    scores = [rand(5, 4, op.heads, device=tgt.device).transpose(0, 1)] if op.heads else []
    for name, x in views.items():
        assert not x.is_contiguous()
        xl, xc = leaf(x), leaf(x.contiguous())
        out = op.run(xl, mask, None, *scores)
        torch.testing.assert_close(out, op.run(xc, mask.contiguous(), None, *scores),
                                   rtol=1e-6, atol=1e-6, msg=name)
        g1 = torch.autograd.grad(out.sum(), xl)[0]
        g2 = torch.autograd.grad(op.run(xc, mask, None, *scores).sum(), xc)[0]
        torch.testing.assert_close(g1, g2, msg=name)


@pytest.mark.parametrize("shape", [(0, 4, 6), (3, 4, 0), (3, 0, 6)], ids=["B0", "D0", "L0"])
def test_zero_sizes(tgt, op, shape):
    b, length, d = shape
    if op.name.startswith("kmax") and length == 0:
        pytest.skip("k > L = 0 is an error (test_api.py::test_bad_inputs_raise_clear_errors)")
    x = leaf(rand(b, length, d, device=tgt.device))
    mask = torch.ones(b, length, dtype=torch.bool, device=tgt.device)
    extras = [leaf(rand(b, length, max(op.heads, 1), device=tgt.device))] if op.heads else []
    out = op.run(x, mask, None, *extras)
    assert out.shape[0] == b and (out == 0).all()
    g = torch.autograd.grad(out.sum(), [x, *extras], allow_unused=True)
    assert g[0] is None or (g[0].shape == x.shape and (g[0] == 0).all())
    # Packed: L = 0 is B sequences of length 0.
    cu = torch.zeros(b + 1, dtype=torch.int32, device=tgt.device)
    xp = rand(0, d, device=tgt.device)
    ex_p = [rand(0, max(op.heads, 1), device=tgt.device)] if op.heads else []
    out_p = op.run(xp, None, cu, *ex_p)
    assert out_p.shape[0] == b and (out_p == 0).all()


def test_no_grad_and_inference_mode(tgt, op):
    mask = make_mask(2, 4, tgt.device)
    x = rand(2, 4, pool_dims(op, 3), device=tgt.device, requires_grad=True)
    extras = [rand(2, 4, op.heads, device=tgt.device)] if op.heads else []
    with torch.no_grad():
        out = op.run(x, mask, None, *extras)
    assert not out.requires_grad
    with torch.inference_mode():
        assert torch.isfinite(op.run(x.detach(), mask, None, *extras)).all()
