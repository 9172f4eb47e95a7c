"""Paths of the Triton attention and weighted-layer kernels (``fused_pool/triton/weighted.py``)
that the contract suite's defaults do not reach: the token split of attention pooling and of
``weighted_layer_mean`` (partials merged afterwards), several feature blocks per head, many
layers per launch (N = 1, 13, 25) with a different stride per layer, layers split over several
launches, and the interpreter's bfloat16 rounding.

Each launcher is compared with the torch reference (``fused_pool/backends/reference.py``)."""

import pytest
import torch

import fused_pool as fp
from fused_pool.backends import reference

pytest.importorskip("triton")
from fused_pool.triton import weighted  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in fp.available_backends(),
                                reason="the triton backend is not available here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    m = torch.rand(b, length, device=DEVICE) < 0.6
    m[0, :] = True
    m[-1, :] = False  # an empty sequence
    return m


@pytest.fixture(params=[1, 3], ids=lambda s: f"split{s}")
def split(request, monkeypatch):
    """Force the token split (several programs per sequence whose partials are merged)."""
    monkeypatch.setattr(weighted, "FORCE_SPLIT", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("heads", [1, 2])
def test_attention_padded(split, dtype, heads, monkeypatch):
    # Feature blocks of 16 (the floor of block_d): 2 blocks per head of 24 features.
    monkeypatch.setattr(weighted, "_tile", lambda d, size: (4, 16, 1))
    b, length, d = 3, 37, 24 * heads
    x = torch.randn(b, d, length, dtype=dtype, device=DEVICE).transpose(1, 2)  # strided
    s = torch.randn(b, length, heads, dtype=dtype, device=DEVICE)
    mask = _mask(b, length)
    x = torch.where(mask[..., None], x, float("nan"))  # padding must never be read
    out, lse = weighted.attention_pool(x, s, mask, None)
    ref_out, ref_lse = reference.attention_pool(x, s, mask, None)
    _close(out, ref_out, dtype)
    assert torch.equal(lse[-1], torch.full_like(lse[-1], float("-inf")))
    _close(lse[:-1], ref_lse[:-1], dtype)
    grad = torch.randn(b, d, dtype=dtype, device=DEVICE)
    got = weighted.attention_pool_backward(grad, x, s, mask, None, out, lse)
    want = reference.attention_pool_backward(grad, x, s, mask, None, ref_out, ref_lse)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_packed(split, dtype):
    lengths = torch.tensor([5, 0, 40, 1])
    cu = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0).to(DEVICE)
    t, d, heads = int(lengths.sum()), 12, 3
    x = torch.randn(t, 2 * d, dtype=dtype, device=DEVICE)[:, ::2]
    s = torch.randn(heads, t, dtype=dtype, device=DEVICE).t()
    out, lse = weighted.attention_pool(x, s, None, cu)
    ref_out, ref_lse = reference.attention_pool(x, s, None, cu)
    _close(out, ref_out, dtype)
    grad = torch.randn(4, d, dtype=dtype, device=DEVICE)
    got = weighted.attention_pool_backward(grad, x, s, None, cu, out, lse)
    want = reference.attention_pool_backward(grad, x, s, None, cu, ref_out, ref_lse)
    _close(got, want, dtype)


def _layers(n, b, length, d, dtype):
    """n layers [B, L, D] with three different stride patterns among them."""
    out = []
    for i in range(n):
        if i % 3 == 1:
            h = torch.randn(b, d, length, dtype=dtype, device=DEVICE).transpose(1, 2)
        elif i % 3 == 2:
            h = torch.randn(b, length, 2 * d, dtype=dtype, device=DEVICE)[..., 1::2]
        else:
            h = torch.randn(b, length, d, dtype=dtype, device=DEVICE)
        out.append(h)
    return out


@pytest.fixture(params=["one_launch", "chunks_of_4"])
def chunking(request, monkeypatch):
    if request.param == "chunks_of_4":
        monkeypatch.setattr(weighted, "MAX_LAYERS", 4)
    return request.param


