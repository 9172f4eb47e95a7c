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
