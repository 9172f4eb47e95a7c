"""The pooling contract, run on every available backend (``tgt`` fixture)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import fused_pool as fp

from . import oracle
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


@dataclass
class PoolOp:
    name: str
    run: Callable  # (x, mask, cu_seqlens, *extras) -> Tensor
    ref: Callable  # (x, mask, cu_seqlens, *extras, dtype=) -> Tensor
    heads: int = 0  # > 0: takes scores [B, L, heads] as an extra token-aligned input
    exact: bool = False  # selection ops: values must equal the input's exactly
    kwargs: dict = field(default_factory=dict)


def _k(k, x, cu):
    """k, lowered to L for padded input with fewer tokens (k > L is an error there)."""
    return k if cu is not None else max(1, min(k, x.shape[1]))


def _attn_ref(x, mask, cu, s, dtype):
    return oracle.attention(x, s, mask, cu, dtype=dtype)


POOL_OPS = [
    PoolOp("mean", lambda x, m, cu: fp.masked_mean(x, m, cu_seqlens=cu),
           lambda x, m, cu, dtype: oracle.mean(x, m, cu, dtype=dtype)),
    PoolOp("max", lambda x, m, cu: fp.masked_max(x, m, cu_seqlens=cu),
           lambda x, m, cu, dtype: oracle.extremum(x, m, cu, dtype=dtype)[0], exact=True),
    PoolOp("min", lambda x, m, cu: fp.masked_min(x, m, cu_seqlens=cu),
           lambda x, m, cu, dtype: oracle.extremum(x, m, cu, largest=False, dtype=dtype)[0],
           exact=True),
    PoolOp("kmax2", lambda x, m, cu: fp.masked_kmax(x, m, _k(2, x, cu), cu_seqlens=cu),
           lambda x, m, cu, dtype: oracle.kmax(x, m, cu, k=_k(2, x, cu), dtype=dtype)[0],
           exact=True),
    PoolOp("kmax3_mean",
           lambda x, m, cu: fp.masked_kmax(x, m, _k(3, x, cu), cu_seqlens=cu, reduce="mean"),
           lambda x, m, cu, dtype: oracle.kmax(x, m, cu, k=_k(3, x, cu), reduce="mean",
                                               dtype=dtype)[0]),
    PoolOp("mean_max", lambda x, m, cu: fp.masked_mean_max(x, m, cu_seqlens=cu),
           lambda x, m, cu, dtype: oracle.mean_max(x, m, cu, dtype=dtype)),
    PoolOp("attention", lambda x, m, cu, s: fp.attention_pool(x, s, m, cu_seqlens=cu),
           _attn_ref, heads=1),
    PoolOp("attention_3heads", lambda x, m, cu, s: fp.attention_pool(x, s, m, cu_seqlens=cu),
           _attn_ref, heads=3),
]
OPS_BY_NAME = {op.name: op for op in POOL_OPS}


def _dims(op: PoolOp, d: int) -> int:
    """Round D to a multiple of the op's head count."""
    return d if op.heads <= 1 else max(op.heads, d - d % op.heads)


