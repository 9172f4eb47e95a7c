"""The ``pool`` family: masked mean, max, min, k-max, mean+max (``fused_pool/backends/*/pool.py``,
``csrc/cpu/pool_cpu.cpp``, ``csrc/cuda/pool_cuda.cu``).

1. The pooling contract (``pooling_contract.py``) and the pool-specific rules, on every backend.
2. Paths of the Triton kernels the contract's tiny shapes miss: the token split with its
   combine kernel, both k-max algorithms at every k, both index-backward strategies, several
   feature blocks, packed rows outside every sequence; each compared with the reference
   (exactly where the result is a selection).
3. Every Triton kernel of the family compiled for sm_90 (``sm90.py``).
"""

from __future__ import annotations

import pytest
import torch

import fused_pool as fp
from fused_pool.backends.reference import pool as ref

from . import oracle
from .helpers import leaf, make_mask, max_err, needs_triton, poison, poison_padding, rand
from .pooling_contract import *  # noqa: F403  (the contract's tests, parametrized by `op`)
from .pooling_contract import PoolOp
from .sm90 import compile_for_sm90, require_compiler_api, run_in_fresh_process

try:
    from fused_pool.backends.triton_backend import _layout
    from fused_pool.backends.triton_backend import pool as tk
except ImportError:  # no Triton: the Triton tests skip
    _layout = tk = None


def _k(k, x, cu):
    """k, lowered to L for padded input with fewer tokens (k > L is an error there)."""
    return k if cu is not None else max(1, min(k, x.shape[1]))


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
]


@pytest.fixture(params=POOL_OPS, ids=lambda o: o.name)
def op(request):
    return request.param


# ----------------------------------------------------------------------------------------------
# Pool-specific rules
# ----------------------------------------------------------------------------------------------


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


def test_mask_dtypes_are_equivalent(tgt):
    x = rand(3, 5, 4, device=tgt.device)
    mask = make_mask(3, 5, tgt.device)
    want = fp.masked_mean(x, mask)
    for dt in (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16):
        m = mask.to(dt) * (3 if dt != torch.uint8 else 1)  # any non-zero value is valid
        assert torch.equal(fp.masked_mean(x, m), want)
    assert torch.equal(fp.masked_mean(x), fp.masked_mean(x, torch.ones_like(mask)))


def test_seq_len_one(tgt):
    x = rand(3, 1, 5, device=tgt.device)
    mask = torch.tensor([[1], [0], [1]], device=tgt.device)
    torch.testing.assert_close(fp.masked_mean(x, mask)[[0, 2]], x[[0, 2], 0])
    torch.testing.assert_close(fp.masked_max(x, mask)[[0, 2]], x[[0, 2], 0])
    torch.testing.assert_close(fp.masked_kmax(x, mask, 1)[[0, 2], 0], x[[0, 2], 0])
    assert (fp.masked_mean(x, mask)[1] == 0).all()


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

# ----------------------------------------------------------------------------------------------
# Triton paths the contract's shapes miss
# ----------------------------------------------------------------------------------------------


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]


def _padded(b, length, d, dtype, *, ints=True):
    """Values with many ties (small integers), NaN and -inf at valid positions, NaN padding,
    an empty sequence and a leading hole."""
    x = (torch.randint(-3, 4, (b, length, d)) if ints else torch.randn(b, length, d)).to(dtype)
    mask = torch.rand(b, length) < 0.7
    mask[-1] = False
    mask[0, :2] = False
    mask[0, 5] = mask[0, 9] = True
    x[0, 5, 0] = float("nan")
    x[0, 9, 0] = float("nan")
    x[0, 5, 1] = float("-inf")
    x = torch.where(mask[..., None], x, float("nan"))
    return x.to(DEV), mask.to(DEV)


def _packed(lengths, d, dtype):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    x = torch.randint(-3, 4, (int(cu[-1]), d)).to(dtype)
    if x.shape[0] > 4:
        x[4, 0] = float("nan")
    return x.to(DEV), cu.to(DEV)


def _same(a, b, exact=True):
    if exact:
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    else:
        torch.testing.assert_close(a, b, equal_nan=True)


def _forward_all(x, mask, cu):
    for largest in (True, False):
        got, want = tk.masked_extremum(x, mask, cu, largest), ref.masked_extremum(x, mask, cu,
                                                                                 largest)
        _same(got[0], want[0])
        assert torch.equal(got[1], want[1])
    got, want = tk.masked_mean_max(x, mask, cu), ref.masked_mean_max(x, mask, cu)
    _same(got[0], want[0], exact=False)
    assert torch.equal(got[1], want[1])
    _same(tk.masked_mean(x, mask, cu), ref.masked_mean(x, mask, cu), exact=False)


