"""Paths of the Triton reduce kernels (fused_pool/triton/reduce.py) that the contract suite does
not reach at its shapes: the L-split with its combine kernel, both k-max algorithms at every k,
both index-backward strategies, several feature blocks. Each is compared with the torch
reference (exactly where the result is a selection)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_pool as fp
from fused_pool.backends import reference as ref

from .helpers import poison

pytestmark = pytest.mark.skipif("triton" not in fp.available_backends(),
                                reason="the triton backend is not available here")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def R():
    from fused_pool.triton import reduce

    return reduce


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


def _forward_all(R, x, mask, cu):
    for largest in (True, False):
        got, want = R.masked_extremum(x, mask, cu, largest), ref.masked_extremum(x, mask, cu,
                                                                                 largest)
        _same(got[0], want[0])
        assert torch.equal(got[1], want[1])
    got, want = R.masked_mean_max(x, mask, cu), ref.masked_mean_max(x, mask, cu)
    _same(got[0], want[0], exact=False)
    assert torch.equal(got[1], want[1])
    _same(R.masked_mean(x, mask, cu), ref.masked_mean(x, mask, cu), exact=False)


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_split_equals_reference(R, monkeypatch, split, dtype):
    """Chunks of the token range are combined in token order: NaN and ties across chunks."""
    monkeypatch.setattr(R, "FORCE_SPLIT", split)
    x, mask = _padded(3, 19, 4, dtype)
    _forward_all(R, x, mask, None)
    xp, cu = _packed([0, 6, 0, 11, 2, 0], 4, dtype)
    _forward_all(R, xp, None, cu)


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("pick_max_k", [0, 8], ids=["scatter", "compare"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_strategies_write_every_element(R, monkeypatch, split, pick_max_k, dtype):
    """Both index-backward strategies (and the split) give the reference, zeros included, into
    memory poisoned with NaN."""
    monkeypatch.setattr(R, "FORCE_SPLIT", split)
    monkeypatch.setattr(R, "PICK_MAX_K", pick_max_k)
    x, mask = _padded(3, 13, 5, dtype)
    xp, cu = _packed([3, 0, 9, 1], 5, dtype)
    for xx, m, c, n in ((x, mask, None, 13), (xp, None, cu, xp.shape[0])):
        b = x.shape[0] if c is None else c.shape[0] - 1
        for k in (1, 3):
            _, idx = ref.masked_kmax(xx, m, c, k)
            g = torch.randn(b, k, 5, dtype=dtype, device=DEV)
            poison(DEV)
            assert torch.equal(R.index_pool_backward(g, idx, c, n),
                               ref.index_pool_backward(g, idx, c, n))
        _, idx = ref.masked_mean_max(xx, m, c)
        g = torch.randn(b, 10, dtype=dtype, device=DEV)
        poison(DEV)
        assert torch.equal(R.masked_mean_max_backward(g, idx, m, c, n),
                           ref.masked_mean_max_backward(g, idx, m, c, n))
        poison(DEV)
        assert torch.equal(R.masked_mean_backward(g[:, :5], m, c, n),
                           ref.masked_mean_backward(g[:, :5], m, c, n))


@pytest.mark.parametrize("small_k", [16, 0], ids=["streaming", "select"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kmax_algorithms(R, monkeypatch, small_k, dtype):
    """Streaming top-k and threshold selection at several k: ties, NaN, -inf, -0.0 vs 0.0,
    rows with fewer than k valid tokens, padded and packed."""
    monkeypatch.setattr(R, "SMALL_K", small_k)
    x, mask = _padded(3, 12, 3, dtype)
    x[1, :, 2] = torch.where(torch.arange(12, device=DEV) % 2 == 0, 0.0, -0.0).to(dtype)
    x = torch.where(mask[..., None], x, float("nan"))
    xp, cu = _packed([0, 7, 2], 3, dtype)
    for k in (1, 2, 5, 12):
        for args in ((x, mask, None), (xp, None, cu)):
            got, want = R.masked_kmax(*args, k), ref.masked_kmax(*args, k)
            _same(got[0], want[0])
            assert torch.equal(got[1], want[1]), (k, got[1], want[1])


def test_several_feature_blocks(R):
    """D beyond one feature block (1024 under the interpreter), forward and backward."""
    x = torch.randn(2, 3, 1030, device=DEV)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool, device=DEV)
    _forward_all(R, x, mask, None)
    got, want = R.masked_kmax(x, mask, None, 2), ref.masked_kmax(x, mask, None, 2)
    _same(got[0], want[0])
    assert torch.equal(got[1], want[1])
    idx = want[1][:, 0]
    g = torch.randn(2, 2060, device=DEV)
    assert torch.equal(R.masked_mean_max_backward(g, idx, mask, None, 3),
                       ref.masked_mean_max_backward(g, idx, mask, None, 3))


@pytest.mark.parametrize("split", [1, 2])
def test_packed_gradient_rows_outside_every_sequence_are_zero(R, monkeypatch, split):
    """cu_seqlens that does not cover [0, T) (its values are not checked while tracing): the
    uncovered rows of every backward are 0, never uninitialized memory; the others match."""
    monkeypatch.setattr(R, "FORCE_SPLIT", split)
    x = torch.randn(7, 4, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 3, 5], device=DEV)  # rows 0, 5 and 6 belong to no sequence
    inner = cu - 1
    _, idx = ref.masked_mean_max(x[1:5], None, inner)
    _, kidx = ref.masked_kmax(x[1:5], None, inner, 2)
    g = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    gk = torch.randn(2, 2, 4, dtype=torch.float64, device=DEV)
    for run, want in (
        (lambda: R.masked_mean_backward(g[:, :4], None, cu, 7),
         ref.masked_mean_backward(g[:, :4], None, inner, 4)),
        (lambda: R.masked_mean_max_backward(g, idx, None, cu, 7),
         ref.masked_mean_max_backward(g, idx, None, inner, 4)),
        (lambda: R.index_pool_backward(gk, kidx, cu, 7),
         ref.index_pool_backward(gk, kidx, inner, 4)),
    ):
        poison(DEV)
        got = run()
        assert (got[[0, 5, 6]] == 0).all()
        assert torch.equal(got[1:5], want)


@pytest.mark.parametrize("split", [1, 2])
def test_packed_rows_before_an_empty_first_sequence_get_no_gradient(R, monkeypatch, split):
    """cu_seqlens[0] > 0 (not checked while tracing) and sequence 0 empty: its index -1 must
    not select the row just before cu[0] (the pick backward once matched it)."""
    monkeypatch.setattr(R, "FORCE_SPLIT", split)
    x = torch.randn(7, 4, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 1, 5], device=DEV)  # rows 0, 5, 6 uncovered; sequence 0 empty
    _, idx = ref.masked_mean_max(x[1:5], None, cu - 1)
    g = torch.randn(2, 8, dtype=torch.float64, device=DEV)
    gk = torch.randn(2, 1, 4, dtype=torch.float64, device=DEV)
    for got in (R.masked_mean_max_backward(g, idx, None, cu, 7),
                R.index_pool_backward(gk, idx[:, None], cu, 7)):
        assert (got[[0, 5, 6]] == 0).all()


# ----------------------------------------------------------------------------------------------
# The GPU compiler: it rejects code the interpreter runs (types, layouts), and needs no GPU.
# ----------------------------------------------------------------------------------------------


def _compile_for_sm90(fn, types, consts, num_warps, ints="i32"):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in consts else types.get(n, ints) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_all_for_sm90():
    """The reduce.py kernels in their main configurations, bfloat16 and float64. Run in a
    process without ``TRITON_INTERPRET`` (kernels must be JIT functions, not interpreted)."""
    from triton.compiler import ASTSource

    from fused_pool.triton import reduce

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        sys.exit(77)  # another Triton's compiler API: the test skips
    for dt in ("bf16", "fp64"):
        p, acc, fp64 = "*" + dt, "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
        bd = 128 if fp64 else 512
        seq = dict(x_ptr=p, start_ptr="*i64", end_ptr="*i64", count_ptr="*i64", mask_ptr="*u8")
        for partial in (False, True):
            out = acc if partial else p
            flags = dict(HAS_MASK=True, MEAN=True, EXT=True, LARGEST=False, PARTIAL=partial,
                         IS_FP64=fp64, BLOCK_T=8, BLOCK_D=bd)
            _compile_for_sm90(reduce._pool_fwd_kernel,
                              dict(seq, sum_ptr=out, val_ptr=out, idx_ptr="*i64"), flags, 4)
        _compile_for_sm90(reduce._pool_combine_kernel, dict(
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
            _compile_for_sm90(reduce._pool_bwd_kernel, bwd, flags, 4)
        kmax = dict(x_ptr=p, start_ptr="*i64", end_ptr="*i64", mask_ptr="*u8", val_ptr=p,
                    idx_ptr="*i64")
        for k_pad in (1, 16):  # k = 1 gives a [1, BLOCK_D] candidate block
            _compile_for_sm90(reduce._kmax_fwd_kernel, kmax, dict(
                HAS_MASK=True, IS_FP64=fp64, K_PAD=k_pad, BLOCK_T=16, BLOCK_D=64), 2)
        _compile_for_sm90(reduce._kmax_select_kernel, kmax, dict(
            HAS_MASK=False, IS_FP64=fp64, N_BITS=64 if fp64 else 32, BLOCK_T=16, BLOCK_D=64), 2,
            ints="i64")


def test_kernels_compile_for_sm90():
    """Triton's compiler and ptxas (shipped with Triton) build the kernels for an H100/H200
    without a GPU: catches what the interpreter lets through. Takes a minute or two."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_triton_reduce import compile_all_for_sm90; compile_all_for_sm90()"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip("this Triton's compiler API differs (ASTSource without constexprs)")
    assert r.returncode == 0, r.stderr[-4000:]