def _inputs(op: PoolOp, tgt, b, length, d, dtype, *, kind="holes", pad=float("nan"),
            mask_dtype=torch.bool):
    d = _dims(op, d)
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
@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_forward_matches_oracle(tgt, op, dtype):
    for b, length, d in _shapes(tgt):
        for kind, pad in (("holes", float("nan")), ("prefix", float("inf")),
                          ("left", float("-inf"))):
            x, mask, extras = _inputs(op, tgt, b, length, d, dtype, kind=kind, pad=pad)
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
@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_backward_matches_oracle(tgt, op, dtype):
    shapes = _shapes(tgt)[:3]
    for b, length, d in shapes:
        x, mask, extras = _inputs(op, tgt, b, length, d, dtype)
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


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_gradcheck_float64(tgt, op):
    x, mask, extras = _inputs(op, tgt, 3, 4, 6, torch.float64, pad=0.5)
    inputs = (leaf(x), *[leaf(e) for e in extras])
    assert torch.autograd.gradcheck(lambda *a: op.run(a[0], mask, None, *a[1:]), inputs)


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_gradcheck_float64_packed(tgt, op):
    x, mask, extras = _inputs(op, tgt, 3, 4, 6, torch.float64, kind="prefix", pad=0.5)
    xp, cu = pack(x, mask)
    inputs = (leaf(xp), *[leaf(pack(e, mask)[0]) for e in extras])
    assert torch.autograd.gradcheck(lambda *a: op.run(a[0], None, cu, *a[1:]), inputs)


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_packed_equals_padded(tgt, op):
    dtype = torch.float32
    x, mask, extras = _inputs(op, tgt, 4, 6, 7, dtype, kind="prefix")
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


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_padding_never_leaks(tgt, op):
    """NaN, +Inf, -Inf or huge values in padding: identical outputs and gradients."""
    x, mask, extras = _inputs(op, tgt, 3, 6, 6, torch.float32, pad=0.0)
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


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_empty_rows_are_zero(tgt, op):
    x, _, extras = _inputs(op, tgt, 3, 5, 6, torch.float32, pad=1.0)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=tgt.device)
    mask[1, 2] = True
    ins = [leaf(poison_padding(t, mask)) for t in (x, *extras)]
    out = op.run(ins[0], mask, None, *ins[1:])
    assert (out[[0, 2]] == 0).all() and torch.isfinite(out).all()
    g = torch.autograd.grad(out, ins, torch.ones_like(out))
    for gi in g:
        assert torch.isfinite(gi).all() and (gi[[0, 2]] == 0).all()


def test_empty_rows_give_index_minus_one(tgt):
    x = rand(3, 4, 5, device=tgt.device)
    mask = make_mask(3, 4, tgt.device)
    mask[0] = False
    for fn in (fp.masked_max, fp.masked_min):
        values, idx = fn(x, mask, return_indices=True)
        assert idx.dtype == torch.int64
        assert (idx[0] == -1).all() and (values[0] == 0).all()
        assert (idx[1:][mask[1:].any(1)] >= 0).all()


@pytest.mark.parametrize("largest", [True, False])
def test_max_min_indices_and_ties(tgt, largest):
    fn = fp.masked_max if largest else fp.masked_min
    x = torch.zeros(2, 6, 3, device=tgt.device)
    top = 5.0 if largest else -5.0
    x[0, [1, 3, 4], 0] = top  # tie: token 1 must win
    x[0, [0, 1], 1] = top  # token 0 is padding: token 1 wins
    x[0, 2, 2] = float("nan")  # NaN propagates with its index
    x[1, :, :] = top  # every token ties
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], device=tgt.device).bool()
    xl = leaf(x)
    values, idx = fn(xl, mask, return_indices=True)
    assert idx.tolist() == [[1, 1, 2], [2, 2, 2]]
    assert values[0, 2].isnan() and values[0, 0] == top and values[1, 0] == top
    (g,) = torch.autograd.grad(values, xl, torch.ones_like(values))
    expected = torch.zeros_like(x)
    for b in range(2):
        for d in range(3):
            expected[b, idx[b, d], d] = 1
    assert torch.equal(g, expected), "only the winning (lowest) index receives the gradient"


def test_indices_are_deterministic(tgt):
    x = torch.randint(0, 3, (4, 9, 17), device=tgt.device).float()  # many ties
    mask = make_mask(4, 9, tgt.device)
    first = fp.masked_max(x, mask, return_indices=True)[1]
    for _ in range(3):
        assert torch.equal(fp.masked_max(x, mask, return_indices=True)[1], first)


def test_nan_at_valid_position_propagates(tgt):
    x = rand(2, 4, 3, device=tgt.device)
    mask = torch.ones(2, 4, dtype=torch.bool, device=tgt.device)
    x[0, 2, 1] = float("nan")
    assert fp.masked_mean(x, mask)[0, 1].isnan()
    assert fp.masked_max(x, mask)[0, 1].isnan()
    assert fp.masked_min(x, mask)[0, 1].isnan()
    assert not fp.masked_mean(x, mask)[1].isnan().any()


