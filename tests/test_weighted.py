"""The ``weighted`` family: attention pooling and weighted-layer pooling / mean
(``fused_pool/backends/*/weighted.py``, ``csrc/cpu/weighted_cpu.cpp``,
``csrc/cuda/weighted_cuda.cu``).

1. The pooling contract (``pooling_contract.py``) for attention pooling with one and three
   heads, the attention-specific rules, and the weighted-layer ops, on every backend.
2. Paths of the Triton kernels the contract's defaults miss: the token split of attention
   pooling and of ``weighted_layer_mean`` (partials merged afterwards), several feature blocks
   per head, many layers per launch (N = 1, 13, 25) with a different stride per layer, layers
   split over several launches, the interpreter's bfloat16 rounding; each compared with the
   reference.
3. Every Triton kernel of the family compiled for sm_90 (``sm90.py``).
"""

from __future__ import annotations

import pytest
import torch

import fused_pool as fp
from fused_pool.backends.reference import weighted as ref

from . import oracle
from .helpers import (
    FLOAT_DTYPES,
    assert_policy_grads,
    leaf,
    make_mask,
    needs_triton,
    poison_padding,
    rand,
)
from .pooling_contract import *  # noqa: F403  (the contract's tests, parametrized by `op`)
from .pooling_contract import PoolOp
from .sm90 import compile_for_sm90, require_compiler_api, run_in_fresh_process

try:
    from fused_pool.backends.triton_backend import _layout
    from fused_pool.backends.triton_backend import weighted as tk
except ImportError:  # no Triton: the Triton tests skip
    _layout = tk = None


def _attn_ref(x, mask, cu, s, dtype):
    return oracle.attention(x, s, mask, cu, dtype=dtype)


ATTENTION_OPS = [
    PoolOp("attention", lambda x, m, cu, s: fp.attention_pool(x, s, m, cu_seqlens=cu),
           _attn_ref, heads=1),
    PoolOp("attention_3heads", lambda x, m, cu, s: fp.attention_pool(x, s, m, cu_seqlens=cu),
           _attn_ref, heads=3),
]


@pytest.fixture(params=ATTENTION_OPS, ids=lambda o: o.name)
def op(request):
    return request.param


# ----------------------------------------------------------------------------------------------
# Attention-specific rules
# ----------------------------------------------------------------------------------------------


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

# ----------------------------------------------------------------------------------------------
# Weighted layers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_weighted_layer_pool(tgt, dtype):
    layers = [rand(2, 5, 7, dtype=dtype, device=tgt.device) for _ in range(4)]
    w = rand(4, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
             device=tgt.device).abs() + 0.5

    def run(w, *hs):
        return fp.weighted_layer_pool(list(hs), w)

    def ref(w, *hs_dt):
        *hs, dt = hs_dt
        return oracle.weighted_layers(hs, w, dtype=dt)

    assert_policy_grads(run, ref, [w, *layers], dtype, "weighted_layer_pool")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_weighted_layer_mean(tgt, dtype):
    mask = make_mask(3, 6, tgt.device)
    layers = [poison_padding(rand(3, 6, 5, dtype=dtype, device=tgt.device), mask)
              for _ in range(3)]
    w = rand(3, device=tgt.device).abs() + 0.5
    if dtype == torch.float64:
        w = w.double()

    def run(w, *hs):
        return fp.weighted_layer_mean(list(hs), w, mask)

    def ref(w, *hs_dt):
        *hs, dt = hs_dt
        return oracle.weighted_layer_mean(hs, w, mask, dtype=dt)

    assert_policy_grads(run, ref, [w, *layers], dtype, "weighted_layer_mean")


def test_weighted_layers_layer_start_and_stacked_input(tgt):
    hs = [rand(2, 3, 4, device=tgt.device) for _ in range(6)]
    w = torch.tensor([1.0, 2.0, 3.0], device=tgt.device)
    want = oracle.weighted_layers(hs[3:], w).float()
    torch.testing.assert_close(fp.weighted_layer_pool(hs, w, layer_start=3), want)
    torch.testing.assert_close(fp.weighted_layer_pool(tuple(hs), w, layer_start=3), want)
    stacked = torch.stack(hs)
    torch.testing.assert_close(fp.weighted_layer_pool(stacked, w, layer_start=3), want)
    mask = make_mask(2, 3, tgt.device)
    torch.testing.assert_close(fp.weighted_layer_mean(hs, w, mask, layer_start=3),
                               fp.masked_mean(want, mask))
    # A plain list of numbers works as weights too.
    torch.testing.assert_close(fp.weighted_layer_pool(hs, [1, 2, 3], layer_start=3), want)


