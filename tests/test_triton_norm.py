"""Paths of the Triton norm kernels (``fused_pool/triton/norm.py``) that the contract suite's tiny
shapes do not reach: the chunked (looping) path for long rows, several row tiles per backward
program, two-level row strides, per-channel parameters, packed sequences, the float64 eps.

Each launcher is compared with the torch reference in float64 (and float32)."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_pool as fp
from fused_pool.backends import reference

pytest.importorskip("triton")
from fused_pool.triton import norm  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in fp.available_backends(),
                                reason="the triton backend is not available here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["single", "loop"])
def path(request, monkeypatch):
    """``loop``: rows longer than 16 elements (8 in float64) take the chunked path, 16 elements
    a chunk."""
    if request.param == "loop":
        monkeypatch.setattr(norm, "_MAX_SINGLE_N", 16)
        monkeypatch.setattr(norm, "_MAX_SINGLE_N_BWD", 16)
        monkeypatch.setattr(norm, "_LOOP_BLOCK_N", 16)
    monkeypatch.setattr(norm, "_TILE_ELEMS", 64)  # several rows per tile for short rows
    return request.param


def _close(got, want, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol)


def _check(outs, refs, dtype):
    for got, want in zip(outs, refs):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [5, 37])
def test_row_norms(path, dtype, n):
    # [L, B, N] transposed to [B, L, N]: two-level row strides; grad with yet another layout.
    x = (torch.randn(7, 3, n, dtype=dtype, device=DEVICE) * 2 + 3).transpose(0, 1)
    g = torch.randn(3, n, 7, dtype=dtype, device=DEVICE).transpose(1, 2)
    w = torch.rand(n, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE)
    for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
        y, mean, rstd = norm.layer_norm(x, 1, weight, bias, 1e-5)
        ry, rmean, rrstd = reference.layer_norm(x, 1, weight, bias, 1e-5)
        _check((y, mean, rstd), (ry, rmean, rrstd), dtype)
        gx, gw, gb = norm.layer_norm_backward(g, x, 1, weight, bias, mean, rstd)
        _check((gx, gw, gb), reference.layer_norm_backward(g, x, 1, weight, bias, rmean, rrstd),
               dtype)
        y, rstd = norm.rms_norm(x, 1, weight, 1e-6)
        _check((y, rstd), reference.rms_norm(x, 1, weight, 1e-6), dtype)
        gx, gw = norm.rms_norm_backward(g, x, 1, weight, rstd)
        _check((gx, gw), reference.rms_norm_backward(g, x, 1, weight, rstd), dtype)


def test_layer_norm_two_normalized_dims_and_stride0_grad(path):
    x = torch.randn(4, 3, 9, dtype=torch.float64, device=DEVICE)[:, :, ::2]  # [4, 3, 5], sn = 2
    w = torch.rand(3, 5, dtype=torch.float64, device=DEVICE)
    b = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    y, mean, rstd = norm.layer_norm(x, 2, w, b, 1e-5)  # normalized dims do not merge: copied
    _check((y, mean, rstd), reference.layer_norm(x, 2, w, b, 1e-5), torch.float64)
    g = torch.ones(1, dtype=torch.float64, device=DEVICE).expand(4, 3, 5)  # sum().backward()
    _check(norm.layer_norm_backward(g, x, 2, w, b, mean, rstd),
           reference.layer_norm_backward(g, x, 2, w, b, mean, rstd), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_instance_norm(path, dtype):
    x = (torch.randn(2, 40, 3, dtype=dtype, device=DEVICE) - 2).transpose(1, 2)  # [B, C, S]
    g = torch.randn(2, 3, 40, dtype=dtype, device=DEVICE)
    w = torch.rand(3, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(3, dtype=dtype, device=DEVICE)
    for weight, bias in ((w, b), (None, None)):
        y, mean, rstd = norm.instance_norm(x, weight, bias, 1e-5)
        _check((y, mean, rstd), reference.instance_norm(x, weight, bias, 1e-5), dtype)
        _check(norm.instance_norm_backward(g, x, weight, bias, mean, rstd),
               reference.instance_norm_backward(g, x, weight, bias, mean, rstd), dtype)


@pytest.mark.parametrize("packed", [False, True])
def test_masked_instance_norm_several_tiles(packed):
    mask = torch.rand(3, 11, device=DEVICE) < 0.7
    mask[1] = False  # empty sequence: mean 0, rstd 1 / sqrt(eps), zero output and gradient
    mask[2, :9] = True
    x = torch.randn(3, 11, 20, dtype=torch.float64, device=DEVICE) + 1
    g = torch.randn(3, 11, 20, dtype=torch.float64, device=DEVICE)
    w = torch.rand(20, dtype=torch.float64, device=DEVICE) + 0.5
    b = torch.randn(20, dtype=torch.float64, device=DEVICE)
    cu = None
    if packed:
        lengths = mask.sum(1)
        mask = torch.arange(11, device=DEVICE)[None, :] < lengths[:, None]  # prefix mask
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        x, g, mask = x[mask], g[mask], None
    y, mean, rstd = norm.masked_instance_norm(x, mask, cu, w, b, 1e-5)
    _check((y, mean, rstd), reference.masked_instance_norm(x, mask, cu, w, b, 1e-5),
           torch.float64)
    _check(norm.masked_instance_norm_backward(g, x, mask, cu, w, b, mean, rstd),
           reference.masked_instance_norm_backward(g, x, mask, cu, w, b, mean, rstd),
           torch.float64)


def test_float64_eps_is_not_rounded_to_float32():
    x = torch.full((2, 1), 3.0, dtype=torch.float64, device=DEVICE)  # variance 0: rstd = eps^-1/2
    _, _, rstd = norm.layer_norm(x, 1, None, None, 1e-5)
    assert abs(rstd[0].item() * 1e-5 ** 0.5 - 1) < 1e-12


def test_parameter_gradients_are_deterministic(path):
    x = torch.randn(9, 37, device=DEVICE)
    g = torch.randn(9, 37, device=DEVICE)
    w, b = torch.rand(37, device=DEVICE), torch.randn(37, device=DEVICE)
    _, mean, rstd = norm.layer_norm(x, 1, w, b, 1e-5)
    first = norm.layer_norm_backward(g, x, 1, w, b, mean, rstd)
    second = norm.layer_norm_backward(g, x, 1, w, b, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_instance_norm_unmergeable_spatial_dims_are_copied():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, device=DEVICE)[..., ::2]  # spatial (4, 3)
    g = torch.randn(2, 3, 4, 3, dtype=torch.float64, device=DEVICE)
    y, mean, rstd = norm.instance_norm(x, None, None, 1e-5)
    _check((y, mean, rstd), reference.instance_norm(x, None, None, 1e-5), torch.float64)
    _check(norm.instance_norm_backward(g, x, None, None, mean, rstd),
           reference.instance_norm_backward(g, x, None, None, mean, rstd), torch.float64)


def test_packed_rows_outside_every_sequence_are_zero():
    """cu_seqlens that does not cover [0, T) (unvalidated, e.g. while tracing): those rows of the
    output and of the gradient are 0, never uninitialized memory."""
    x = torch.randn(7, 5, dtype=torch.float64, device=DEVICE)
    cu = torch.tensor([1, 3, 5], device=DEVICE)  # rows 0, 5 and 6 belong to no sequence
    y, mean, rstd = norm.masked_instance_norm(x, None, cu, None, None, 1e-5)
    gx, _, _ = norm.masked_instance_norm_backward(torch.ones_like(x), x, None, cu, None, None,
                                                  mean, rstd)
    for t in (y, gx):
        assert (t[[0, 5, 6]] == 0).all()
    inner = cu - 1  # the covered rows alone, as a valid packed input
    _check((y[1:5], mean, rstd),
           reference.masked_instance_norm(x[1:5], None, inner, None, None, 1e-5), torch.float64)


# ----------------------------------------------------------------------------------------------
# The GPU compiler: it rejects code the interpreter runs (types, layouts), and needs no GPU.
# ----------------------------------------------------------------------------------------------

_UNIT = ("sxn", "sgn", "stride_d", "sg_d")  # unit strides: Triton makes an argument 1 a constant


def _compile_for_sm90(fn, types, consts, num_warps):
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts, **{u: 1 for u in _UNIT if u in fn.arg_names})
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_all_for_sm90():
    """Every kernel of norm.py in its main configurations, bfloat16 and float64. Run in a
    process without ``TRITON_INTERPRET`` (kernels must be JIT functions, not interpreted)."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        sys.exit(77)  # another Triton's compiler API: the test skips
    for dt in ("bf16", "fp64"):
        p, acc = "*" + dt, "*fp64" if dt == "fp64" else "*fp32"
        ints = {n: "i32" for n in ("M", "N", "M1", "sx0", "sx1", "sg0", "sg1", "tiles_per_prog")}
        for single, bm, bn, nw in ((True, 4, 1024, 8), (False, 1, 4096, 8)):
            for centered, row in ((True, False), (False, False), (True, True)):
                flags = dict(CENTERED=centered, ROW_AFFINE=row, HAS_W=True,
                             IS_FP64=dt == "fp64", BLOCK_M=bm, BLOCK_N=bn, SINGLE=single)
                _compile_for_sm90(norm._row_norm_fwd_kernel, dict(
                    X=p, Y=p, W="*fp32", Bb="*fp32", MEAN=acc, RSTD=acc, eps_hi="fp32",
                    eps_lo="fp32", **ints), dict(flags, HAS_B=centered), nw)
                _compile_for_sm90(norm._row_norm_bwd_kernel, dict(
                    G=p, X=p, W="*fp32", MEAN=acc, RSTD=acc, DX=p, DWP=acc, DBP=acc, **ints),
                    dict(flags, NEED_DW=True, NEED_DB=centered), nw)
        # The longest register-resident rows the launcher picks on a GPU (_row_config): one row
        # per program, 16 warps.
        big = dict(CENTERED=True, ROW_AFFINE=False, HAS_W=True, IS_FP64=dt == "fp64",
                   BLOCK_M=1, SINGLE=True)
        scale = 2 if dt == "fp64" else 1
        _compile_for_sm90(norm._row_norm_fwd_kernel, dict(
            X=p, Y=p, W="*fp32", Bb="*fp32", MEAN=acc, RSTD=acc, eps_hi="fp32", eps_lo="fp32",
            **ints), dict(big, HAS_B=True, BLOCK_N=norm._MAX_SINGLE_N // scale), 16)
        _compile_for_sm90(norm._row_norm_bwd_kernel, dict(
            G=p, X=p, W="*fp32", MEAN=acc, RSTD=acc, DX=p, DWP=acc, DBP=acc, **ints),
            dict(big, NEED_DW=True, NEED_DB=True, BLOCK_N=norm._MAX_SINGLE_N_BWD // scale), 16)
        common = dict(start_ptr="*i64", end_ptr="*i64", mask_ptr="*u8", stride_mb="i64",
                      stride_ml="i64", stride_b="i64", stride_t="i64", D="i32", out_len="i32")
        for packed in (False, True):
            flags = dict(HAS_MASK=not packed, PACKED=packed, HAS_W=True, IS_FP64=dt == "fp64",
                         BLOCK_T=16, BLOCK_D=128)
            _compile_for_sm90(norm._masked_instance_norm_fwd_kernel, dict(
                X=p, Y=p, W="*fp32", Bb="*fp32", MEAN=acc, RSTD=acc, sy_b="i64", sy_t="i64",
                eps_hi="fp32", eps_lo="fp32", **common), dict(flags, HAS_B=True), 8)
            _compile_for_sm90(norm._masked_instance_norm_bwd_kernel, dict(
                G=p, X=p, W="*fp32", MEAN=acc, RSTD=acc, DX=p, DWP=acc, DBP=acc, sg_b="i64",
                sg_t="i64", sdx_b="i64", sdx_t="i64", **common), flags, 8)
        _compile_for_sm90(norm._zero_uncovered_rows_kernel, dict(
            Y=p, start_ptr="*i64", end_ptr="*i64", nbatch="i32", num_tokens="i32", D="i32"),
            dict(BLOCK_T=32, BLOCK_D=128), 4)


def test_kernels_compile_for_sm90():
    """Triton's compiler and ptxas (shipped with Triton) build every kernel for an H100/H200
    without a GPU: catches what the interpreter lets through. Takes ~30 s."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_triton_norm import compile_all_for_sm90; compile_all_for_sm90()"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 77:
        pytest.skip("this Triton's compiler API differs (ASTSource without constexprs)")
    assert r.returncode == 0, r.stderr[-4000:]