def test_kmax_order_and_short_rows(tgt):
    x = torch.tensor([[5.0, 1.0, 4.0, 2.0, 9.0], [3.0, 7.0, 7.0, 0.0, 1.0],
                      [1.0, 2.0, 3.0, 4.0, 5.0]], device=tgt.device)[..., None]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]],
                        device=tgt.device).bool()
    out = fp.masked_kmax(x, mask, 3)[..., 0]
    # Row 0: top-3 of [5, 1, 4, 2] is {5, 4, 2}, in token order. Row 1: ties 7, 7 at 1, 2 and 3.
    # Row 2: one valid token, then zeros.
    assert out.tolist() == [[5.0, 4.0, 2.0], [3.0, 7.0, 7.0], [2.0, 0.0, 0.0]]
    mean = fp.masked_kmax(x, mask, 3, reduce="mean")[..., 0]
    torch.testing.assert_close(mean, torch.tensor([11 / 3, 17 / 3, 2.0], device=tgt.device))
    xl = leaf(x)
    g = torch.autograd.grad(fp.masked_kmax(xl, mask, 3).sum(), xl)[0][..., 0]
    assert g.tolist() == [[1, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 1, 0, 0, 0]]


@pytest.mark.parametrize("k", [17, 40])
def test_kmax_large_k(tgt, k):
    """k beyond the streaming kernels' small-k path; ties and NaN included."""
    length = 45
    x = torch.randint(-4, 5, (3, length, 5)).float().to(tgt.device)
    x[0, 3, 1] = float("nan")
    mask = make_mask(3, length, tgt.device)
    mask[1, :] = False
    mask[1, : k // 2] = True  # fewer than k valid tokens
    xl = leaf(poison_padding(x, mask))
    out = fp.masked_kmax(xl, mask, k)
    want, want_idx = oracle.kmax(x, mask, k=k)
    assert max_err(out, want) == 0
    (g,) = torch.autograd.grad(out.sum(), xl)
    expected = torch.zeros_like(x)
    for b in range(3):
        for r in range(k):
            for d in range(5):
                if want_idx[b, r, d] >= 0:
                    expected[b, want_idx[b, r, d], d] = 1
    assert torch.equal(g, expected)


def test_kmax_ties_lowest_index(tgt):
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0]], device=tgt.device)[..., None]
    mask = torch.tensor([[0, 1, 1, 1]], device=tgt.device).bool()
    xl = leaf(x)
    out = fp.masked_kmax(xl, mask, 2)
    (g,) = torch.autograd.grad(out.sum(), xl)
    assert g[0, :, 0].tolist() == [0, 1, 1, 0]


def test_multihead_attention_heads_weight_their_features(tgt):
    b, length, h, dh = 2, 5, 3, 2
    x = rand(b, length, h * dh, device=tgt.device)
    s = rand(b, length, h, device=tgt.device)
    mask = make_mask(b, length, tgt.device, empty_rows=False)
    out = fp.attention_pool(x, s, mask)
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        single = fp.attention_pool(x[..., sl].contiguous(), s[..., head], mask)
        torch.testing.assert_close(out[:, sl], single)


def test_attention_minus_inf_scores_get_zero_weight(tgt):
    """A -inf score is a zero softmax weight, as in torch.softmax, wherever it sits (the first
    valid token included: an online softmax must not compute exp(-inf - -inf))."""
    x = rand(3, 5, 4, device=tgt.device)
    s = rand(3, 5, device=tgt.device)
    s[:, 0] = float("-inf")
    s[1, 1:4] = float("-inf")
    s[2, :] = float("-inf")
    s[2, 3] = 0.5  # one finite score: all the weight
    mask = torch.ones(3, 5, dtype=torch.bool, device=tgt.device)
    xl, sl = leaf(x), leaf(s)
    out = fp.attention_pool(xl, sl, mask)
    want = (torch.softmax(s.double(), 1)[..., None] * x.double()).sum(1)
    torch.testing.assert_close(out.double(), want)
    gx, gs = torch.autograd.grad(out.sum(), [xl, sl])
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all()
    assert (gs[s == float("-inf")] == 0).all()


