"""The ``norm`` family: LayerNorm, RMSNorm, InstanceNorm, masked InstanceNorm
(``fused_pool/backends/*/norm.py``, ``csrc/cpu/norm_cpu.cpp``, ``csrc/cuda/norm_cuda.cu``).

1. The contract of every norm on every backend: forward and gradients against the float64
   oracle and torch's own kernels, gradcheck, strided views, zero sizes; the same for the fused
   residual-add norms (``add_layer_norm``, ``add_rms_norm``), plus NaN/Inf rows and the returned
   sum.
2. Paths of the Triton kernels the contract's tiny shapes miss: the chunked (looping) path for
   long rows, several row tiles per backward program, two-level row strides, per-channel
   parameters, packed sequences, the float64 eps; each compared with the reference.
3. Every Triton kernel of the family compiled for sm_90 (``sm90.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_pool as fp
from fused_pool.backends.reference import norm as ref

from . import oracle
from .helpers import (
    FLOAT_DTYPES,
    assert_policy_grads,
    leaf,
    make_mask,
    needs_triton,
    pack,
    poison_padding,
    rand,
)
from .sm90 import compile_for_sm90, require_compiler_api, run_in_fresh_process

try:
    from fused_pool.backends.triton_backend import norm as tk
except ImportError:  # no Triton: the Triton tests skip
    tk = None



# ----------------------------------------------------------------------------------------------
# The contract, every backend
# ----------------------------------------------------------------------------------------------


NORM_SHAPES = [((4, 7), (7,)), ((2, 3, 33), (33,)), ((2, 3, 5), (3, 5)), ((3, 1), (1,)),
               ((2, 769), (769,))]


def _params(shape, dtype, device, affine=True):
    if not affine:
        return None, None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (rand(*shape, dtype=pdt, device=device) * 0.5 + 1,
            rand(*shape, dtype=pdt, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs,ns", NORM_SHAPES, ids=str)
def test_layer_norm(tgt, dtype, xs, ns):
    x = rand(*xs, dtype=dtype, device=tgt.device) + 3  # an offset mean stresses the variance
    w, b = _params(ns, dtype, tgt.device)

    def ref(x, w, b, dt):
        return oracle.layer_norm(x, ns, w, b, 1e-5, dtype=dt)

    assert_policy_grads(lambda x, w, b: fp.layer_norm(x, ns, w, b), ref, [x, w, b], dtype,
                  f"layer_norm {xs}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs,ns", NORM_SHAPES, ids=str)
def test_rms_norm(tgt, dtype, xs, ns):
    x = rand(*xs, dtype=dtype, device=tgt.device)
    w, _ = _params(ns, dtype, tgt.device)

    def ref(x, w, dt):
        return oracle.rms_norm(x, ns, w, None if dt == dtype else torch.finfo(dtype).eps,
                               dtype=dt)

    assert_policy_grads(lambda x, w: fp.rms_norm(x, ns, w), ref, [x, w], dtype, f"rms_norm {xs}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs", [(2, 3, 5), (3, 4, 2, 3), (1, 2, 129)], ids=str)
def test_instance_norm(tgt, dtype, xs):
    x = rand(*xs, dtype=dtype, device=tgt.device) - 2
    w, b = _params((xs[1],), dtype, tgt.device)

    def ref(x, w, b, dt):
        return oracle.instance_norm(x, w, b, 1e-5, dtype=dt)

    assert_policy_grads(lambda x, w, b: fp.instance_norm(x, w, b), ref, [x, w, b], dtype,
                  f"instance_norm {xs}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_masked_instance_norm(tgt, dtype):
    mask = make_mask(4, 7, tgt.device)
    mask[0, :] = False
    mask[0, 3] = True  # one valid token: variance 0, output = bias
    x = poison_padding(rand(4, 7, 6, dtype=dtype, device=tgt.device) + 1, mask)
    w, b = _params((6,), dtype, tgt.device)

    def ref(x, w, b, dt):
        return oracle.masked_instance_norm(x, mask, w, b, 1e-5, dtype=dt)

    assert_policy_grads(lambda x, w, b: fp.masked_instance_norm(x, mask, w, b), ref, [x, w, b],
                  dtype, "masked_instance_norm")
    out = fp.masked_instance_norm(x, mask, w, b)
    assert (out[~mask] == 0).all(), "padded positions output 0"


def test_masked_instance_norm_packed_equals_padded(tgt):
    mask = make_mask(3, 6, tgt.device, kind="prefix")
    x = rand(3, 6, 5, device=tgt.device)
    w, b = _params((5,), torch.float32, tgt.device)
    xp, cu = pack(x, mask)
    torch.testing.assert_close(fp.masked_instance_norm(xp, None, w, b, cu_seqlens=cu),
                               pack(fp.masked_instance_norm(x, mask, w, b), mask)[0])
    x64 = leaf(xp.double())
    w64, b64 = leaf(w.double()), leaf(b.double())
    assert torch.autograd.gradcheck(
        lambda x, w, b: fp.masked_instance_norm(x, None, w, b, cu_seqlens=cu), (x64, w64, b64))


@pytest.mark.parametrize("affine", [True, False])
def test_norms_gradcheck_float64(tgt, affine):
    dev = tgt.device
    x = leaf(rand(3, 5, dtype=torch.float64, device=dev))
    w, b = _params((5,), torch.float64, dev, affine)
    params = tuple(leaf(t) for t in (w, b) if t is not None)
    def wb(p):
        return tuple(p) + (None,) * (2 - len(p))

    assert torch.autograd.gradcheck(lambda x, *p: fp.layer_norm(x, (5,), *wb(p)), (x, *params))
    assert torch.autograd.gradcheck(lambda x, *p: fp.rms_norm(x, (5,), wb(p)[0]),
                                    (x, *params[:1]))
    x3 = leaf(rand(2, 5, 4, dtype=torch.float64, device=dev))
    assert torch.autograd.gradcheck(lambda x, *p: fp.instance_norm(x, *wb(p)), (x3, *params))
    mask = make_mask(2, 4, dev)
    x4 = leaf(poison_padding(rand(2, 4, 5, dtype=torch.float64, device=dev), mask, 0.3))
    assert torch.autograd.gradcheck(lambda x, *p: fp.masked_instance_norm(x, mask, *wb(p)),
                                    (x4, *params))


def test_norms_without_affine_match_torch(tgt):
    x = rand(3, 4, 6, device=tgt.device)
    torch.testing.assert_close(fp.layer_norm(x, 6), F.layer_norm(x, (6,)))
    torch.testing.assert_close(fp.rms_norm(x, [6]), F.rms_norm(x, [6]))
    torch.testing.assert_close(fp.instance_norm(x), F.instance_norm(x))
    torch.testing.assert_close(fp.masked_instance_norm(x), F.instance_norm(x.transpose(1, 2))
                               .transpose(1, 2))


def test_norms_non_contiguous(tgt):
    base = rand(6, 10, device=tgt.device)
    x = base[::2, 1:8]  # rows strided, features offset
    w, b = _params((7,), torch.float32, tgt.device)
    torch.testing.assert_close(fp.layer_norm(x, 7, w, b), fp.layer_norm(x.contiguous(), 7, w, b))
    torch.testing.assert_close(fp.rms_norm(x, 7, w), fp.rms_norm(x.contiguous(), 7, w))
    xt = rand(3, 5, 4, device=tgt.device).transpose(1, 2)  # [B, C=4, L=5] view
    torch.testing.assert_close(fp.instance_norm(xt), F.instance_norm(xt.contiguous()))
    xm = rand(2, 8, 6, device=tgt.device)[:, ::2]
    mask = make_mask(2, 4, tgt.device)
    torch.testing.assert_close(fp.masked_instance_norm(xm, mask),
                               fp.masked_instance_norm(xm.contiguous(), mask))


def test_norms_zero_sizes(tgt):
    x = leaf(rand(0, 5, device=tgt.device))
    w, b = _params((5,), torch.float32, tgt.device)
    out = fp.layer_norm(x, 5, leaf(w), leaf(b))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert fp.rms_norm(rand(0, 3, device=tgt.device), 3).shape == (0, 3)
    assert fp.instance_norm(rand(0, 3, 4, device=tgt.device)).shape == (0, 3, 4)
    assert fp.masked_instance_norm(rand(0, 3, 4, device=tgt.device)).shape == (0, 3, 4)
    y = fp.masked_instance_norm(rand(2, 0, 4, device=tgt.device))
    assert y.shape == (2, 0, 4)

# ----------------------------------------------------------------------------------------------
# Fused residual-add norms: add_layer_norm / add_rms_norm == F.*_norm(x + residual)
# ----------------------------------------------------------------------------------------------


ADD_SHAPES = [((4, 7), (7,)), ((2, 3, 33), (33,)), ((2, 3, 5), (3, 5)), ((2, 769), (769,))]


def _add_ref(norm, ns, return_residual):
    """The oracle of ``add_<norm>``: the plain norm of ``x + residual`` (the sum rounded to
    ``dt`` first, as plain torch in ``dt`` does); with ``return_residual`` the sum is appended
    along the last dim so one output carries both gradients."""

    def ref(x, r, *params_dt):
        *params, dt = params_dt
        s = x.to(dt) + r.to(dt)
        if norm == "layer_norm":
            y = oracle.layer_norm(s, ns, *params, 1e-5, dtype=dt)
        else:
            y = oracle.rms_norm(s, ns, params[0], None if dt == torch.float64 else
                                torch.finfo(x.dtype).eps, dtype=dt)
        return torch.cat([y, s], -1) if return_residual else y

    return ref


def _add_run(norm, ns, return_residual):
    fn = fp.add_layer_norm if norm == "layer_norm" else fp.add_rms_norm

    def run(x, r, *params):
        out = fn(x, r, ns, *params, return_residual=return_residual)
        return torch.cat(out, -1) if return_residual else out

    return run


@pytest.mark.parametrize("return_residual", [False, True], ids=["y", "y+sum"])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs,ns", ADD_SHAPES, ids=str)
def test_add_norms(tgt, dtype, xs, ns, norm, return_residual):
    if tgt.interpreted and (xs[-1] > 100 or dtype in (torch.float16, torch.bfloat16)):
        pytest.skip("the interpreter runs the same kernels at the small float shapes")
    x = rand(*xs, dtype=dtype, device=tgt.device) + 3  # an offset mean stresses the variance
    r = rand(*xs, dtype=dtype, device=tgt.device)
    w, b = _params(ns, dtype, tgt.device)
    params = [w, b] if norm == "layer_norm" else [w]
    assert_policy_grads(_add_run(norm, ns, return_residual), _add_ref(norm, ns, return_residual),
                        [x, r, *params], dtype, f"add_{norm} {xs}")


@pytest.mark.parametrize("return_residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_add_norms_gradcheck_float64(tgt, affine, return_residual):
    dev = tgt.device
    x = leaf(rand(3, 5, dtype=torch.float64, device=dev))
    r = leaf(rand(3, 5, dtype=torch.float64, device=dev))
    w, b = _params((5,), torch.float64, dev, affine)
    params = tuple(leaf(t) for t in (w, b) if t is not None)
    ln, rms = _add_run("layer_norm", (5,), return_residual), _add_run("rms_norm", (5,),
                                                                       return_residual)
    assert torch.autograd.gradcheck(lambda x, r, *p: ln(x, r, *p), (x, r, *params))
    assert torch.autograd.gradcheck(lambda x, r, *p: rms(x, r, *p), (x, r, *params[:1]))


def test_add_norms_return_the_exact_sum_and_one_gradient(tgt):
    for dtype in (torch.float32, torch.bfloat16):
        x = rand(3, 4, 8, dtype=dtype, device=tgt.device, requires_grad=True)
        r = rand(3, 4, 8, dtype=dtype, device=tgt.device, requires_grad=True)
        y, s = fp.add_layer_norm(x, r, 8, return_residual=True)
        assert torch.equal(s, x + r), "the sum is x + residual rounded once to the input dtype"
        y2, s2 = fp.add_rms_norm(x, r, 8, return_residual=True)
        assert torch.equal(s2, s)
        gx, gr = torch.autograd.grad((y * 2 + s + y2).float().sum(), (x, r))
        assert torch.equal(gx, gr), "x and residual get the gradient of their sum"


def test_add_norms_nan_and_inf_stay_in_their_row(tgt):
    x = rand(4, 6, device=tgt.device)
    r = rand(4, 6, device=tgt.device)
    x[1, 2] = float("nan")
    x[2, 0], r[2, 0] = float("inf"), float("-inf")  # inf + -inf = nan
    r[3, 5] = float("inf")
    w, b = _params((6,), torch.float32, tgt.device)
    for got, want in ((fp.add_layer_norm(x, r, 6, w, b), F.layer_norm(x + r, (6,), w, b)),
                      (fp.add_rms_norm(x, r, 6, w), F.rms_norm(x + r, (6,), w))):
        torch.testing.assert_close(got, want, equal_nan=True)
        assert got[1:].isnan().all(dim=1).tolist() == want[1:].isnan().all(dim=1).tolist()
        assert torch.isfinite(got[0]).all(), "a NaN in one row never reaches another"


def test_add_norms_non_contiguous(tgt):
    base = rand(6, 10, device=tgt.device)
    x = base[::2, 1:8]  # rows strided, features offset
    r = rand(7, 3, device=tgt.device).t()  # transposed
    w, b = _params((7,), torch.float32, tgt.device)
    xc, rc = x.contiguous(), r.contiguous()
    torch.testing.assert_close(fp.add_layer_norm(x, r, 7, w, b),
                               fp.add_layer_norm(xc, rc, 7, w, b))
    torch.testing.assert_close(fp.add_rms_norm(x, r, 7, w), F.rms_norm(xc + rc, (7,), w))
    g = rand(7, 3, device=tgt.device).t()  # a strided upstream gradient
    xl, rl = leaf(x), leaf(r)
    gx, = torch.autograd.grad(fp.add_layer_norm(xl, rl, 7, w, b), xl, g)
    xl2 = leaf(xc + rc)
    want, = torch.autograd.grad(F.layer_norm(xl2, (7,), w, b), xl2, g)
    torch.testing.assert_close(gx, want)


def test_add_norms_zero_sizes(tgt):
    w, b = _params((5,), torch.float32, tgt.device)
    for shape in ((0, 5), (2, 0, 5)):
        x, r = leaf(rand(*shape, device=tgt.device)), leaf(rand(*shape, device=tgt.device))
        wl, bl = leaf(w), leaf(b)
        y, s = fp.add_layer_norm(x, r, 5, wl, bl, return_residual=True)
        assert y.shape == s.shape == shape
        (y.sum() + s.sum()).backward()
        assert x.grad.shape == shape and (wl.grad == 0).all() and (bl.grad == 0).all()
        assert fp.add_rms_norm(x, r, 5, wl).shape == shape

# ----------------------------------------------------------------------------------------------
# Triton paths the contract's shapes miss
# ----------------------------------------------------------------------------------------------


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["single", "loop"])
def path(request, monkeypatch):
    """``loop``: rows longer than 16 elements (8 in float64) take the chunked path, 16 elements
    a chunk."""
    if request.param == "loop":
        monkeypatch.setattr(tk, "_MAX_SINGLE_N", 16)
        monkeypatch.setattr(tk, "_MAX_SINGLE_N_BWD", 16)
        monkeypatch.setattr(tk, "_LOOP_BLOCK_N", 16)
    monkeypatch.setattr(tk, "_TILE_ELEMS", 64)  # several rows per tile for short rows
    return request.param


def _close(got, want, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol)


def _check(outs, refs, dtype):
    for got, want in zip(outs, refs):
        _close(got, want, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [5, 37])
def test_triton_row_norms(path, dtype, n):
    # [L, B, N] transposed to [B, L, N]: two-level row strides; grad with yet another layout.
    x = (torch.randn(7, 3, n, dtype=dtype, device=DEV) * 2 + 3).transpose(0, 1)
    g = torch.randn(3, n, 7, dtype=dtype, device=DEV).transpose(1, 2)
    w = torch.rand(n, dtype=dtype, device=DEV) + 0.5
    b = torch.randn(n, dtype=dtype, device=DEV)
    for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
        y, mean, rstd = tk.layer_norm(x, 1, weight, bias, 1e-5)
        ry, rmean, rrstd = ref.layer_norm(x, 1, weight, bias, 1e-5)
        _check((y, mean, rstd), (ry, rmean, rrstd), dtype)
        gx, gw, gb = tk.layer_norm_backward(g, x, 1, weight, bias, mean, rstd)
        _check((gx, gw, gb), ref.layer_norm_backward(g, x, 1, weight, bias, rmean, rrstd),
               dtype)
        y, rstd = tk.rms_norm(x, 1, weight, 1e-6)
        _check((y, rstd), ref.rms_norm(x, 1, weight, 1e-6), dtype)
        gx, gw = tk.rms_norm_backward(g, x, 1, weight, rstd)
        _check((gx, gw), ref.rms_norm_backward(g, x, 1, weight, rstd), dtype)


@needs_triton
def test_triton_layer_norm_two_normalized_dims_and_stride0_grad(path):
    x = torch.randn(4, 3, 9, dtype=torch.float64, device=DEV)[:, :, ::2]  # [4, 3, 5], sn = 2
    w = torch.rand(3, 5, dtype=torch.float64, device=DEV)
    b = torch.randn(3, 5, dtype=torch.float64, device=DEV)
    y, mean, rstd = tk.layer_norm(x, 2, w, b, 1e-5)  # normalized dims do not merge: copied
    _check((y, mean, rstd), ref.layer_norm(x, 2, w, b, 1e-5), torch.float64)
    g = torch.ones(1, dtype=torch.float64, device=DEV).expand(4, 3, 5)  # sum().backward()
    _check(tk.layer_norm_backward(g, x, 2, w, b, mean, rstd),
           ref.layer_norm_backward(g, x, 2, w, b, mean, rstd), torch.float64)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_instance_norm(path, dtype):
    x = (torch.randn(2, 40, 3, dtype=dtype, device=DEV) - 2).transpose(1, 2)  # [B, C, S]
    g = torch.randn(2, 3, 40, dtype=dtype, device=DEV)
    w = torch.rand(3, dtype=dtype, device=DEV) + 0.5
    b = torch.randn(3, dtype=dtype, device=DEV)
    for weight, bias in ((w, b), (None, None)):
        y, mean, rstd = tk.instance_norm(x, weight, bias, 1e-5)
        _check((y, mean, rstd), ref.instance_norm(x, weight, bias, 1e-5), dtype)
        _check(tk.instance_norm_backward(g, x, weight, bias, mean, rstd),
               ref.instance_norm_backward(g, x, weight, bias, mean, rstd), dtype)


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_triton_masked_instance_norm_several_tiles(packed):
    mask = torch.rand(3, 11, device=DEV) < 0.7
    mask[1] = False  # empty sequence: mean 0, rstd 1 / sqrt(eps), zero output and gradient
    mask[2, :9] = True
    x = torch.randn(3, 11, 20, dtype=torch.float64, device=DEV) + 1
    g = torch.randn(3, 11, 20, dtype=torch.float64, device=DEV)
    w = torch.rand(20, dtype=torch.float64, device=DEV) + 0.5
    b = torch.randn(20, dtype=torch.float64, device=DEV)
    cu = None
    if packed:
        lengths = mask.sum(1)
        mask = torch.arange(11, device=DEV)[None, :] < lengths[:, None]  # prefix mask
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        x, g, mask = x[mask], g[mask], None
    y, mean, rstd = tk.masked_instance_norm(x, mask, cu, w, b, 1e-5)
    _check((y, mean, rstd), ref.masked_instance_norm(x, mask, cu, w, b, 1e-5),
           torch.float64)
    _check(tk.masked_instance_norm_backward(g, x, mask, cu, w, b, mean, rstd),
           ref.masked_instance_norm_backward(g, x, mask, cu, w, b, mean, rstd),
           torch.float64)


@needs_triton
def test_triton_float64_eps_is_not_rounded_to_float32():
    x = torch.full((2, 1), 3.0, dtype=torch.float64, device=DEV)  # variance 0: rstd = eps^-1/2
    _, _, rstd = tk.layer_norm(x, 1, None, None, 1e-5)
    assert abs(rstd[0].item() * 1e-5 ** 0.5 - 1) < 1e-12


@needs_triton
def test_triton_parameter_gradients_are_deterministic(path):
    x = torch.randn(9, 37, device=DEV)
    g = torch.randn(9, 37, device=DEV)
    w, b = torch.rand(37, device=DEV), torch.randn(37, device=DEV)
    _, mean, rstd = tk.layer_norm(x, 1, w, b, 1e-5)
    first = tk.layer_norm_backward(g, x, 1, w, b, mean, rstd)
    second = tk.layer_norm_backward(g, x, 1, w, b, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@needs_triton
def test_triton_instance_norm_unmergeable_spatial_dims_are_copied():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, device=DEV)[..., ::2]  # spatial (4, 3)
    g = torch.randn(2, 3, 4, 3, dtype=torch.float64, device=DEV)
    y, mean, rstd = tk.instance_norm(x, None, None, 1e-5)
    _check((y, mean, rstd), ref.instance_norm(x, None, None, 1e-5), torch.float64)
    _check(tk.instance_norm_backward(g, x, None, None, mean, rstd),
           ref.instance_norm_backward(g, x, None, None, mean, rstd), torch.float64)


@needs_triton
def test_triton_packed_rows_outside_every_sequence_are_zero():
    """cu_seqlens that does not cover [0, T) (unvalidated, e.g. while tracing): those rows of the
    output and of the gradient are 0, never uninitialized memory."""
    x = torch.randn(7, 5, dtype=torch.float64, device=DEV)
    cu = torch.tensor([1, 3, 5], device=DEV)  # rows 0, 5 and 6 belong to no sequence
    y, mean, rstd = tk.masked_instance_norm(x, None, cu, None, None, 1e-5)
    gx, _, _ = tk.masked_instance_norm_backward(torch.ones_like(x), x, None, cu, None, None,
                                                  mean, rstd)
    for t in (y, gx):
        assert (t[[0, 5, 6]] == 0).all()
    inner = cu - 1  # the covered rows alone, as a valid packed input
    _check((y[1:5], mean, rstd),
           ref.masked_instance_norm(x[1:5], None, inner, None, None, 1e-5), torch.float64)

# ----------------------------------------------------------------------------------------------
# sm_90 compile check
# ----------------------------------------------------------------------------------------------


def compile_all_for_sm90():
    """The kernels of ``triton_backend/norm.py`` in their main configurations, bfloat16 and
    float64 (run by ``run_in_fresh_process``)."""
    require_compiler_api()
    unit = ("sxn", "sgn", "stride_d", "sg_d")  # unit feature strides, constants for the JIT
    for dt in ("bf16", "fp64"):
        p, acc = "*" + dt, "*fp64" if dt == "fp64" else "*fp32"
        rows = dict(W="*fp32", Bb="*fp32", MEAN=acc, RSTD=acc, DWP=acc, DBP=acc, X=p, Y=p, G=p,
                    DX=p, eps_hi="fp32", eps_lo="fp32")
        for single, bm, bn, nw in ((True, 4, 1024, 8), (False, 1, 4096, 8)):
            for centered, row in ((True, False), (False, False), (True, True)):
                flags = dict(CENTERED=centered, ROW_AFFINE=row, HAS_W=True,
                             IS_FP64=dt == "fp64", BLOCK_M=bm, BLOCK_N=bn, SINGLE=single)
                compile_for_sm90(tk._row_norm_fwd_kernel, rows, dict(flags, HAS_B=centered), nw,
                                 unit=unit)
                compile_for_sm90(tk._row_norm_bwd_kernel, rows,
                                 dict(flags, NEED_DW=True, NEED_DB=centered), nw, unit=unit)
        # The longest register-resident rows the launcher picks on a GPU (_row_config): one row
        # per program, 16 warps.
        big = dict(CENTERED=True, ROW_AFFINE=False, HAS_W=True, IS_FP64=dt == "fp64",
                   BLOCK_M=1, SINGLE=True)
        scale = 2 if dt == "fp64" else 1
        compile_for_sm90(tk._row_norm_fwd_kernel, rows,
                         dict(big, HAS_B=True, BLOCK_N=tk._MAX_SINGLE_N // scale), 16, unit=unit)
        compile_for_sm90(tk._row_norm_bwd_kernel, rows,
                         dict(big, NEED_DW=True, NEED_DB=True,
                              BLOCK_N=tk._MAX_SINGLE_N_BWD // scale), 16, unit=unit)
        masked = dict(rows, start_ptr="*i64", end_ptr="*i64", mask_ptr="*u8", stride_mb="i64",
                      stride_ml="i64", stride_b="i64", stride_t="i64", sy_b="i64", sy_t="i64",
                      sg_b="i64", sg_t="i64", sdx_b="i64", sdx_t="i64")
        for packed in (False, True):
            flags = dict(HAS_MASK=not packed, PACKED=packed, HAS_W=True, IS_FP64=dt == "fp64",
                         BLOCK_T=16, BLOCK_D=128)
            compile_for_sm90(tk._masked_instance_norm_fwd_kernel, masked,
                             dict(flags, HAS_B=True), 8, unit=unit)
            compile_for_sm90(tk._masked_instance_norm_bwd_kernel, masked, flags, 8, unit=unit)


def test_triton_kernels_compile_for_sm90():
    """Every kernel of ``triton_backend/norm.py`` builds for sm_90 (about 30 s)."""
    run_in_fresh_process("test_norm.compile_all_for_sm90")
