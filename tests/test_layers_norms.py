"""Weighted-layer pooling and the norms, on every available backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_pool as fp

from . import oracle
from .helpers import (
    FLOAT_DTYPES,
    assert_policy,
    leaf,
    make_mask,
    pack,
    poison,
    poison_padding,
    rand,
)


def _policy_grads(run, ref, inputs, dtype, what):
    """Forward and every input gradient of ``run`` against ``ref`` (float64 and in ``dtype``)."""
    ins = [leaf(t) for t in inputs]
    poison(ins[0].device)
    out = run(*ins)
    assert out.dtype == dtype
    assert_policy(out, ref(*[t.double() for t in inputs], torch.float64),
                  ref(*inputs, dtype), dtype, what)
    # The upstream gradient as the op sees it (rounded to its dtype), for every reference.
    proj = rand(*out.shape, dtype=torch.float64, device=out.device).to(dtype)
    got = torch.autograd.grad(out, ins, proj.to(dtype))

    def ref_grads(dt):
        r_in = [leaf(t, torch.float64 if dt == torch.float64 else None) for t in inputs]
        r = ref(*r_in, dt)
        return torch.autograd.grad(r, r_in, proj.to(r.dtype))

    for i, (g, r, lo) in enumerate(zip(got, ref_grads(torch.float64), ref_grads(dtype))):
        assert g.dtype == inputs[i].dtype, f"{what}: grad[{i}] dtype"
        assert_policy(g, r, lo, dtype if inputs[i].dtype == dtype else inputs[i].dtype,
                      f"{what} grad[{i}]")


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

    _policy_grads(run, ref, [w, *layers], dtype, "weighted_layer_pool")


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

    _policy_grads(run, ref, [w, *layers], dtype, "weighted_layer_mean")


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
# Norms
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

    _policy_grads(lambda x, w, b: fp.layer_norm(x, ns, w, b), ref, [x, w, b], dtype,
                  f"layer_norm {xs}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs,ns", NORM_SHAPES, ids=str)
def test_rms_norm(tgt, dtype, xs, ns):
    x = rand(*xs, dtype=dtype, device=tgt.device)
    w, _ = _params(ns, dtype, tgt.device)

    def ref(x, w, dt):
        return oracle.rms_norm(x, ns, w, None if dt == dtype else torch.finfo(dtype).eps,
                               dtype=dt)

    _policy_grads(lambda x, w: fp.rms_norm(x, ns, w), ref, [x, w], dtype, f"rms_norm {xs}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xs", [(2, 3, 5), (3, 4, 2, 3), (1, 2, 129)], ids=str)
def test_instance_norm(tgt, dtype, xs):
    x = rand(*xs, dtype=dtype, device=tgt.device) - 2
    w, b = _params((xs[1],), dtype, tgt.device)

    def ref(x, w, b, dt):
        return oracle.instance_norm(x, w, b, 1e-5, dtype=dt)

    _policy_grads(lambda x, w, b: fp.instance_norm(x, w, b), ref, [x, w, b], dtype,
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

    _policy_grads(lambda x, w, b: fp.masked_instance_norm(x, mask, w, b), ref, [x, w, b],
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