def test_mask_dtypes_are_equivalent(tgt):
    x = rand(3, 5, 4, device=tgt.device)
    mask = make_mask(3, 5, tgt.device)
    want = fp.masked_mean(x, mask)
    for dt in (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16):
        m = mask.to(dt) * (3 if dt != torch.uint8 else 1)  # any non-zero value is valid
        assert torch.equal(fp.masked_mean(x, m), want)
    assert torch.equal(fp.masked_mean(x), fp.masked_mean(x, torch.ones_like(mask)))


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
def test_non_contiguous_views(tgt, op):
    d = _dims(op, 6)
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


@pytest.mark.parametrize("op", POOL_OPS, ids=lambda o: o.name)
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


def test_seq_len_one(tgt):
    x = rand(3, 1, 5, device=tgt.device)
    mask = torch.tensor([[1], [0], [1]], device=tgt.device)
    torch.testing.assert_close(fp.masked_mean(x, mask)[[0, 2]], x[[0, 2], 0])
    torch.testing.assert_close(fp.masked_max(x, mask)[[0, 2]], x[[0, 2], 0])
    torch.testing.assert_close(fp.masked_kmax(x, mask, 1)[[0, 2], 0], x[[0, 2], 0])
    assert (fp.masked_mean(x, mask)[1] == 0).all()


def test_no_grad_and_inference_mode(tgt):
    x = rand(2, 4, 3, device=tgt.device, requires_grad=True)
    mask = make_mask(2, 4, tgt.device)
    with torch.no_grad():
        out = fp.masked_mean_max(x, mask)
    assert not out.requires_grad
    with torch.inference_mode():
        for op in POOL_OPS:
            extras = [rand(2, 4, op.heads, device=tgt.device)] if op.heads else []
            x6 = rand(2, 4, _dims(op, 3), device=tgt.device)
            assert torch.isfinite(op.run(x6, mask, None, *extras)).all()


def test_large_values_accumulate_in_float32(tgt):
    # A half-precision sum of 2048 ones saturates at 2048 and loses units; fp32 accumulation
    # must give the exact mean, and a bf16 sum of 1 + tiny values must not drop them.
    x = torch.ones(1, 4096, 2, dtype=torch.float16, device=tgt.device) * 30
    assert fp.masked_mean(x)[0, 0].item() == 30.0  # a float16 running sum overflows at 65504
    xb = torch.full((1, 512, 1), 1e-3, dtype=torch.bfloat16, device=tgt.device)
    xb[0, 0] = 1.0
    got = fp.masked_mean(xb).double().item()
    want = (1.0 + 511 * xb[0, 1].double().item()) / 512
    assert abs(got - want) < 1e-4


def test_large_outputs_are_fully_written(tgt):
    """Outputs of 16 MiB and more come from a cache of reused blocks on the C++ CPU path:
    every element, padding included, must be written on every call (fresh, then reused)."""
    if tgt.interpreted:
        pytest.skip("too large for the Triton interpreter")
    x = rand(4, 1024, 1024, device=tgt.device)  # 16 MiB gradients
    for trial in range(3):
        mask = make_mask(4, 1024, tgt.device, kind="holes")
        xl = leaf(poison_padding(x, mask, 100.0 * (trial + 1)))
        g = torch.randn(4, 1024, device=tgt.device) * (trial + 1)
        (gx,) = torch.autograd.grad(fp.masked_mean(xl, mask), xl, g)
        n = mask.sum(1, keepdim=True).clamp(min=1)
        want = torch.where(mask[..., None], (g / n)[:, None, :], 0)
        torch.testing.assert_close(gx, want)
        y = fp.layer_norm(xl.detach(), 1024)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(xl.detach(), (1024,)),
                                   rtol=1e-5, atol=1e-5)
        del gx, y