@pytest.mark.parametrize("n", [1, 13, 25])
def test_weighted_layer_pool_many_layers(n, chunking):
    dtype = torch.float64
    layers = _layers(n, 2, 5, 7, dtype)
    w = torch.rand(n, dtype=dtype, device=DEVICE) + 0.5
    _close(weighted.weighted_layer_pool(layers, w), reference.weighted_layer_pool(layers, w),
           dtype)
    grad = torch.randn(2, 7, 5, dtype=dtype, device=DEVICE).transpose(1, 2)
    got = weighted.weighted_layer_pool_backward(grad, layers, w)
    want = reference.weighted_layer_pool_backward(grad, layers, w)
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)


@pytest.mark.parametrize("n", [1, 13, 25])
def test_weighted_layer_mean_many_layers(n, chunking, split):
    dtype = torch.float64
    b, length, d = 3, 9, 5
    mask = _mask(b, length)
    layers = [torch.where(mask[..., None], h, float("nan"))
              for h in _layers(n, b, length, d, dtype)]
    w = torch.rand(n, dtype=dtype, device=DEVICE) + 0.5
    for m in (mask, None):
        hs = layers if m is not None else _layers(n, b, length, d, dtype)
        _close(weighted.weighted_layer_mean(hs, w, m), reference.weighted_layer_mean(hs, w, m),
               dtype)
        grad = torch.randn(b, d, dtype=dtype, device=DEVICE)
        got = weighted.weighted_layer_mean_backward(grad, hs, w, m)
        want = reference.weighted_layer_mean_backward(grad, hs, w, m)
        _close(got[0], want[0], dtype)
        _close(got[1], want[1], dtype)


def test_weighted_layers_bfloat16_round_to_nearest():
    """Outputs are rounded to nearest even, as on a GPU (the interpreter truncates unless told)."""
    layers = [torch.randn(2, 3, 40, device=DEVICE).to(torch.bfloat16) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 3.5], device=DEVICE)
    got = weighted.weighted_layer_pool(layers, w)
    want = reference.weighted_layer_pool(layers, w)  # float32 sum, rounded by torch
    assert torch.equal(got, want)


def test_weights_in_another_dtype_and_zero_sizes():
    layers = [torch.randn(2, 0, 4, device=DEVICE) for _ in range(2)]
    w = torch.ones(2, dtype=torch.float64, device=DEVICE)
    assert weighted.weighted_layer_pool(layers, w).shape == (2, 0, 4)
    out = weighted.weighted_layer_mean(layers, w, None)
    assert torch.equal(out, torch.zeros(2, 4, device=DEVICE))
    grads, gw = weighted.weighted_layer_mean_backward(torch.ones(2, 4, device=DEVICE), layers,
                                                      w, None)
    assert [g.shape for g in grads] == [(2, 0, 4)] * 2 and gw.dtype == torch.float64
    assert torch.equal(gw, torch.zeros(2, dtype=torch.float64, device=DEVICE))


def test_attention_packed_gradient_rows_outside_every_sequence_are_zero(split):
    """cu_seqlens that does not cover [0, T) (its values are not checked while tracing): the
    uncovered rows of both gradients are 0, never uninitialized memory; the others match."""
    x = torch.randn(7, 4, dtype=torch.float64, device=DEVICE)
    s = torch.randn(7, 2, dtype=torch.float64, device=DEVICE)
    cu = torch.tensor([1, 3, 5], device=DEVICE)  # rows 0, 5 and 6 belong to no sequence
    out = weighted.attention_pool(x, s, None, cu)
    g = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    torch.full((1 << 20,), float("nan"), device=DEVICE)  # poison freed memory
    gx, gs = weighted.attention_pool_backward(g, x, s, None, cu, *out)
    want = reference.attention_pool_backward(g, x[1:5], s[1:5], None, cu - 1, *out)
    for got, ref in zip((gx, gs), want):
        assert (got[[0, 5, 6]] == 0).all()
        torch.testing.assert_close(got[1:5], ref)


# ----------------------------------------------------------------------------------------------
# The GPU compiler: it rejects code the interpreter runs (types, layouts), and needs no GPU.
# ----------------------------------------------------------------------------------------------