def test_weighted_layers_gradcheck(tgt):
    layers = [leaf(rand(2, 3, 4, dtype=torch.float64, device=tgt.device)) for _ in range(3)]
    w = leaf(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, device=tgt.device))
    mask = make_mask(2, 3, tgt.device)
    assert torch.autograd.gradcheck(lambda w, *h: fp.weighted_layer_pool(list(h), w),
                                    (w, *layers))
    assert torch.autograd.gradcheck(lambda w, *h: fp.weighted_layer_mean(list(h), w, mask),
                                    (w, *layers))


def test_weighted_layer_mean_padding_never_leaks(tgt):
    mask = make_mask(3, 5, tgt.device)
    clean = [rand(3, 5, 4, device=tgt.device) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 3.0], device=tgt.device, requires_grad=True)
    outs = []
    for pad in (0.0, float("nan"), float("inf")):
        hs = [leaf(poison_padding(h, mask, pad)) for h in clean]
        out = fp.weighted_layer_mean(hs, w, mask)
        g = torch.autograd.grad(out.sum(), [w, *hs])
        assert all(torch.isfinite(t).all() for t in g)
        outs.append((out, g[0]))
    for out, gw in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(gw, outs[0][1])

# ----------------------------------------------------------------------------------------------
# Triton paths the contract's defaults miss
# ----------------------------------------------------------------------------------------------


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _close(got, want, dtype):
    if isinstance(got, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w, dtype)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _mask(b, length):
    m = torch.rand(b, length, device=DEV) < 0.6
    m[0, :] = True
    m[-1, :] = False  # an empty sequence
    return m


@pytest.fixture(params=[1, 3], ids=lambda s: f"split{s}")
def split(request, monkeypatch):
    """Force the token split (several programs per sequence whose partials are merged)."""
    monkeypatch.setattr(_layout, "FORCE_SPLIT", request.param)
    return request.param


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("heads", [1, 2])
def test_triton_attention_padded(split, dtype, heads, monkeypatch):
    # Feature blocks of 16 (the floor of block_d): 2 blocks per head of 24 features.
    monkeypatch.setattr(tk, "_tile", lambda d, size: (4, 16, 1))
    b, length, d = 3, 37, 24 * heads
    x = torch.randn(b, d, length, dtype=dtype, device=DEV).transpose(1, 2)  # strided
    s = torch.randn(b, length, heads, dtype=dtype, device=DEV)
    mask = _mask(b, length)
    x = torch.where(mask[..., None], x, float("nan"))  # padding must never be read
    out, lse = tk.attention_pool(x, s, mask, None)
    ref_out, ref_lse = ref.attention_pool(x, s, mask, None)
    _close(out, ref_out, dtype)
    assert torch.equal(lse[-1], torch.full_like(lse[-1], float("-inf")))
    _close(lse[:-1], ref_lse[:-1], dtype)
    grad = torch.randn(b, d, dtype=dtype, device=DEV)
    got = tk.attention_pool_backward(grad, x, s, mask, None, out, lse)
    want = ref.attention_pool_backward(grad, x, s, mask, None, ref_out, ref_lse)
    _close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_attention_packed(split, dtype):
    lengths = torch.tensor([5, 0, 40, 1])
    cu = torch.zeros(5, dtype=torch.int32, device=DEV)
    cu[1:] = lengths.cumsum(0).to(DEV)
    t, d, heads = int(lengths.sum()), 12, 3
    x = torch.randn(t, 2 * d, dtype=dtype, device=DEV)[:, ::2]
    s = torch.randn(heads, t, dtype=dtype, device=DEV).t()
    out, lse = tk.attention_pool(x, s, None, cu)
    ref_out, ref_lse = ref.attention_pool(x, s, None, cu)
    _close(out, ref_out, dtype)
    grad = torch.randn(4, d, dtype=dtype, device=DEV)
    got = tk.attention_pool_backward(grad, x, s, None, cu, out, lse)
    want = ref.attention_pool_backward(grad, x, s, None, cu, ref_out, ref_lse)
    _close(got, want, dtype)


