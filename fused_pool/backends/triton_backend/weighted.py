"""Triton kernels for attention pooling and the weighted-layer ops.

Formulas are those of ``backends/reference/weighted.py``; shapes and conventions those of
``fused_pool/_schema.py``. Every kernel accumulates in float32 (float64 for float64 input, via the
``IS_FP64`` constexpr), reads each valid token's row once, never loads padding, uses the inputs'
strides and 64-bit offsets, and launches a grid that depends on shapes only (no host sync).

Attention pooling
    Forward: one pass over ``x`` with an online softmax per (sequence, head, feature block):
    running max ``m``, running sum ``l`` and an accumulator rescaled by ``exp(m_old - m_new)``
    whenever the max grows, over tiles of ``BLOCK_T`` tokens. When (sequence, head, block)
    programs alone cannot fill the GPU, the tokens are split into ``SPLIT`` chunks whose partial
    ``(m, l, acc)`` a tiny second kernel merges. Backward uses the saved ``lse``:
    ``p_t = exp(s_t - lse)``, ``grad_x[t] = p_t * grad_h`` and ``c_t = <grad_h, x_t,h>`` in one
    pass over x (tokens split freely: nothing is reduced over them), ``c`` kept in a small
    ``[B, L, H]`` buffer of the accumulation dtype; a second tiny kernel then forms
    ``grad_s[t] = p_t * (c_t - sum_u p_u c_u)``. The saved ``out`` is not used: in half
    precision ``<grad_h, out_h>`` is too inexact a ``sum_u p_u c_u`` (the contract tests fail).

Weighted layers: how N tensors reach one kernel
    Triton has no list-of-pointers argument. We pass the layers as a **tuple kernel argument**
    (``tuple(layers)``, plus tuples of their strides): Triton (>= 3.3; tuples arrived with
    triton-lang/triton#5220) flattens a tuple into N pointer parameters, specializes each one
    (alignment, unit strides) like a plain argument, and ``ptrs[i]`` inside
    ``tl.static_range(N)`` selects one at compile time. Why not the alternatives:

    * a device table of ``data_ptr()``s cast to pointers in the kernel needs a host-to-device
      copy per call, which stalls and is unsafe under CUDA-graph capture (the captured copy
      would replay stale host memory), and hides the layers' alignment from the compiler;
    * a fixed group of G pointer parameters means G hand-written parameters and branches, and
      for N > G a carry between launches: either a [B, L, D] float32 buffer (forbidden) or a
      rounding to the output dtype at every group boundary.

    The tuple costs one compilation per distinct N (a model has one N; compiling grows with N:
    about a minute for the N = 25 backward kernels on a slow CPU) and launch arguments that
    grow with N; a launch takes at most ``MAX_LAYERS`` layers (kernel parameter space and
    unrolled code size). Beyond that, layers go in chunks: the backward chunks are independent,
    ``weighted_layer_mean`` sums float32 partials, and ``weighted_layer_pool`` adds each chunk
    into its output (one extra read+write of the output and a rounding to its dtype per extra
    chunk; only for N > MAX_LAYERS, which no current model reaches with float16/bfloat16).

    ``weighted_layer_pool`` tiles (rows of B*L) x (feature block) and sums the N layers in
    registers; its backward writes ``grad * w_i / S`` for each layer while reducing
    ``c_i = <grad, h_i>`` into a per-program partial buffer ``[P, N]`` (summed afterwards by
    torch: deterministic, no atomics). ``weighted_layer_mean`` walks each sequence's valid tokens
    once, summing all N layers per token tile; its backward walks the layers one by one (it needs
    one sum per layer) and writes every gradient row, zeros at padding.

    Normalized weights ``w / S`` and the final ``grad_w = (c - <w/S, c>) / S`` are computed by
    a few tiny torch ops on N-element tensors, on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._schema import acc_dtype
from . import _layout
from ._layout import INTERPRET, block_d, cast_to, dummy, num_sms, owned_rows, seqs, token_valid

#: Layers per launch (see the module docstring).
MAX_LAYERS = 64



# ----------------------------------------------------------------------------------------------
# Launch heuristics (shape-only, so the grid never depends on data)
# ----------------------------------------------------------------------------------------------


def _split(device: torch.device, programs: int, tokens: int, block_t: int,
           min_tokens: int = 128) -> int:
    """How many token chunks per sequence: enough programs for ~4 waves of the GPU, each chunk
    at least ``min_tokens`` tokens (fewer would make merging the chunks' partial results cost
    more than it saves); 1 when interpreting."""
    if _layout.FORCE_SPLIT is not None:
        return _layout.FORCE_SPLIT
    if INTERPRET or programs <= 0:
        return 1
    want = triton.cdiv(4 * num_sms(device), programs)
    most = max(1, tokens // max(min_tokens, block_t))
    return max(1, min(want, most, 64))


def _tile(d: int, itemsize: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` for the attention kernels' token x feature tile: wide
    loads along D, 4K elements per tile on a GPU (sm_90 ptxas, bfloat16: 168 registers forward,
    107 backward, no spills); one tile per program for the tests' tiny shapes interpreted."""
    if INTERPRET:
        return 16, block_d(d, 128), 1
    bd = block_d(d, 1024 if itemsize <= 2 else 512)
    return max(1, 4096 // bd), bd, 4


def _is_fp64(t: Tensor) -> bool:
    return t.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Attention pooling
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_pool_fwd_kernel(
    x_ptr, s_ptr, out_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr,
    start_ptr, end_ptr, count_ptr, mask_ptr, stride_mb, stride_ml,
    stride_xb, stride_xt, stride_xd, stride_sb, stride_st, stride_sh,
    B, D, DH, H, NBLK,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online-softmax attention pooling of one (sequence b, head h, feature block, token chunk).

    Grid ``(B, H * NBLK, SPLIT)`` with ``NBLK = cdiv(D / H, BLOCK_D)``. Over the valid tokens t
    of the chunk: ``m = max_t s[t, h]``, ``l = sum_t exp(s[t, h] - m)``,
    ``acc = sum_t exp(s[t, h] - m) * x[t, block]``, kept rescaled as m grows. SPLIT == 1:
    writes ``out[b, block] = acc / l`` (0 for an empty sequence) and
    ``lse[b, h] = m + log(l)`` (-inf when empty). SPLIT > 1: writes the partial ``(m, l, acc)``
    to ``pm/pl [B, SPLIT, H]`` and ``pacc [B, SPLIT, D]`` for ``_attention_pool_merge_kernel``.
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) // NBLK
    blk = tl.program_id(1) % NBLK
    split = tl.program_id(2)

    lo = tl.load(start_ptr + b)
    hi = tl.load(end_ptr + b)
    if SPLIT > 1:
        # Chunks of whole tiles, so that no tile straddles two programs.
        chunk = tl.cdiv(tl.cdiv(hi - lo, SPLIT), BLOCK_T) * BLOCK_T
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)

    offs_t = tl.arange(0, BLOCK_T)
    offs_e = blk * BLOCK_D + tl.arange(0, BLOCK_D)  # feature within the head
    dmask = offs_e < DH
    d = (h * DH + offs_e).to(tl.int64)
    x_base = x_ptr + b * stride_xb + d * stride_xd
    s_base = s_ptr + b * stride_sb + h.to(tl.int64) * stride_sh

    m = tl.max(tl.full([BLOCK_T], float("-inf"), acc_ty), 0)
    denom = tl.sum(tl.zeros([BLOCK_T], acc_ty), 0)
    acc = tl.zeros([BLOCK_D], acc_ty)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + offs_t
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        s = tl.load(s_base + t * stride_st, mask=valid, other=0).to(acc_ty)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        # m_new == m also covers "nothing valid yet" (-inf == -inf), where exp would be NaN.
        alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new)).to(acc_ty)
        # A NaN score (or a valid row of -inf scores) makes p NaN, as torch.softmax does.
        p = tl.where(valid, tl.exp(s - m_new), 0.0).to(acc_ty)
        xt = tl.load(x_base[None, :] + t[:, None] * stride_xt,
                     mask=valid[:, None] & dmask[None, :], other=0).to(acc_ty)
        acc = acc * alpha + tl.sum(p[:, None] * xt, 0)
        denom = denom * alpha + tl.sum(p, 0)
        m = m_new

    if SPLIT == 1:
        nonempty = tl.load(count_ptr + b) > 0
        out = tl.where(nonempty, acc / denom, 0.0)
        tl.store(out_ptr + b * D + d, cast_to(out, out_ptr.dtype.element_ty), mask=dmask)
        lse = tl.where(nonempty, m + tl.log(denom), float("-inf"))
        tl.store(lse_ptr + b * H + h, lse.to(lse_ptr.dtype.element_ty), mask=blk == 0)
    else:
        row = b * SPLIT + split
        tl.store(pacc_ptr + row * D + d, acc, mask=dmask)
        tl.store(pm_ptr + row * H + h, m, mask=blk == 0)
        tl.store(pl_ptr + row * H + h, denom, mask=blk == 0)


