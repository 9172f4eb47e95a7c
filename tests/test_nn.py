"""The modules are drop-ins: same call, same parameters and state_dict keys, same numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_pool as fp
from fused_pool import nn as fpnn

from .helpers import make_mask, poison_padding, rand


# The seed-style heads users copy today (written for these tests, bugs included where noted).
def seed_mean(h, m):
    e = m.unsqueeze(-1).expand(h.size()).float()
    return (h * e).sum(1) / e.sum(1).clamp(min=1e-9)


def seed_max(h, m):
    e = h.clone()
    e[m.unsqueeze(-1).expand(h.size()) == 0] = -1e4
    return e.max(1).values


def seed_weighted(all_hidden, weights, start):
    stacked = torch.stack(all_hidden)[start:]
    return (weights[:, None, None, None] * stacked).sum(0) / weights.sum()


def test_pooling_modules_match_seed_where_seed_is_right(tgt):
    h = rand(3, 6, 8, device=tgt.device)
    m = make_mask(3, 6, tgt.device, kind="prefix", dtype=torch.long, empty_rows=False)
    torch.testing.assert_close(fpnn.MeanPooling()(h, m), seed_mean(h, m))
    torch.testing.assert_close(fpnn.MaxPooling()(h, m), seed_max(h, m))
    want_min = torch.where(m[..., None] != 0, h, float("inf")).min(1).values
    torch.testing.assert_close(fpnn.MinPooling()(h, m), want_min)
    torch.testing.assert_close(fpnn.MeanMaxPooling()(h, m),
                               torch.cat([seed_mean(h, m), seed_max(h, m)], -1))
    assert fpnn.KMaxPooling(2)(h, m).shape == (3, 2, 8)
    torch.testing.assert_close(fpnn.KMaxPooling(1, reduce="mean")(h, m), seed_max(h, m))


def test_pooling_modules_fix_the_seed_bugs(tgt):
    h = rand(2, 4, 3, device=tgt.device) - 2e4  # every value below the seed's -1e4 fill
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], device=tgt.device)
    h = poison_padding(h, m)  # NaN in padding
    assert torch.isnan(seed_mean(h, m)).any(), "the seed leaks NaN padding"
    assert not torch.isnan(fpnn.MeanPooling()(h, m)).any()
    assert (seed_max(h, m)[0] == -1e4).all(), "the seed returns its fill value"
    torch.testing.assert_close(fpnn.MaxPooling()(h, m)[0], h[0, :2].max(0).values)


def test_attention_pooling_loads_the_seed_head(tgt):
    seed = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 1))
    mod = fpnn.AttentionPooling(8)
    mod.attention.load_state_dict(seed.state_dict())
    assert set(mod.state_dict()) == {f"attention.{k}" for k in seed.state_dict()}
    mod, seed = mod.to(tgt.device), seed.to(tgt.device)
    h = rand(3, 5, 8, device=tgt.device)
    m = make_mask(3, 5, tgt.device, kind="prefix", empty_rows=False)
    w = seed(h).float()
    w[m == 0] = float("-inf")
    want = (torch.softmax(w, 1) * h).sum(1)
    torch.testing.assert_close(mod(h, m), want)
    out = fpnn.AttentionPooling(8, num_heads=4).to(tgt.device)(h, m)
    assert out.shape == (3, 8)
    out.sum().backward()
    with pytest.raises(ValueError, match="divisible"):
        fpnn.AttentionPooling(8, num_heads=3)


def test_weighted_layer_pooling_matches_seed_and_learns(tgt):
    hs = tuple(rand(2, 4, 6, device=tgt.device) for _ in range(13))  # 12 layers + embeddings
    mod = fpnn.WeightedLayerPooling(12, layer_start=4).to(tgt.device)
    assert mod.layer_weights.shape == (9,)
    with torch.no_grad():
        mod.layer_weights.copy_(torch.arange(1.0, 10.0))
    out = mod(hs)
    torch.testing.assert_close(out, seed_weighted(hs, mod.layer_weights.detach(), 4))
    out.sum().backward()
    assert mod.layer_weights.grad is not None and torch.isfinite(mod.layer_weights.grad).all()


def test_concat_pooling(tgt):
    hs = [rand(2, 3, 4, device=tgt.device) for _ in range(6)]
    out = fpnn.ConcatPooling(last_k=3)(hs)
    torch.testing.assert_close(out, torch.cat([hs[-1][:, 0], hs[-2][:, 0], hs[-3][:, 0]], -1))


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}],
                         ids=str)
def test_layer_norm_module_is_a_drop_in(tgt, kwargs):
    ref = nn.LayerNorm((4, 6), eps=1e-6, **kwargs).to(tgt.device)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    mod = fpnn.LayerNorm((4, 6), eps=1e-6, **kwargs).to(tgt.device)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = rand(3, 4, 6, device=tgt.device)
    torch.testing.assert_close(mod(x), ref(x))
    ref.load_state_dict(mod.state_dict())  # and back


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}], ids=str)
def test_rms_norm_module_is_a_drop_in(tgt, kwargs):
    ref = nn.RMSNorm(6, **kwargs).to(tgt.device)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(6))
    mod = fpnn.RMSNorm(6, **kwargs).to(tgt.device)
    mod.load_state_dict(ref.state_dict())
    x = rand(2, 5, 6, device=tgt.device)
    torch.testing.assert_close(mod(x), ref(x))


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}],
                         ids=str)
def test_add_layer_norm_module_is_a_drop_in(tgt, kwargs):
    ref = nn.LayerNorm(6, eps=1e-6, **kwargs).to(tgt.device)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    mod = fpnn.AddLayerNorm(6, eps=1e-6, **kwargs).to(tgt.device)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x, r = rand(3, 4, 6, device=tgt.device), rand(3, 4, 6, device=tgt.device)
    torch.testing.assert_close(mod(x, r), ref(x + r))
    ref.load_state_dict(mod.state_dict())  # and back
    y, s = fpnn.AddLayerNorm(6, return_residual=True).to(tgt.device)(x, r)
    torch.testing.assert_close(s, x + r)


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}], ids=str)
def test_add_rms_norm_module_is_a_drop_in(tgt, kwargs):
    ref = nn.RMSNorm(6, **kwargs).to(tgt.device)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(6))
    mod = fpnn.AddRMSNorm(6, **kwargs).to(tgt.device)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x, r = rand(2, 5, 6, device=tgt.device), rand(2, 5, 6, device=tgt.device)
    torch.testing.assert_close(mod(x, r), ref(x + r))


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_module_is_a_drop_in(tgt, affine):
    ref = nn.InstanceNorm1d(4, affine=affine).to(tgt.device)
    mod = fpnn.InstanceNorm1d(4, affine=affine).to(tgt.device)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(4))
            ref.bias.copy_(torch.randn(4))
    mod.load_state_dict(ref.state_dict())
    x = rand(2, 4, 7, device=tgt.device)
    torch.testing.assert_close(mod(x), ref(x))
    torch.testing.assert_close(mod(x[0]), ref(x[0]))  # unbatched [C, L]
    with pytest.raises(ValueError, match="track_running_stats=True is not supported"):
        fpnn.InstanceNorm1d(4, track_running_stats=True)


def test_masked_instance_norm_module(tgt):
    mod = fpnn.MaskedInstanceNorm(5).to(tgt.device)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(5))
    x = rand(2, 4, 5, device=tgt.device)
    m = make_mask(2, 4, tgt.device)
    torch.testing.assert_close(mod(x, m), fp.masked_instance_norm(x, m, mod.weight, mod.bias))
    assert set(mod.state_dict()) == {"weight", "bias"}
    assert fpnn.MaskedInstanceNorm(5, affine=False).weight is None


def test_modules_compile_without_graph_breaks(tgt):
    torch._dynamo.reset()
    head = nn.Sequential(fpnn.LayerNorm(8), nn.Linear(8, 8)).to(tgt.device)
    pool = fpnn.AttentionPooling(8, num_heads=2).to(tgt.device)

    def fn(h, m):
        return pool(head(h), m)

    h = rand(2, 5, 8, device=tgt.device)
    m = make_mask(2, 5, tgt.device)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(h, m),
                               fn(h, m))