def _layers(n, b, length, d, dtype):
    """n layers [B, L, D] with three different stride patterns among them."""
    out = []
    for i in range(n):
        if i % 3 == 1:
            h = torch.randn(b, d, length, dtype=dtype, device=DEV).transpose(1, 2)
        elif i % 3 == 2:
            h = torch.randn(b, length, 2 * d, dtype=dtype, device=DEV)[..., 1::2]
        else:
            h = torch.randn(b, length, d, dtype=dtype, device=DEV)
        out.append(h)
    return out


@pytest.fixture(params=["one_launch", "chunks_of_4"])
def chunking(request, monkeypatch):
    if request.param == "chunks_of_4":
        monkeypatch.setattr(tk, "MAX_LAYERS", 4)
    return request.param


@needs_triton
@pytest.mark.parametrize("n", [1, 13, 25])
def test_triton_weighted_layer_pool_many_layers(n, chunking):
    dtype = torch.float64
    layers = _layers(n, 2, 5, 7, dtype)
    w = torch.rand(n, dtype=dtype, device=DEV) + 0.5
    _close(tk.weighted_layer_pool(layers, w), ref.weighted_layer_pool(layers, w),
           dtype)
    grad = torch.randn(2, 7, 5, dtype=dtype, device=DEV).transpose(1, 2)
    got = tk.weighted_layer_pool_backward(grad, layers, w)
    want = ref.weighted_layer_pool_backward(grad, layers, w)
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)


@needs_triton
@pytest.mark.parametrize("n", [1, 13, 25])
def test_triton_weighted_layer_mean_many_layers(n, chunking, split):
    dtype = torch.float64
    b, length, d = 3, 9, 5
    mask = _mask(b, length)
    layers = [torch.where(mask[..., None], h, float("nan"))
              for h in _layers(n, b, length, d, dtype)]
    w = torch.rand(n, dtype=dtype, device=DEV) + 0.5
    for m in (mask, None):
        hs = layers if m is not None else _layers(n, b, length, d, dtype)
        _close(tk.weighted_layer_mean(hs, w, m), ref.weighted_layer_mean(hs, w, m),
               dtype)
        grad = torch.randn(b, d, dtype=dtype, device=DEV)
        got = tk.weighted_layer_mean_backward(grad, hs, w, m)
        want = ref.weighted_layer_mean_backward(grad, hs, w, m)
        _close(got[0], want[0], dtype)
        _close(got[1], want[1], dtype)


@needs_triton
def test_triton_weighted_layers_bfloat16_round_to_nearest():
    """Outputs are rounded to nearest even, as on a GPU (the interpreter truncates unless told)."""
    layers = [torch.randn(2, 3, 40, device=DEV).to(torch.bfloat16) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 3.5], device=DEV)
    got = tk.weighted_layer_pool(layers, w)
    want = ref.weighted_layer_pool(layers, w)  # float32 sum, rounded by torch
    assert torch.equal(got, want)


@needs_triton
def test_triton_weights_in_another_dtype_and_zero_sizes():
    layers = [torch.randn(2, 0, 4, device=DEV) for _ in range(2)]
    w = torch.ones(2, dtype=torch.float64, device=DEV)
    assert tk.weighted_layer_pool(layers, w).shape == (2, 0, 4)
    out = tk.weighted_layer_mean(layers, w, None)
    assert torch.equal(out, torch.zeros(2, 4, device=DEV))
    grads, gw = tk.weighted_layer_mean_backward(torch.ones(2, 4, device=DEV), layers,
                                                      w, None)
    assert [g.shape for g in grads] == [(2, 0, 4)] * 2 and gw.dtype == torch.float64
    assert torch.equal(gw, torch.zeros(2, dtype=torch.float64, device=DEV))