@triton.jit
def _attention_pool_merge_kernel(
    pm_ptr, pl_ptr, pacc_ptr, count_ptr, out_ptr, lse_ptr, D, DH, H, NBLK,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the SPLIT partial online softmaxes of one (b, h, feature block).

    Grid ``(B, H * NBLK)``. ``M = max_s m_s``, ``c_s = exp(m_s - M)``, ``L = sum_s c_s l_s``:
    ``out = sum_s c_s acc_s / L`` (0 when the sequence is empty), ``lse = M + log(L)``.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) // NBLK
    blk = tl.program_id(1) % NBLK
    sp = tl.arange(0, BLOCK_S)
    smask = sp < SPLIT
    rows = b * SPLIT + sp
    ms = tl.load(pm_ptr + rows * H + h, mask=smask, other=float("-inf"))
    ls = tl.load(pl_ptr + rows * H + h, mask=smask, other=0.0)
    mx = tl.max(ms, 0)
    c = tl.where(ms == mx, 1.0, tl.exp(ms - mx)).to(ms.dtype)
    c = tl.where(smask, c, 0.0).to(ms.dtype)
    total = tl.sum(c * ls, 0)
    offs_e = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_e < DH
    d = (h * DH + offs_e).to(tl.int64)
    accs = tl.load(pacc_ptr + rows[:, None] * D + d[None, :],
                   mask=smask[:, None] & dmask[None, :], other=0.0)
    acc = tl.sum(c[:, None] * accs, 0)
    nonempty = tl.load(count_ptr + b) > 0
    out = tl.where(nonempty, acc / total, 0.0)
    tl.store(out_ptr + b * D + d, cast_to(out, out_ptr.dtype.element_ty), mask=dmask)
    lse = tl.where(nonempty, mx + tl.log(total), float("-inf"))
    tl.store(lse_ptr + b * H + h, lse.to(lse_ptr.dtype.element_ty), mask=blk == 0)