def _compile_for_sm90(fn, types, consts, num_warps, tuples=0):
    """Compile ``fn`` for sm_90. Pointer arguments get 16-byte alignment; with ``tuples = N``
    the layer tuples hold N pointers / strides, the feature stride being 1 (contiguous layers,
    which Triton specializes to a constant)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig, attrs, consts = {}, {}, dict(consts)
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("layers", "grads"):
            sig[n] = (types["layer"],) * tuples
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(tuples)})
        elif n in ("stride_b", "stride_l"):
            sig[n] = ("i32",) * tuples
        elif n == "stride_d":
            sig[n] = ("constexpr",) * tuples
            consts.update({(i, j): 1 for j in range(tuples)})
        else:
            sig[n] = types.get(n, "i32")
            if sig[n].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_all_for_sm90():
    """Every kernel of weighted.py in its main configurations, bfloat16 and float64, 3 layers.
    Run in a process without ``TRITON_INTERPRET`` (kernels must be JIT functions)."""
    import inspect
    import sys

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        sys.exit(77)  # another Triton's compiler API: the test skips
    w = weighted
    for dt in ("bf16", "fp64"):
        p, acc, f64 = "*" + dt, "*fp64" if dt == "fp64" else "*fp32", dt == "fp64"
        types = dict(x_ptr=p, s_ptr=p, out_ptr=p, grad_ptr=p, gx_ptr=p, gs_ptr=p, layer=p,
                     lse_ptr=acc, pm_ptr=acc, pl_ptr=acc, pacc_ptr=acc, c_ptr=acc, wn_ptr=acc,
                     part_ptr=acc, partial_ptr=acc, start_ptr="*i64", end_ptr="*i64",
                     count_ptr="*i64", mask_ptr="*u8")
        for split in (1, 4):
            for mask in (True, False):
                _compile_for_sm90(w._attention_pool_fwd_kernel, types, dict(
                    HAS_MASK=mask, SPLIT=split, IS_FP64=f64, BLOCK_T=4, BLOCK_D=1024), 4)
        _compile_for_sm90(w._attention_pool_merge_kernel, types,
                          dict(SPLIT=5, BLOCK_S=8, BLOCK_D=1024), 4)
        for packed in (False, True):
            flags = dict(HAS_MASK=not packed, PACKED=packed, IS_FP64=f64)
            _compile_for_sm90(w._attention_pool_bwd_kernel, types,
                              dict(flags, SPLIT=4, BLOCK_T=4, BLOCK_D=1024), 4)
            _compile_for_sm90(w._attention_pool_bwd_scores_kernel, types,
                              dict(flags, BLOCK_T=512), 4)
        # float64 (and > 32 layers) tiles are one row deep on a GPU (_layer_tile)
        blocks = dict(N=3, IS_FP64=f64, BLOCK_R=1 if f64 else 4, BLOCK_D=512)
        _compile_for_sm90(w._weighted_layer_pool_fwd_kernel, types,
                          dict(blocks, ACCUMULATE=True), 8, tuples=3)
        _compile_for_sm90(w._weighted_layer_pool_bwd_kernel, types, blocks, 8, tuples=3)
        mean = dict(N=3, HAS_MASK=True, SPLIT=4, IS_FP64=f64, BLOCK_T=1 if f64 else 4,
                    BLOCK_D=512)
        _compile_for_sm90(w._weighted_layer_mean_fwd_kernel, types, dict(mean, FINAL=False), 8,
                          tuples=3)
        _compile_for_sm90(w._weighted_layer_mean_bwd_kernel, types, mean, 8, tuples=3)


def test_kernels_compile_for_sm90():
    """Triton's compiler and ptxas (shipped with Triton) build every kernel for an H100/H200
    without a GPU: catches what the interpreter lets through (tuple arguments included)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_triton_weighted import compile_all_for_sm90; compile_all_for_sm90()"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip("this Triton's compiler API differs (ASTSource without constexprs)")
    assert r.returncode == 0, r.stderr[-4000:]