@needs_triton
def test_triton_attention_packed_gradient_rows_outside_every_sequence_are_zero(split):
    """cu_seqlens that does not cover [0, T) (its values are not checked while tracing): the
    uncovered rows of both gradients are 0, never uninitialized memory; the others match."""
    x = torch.randn(7, 4, dtype=torch.float64, device=DEV)
    s = torch.randn(7, 2, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 3, 5], device=DEV)  # rows 0, 5 and 6 belong to no sequence
    out = tk.attention_pool(x, s, None, cu)
    g = torch.randn(2, 4, dtype=torch.float64, device=DEV)
    torch.full((1 << 20,), float("nan"), device=DEV)  # poison freed memory
    gx, gs = tk.attention_pool_backward(g, x, s, None, cu, *out)
    want = ref.attention_pool_backward(g, x[1:5], s[1:5], None, cu - 1, *out)
    for got, exp in zip((gx, gs), want):
        assert (got[[0, 5, 6]] == 0).all()
        torch.testing.assert_close(got[1:5], exp)

# ----------------------------------------------------------------------------------------------
# sm_90 compile check
# ----------------------------------------------------------------------------------------------


def compile_all_for_sm90():
    """The kernels of ``triton_backend/weighted.py`` in their main configurations, bfloat16
    and float64, 3 layers (run by ``run_in_fresh_process``)."""
    require_compiler_api()
    for dt in ("bf16", "fp64"):
        p, acc, f64 = "*" + dt, "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
        types = dict(x_ptr=p, s_ptr=p, out_ptr=p, grad_ptr=p, gx_ptr=p, gs_ptr=p,
                     lse_ptr=acc, pm_ptr=acc, pl_ptr=acc, pacc_ptr=acc, c_ptr=acc, wn_ptr=acc,
                     part_ptr=acc, partial_ptr=acc, start_ptr="*i64", end_ptr="*i64",
                     count_ptr="*i64", mask_ptr="*u8",
                     # tuple arguments: one element per layer, contiguous layers (stride_d = 1)
                     layers=(p,), grads=(p,), stride_b=("i32",), stride_l=("i32",),
                     stride_d=("i32",))
        for split in (1, 4):
            for mask in (True, False):
                compile_for_sm90(tk._attention_pool_fwd_kernel, types, dict(
                    HAS_MASK=mask, SPLIT=split, IS_FP64=f64, BLOCK_T=4, BLOCK_D=1024), 4)
        compile_for_sm90(tk._attention_pool_merge_kernel, types,
                         dict(SPLIT=5, BLOCK_S=8, BLOCK_D=1024), 4)
        for packed in (False, True):
            flags = dict(HAS_MASK=not packed, PACKED=packed, IS_FP64=f64)
            compile_for_sm90(tk._attention_pool_bwd_kernel, types,
                             dict(flags, SPLIT=4, BLOCK_T=4, BLOCK_D=1024), 4)
            compile_for_sm90(tk._attention_pool_bwd_scores_kernel, types,
                             dict(flags, BLOCK_T=512), 4)
        # float64 (and > 32 layers) tiles are one row deep on a GPU (_layer_tile)
        layered = dict(unit=("stride_d",), tuples=3)
        blocks = dict(N=3, IS_FP64=f64, BLOCK_R=1 if f64 else 4, BLOCK_D=512)
        compile_for_sm90(tk._weighted_layer_pool_fwd_kernel, types,
                         dict(blocks, ACCUMULATE=True), 8, **layered)
        compile_for_sm90(tk._weighted_layer_pool_bwd_kernel, types, blocks, 8, **layered)
        mean = dict(N=3, HAS_MASK=True, SPLIT=4, IS_FP64=f64, BLOCK_T=1 if f64 else 4,
                    BLOCK_D=512)
        compile_for_sm90(tk._weighted_layer_mean_fwd_kernel, types, dict(mean, FINAL=False), 8,
                         **layered)
        compile_for_sm90(tk._weighted_layer_mean_bwd_kernel, types, mean, 8, **layered)


def test_triton_kernels_compile_for_sm90():
    """Every kernel of ``triton_backend/weighted.py`` builds for sm_90, tuple arguments
    included."""
    run_in_fresh_process("test_weighted.compile_all_for_sm90")