def _score_strides(scores: Tensor, packed: bool) -> tuple[int, int, int]:
    """(sequence, token, head) strides of scores ``[B, L, H]`` or packed ``[T, H]``."""
    if packed:
        return 0, scores.stride(0), scores.stride(1)
    return scores.stride(0), scores.stride(1), scores.stride(2)


def attention_pool(
    x: Tensor, scores: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(out [B, D] in x's dtype, lse [B, H] float32/float64)``; see the kernel docstrings."""
    q = seqs(x, mask, cu_seqlens)
    nb, d, h = q.batch, x.shape[-1], scores.shape[-1]
    acc = acc_dtype(x.dtype)
    out = torch.empty(nb, d, dtype=x.dtype, device=x.device)
    lse = torch.empty(nb, h, dtype=acc, device=x.device)
    if nb == 0:
        return out, lse
    dh = d // h
    block_t, bd, warps = _tile(dh, x.element_size())
    nblk = max(1, triton.cdiv(dh, bd))  # D == 0 still computes lse
    tokens = x.shape[1] if cu_seqlens is None else x.shape[0] // max(nb, 1)
    split = _split(x.device, nb * h * nblk, tokens, block_t)
    if split > 1:
        pm = torch.empty(nb, split, h, dtype=acc, device=x.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(nb, split, d, dtype=acc, device=x.device)
    else:
        pm = pl = pacc = dummy(x.device, acc)
    _attention_pool_fwd_kernel[(nb, h * nblk, split)](
        x, scores, out, lse, pm, pl, pacc,
        q.start, q.end, q.count, q.mask, q.stride_mb, q.stride_ml,
        q.stride_b, q.stride_t, q.stride_d, *_score_strides(scores, cu_seqlens is not None),
        nb, d, dh, h, nblk,
        HAS_MASK=q.has_mask, SPLIT=split, IS_FP64=_is_fp64(x),
        BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps,
    )
    if split > 1:
        # Its own feature blocks: a [BLOCK_S, BLOCK_D] tile of at most 8K partials.
        block_s = triton.next_power_of_2(split)
        bd_merge = max(16, min(bd, 8192 // block_s))
        nblk_merge = max(1, triton.cdiv(dh, bd_merge))
        _attention_pool_merge_kernel[(nb, h * nblk_merge)](
            pm, pl, pacc, q.count, out, lse, d, dh, h, nblk_merge,
            SPLIT=split, BLOCK_S=block_s, BLOCK_D=bd_merge, num_warps=warps,
        )
    return out, lse


@triton.jit
def _token_range(start_ptr, end_ptr, b, NUM_TOKENS, split,
                 PACKED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr):
    """The rows ``[lo, hi)`` of sequence b's gradient that chunk ``split`` of SPLIT writes
    (``_layout.owned_rows``), and ``[vstart, vend)``, the sequence's tokens. Chunks are whole
    tiles, so that no tile straddles two programs."""
    vend = tl.load(end_ptr + b)
    if PACKED:
        vstart = tl.load(start_ptr + b)
    else:
        vstart = tl.zeros([], tl.int64)
    lo, hi = owned_rows(vstart, vend, b, NUM_TOKENS, PACKED)
    if SPLIT > 1:
        chunk = tl.cdiv(tl.cdiv(hi - lo, SPLIT), BLOCK_T) * BLOCK_T
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    return lo, hi, vstart, vend


@triton.jit
def _inside_and_valid(t, hi, vstart, vend, b, mask_ptr, stride_mb, stride_ml,
                      HAS_MASK: tl.constexpr):
    """``(inside, valid)`` for token rows t: inside the written range, and a valid token."""
    inside = t < hi
    valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml,
                        inside & (t >= vstart) & (t < vend), HAS_MASK)
    return inside, valid


@triton.jit
def _attention_pool_bwd_kernel(
    grad_ptr, x_ptr, s_ptr, lse_ptr, gx_ptr, c_ptr,
    start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml,
    stride_xb, stride_xt, stride_xd, stride_sb, stride_st, stride_sh,
    stride_gxb, stride_gxt, stride_cb, stride_ct, D, DH, H, NUM_TOKENS,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, SPLIT: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``grad_x`` and the per-token dot products of one (sequence b, head h, token chunk).

    Grid ``(B, H, SPLIT)``. With ``p_t = exp(s[t, h] - lse[b, h])`` at valid tokens (0
    elsewhere): ``grad_x[t, h] = p_t * grad[b, h]`` for every row of the chunk (zeros at
    padding), and ``c[t, h] = <grad[b, h], x[t, h]>`` (accumulation dtype) at valid tokens, for
    ``_attention_pool_bwd_scores_kernel``. Reads x only at valid tokens, once.
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    lo, hi, vstart, vend = _token_range(start_ptr, end_ptr, b, NUM_TOKENS, tl.program_id(2),
                                PACKED, SPLIT, BLOCK_T)
    hd = h.to(tl.int64) * DH  # first feature of the head
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + b * H + h).to(acc_ty)
    s_base = s_ptr + b * stride_sb + h.to(tl.int64) * stride_sh
    c_base = c_ptr + b * stride_cb + h
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside, valid = _inside_and_valid(t, hi, vstart, vend, b, mask_ptr, stride_mb,
                                          stride_ml, HAS_MASK)
        s = tl.load(s_base + t * stride_st, mask=valid, other=0).to(acc_ty)
        p = tl.where(valid, tl.exp(s - lse), 0.0).to(acc_ty)
        c = tl.zeros([BLOCK_T], acc_ty)
        for e0 in range(0, DH, BLOCK_D):
            e = e0 + offs_d
            emask = e < DH
            g = tl.load(grad_ptr + b * D + hd + e, mask=emask, other=0).to(acc_ty)
            xt = tl.load(x_ptr + b * stride_xb + t[:, None] * stride_xt
                         + (hd + e)[None, :] * stride_xd,
                         mask=valid[:, None] & emask[None, :], other=0).to(acc_ty)
            c += tl.sum(xt * g[None, :], 1)
            gx = p[:, None] * g[None, :]
            tl.store(gx_ptr + b * stride_gxb + t[:, None] * stride_gxt + (hd + e)[None, :],
                     cast_to(gx, gx_ptr.dtype.element_ty), mask=inside[:, None] & emask[None, :])
        tl.store(c_base + t * stride_ct, c, mask=valid)


@triton.jit
def _attention_pool_bwd_scores_kernel(
    s_ptr, lse_ptr, c_ptr, gs_ptr, start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml,
    stride_sb, stride_st, stride_sh, stride_cb, stride_ct, stride_gsb, stride_gst, stride_gsh,
    H, NUM_TOKENS,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``grad_s[t, h] = p_t * (c[t, h] - delta)`` with ``delta = sum_u p_u c[u, h]``, for one
    (sequence b, head h); every row of the sequence written (zeros at padding).

    Grid ``(B, H)``. Two passes over the small ``[L]`` vectors s and c: delta is recomputed in
    full precision rather than taken as ``<grad, out>`` from the output rounded to x's dtype.
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    lo, hi, vstart, vend = _token_range(start_ptr, end_ptr, b, NUM_TOKENS, 0, PACKED, 1, BLOCK_T)
    lse = tl.load(lse_ptr + b * H + h).to(acc_ty)
    s_base = s_ptr + b * stride_sb + h.to(tl.int64) * stride_sh
    c_base = c_ptr + b * stride_cb + h
    delta = tl.sum(tl.zeros([BLOCK_T], acc_ty), 0)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside, valid = _inside_and_valid(t, hi, vstart, vend, b, mask_ptr, stride_mb,
                                          stride_ml, HAS_MASK)
        s = tl.load(s_base + t * stride_st, mask=valid, other=0).to(acc_ty)
        c = tl.load(c_base + t * stride_ct, mask=valid, other=0)
        delta += tl.sum(tl.where(valid, tl.exp(s - lse) * c, 0.0), 0)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        inside, valid = _inside_and_valid(t, hi, vstart, vend, b, mask_ptr, stride_mb,
                                          stride_ml, HAS_MASK)
        s = tl.load(s_base + t * stride_st, mask=valid, other=0).to(acc_ty)
        c = tl.load(c_base + t * stride_ct, mask=valid, other=0)
        gs = tl.where(valid, tl.exp(s - lse) * (c - delta), 0.0)
        tl.store(gs_ptr + b * stride_gsb + t * stride_gst + h.to(tl.int64) * stride_gsh,
                 cast_to(gs, gs_ptr.dtype.element_ty), mask=inside)


def attention_pool_backward(
    grad: Tensor,
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None,
    cu_seqlens: Tensor | None,
    out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(grad_x like x, grad_scores like scores)``, both contiguous and fully written.

    ``out`` is not used: ``sum_u p_u c_u`` is recomputed from per-token dot products kept in a
    small ``[B, L, H]`` (``[T, H]``) buffer of the accumulation dtype, because ``<grad, out>``
    with ``out`` rounded to half precision is too inexact for the score gradient.
    """
    del out
    packed = cu_seqlens is not None
    q = seqs(x, mask, cu_seqlens)
    nb, d, h = q.batch, x.shape[-1], scores.shape[-1]
    num_tokens = x.shape[0] if packed else x.shape[1]
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gs = torch.empty(scores.shape, dtype=scores.dtype, device=x.device)
    if nb == 0 or num_tokens == 0:
        return gx, gs.zero_()
    acc = acc_dtype(x.dtype)
    c = torch.empty(scores.shape, dtype=acc, device=x.device)
    dh = d // h
    block_t, bd, warps = _tile(dh, x.element_size())
    # Tokens per sequence (on average, when packed) set how finely they can be split.
    # Chunks of the backward merge nothing (no partial results), so they can be short.
    split = _split(x.device, nb * h, num_tokens // nb if packed else num_tokens, block_t, 32)
    gx_sb, gx_st = (0, gx.stride(0)) if packed else (gx.stride(0), gx.stride(1))
    c_sb, c_st, _ = _score_strides(c, packed)
    _attention_pool_bwd_kernel[(nb, h, split)](
        grad, x, scores, lse, gx, c,
        q.start, q.end, q.mask, q.stride_mb, q.stride_ml,
        q.stride_b, q.stride_t, q.stride_d, *_score_strides(scores, packed),
        gx_sb, gx_st, c_sb, c_st, d, dh, h, num_tokens,
        HAS_MASK=q.has_mask, PACKED=packed, SPLIT=split, IS_FP64=_is_fp64(x),
        BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps,
    )
    _attention_pool_bwd_scores_kernel[(nb, h)](
        scores, lse, c, gs, q.start, q.end, q.mask, q.stride_mb, q.stride_ml,
        *_score_strides(scores, packed), c_sb, c_st, *_score_strides(gs, packed),
        h, num_tokens,
        HAS_MASK=q.has_mask, PACKED=packed, IS_FP64=_is_fp64(x),
        BLOCK_T=16 if INTERPRET else 512, num_warps=1 if INTERPRET else 4,
    )
    return gx, gs


# ----------------------------------------------------------------------------------------------
# Weighted layers
# ----------------------------------------------------------------------------------------------


def _normalized(weights: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(w / S, S)`` in the accumulation dtype of the layers, as the reference computes them."""
    w = weights.to(acc_dtype(dtype))
    total = w.sum()
    return (w / total).contiguous(), total


def _chunks(n: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each launch's layers."""
    return [(i, min(MAX_LAYERS, n - i)) for i in range(0, n, MAX_LAYERS)]


def _strides(layers: list[Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The (batch, token, feature) strides of each layer, as three tuples."""
    return tuple(tuple(h.stride(k) for h in layers) for k in range(3))


def _weights_grad(partial: Tensor, wn: Tensor, total: Tensor, weights: Tensor) -> Tensor:
    """``grad_w = (c - <w/S, c>) / S`` from per-program partials ``c`` of shape ``[P, N]``."""
    c = partial.sum(0)
    return ((c - (wn * c).sum()) / total).to(weights.dtype)


def _layer_tile(rows: int, d: int, itemsize: int, n: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` for the layer kernels, whose N loads per tile are all in
    flight at once: tiles of 8 KiB per layer for up to 16 layers, smaller beyond, 8 warps (sm_90
    ptxas, bfloat16: no register spills for N = 13 at 4096 elements, N = 25 at 2048). ``rows``
    bounds the tile under the interpreter, where few large programs are fastest."""
    if INTERPRET:
        return min(64, triton.next_power_of_2(max(rows, 1))), block_d(d, 128), 1
    # The same bytes per layer in flight whatever the dtype (registers hold the loaded data).
    elems = (4096 if n <= 16 else 2048 if n <= 32 else 1024) * 2 // itemsize
    bd = block_d(d, min(elems, 1024))
    return max(1, elems // bd), bd, 8


@triton.jit
def _weighted_layer_pool_fwd_kernel(
    layers, stride_b, stride_l, stride_d, wn_ptr, first, out_ptr, ROWS, L, D,
    N: tl.constexpr, ACCUMULATE: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[r, d] = sum_i wn[first + i] * layers[i][r, d]`` (+ ``out`` when ACCUMULATE).

    ``layers`` is a tuple of N pointers to ``[B, L, D]`` tensors (strides in the tuples
    ``stride_b/l/d``), rows ``r = b * L + t``; ``out`` is contiguous ``[B, L, D]``.
    Grid ``(cdiv(B * L, BLOCK_R), cdiv(D, BLOCK_D))``.
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    msk = (r < ROWS)[:, None] & (d < D)[None, :]
    b = r // L
    t = r % L
    acc = tl.zeros([BLOCK_R, BLOCK_D], acc_ty)
    for i in tl.static_range(N):
        w = tl.load(wn_ptr + first + i)
        ptr = layers[i] + (b * stride_b[i] + t * stride_l[i])[:, None] + d[None, :] * stride_d[i]
        acc += w * tl.load(ptr, mask=msk, other=0).to(acc_ty)
    optr = out_ptr + r[:, None] * D + d[None, :]
    if ACCUMULATE:
        acc += tl.load(optr, mask=msk, other=0).to(acc_ty)
    tl.store(optr, cast_to(acc, out_ptr.dtype.element_ty), mask=msk)


def weighted_layer_pool(layers: list[Tensor], weights: Tensor) -> Tensor:
    """``sum_i w_i layers[i] / sum_i w_i`` -> contiguous ``[B, L, D]`` in the layers' dtype."""
    h0 = layers[0]
    nb, length, d = h0.shape
    out = torch.empty(nb, length, d, dtype=h0.dtype, device=h0.device)
    if out.numel() == 0:
        return out
    wn, _ = _normalized(weights, h0.dtype)
    rows = nb * length
    br, bd, warps = _layer_tile(rows, d, h0.element_size(), min(len(layers), MAX_LAYERS))
    grid = (triton.cdiv(rows, br), triton.cdiv(d, bd))
    for k, (first, n) in enumerate(_chunks(len(layers))):
        chunk = layers[first:first + n]
        _weighted_layer_pool_fwd_kernel[grid](
            tuple(chunk), *_strides(chunk), wn, first, out, rows, length, d,
            N=n, ACCUMULATE=k > 0, IS_FP64=_is_fp64(h0),
            BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
        )
    return out


@triton.jit
def _weighted_layer_pool_bwd_kernel(
    grad_ptr, stride_gb, stride_gl, stride_gd,
    layers, stride_b, stride_l, stride_d, grads, wn_ptr, first, partial_ptr, NTOT, ROWS, L, D,
    N: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``grads[i][r, d] = grad[r, d] * wn[first + i]`` and the partial dot products
    ``partial[pid, first + i] = sum_tile grad * layers[i]``.

    Tuples as in ``_weighted_layer_pool_fwd_kernel``; ``grads`` are contiguous ``[B, L, D]``;
    ``partial`` is ``[P, NTOT]`` with ``pid = program_id(0) * num_programs(1) + program_id(1)``.
    Grid ``(cdiv(B * L, BLOCK_R), cdiv(D, BLOCK_D))``.
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    msk = (r < ROWS)[:, None] & (d < D)[None, :]
    b = r // L
    t = r % L
    g = tl.load(grad_ptr + (b * stride_gb + t * stride_gl)[:, None] + d[None, :] * stride_gd,
                mask=msk, other=0).to(acc_ty)
    out_off = r[:, None] * D + d[None, :]
    for i in tl.static_range(N):
        w = tl.load(wn_ptr + first + i)
        ptr = layers[i] + (b * stride_b[i] + t * stride_l[i])[:, None] + d[None, :] * stride_d[i]
        h = tl.load(ptr, mask=msk, other=0).to(acc_ty)
        tl.store(partial_ptr + pid * NTOT + first + i, tl.sum(tl.sum(g * h, 1), 0))
        tl.store(grads[i] + out_off, cast_to(g * w, grads[i].dtype.element_ty), mask=msk)


def weighted_layer_pool_backward(
    grad: Tensor, layers: list[Tensor], weights: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``grad_layers[i] = grad * w_i / S``; ``grad_w[j] = (<grad, h_j> - <grad, out>) / S``."""
    h0 = layers[0]
    nb, length, d = h0.shape
    grads = [torch.empty(nb, length, d, dtype=h.dtype, device=h.device) for h in layers]
    if h0.numel() == 0:
        return grads, torch.zeros_like(weights)
    wn, total = _normalized(weights, h0.dtype)
    rows = nb * length
    br, bd, warps = _layer_tile(rows, d, h0.element_size(), min(len(layers), MAX_LAYERS))
    grid = (triton.cdiv(rows, br), triton.cdiv(d, bd))
    partial = torch.empty(grid[0] * grid[1], len(layers), dtype=wn.dtype, device=h0.device)
    for first, n in _chunks(len(layers)):
        chunk = layers[first:first + n]
        _weighted_layer_pool_bwd_kernel[grid](
            grad, *grad.stride(), tuple(chunk), *_strides(chunk), tuple(grads[first:first + n]),
            wn, first, partial, len(layers), rows, length, d,
            N=n, IS_FP64=_is_fp64(h0), BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
        )
    return grads, _weights_grad(partial, wn, total, weights)


@triton.jit
def _weighted_layer_mean_fwd_kernel(
    layers, stride_b, stride_l, stride_d, wn_ptr, first,
    end_ptr, count_ptr, mask_ptr, stride_mb, stride_ml, out_ptr, part_ptr, B, D,
    N: tl.constexpr, HAS_MASK: tl.constexpr, FINAL: tl.constexpr, SPLIT: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``sum_i wn[first + i] * sum_t layers[i][b, t, block]`` over the valid tokens t of one
    (sequence b, feature block, token chunk), all N layers summed per token tile.

    Grid ``(B, cdiv(D, BLOCK_D), SPLIT)``. FINAL (one chunk of layers, SPLIT == 1): writes
    ``out[b, block] = sum / max(n_b, 1)``; else the sum goes to ``part[k, b, block]`` with
    ``k = program_id(2)`` (the caller adds the partials and divides).
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    split = tl.program_id(2)
    lo = tl.zeros([], tl.int64)
    hi = tl.load(end_ptr + b)
    if SPLIT > 1:
        chunk = tl.cdiv(tl.cdiv(hi, SPLIT), BLOCK_T) * BLOCK_T
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_D], acc_ty)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + offs_t
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        msk = valid[:, None] & dmask[None, :]
        for i in tl.static_range(N):
            w = tl.load(wn_ptr + first + i)
            ptr = layers[i] + b * stride_b[i] + t[:, None] * stride_l[i] + d[None, :] * stride_d[i]
            acc += w * tl.load(ptr, mask=msk, other=0).to(acc_ty)
    total = tl.sum(acc, 0)
    if FINAL:
        n = tl.maximum(tl.load(count_ptr + b), 1).to(acc_ty)
        tl.store(out_ptr + b * D + d, cast_to(total / n, out_ptr.dtype.element_ty), mask=dmask)
    else:
        tl.store(part_ptr + (split * B + b) * D + d, total, mask=dmask)


def weighted_layer_mean(layers: list[Tensor], weights: Tensor, mask: Tensor | None) -> Tensor:
    """``masked_mean(weighted_layer_pool(layers, weights), mask)`` -> ``[B, D]``, fused."""
    h0 = layers[0]
    nb, length, d = h0.shape
    out = torch.empty(nb, d, dtype=h0.dtype, device=h0.device)
    if out.numel() == 0:
        return out
    q = seqs(h0, mask, None)
    wn, _ = _normalized(weights, h0.dtype)
    block_t, bd, warps = _layer_tile(16, d, h0.element_size(), min(len(layers), MAX_LAYERS))
    nblk = triton.cdiv(d, bd)
    split = _split(h0.device, nb * nblk, length, block_t)
    chunks = _chunks(len(layers))
    final = split == 1 and len(chunks) == 1
    part = dummy(h0.device, wn.dtype)
    if not final:
        part = torch.empty(len(chunks), split, nb, d, dtype=wn.dtype, device=h0.device)
    for k, (first, n) in enumerate(chunks):
        chunk = layers[first:first + n]
        _weighted_layer_mean_fwd_kernel[(nb, nblk, split)](
            tuple(chunk), *_strides(chunk), wn, first,
            q.end, q.count, q.mask, q.stride_mb, q.stride_ml, out,
            part if final else part[k], nb, d,
            N=n, HAS_MASK=q.has_mask, FINAL=final, SPLIT=split, IS_FP64=_is_fp64(h0),
            BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps,
        )
    if not final:
        mean = part.sum((0, 1)) / q.count.clamp(min=1).to(wn.dtype)[:, None]
        out.copy_(mean)
    return out


@triton.jit
def _weighted_layer_mean_bwd_kernel(
    grad_ptr, layers, stride_b, stride_l, stride_d, grads, wn_ptr, first,
    end_ptr, count_ptr, mask_ptr, stride_mb, stride_ml, partial_ptr, NTOT, L, D,
    N: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of ``weighted_layer_mean`` for one (sequence b, feature block, token chunk).

    Grid ``(B, NBLK, SPLIT)``, ``NBLK = cdiv(D, BLOCK_D)``. With ``gm = grad[b] / max(n_b, 1)``:
    ``grads[i][b, t, block] = gm * wn[first + i]`` at valid t, 0 at every other row of the chunk
    (the L rows are split among the SPLIT programs); and the partial
    ``partial[pid, first + i] = <gm, sum_t layers[i][b, t, block]>`` over the chunk's valid
    tokens, ``pid = (b * NBLK + block) * SPLIT + chunk``. Layers are visited one after the other
    (one running sum each).
    """
    acc_ty = tl.float64 if IS_FP64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    split = tl.program_id(2)
    pid = (b * tl.num_programs(1) + tl.program_id(1)) * SPLIT + split
    vend = tl.load(end_ptr + b)
    n = tl.maximum(tl.load(count_ptr + b), 1).to(acc_ty)
    gm = tl.load(grad_ptr + b * D + d, mask=dmask, other=0).to(acc_ty) / n
    lo = tl.zeros([], tl.int64)
    hi = lo + L
    if SPLIT > 1:
        chunk = tl.cdiv(tl.cdiv(hi, SPLIT), BLOCK_T) * BLOCK_T
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)
    offs_t = tl.arange(0, BLOCK_T)
    row0 = b * L * D
    for i in tl.static_range(N):
        w = tl.load(wn_ptr + first + i)
        gi = gm * w
        acc = tl.zeros([BLOCK_T, BLOCK_D], acc_ty)
        for t0 in range(lo, hi, BLOCK_T):
            t = t0 + offs_t
            inside = t < hi
            valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, inside & (t < vend),
                                HAS_MASK)
            ptr = layers[i] + b * stride_b[i] + t[:, None] * stride_l[i] + d[None, :] * stride_d[i]
            acc += tl.load(ptr, mask=valid[:, None] & dmask[None, :], other=0).to(acc_ty)
            gv = tl.where(valid[:, None], gi[None, :], 0.0)
            tl.store(grads[i] + row0 + t[:, None] * D + d[None, :],
                     cast_to(gv, grads[i].dtype.element_ty), mask=inside[:, None] & dmask[None, :])
        tl.store(partial_ptr + pid * NTOT + first + i, tl.sum(tl.sum(acc, 0) * gm, 0))


def weighted_layer_mean_backward(
    grad: Tensor, layers: list[Tensor], weights: Tensor, mask: Tensor | None
) -> tuple[list[Tensor], Tensor]:
    """``grad_layers[i][b, t] = grad[b] * w_i / (S * n_b)`` at valid tokens (0 elsewhere);
    ``grad_w[j] = (<grad, mean_j> - <grad, out>) / S`` with ``mean_j`` the masked mean of
    layer j."""
    h0 = layers[0]
    nb, length, d = h0.shape
    grads = [torch.empty(nb, length, d, dtype=h.dtype, device=h.device) for h in layers]
    if h0.numel() == 0:
        return grads, torch.zeros_like(weights)
    q = seqs(h0, mask, None)
    wn, total = _normalized(weights, h0.dtype)
    block_t, bd, warps = _layer_tile(16, d, h0.element_size(), min(len(layers), MAX_LAYERS))
    nblk = triton.cdiv(d, bd)
    split = _split(h0.device, nb * nblk, length, block_t, 32)  # partials are [P, N] scalars
    partial = torch.empty(nb * nblk * split, len(layers), dtype=wn.dtype, device=h0.device)
    for first, n in _chunks(len(layers)):
        chunk = layers[first:first + n]
        _weighted_layer_mean_bwd_kernel[(nb, nblk, split)](
            grad, tuple(chunk), *_strides(chunk), tuple(grads[first:first + n]), wn, first,
            q.end, q.count, q.mask, q.stride_mb, q.stride_ml, partial, len(layers), length, d,
            N=n, HAS_MASK=q.has_mask, SPLIT=split, IS_FP64=_is_fp64(h0),
            BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps,
        )
    return grads, _weights_grad(partial, wn, total, weights)


IMPLEMENTATIONS = {
    "attention_pool": attention_pool,
    "attention_pool_backward": attention_pool_backward,
    "weighted_layer_pool": weighted_layer_pool,
    "weighted_layer_pool_backward": weighted_layer_pool_backward,
    "weighted_layer_mean": weighted_layer_mean,
    "weighted_layer_mean_backward": weighted_layer_mean_backward,
}
