"""What the benchmark runs: per op, its inputs, the implementations compared and its byte count.

Implementations of each op:

* ``eager``: the seed-style code users copy today (mask expanded to a float ``[B, L, D]``
  tensor, multiply, sum; ``-1e4`` fill on a ``clone`` for max; ``torch.stack`` for weighted
  layers). For the norms, where users call torch's own kernels, ``eager`` is that kernel
  (``F.layer_norm``, ``F.rms_norm``, ``F.instance_norm``).
* ``compile``: ``torch.compile`` of a clean torch formulation (``torch.where`` masking, no
  expanded float mask), the strongest thing a user gets without custom kernels.
* ``liger``: Liger-Kernel's norm where it is installed (CUDA only).
* ``fp:<backend>``: fused_pool's public function under that backend.

Bytes an op must move (``must_move``): the valid tokens of every input it reads (padding need
never be read), the mask, the outputs; for forward+backward also the gradient it reads and every
gradient it writes (a ``[B, L, D]`` input gradient is written in full, zeros at padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import fused_pool as fp

KMAX_K = 4
NUM_LAYERS = 5  # hidden states passed to the weighted-layer ops; the first is skipped
LAYER_START = 1


@dataclass
class Inputs:
    x: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] int64, as tokenizers return it
    lengths: Tensor  # [B] valid tokens (for byte counts)
    scores: Tensor | None = None
    layers: list[Tensor] = field(default_factory=list)
    weights: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None

    @property
    def valid(self) -> int:
        return int(self.lengths.sum())


def make_inputs(b: int, length: int, d: int, dtype, device, padding: str | float,
                need: set[str]) -> Inputs:
    """Random inputs. ``padding="uniform"``: each sequence's length uniform in ``[L/4, L]``;
    a float ``f``: every sequence has ``round(L * (1 - f))`` valid tokens (right padding)."""
    g = torch.Generator().manual_seed(0)
    if padding == "uniform":
        lengths = torch.randint(max(1, length // 4), length + 1, (b,), generator=g)
    else:
        lengths = torch.full((b,), round(length * (1 - float(padding))), dtype=torch.int64)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
    x = torch.randn(b, length, d, generator=g).to(device=device, dtype=dtype)
    inp = Inputs(x, mask, lengths)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if "scores" in need:
        inp.scores = torch.randn(b, length, generator=g).to(device=device, dtype=dtype)
    if "layers" in need:
        inp.layers = [x] + [torch.randn(b, length, d, generator=g).to(device=device, dtype=dtype)
                            for _ in range(NUM_LAYERS - 1)]
        inp.weights = torch.rand(NUM_LAYERS - LAYER_START, generator=g).to(device, pdt) + 0.5
    if "norm" in need:
        inp.weight = (torch.rand(d, generator=g) + 0.5).to(device=device, dtype=pdt)
        inp.bias = torch.randn(d, generator=g).to(device=device, dtype=pdt)
    if "instance" in need:  # per-channel parameters for x seen as [B, C = L, D]
        inp.weight = (torch.rand(length, generator=g) + 0.5).to(device=device, dtype=pdt)
        inp.bias = torch.randn(length, generator=g).to(device=device, dtype=pdt)
    return inp


# ----------------------------------------------------------------------------------------------
# Seed-style eager code (the baseline users copy) and clean formulations (for torch.compile)
# ----------------------------------------------------------------------------------------------

def _expanded(x, mask):
    return mask.unsqueeze(-1).expand(x.size()).float()


def seed_mean(x, mask):
    m = _expanded(x, mask)
    return (torch.sum(x * m, 1) / torch.clamp(m.sum(1), min=1e-9)).to(x.dtype)


def seed_fill_reduce(x, mask, fill, reduce):
    e = x.clone()
    e[_expanded(x, mask) == 0] = fill
    return reduce(e)


def seed_kmax(x, mask, k):
    e = x.clone()
    e[_expanded(x, mask) == 0] = -1e4
    idx = e.topk(k, dim=1).indices.sort(1).values
    return e.gather(1, idx)


def seed_attention(x, mask, scores):
    w = scores.float().clone()
    w[mask == 0] = float("-inf")
    w = torch.softmax(w, 1).unsqueeze(-1)
    return torch.sum(w * x, dim=1).to(x.dtype)


def seed_weighted(layers, weights):
    stacked = torch.stack(layers)[LAYER_START:]
    factor = weights[:, None, None, None].expand(stacked.size())
    return ((factor * stacked).sum(0) / weights.sum()).to(layers[0].dtype)


def seed_masked_instance_norm(x, mask, weight, bias, eps=1e-5):
    m = _expanded(x, mask)
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (x * m).sum(1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (((x - mean) / torch.sqrt(var + eps) * weight + bias) * m).to(x.dtype)


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def clean_mean(x, mask):
    m = (mask != 0)[..., None]
    n = m.sum(1).clamp(min=1)
    return (torch.where(m, x, 0).sum(1, dtype=_acc(x)) / n).to(x.dtype)


def clean_max(x, mask, largest=True):
    m = (mask != 0)[..., None]
    fill = float("-inf") if largest else float("inf")
    e = torch.where(m, x, fill)
    v = e.amax(1) if largest else e.amin(1)
    return torch.where(m.any(1), v, 0)


def clean_kmax(x, mask, k):
    e = torch.where((mask != 0)[..., None], x, float("-inf"))
    idx = e.topk(k, dim=1).indices.sort(1).values
    v = e.gather(1, idx)
    return torch.where(torch.isinf(v) & (v < 0), 0, v)


def clean_attention(x, mask, scores):
    s = torch.where(mask != 0, scores.to(_acc(x)), float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, 1), nan=0.0)
    return torch.einsum("bl,bld->bd", p, torch.where((mask != 0)[..., None], x, 0).to(p.dtype)
                        ).to(x.dtype)


def clean_weighted(layers, weights):
    w = weights / weights.sum()
    out = w[0] * layers[LAYER_START].to(w.dtype)
    for i, h in enumerate(layers[LAYER_START + 1:], 1):
        out = out + w[i] * h.to(w.dtype)
    return out.to(layers[0].dtype)


def clean_layer_norm(x, weight, bias, eps=1e-5):
    xf = x.to(_acc(x))
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps) * weight + bias).to(x.dtype)


def clean_rms_norm(x, weight, eps):
    xf = x.to(_acc(x))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def clean_instance_norm(x, weight, bias, eps=1e-5):
    xf = x.to(_acc(x))
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps) * weight[:, None] + bias[:, None]).to(x.dtype)


def clean_masked_instance_norm(x, mask, weight, bias, eps=1e-5):
    m = (mask != 0)[..., None]
    xf = torch.where(m, x, 0).to(_acc(x))
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = xf.sum(1, keepdim=True) / n
    var = torch.where(m, (xf - mean) ** 2, 0).sum(1, keepdim=True) / n
    return torch.where(m, (xf - mean) * torch.rsqrt(var + eps) * weight + bias, 0).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The op table
# ----------------------------------------------------------------------------------------------

@dataclass
class OpCase:
    name: str
    need: set[str]
    fused: Callable[[Inputs], Tensor]
    eager: Callable[[Inputs], Tensor]
    clean: Callable[[Inputs], Tensor]
    grad_inputs: Callable[[Inputs], list[Tensor]]  # the tensors fwd+bwd differentiates
    fwd_bytes: Callable[[Inputs], int]
    bwd_bytes: Callable[[Inputs], int]
    liger: str | None = None  # name of the Liger-Kernel functional, for norms


def _esize(t: Tensor) -> int:
    return t.element_size()


def _pool_bytes(extra_out_per_bd: int = 0, out_per_bd: int = 1):
    """Read valid tokens of x and the mask; write the [B, out_per_bd * D] output (+ extras)."""
    def fwd(i: Inputs) -> int:
        b, length, d = i.x.shape
        e = _esize(i.x)
        return i.valid * d * e + i.mask.numel() * _esize(i.mask) + b * d * (
            out_per_bd * e + extra_out_per_bd)
    return fwd


def _pool_bwd(i: Inputs, out_per_bd: int = 1, index_bytes: int = 0) -> int:
    """Read the [B, out D] gradient (+ indices, + mask); write the full [B, L, D] gradient."""
    b, length, d = i.x.shape
    e = _esize(i.x)
    return b * d * (out_per_bd * e + index_bytes) + i.mask.numel() * _esize(i.mask) + \
        i.x.numel() * e


def _x_only(i: Inputs) -> list[Tensor]:
    return [i.x]


def _norm_fwd(i: Inputs) -> int:
    return 2 * i.x.numel() * _esize(i.x)


def _norm_bwd(i: Inputs) -> int:
    return 3 * i.x.numel() * _esize(i.x)


def _layers_fwd(i: Inputs) -> int:
    n = len(i.layers) - LAYER_START
    return (n + 1) * i.x.numel() * _esize(i.x)


def _layers_bwd(i: Inputs) -> int:
    n = len(i.layers) - LAYER_START
    return (2 * n + 1) * i.x.numel() * _esize(i.x)  # read grad + layers, write layer grads


def _layer_mean_fwd(i: Inputs) -> int:
    n = len(i.layers) - LAYER_START
    b, _, d = i.x.shape
    return n * i.valid * d * _esize(i.x) + i.mask.numel() * _esize(i.mask) + b * d * _esize(i.x)


def _layer_mean_bwd(i: Inputs) -> int:
    n = len(i.layers) - LAYER_START
    return n * i.valid * i.x.shape[-1] * _esize(i.x) + n * i.x.numel() * _esize(i.x)


def _layer_grads(i: Inputs) -> list[Tensor]:
    return [*i.layers[LAYER_START:], i.weights]


OPS: dict[str, OpCase] = {c.name: c for c in [
    OpCase("masked_mean", set(),
           lambda i: fp.masked_mean(i.x, i.mask),
           lambda i: seed_mean(i.x, i.mask),
           lambda i: clean_mean(i.x, i.mask),
           _x_only, _pool_bytes(), lambda i: _pool_bwd(i)),
    OpCase("masked_max", set(),
           lambda i: fp.masked_max(i.x, i.mask),
           lambda i: seed_fill_reduce(i.x, i.mask, -1e4, lambda e: e.max(1).values),
           lambda i: clean_max(i.x, i.mask),
           _x_only, _pool_bytes(8), lambda i: _pool_bwd(i, index_bytes=8)),
    OpCase("masked_min", set(),
           lambda i: fp.masked_min(i.x, i.mask),
           # The seed fills with 1e-4 (a bug); 1e4 keeps the baseline's cost and gives numbers.
           lambda i: seed_fill_reduce(i.x, i.mask, 1e4, lambda e: e.min(1).values),
           lambda i: clean_max(i.x, i.mask, largest=False),
           _x_only, _pool_bytes(8), lambda i: _pool_bwd(i, index_bytes=8)),
    OpCase("masked_kmax", set(),
           lambda i: fp.masked_kmax(i.x, i.mask, KMAX_K),
           lambda i: seed_kmax(i.x, i.mask, KMAX_K),
           lambda i: clean_kmax(i.x, i.mask, KMAX_K),
           _x_only, _pool_bytes(8 * KMAX_K, KMAX_K),
           lambda i: _pool_bwd(i, KMAX_K, 8 * KMAX_K)),
    OpCase("masked_kmax_mean", set(),
           lambda i: fp.masked_kmax(i.x, i.mask, KMAX_K, reduce="mean"),
           lambda i: seed_kmax(i.x, i.mask, KMAX_K).float().mean(1).to(i.x.dtype),
           lambda i: clean_kmax(i.x, i.mask, KMAX_K).float().mean(1).to(i.x.dtype),
           _x_only, _pool_bytes(8 * KMAX_K), lambda i: _pool_bwd(i, 1, 8 * KMAX_K)),
    OpCase("masked_mean_max", set(),
           lambda i: fp.masked_mean_max(i.x, i.mask),
           lambda i: torch.cat([seed_mean(i.x, i.mask), seed_fill_reduce(
               i.x, i.mask, -1e4, lambda e: e.max(1).values)], -1),
           lambda i: torch.cat([clean_mean(i.x, i.mask), clean_max(i.x, i.mask)], -1),
           _x_only, _pool_bytes(8, 2), lambda i: _pool_bwd(i, 2, 8)),
    OpCase("attention_pool", {"scores"},
           lambda i: fp.attention_pool(i.x, i.scores, i.mask),
           lambda i: seed_attention(i.x, i.mask, i.scores),
           lambda i: clean_attention(i.x, i.mask, i.scores),
           lambda i: [i.x, i.scores],
           lambda i: _pool_bytes()(i) + i.valid * _esize(i.scores),
           lambda i: _pool_bwd(i) + i.valid * i.x.shape[-1] * _esize(i.x)
           + (i.valid + i.scores.numel()) * _esize(i.scores)),
    OpCase("weighted_layer_pool", {"layers"},
           lambda i: fp.weighted_layer_pool(i.layers, i.weights, layer_start=LAYER_START),
           lambda i: seed_weighted(i.layers, i.weights),
           lambda i: clean_weighted(i.layers, i.weights),
           _layer_grads, _layers_fwd, _layers_bwd),
    OpCase("weighted_layer_mean", {"layers"},
           lambda i: fp.weighted_layer_mean(i.layers, i.weights, i.mask,
                                            layer_start=LAYER_START),
           lambda i: seed_mean(seed_weighted(i.layers, i.weights), i.mask),
           lambda i: clean_mean(clean_weighted(i.layers, i.weights), i.mask),
           _layer_grads, _layer_mean_fwd, _layer_mean_bwd),
    OpCase("layer_norm", {"norm"},
           lambda i: fp.layer_norm(i.x, i.x.shape[-1:], i.weight, i.bias),
           lambda i: F.layer_norm(i.x, i.x.shape[-1:], i.weight.to(i.x.dtype),
                                  i.bias.to(i.x.dtype)),
           lambda i: clean_layer_norm(i.x, i.weight, i.bias),
           lambda i: [i.x, i.weight, i.bias], _norm_fwd, _norm_bwd, liger="layer_norm"),
    OpCase("rms_norm", {"norm"},
           lambda i: fp.rms_norm(i.x, i.x.shape[-1:], i.weight, 1e-6),
           lambda i: F.rms_norm(i.x, i.x.shape[-1:], i.weight.to(i.x.dtype), 1e-6),
           lambda i: clean_rms_norm(i.x, i.weight, 1e-6),
           lambda i: [i.x, i.weight], _norm_fwd, _norm_bwd, liger="rms_norm"),
    OpCase("instance_norm", {"instance"},
           lambda i: fp.instance_norm(i.x, i.weight, i.bias),
           lambda i: F.instance_norm(i.x, weight=i.weight.to(i.x.dtype),
                                     bias=i.bias.to(i.x.dtype)),
           lambda i: clean_instance_norm(i.x, i.weight, i.bias),
           lambda i: [i.x, i.weight, i.bias], _norm_fwd, _norm_bwd),
    OpCase("masked_instance_norm", {"norm"},
           lambda i: fp.masked_instance_norm(i.x, i.mask, i.weight, i.bias),
           lambda i: seed_masked_instance_norm(i.x, i.mask, i.weight, i.bias),
           lambda i: clean_masked_instance_norm(i.x, i.mask, i.weight, i.bias),
           lambda i: [i.x, i.weight, i.bias],
           lambda i: _pool_bytes()(i) - i.x.shape[0] * i.x.shape[2] * _esize(i.x)
           + i.x.numel() * _esize(i.x),
           lambda i: 2 * i.valid * i.x.shape[-1] * _esize(i.x) + i.x.numel() * _esize(i.x)),
]}


def liger_fn(case: OpCase) -> Callable[[Inputs], Tensor] | None:
    """Liger-Kernel's implementation of a norm, when that package imports (CUDA only)."""
    if case.liger is None or not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    if case.liger == "layer_norm":
        return lambda i: LigerLayerNormFunction.apply(i.x, i.weight.to(i.x.dtype),
                                                      i.bias.to(i.x.dtype), 1e-5)
    return lambda i: LigerRMSNormFunction.apply(i.x, i.weight.to(i.x.dtype), 1e-6)