@needs_triton
@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_token_split_equals_reference(monkeypatch, split, dtype):
    """Chunks of the token range are combined in token order: NaN and ties across chunks."""
    monkeypatch.setattr(_layout, "FORCE_SPLIT", split)
    x, mask = _padded(3, 19, 4, dtype)
    _forward_all(x, mask, None)
    xp, cu = _packed([0, 6, 0, 11, 2, 0], 4, dtype)
    _forward_all(xp, None, cu)


@needs_triton
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("pick_max_k", [0, 8], ids=["scatter", "compare"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_backward_strategies_write_every_element(monkeypatch, split, pick_max_k, dtype):
    """Both index-backward strategies (and the split) give the reference, zeros included, into
    memory poisoned with NaN."""
    monkeypatch.setattr(_layout, "FORCE_SPLIT", split)
    monkeypatch.setattr(tk, "PICK_MAX_K", pick_max_k)
    x, mask = _padded(3, 13, 5, dtype)
    xp, cu = _packed([3, 0, 9, 1], 5, dtype)
    for xx, m, c, n in ((x, mask, None, 13), (xp, None, cu, xp.shape[0])):
        b = x.shape[0] if c is None else c.shape[0] - 1
        for k in (1, 3):
            _, idx = ref.masked_kmax(xx, m, c, k)
            g = torch.randn(b, k, 5, dtype=dtype, device=DEV)
            poison(DEV)
            assert torch.equal(tk.index_pool_backward(g, idx, c, n),
                               ref.index_pool_backward(g, idx, c, n))
        _, idx = ref.masked_mean_max(xx, m, c)
        g = torch.randn(b, 10, dtype=dtype, device=DEV)
        poison(DEV)
        assert torch.equal(tk.masked_mean_max_backward(g, idx, m, c, n),
                           ref.masked_mean_max_backward(g, idx, m, c, n))
        poison(DEV)
        assert torch.equal(tk.masked_mean_backward(g[:, :5], m, c, n),
                           ref.masked_mean_backward(g[:, :5], m, c, n))


@needs_triton
@pytest.mark.parametrize("small_k", [16, 0], ids=["streaming", "select"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kmax_algorithms(monkeypatch, small_k, dtype):
    """Streaming top-k and threshold selection at several k: ties, NaN, -inf, -0.0 vs 0.0,
    rows with fewer than k valid tokens, padded and packed."""
    monkeypatch.setattr(tk, "SMALL_K", small_k)
    x, mask = _padded(3, 12, 3, dtype)
    x[1, :, 2] = torch.where(torch.arange(12, device=DEV) % 2 == 0, 0.0, -0.0).to(dtype)
    x = torch.where(mask[..., None], x, float("nan"))
    xp, cu = _packed([0, 7, 2], 3, dtype)
    for k in (1, 2, 5, 12):
        for args in ((x, mask, None), (xp, None, cu)):
            got, want = tk.masked_kmax(*args, k), ref.masked_kmax(*args, k)
            _same(got[0], want[0])
            assert torch.equal(got[1], want[1]), (k, got[1], want[1])


@needs_triton
def test_triton_several_feature_blocks():
    """D beyond one feature block (1024 under the interpreter), forward and backward."""
    x = torch.randn(2, 3, 1030, device=DEV)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool, device=DEV)
    _forward_all(x, mask, None)
    got, want = tk.masked_kmax(x, mask, None, 2), ref.masked_kmax(x, mask, None, 2)
    _same(got[0], want[0])
    assert torch.equal(got[1], want[1])
    idx = want[1][:, 0]
    g = torch.randn(2, 2060, device=DEV)
    assert torch.equal(tk.masked_mean_max_backward(g, idx, mask, None, 3),
                       ref.masked_mean_max_backward(g, idx, mask, None, 3))


@needs_triton
@pytest.mark.parametrize("split", [1, 2])
def test_triton_packed_gradient_rows_outside_every_sequence_are_zero(monkeypatch, split):
    """cu_seqlens that does not cover [0, T) (its values are not checked while tracing): the
    uncovered rows of every backward are 0, never uninitialized memory; the others match."""
    monkeypatch.setattr(_layout, "FORCE_SPLIT", split)
    x = torch.randn(7, 4, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 3, 5], device=DEV)  # rows 0, 5 and 6 belong to no sequence
    inner = cu - 1
    _, idx = ref.masked_mean_max(x[1:5], None, inner)
    _, kidx = ref.masked_kmax(x[1:5], None, inner, 2)
    g = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    gk = torch.randn(2, 2, 4, dtype=torch.float64, device=DEV)
    for run, want in (
        (lambda: tk.masked_mean_backward(g[:, :4], None, cu, 7),
         ref.masked_mean_backward(g[:, :4], None, inner, 4)),
        (lambda: tk.masked_mean_max_backward(g, idx, None, cu, 7),
         ref.masked_mean_max_backward(g, idx, None, inner, 4)),
        (lambda: tk.index_pool_backward(gk, kidx, cu, 7),
         ref.index_pool_backward(gk, kidx, inner, 4)),
    ):
        poison(DEV)
        got = run()
        assert (got[[0, 5, 6]] == 0).all()
        assert torch.equal(got[1:5], want)


@needs_triton
@pytest.mark.parametrize("split", [1, 2])
def test_triton_packed_rows_before_an_empty_first_sequence_get_no_gradient(monkeypatch, split):
    """cu_seqlens[0] > 0 (not checked while tracing) and sequence 0 empty: its index -1 must
    not select the row just before cu[0] (the pick backward once matched it)."""
    monkeypatch.setattr(_layout, "FORCE_SPLIT", split)
    x = torch.randn(7, 4, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 1, 5], device=DEV)  # rows 0, 5, 6 uncovered; sequence 0 empty
    _, idx = ref.masked_mean_max(x[1:5], None, cu - 1)
    g = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    gk = torch.randn(2, 1, 4, dtype=torch.float64, device=DEV)
    for got in (tk.masked_mean_max_backward(g, idx, None, cu, 7),
                tk.index_pool_backward(gk, idx[:, None], cu, 7)):
        assert (got[[0, 5, 6]] == 0).all()

# ----------------------------------------------------------------------------------------------
# sm_90 compile check
# ----------------------------------------------------------------------------------------------


def compile_all_for_sm90():
    """The kernels of ``triton_backend/pool.py`` in their main configurations, bfloat16 and
    float64 (run by ``run_in_fresh_process``)."""
    require_compiler_api()
    unit = ("stride_d", "stride_id")
    for dt in ("bf16", "fp64"):
        p, acc, fp64 = "*" + dt, "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
        bd = 128 if fp64 else 512
        seq = dict(x_ptr=p, start_ptr="*i64", end_ptr="*i64", count_ptr="*i64", mask_ptr="*u8")
        for partial in (False, True):
            out = acc if partial else p
            flags = dict(HAS_MASK=True, MEAN=True, EXT=True, LARGEST=False, PARTIAL=partial,
                         IS_FP64=fp64, BLOCK_T=8, BLOCK_D=bd)
            compile_for_sm90(tk._pool_fwd_kernel,
                             dict(seq, sum_ptr=out, val_ptr=out, idx_ptr="*i64"), flags, 4,
                             unit=unit)
        compile_for_sm90(tk._pool_combine_kernel, dict(
            count_ptr="*i64", psum_ptr=acc, pval_ptr=acc, pidx_ptr="*i64", sum_ptr=p, val_ptr=p,
            idx_ptr="*i64"), dict(MEAN=True, EXT=True, LARGEST=True, IS_FP64=fp64,
                                  BLOCK_D=bd), 4)
        bwd = dict(gx_ptr=p, cu_ptr="*i32", mask_ptr="*u8", count_ptr="*i64", gmean_ptr=p,
                   gsel_ptr=p, idx_ptr="*i64")
        for packed, mean, pick, one, scatter in ((False, True, True, True, False),
                                                 (True, False, True, False, False),
                                                 (True, False, False, False, True)):
            flags = dict(PACKED=packed, HAS_MASK=not packed, MEAN=mean, PICK=pick, PICK_ONE=one,
                         SCATTER=scatter, IS_FP64=fp64, BLOCK_T=8, BLOCK_D=bd)
            compile_for_sm90(tk._pool_bwd_kernel, bwd, flags, 4, unit=unit)
        kmax = dict(x_ptr=p, start_ptr="*i64", end_ptr="*i64", mask_ptr="*u8", val_ptr=p,
                    idx_ptr="*i64")
        for k_pad in (1, 16):  # k = 1 gives a [1, BLOCK_D] candidate block
            compile_for_sm90(tk._kmax_fwd_kernel, kmax, dict(
                HAS_MASK=True, IS_FP64=fp64, K_PAD=k_pad, BLOCK_T=16, BLOCK_D=64), 2, unit=unit)
        compile_for_sm90(tk._kmax_select_kernel, kmax, dict(
            HAS_MASK=False, IS_FP64=fp64, N_BITS=64 if fp64 else 32, BLOCK_T=16, BLOCK_D=64), 2,
            default="i64", unit=unit)


def test_triton_kernels_compile_for_sm90():
    """Every kernel of ``triton_backend/pool.py`` builds for sm_90 (a minute or two)."""
    run_in_fresh_process("test_pool.compile_all_for_sm90")
