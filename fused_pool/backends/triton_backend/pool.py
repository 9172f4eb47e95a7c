"""Triton kernels of the selection/mean pools: masked mean, max/min, k-max, mean+max, and their
backwards (formulas: ``backends/reference/pool.py``; token layout: ``_layout.py``).

Forward pools (``_pool_fwd_kernel``) run a grid ``(B, cdiv(D, BLOCK_D), SPLIT)``: program
``(b, j, s)`` reads tile after tile of ``[BLOCK_T, BLOCK_D]`` of the ``s``-th of ``SPLIT`` equal
chunks of sequence ``b``'s token range ``[start[b], end[b])`` (rows whose mask is 0 are masked
lanes: never fetched). With ``SPLIT == 1`` it writes the outputs; otherwise it writes fp32
(fp64) partials ``[SPLIT, B, D]`` that ``_pool_combine_kernel`` folds in token order. ``SPLIT``
only depends on shapes (no host synchronization; CUDA graphs work): it is raised when ``B * D``
alone gives too few programs to fill the GPU.

Backwards (``_pool_bwd_kernel``) write every element of ``grad_x``, zeros included, in one
pass (each element once, except the few indexed ones of the scatter strategy), over a grid
``(B, cdiv(D, BLOCK_D), SPLIT)`` in which program ``(b, j, s)`` owns the ``s``-th chunk of
sequence ``b``'s rows (``_layout.owned_rows``: ``0 .. L-1`` for padded input, ``cu[b] ..
cu[b+1]-1`` for packed input, the first / last sequence also owning any rows outside every
sequence), so the rows are covered without knowing the lengths on the host.

k-max (``_kmax_fwd_kernel`` for ``k <= 16``, ``_kmax_select_kernel`` above) runs a grid
``(B, cdiv(D, BLOCK_D))``; see the kernels for the two algorithms.

Values are compared and summed in float32 (float64 for float64 input). Output positions are
int64; the forward pools track them as int32 internally (a sequence must be shorter than 2^31
tokens), while all addresses are int64 (tensors may exceed 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._schema import acc_dtype, batch_size, grad_x_shape
from . import _layout
from ._layout import (
    INTERPRET,
    block_d,
    cast_to,
    dummy,
    mask_view,
    num_sms,
    owned_rows,
    seqs,
    to_acc,
    token_valid,
)

# k up to this uses the streaming register top-k; larger k uses threshold selection.
SMALL_K = 16
# index_pool_backward with at most this many indices per feature compares every row against
# them (one store per element); more indices zero-fill first, then scatter (see the kernel).
PICK_MAX_K = 4
# Tests set this to force an L-split (the interpreter never picks one on its own).


# ----------------------------------------------------------------------------------------------
# Small shared pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _and(a, b):
    """``a & b`` for a scalar and/or a block of bools (``&`` of a scalar and a block gives an
    integer block under the interpreter, which a load mask rejects)."""
    return tl.where(a, b, False)


@triton.jit
def _chunk(lo, hi, s, n_split):
    """The ``s``-th of ``n_split`` equal chunks of ``[lo, hi)``."""
    size = (hi - lo + n_split - 1) // n_split
    c_lo = lo + s * size
    c_hi = tl.minimum(c_lo + size, hi)
    return c_lo, c_hi


# ----------------------------------------------------------------------------------------------
# Forward: mean, max/min + argmax, both at once
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pool_fwd_kernel(
    x_ptr, start_ptr, end_ptr, count_ptr, mask_ptr,
    stride_mb, stride_ml, stride_b, stride_t, stride_d,
    sum_ptr, val_ptr, idx_ptr, stride_sb, stride_vb, stride_ib,
    n_batch, D,
    HAS_MASK: tl.constexpr, MEAN: tl.constexpr, EXT: tl.constexpr, LARGEST: tl.constexpr,
    PARTIAL: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Masked mean and/or extremum of features ``j*BLOCK_D ...`` of sequence ``b`` over chunk
    ``s`` of its tokens; grid ``(B, cdiv(D, BLOCK_D), SPLIT)``.

    ``MEAN``: ``sum[b, d] = sum_{t valid} x[b, t, d]``, written as ``sum / max(count[b], 1)``.
    ``EXT``: ``val[b, d] = max_t x[b, t, d]`` (``LARGEST``; else the min, computed as the max of
    ``-x``) and ``idx[b, d]`` its position within the sequence: NaN beats every number, the
    lowest position wins ties; empty -> value 0, index -1.
    ``PARTIAL``: write the raw sum / (possibly negated) value / index (-1: chunk empty) to
    ``[SPLIT, B, D]`` partial buffers for ``_pool_combine_kernel`` instead.

    Positions are tracked as int32: a single sequence must be shorter than 2^31 tokens (the
    tensors themselves may exceed 2^31 elements: addresses are int64).
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col = offs_d.to(tl.int64) * stride_d
    seq_lo = tl.load(start_ptr + b)
    lo, hi = _chunk(seq_lo, tl.load(end_ptr + b), s, tl.num_programs(2))
    x_base = x_ptr + b * stride_b
    rows = tl.arange(0, BLOCK_T)

    # Row lane r of the tile sees tokens t0 + r in order and keeps its own running sum and
    # extremum; the lanes are folded once at the end, so the loop has no cross-thread reduction.
    lane_sum = to_acc(tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), IS_FP64)
    lane_best = lane_sum - float("inf")  # NaN once the lane saw a NaN
    lane_pos = tl.full([BLOCK_T, BLOCK_D], -1, dtype=tl.int32)  # position in the sequence
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + rows
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        m2 = valid[:, None] & dmask[None, :]
        v = tl.load(x_base + t[:, None] * stride_t + col[None, :], mask=m2, other=0.0)
        v = to_acc(v, IS_FP64)
        if MEAN:
            lane_sum += v
        if EXT:
            if not LARGEST:
                v = -v
            # Strictly greater: the lane's earlier token keeps ties; a NaN is never replaced.
            take = m2 & (lane_best == lane_best) & (
                (v != v) | (v > lane_best) | (lane_pos < 0)
            )
            lane_best = tl.where(take, v, lane_best)
            lane_pos = tl.where(take, (t - seq_lo).to(tl.int32)[:, None], lane_pos)

    total = tl.sum(lane_sum, axis=0)
    best, best_idx = _fold_lanes(lane_best, lane_pos)
    if PARTIAL:
        out = (s * n_batch + b) * D + offs_d
        if MEAN:
            tl.store(sum_ptr + out, total, mask=dmask)
        if EXT:
            tl.store(val_ptr + out, best, mask=dmask)
            tl.store(idx_ptr + out, best_idx, mask=dmask)
    else:
        _store_pool(total, best, best_idx, tl.load(count_ptr + b), b, offs_d, dmask,
                    sum_ptr, val_ptr, idx_ptr, stride_sb, stride_vb, stride_ib,
                    MEAN, EXT, LARGEST, IS_FP64)


@triton.jit
def _fold_lanes(lane_best, lane_pos):
    """The extremum over the lanes (each holding its own best and its position, -1 if none):
    the first NaN if any, else the max with the lowest position. Returns int64 positions."""
    seen = lane_pos >= 0
    isnan = lane_best != lane_best
    big = 0x7FFFFFFF
    nan_pos = tl.min(tl.where(seen & isnan, lane_pos, big), axis=0)
    num = seen & ~isnan
    top = tl.max(tl.where(num, lane_best, float("-inf")), axis=0)
    top_pos = tl.min(tl.where(num & (lane_best == top[None, :]), lane_pos, big), axis=0)
    any_nan = nan_pos < big
    best = tl.where(any_nan, float("nan"), top)
    pos = tl.where(any_nan, nan_pos, top_pos)
    return best, tl.where(pos < big, pos, -1).to(tl.int64)


@triton.jit
def _store_pool(total, best, best_idx, count, b, offs_d, dmask,
                sum_ptr, val_ptr, idx_ptr, stride_sb, stride_vb, stride_ib,
                MEAN: tl.constexpr, EXT: tl.constexpr, LARGEST: tl.constexpr,
                IS_FP64: tl.constexpr):
    """Final outputs: ``total / max(count, 1)``; the extremum (0 and -1 when empty)."""
    if MEAN:
        n = to_acc(tl.maximum(count, 1), IS_FP64)
        mean = total / n
        mean = cast_to(mean, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + b * stride_sb + offs_d, mean, mask=dmask)
    if EXT:
        if not LARGEST:
            best = -best
        val = tl.where(best_idx < 0, 0.0, best)
        tl.store(val_ptr + b * stride_vb + offs_d, val.to(val_ptr.dtype.element_ty), mask=dmask)
        tl.store(idx_ptr + b * stride_ib + offs_d, best_idx, mask=dmask)


@triton.jit
def _pool_combine_kernel(
    count_ptr, psum_ptr, pval_ptr, pidx_ptr,
    sum_ptr, val_ptr, idx_ptr, stride_sb, stride_vb, stride_ib,
    n_batch, D, n_split,
    MEAN: tl.constexpr, EXT: tl.constexpr, LARGEST: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Folds the ``[SPLIT, B, D]`` partials of ``_pool_fwd_kernel`` into the outputs; grid
    ``(B, cdiv(D, BLOCK_D))``. Sums add; extrema combine in chunk (= token) order with the same
    rule as within a chunk, so the result equals an unsplit pass."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    total = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    best = total - float("inf")
    best_idx = tl.full([BLOCK_D], -1, dtype=tl.int64)
    for s in range(0, n_split):
        off = (s * n_batch + b) * D + offs_d
        if MEAN:
            total += tl.load(psum_ptr + off, mask=dmask, other=0.0)
        if EXT:
            v = tl.load(pval_ptr + off, mask=dmask, other=0.0)
            i = tl.load(pidx_ptr + off, mask=dmask, other=-1)
            take = (best == best) & (i >= 0) & ((v != v) | (v > best) | (best_idx < 0))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, i, best_idx)
    _store_pool(total, best, best_idx, tl.load(count_ptr + b), b, offs_d, dmask,
                sum_ptr, val_ptr, idx_ptr, stride_sb, stride_vb, stride_ib,
                MEAN, EXT, LARGEST, IS_FP64)


# ----------------------------------------------------------------------------------------------
# Backward: mean, index scatter, mean + max
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pool_bwd_kernel(
    gx_ptr, stride_gxb, stride_gxt,
    cu_ptr, num_tokens, mask_ptr, stride_mb, stride_ml, count_ptr,
    gmean_ptr, stride_gmb,
    gsel_ptr, stride_gsb, stride_gsk,
    idx_ptr, stride_ib, stride_ik, stride_id,
    D, K,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, MEAN: tl.constexpr, PICK: tl.constexpr,
    PICK_ONE: tl.constexpr, SCATTER: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``grad_x`` of sequence ``b``'s rows in chunk ``s``, features ``j*BLOCK_D ...``; grid
    ``(B, cdiv(D, BLOCK_D), SPLIT)``. Rows are ``cu[b] .. cu[b+1]-1`` (``PACKED``) or
    ``0 .. num_tokens-1``; ``grad_x`` is contiguous in ``D``. Every element of those rows is
    written:

    ``grad_x[b, t, d] = MEAN * valid[b, t] * rnd(gmean[b, d] / max(n_b, 1))
                        + sum_k [idx[b, k, d] == t] * gsel[b, k, d]``

    (``rnd``: rounded to the output dtype first, as the reference does). ``PICK`` evaluates the
    sum by comparing every row with the ``K`` indices (cheap for small ``K``). ``SCATTER`` (no
    ``MEAN``) writes zeros, then, after a block barrier that orders those stores before the
    ones that follow, stores ``gsel`` at the indexed rows of the chunk: indices of one feature
    are distinct (except -1, skipped), so no atomics are needed.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    if PACKED:
        # Clamped to [0, T]: cu_seqlens is not checked while tracing, and a bad offset must not
        # become a write out of bounds.
        seq_lo = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), num_tokens)
        seq_hi = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), seq_lo), num_tokens)
    else:
        seq_lo = b * 0
        seq_hi = seq_lo + num_tokens
    rows_lo, rows_hi = owned_rows(seq_lo, seq_hi, b, num_tokens, PACKED)
    lo, hi = _chunk(rows_lo, rows_hi, s, tl.num_programs(2))
    gx_base = gx_ptr + b * stride_gxb
    out_ty = gx_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_T)

    gmean = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    if MEAN:
        if HAS_MASK:
            n = tl.load(count_ptr + b)
        else:
            n = seq_hi - seq_lo
        g = to_acc(tl.load(gmean_ptr + b * stride_gmb + offs_d, mask=dmask, other=0.0), IS_FP64)
        gmean = g / to_acc(tl.maximum(n, 1), IS_FP64)
        gmean = to_acc(cast_to(gmean, out_ty), IS_FP64)
    gsel_base = gsel_ptr + b * stride_gsb + offs_d
    idx_base = idx_ptr + b * stride_ib + offs_d.to(tl.int64) * stride_id
    if PICK_ONE:  # K == 1 (max/min, mean+max): the index and gradient stay in registers
        idx1 = tl.load(idx_base, mask=dmask, other=-1)
        g1 = to_acc(tl.load(gsel_base, mask=dmask, other=0.0), IS_FP64)

    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + rows
        in_range = t < hi
        tile = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        tile = to_acc(tile, IS_FP64)
        if MEAN:
            valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, in_range, HAS_MASK)
            if PACKED:
                valid = valid & (t >= seq_lo) & (t < seq_hi)
            tile = tl.where(valid[:, None], gmean[None, :], tile)
        if PICK:
            # -2 matches no index. Rows before seq_lo (only sequence 0 owns any: cu[0] > 0, not
            # checked while tracing) would otherwise give -1, the index of an empty feature.
            pos = tl.where((t >= seq_lo) & (t < seq_hi), t - seq_lo, -2)[:, None]
            if PICK_ONE:
                tile += tl.where(pos == idx1[None, :], g1[None, :], 0.0)
            else:
                for k in range(0, K):
                    k64 = b * 0 + k  # as int64: k * D may pass 2^31 (a [K, D] slab that large)
                    i = tl.load(idx_base + k64 * stride_ik, mask=dmask, other=-1)
                    g = tl.load(gsel_base + k64 * stride_gsk, mask=dmask, other=0.0)
                    tile += tl.where(pos == i[None, :], to_acc(g, IS_FP64)[None, :], 0.0)
        ptrs = gx_base + t[:, None] * stride_gxt + offs_d[None, :]
        tile = cast_to(tile, out_ty)
        tl.store(ptrs, tile, mask=in_range[:, None] & dmask[None, :])

    if SCATTER:
        tl.debug_barrier()
        for k in range(0, K):
            k64 = b * 0 + k  # as int64: k * D may pass 2^31 (a [K, D] slab that large)
            i = tl.load(idx_base + k64 * stride_ik, mask=dmask, other=-1)
            g = tl.load(gsel_base + k64 * stride_gsk, mask=dmask, other=0.0)
            row = seq_lo + i
            ok = dmask & (i >= 0) & (row >= lo) & (row < hi) & (row < seq_hi)
            tl.store(gx_base + row * stride_gxt + offs_d, g.to(out_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# k-max forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kmax_worst(cand, cidx):
    """Per feature, the candidate ranking last (the next to be evicted) among the filled slots
    (``cidx >= 0``): the lowest number, the highest position among equal numbers; NaN ranks
    above every number. Returns its value and position (-1 when no slot is filled)."""
    filled = cidx >= 0
    num = filled & (cand == cand)
    low = tl.min(tl.where(num, cand, float("inf")), axis=0)
    has_num = tl.max(num.to(tl.int32), axis=0) > 0
    is_worst = tl.where(has_num[None, :], num & (cand == low[None, :]), filled)
    worst_idx = tl.max(tl.where(is_worst, cidx, -1), axis=0)
    worst = tl.where(has_num, low, float("nan"))
    return worst, worst_idx


@triton.jit
def _kmax_emit(cand, cidx, b, K, offs_d, dmask, val_ptr, idx_ptr, D):
    """Writes rows ``0 .. K-1`` of ``out[b]``: the filled candidates in token order, then 0 / -1."""
    prev = tl.full([cand.shape[1]], -1, dtype=tl.int64)
    big = 0x7FFFFFFFFFFFFFFF
    for r in range(0, K):
        cur = tl.min(tl.where(cidx > prev[None, :], cidx, big), axis=0)
        found = cur < big
        val = tl.sum(tl.where(cidx == cur[None, :], cand, 0.0), axis=0)
        out = (b * K + r) * D + offs_d
        tl.store(val_ptr + out, tl.where(found, val, 0.0).to(val_ptr.dtype.element_ty),
                 mask=dmask)
        tl.store(idx_ptr + out, tl.where(found, cur, -1), mask=dmask)
        prev = cur


@triton.jit
def _kmax_fwd_kernel(
    x_ptr, start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml, stride_b, stride_t, stride_d,
    val_ptr, idx_ptr, D, K,
    HAS_MASK: tl.constexpr, IS_FP64: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The ``K <= K_PAD`` best valid values of each feature, in token order; grid
    ``(B, cdiv(D, BLOCK_D))``. Rank: NaN first, then value descending, then lower position.

    Streams the tokens once keeping ``K`` candidates per feature in registers (``[K_PAD,
    BLOCK_D]`` values and positions). The first ``K`` valid tokens fill the slots; afterwards
    a token (always the latest position) evicts the worst candidate of a feature only if it
    ranks strictly above it. Tiles of ``BLOCK_T`` tokens are first tested against the current
    worst values; only a tile with a possible entry is walked token by token (its rows are
    reloaded from cache), which is rare once the candidates settle.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col = offs_d.to(tl.int64) * stride_d
    lo = tl.load(start_ptr + b)
    hi = tl.load(end_ptr + b)
    x_base = x_ptr + b * stride_b
    rows = tl.arange(0, BLOCK_T)
    slot = tl.arange(0, K_PAD)[:, None]

    cand = to_acc(tl.zeros([K_PAD, BLOCK_D], dtype=tl.float32), IS_FP64)
    cidx = tl.full([K_PAD, BLOCK_D], -1, dtype=tl.int64)
    worst = to_acc(tl.zeros([BLOCK_D], dtype=tl.float32), IS_FP64)
    worst_idx = tl.full([BLOCK_D], -1, dtype=tl.int64)
    n_filled = lo * 0
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + rows
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        m2 = valid[:, None] & dmask[None, :]
        v = to_acc(tl.load(x_base + t[:, None] * stride_t + col[None, :], mask=m2, other=0.0),
                    IS_FP64)
        beats = (v > worst[None, :]) | ((v != v) & (worst == worst)[None, :])
        n_hits = tl.sum(tl.sum((m2 & beats).to(tl.int32), axis=1), axis=0)
        if (n_filled < K) | (n_hits > 0):
            for r in range(0, BLOCK_T):
                tr = t0 + r
                ok = token_valid(mask_ptr, b, tr, stride_mb, stride_ml, tr < hi, HAS_MASK)
                row = to_acc(tl.load(x_base + tr * stride_t + col, mask=_and(ok, dmask),
                                      other=0.0), IS_FP64)
                fill = _and(ok, n_filled < K)
                enter = _and(_and(ok, n_filled >= K),
                             (row > worst) | ((row != row) & (worst == worst)))
                sel = _and(fill, slot == n_filled) | (enter[None, :] & (cidx == worst_idx[None, :]))
                cand = tl.where(sel, row[None, :], cand)
                cidx = tl.where(sel, tr - lo, cidx)
                n_filled += fill.to(tl.int64)
                worst, worst_idx = _kmax_worst(cand, cidx)
    _kmax_emit(cand, cidx, b, K, offs_d, dmask, val_ptr, idx_ptr, D)


@triton.jit
def _rank_key(v, IS_FP64: tl.constexpr):
    """An integer key ordered like the k-max rank of float ``v``: signed-integer order equals
    float order once the magnitude bits of negative numbers are flipped; -0.0 ties with 0.0 and
    every NaN gets the largest key (as torch.sort ranks them). int64."""
    v = tl.where(v == 0, 0.0, v).to(v.dtype)
    if IS_FP64:
        bits = v.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(v != v, 0x7FFFFFFFFFFFFFFF, key)
    else:
        bits = v.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(v != v, 0x7FFFFFFF, key).to(tl.int64)
    return key


@triton.jit
def _count_keys(x_base, col, dmask, mask_ptr, b, stride_mb, stride_ml, stride_t, lo, hi,
                thr, strict: tl.constexpr, HAS_MASK: tl.constexpr, IS_FP64: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per feature, how many valid tokens have key ``>= thr`` (``> thr`` when ``strict``)."""
    cnt = tl.zeros([BLOCK_D], dtype=tl.int64)
    rows = tl.arange(0, BLOCK_T)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + rows
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        m2 = valid[:, None] & dmask[None, :]
        v = to_acc(tl.load(x_base + t[:, None] * stride_t + col[None, :], mask=m2, other=0.0),
                    IS_FP64)
        key = _rank_key(v, IS_FP64)
        if strict:
            above = key > thr[None, :]
        else:
            above = key >= thr[None, :]
        cnt += tl.sum((m2 & above).to(tl.int64), axis=0)
    return cnt


@triton.jit
def _kmax_select_kernel(
    x_ptr, start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml, stride_b, stride_t, stride_d,
    val_ptr, idx_ptr, D, K,
    HAS_MASK: tl.constexpr, IS_FP64: tl.constexpr, N_BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """k-max for any ``K`` (same contract as ``_kmax_fwd_kernel``); grid ``(B, cdiv(D, BLOCK_D))``.

    Threshold selection: a bisection over the integer rank keys (``_rank_key``: 32 passes, 64
    for float64) finds per feature the ``K``-th largest key ``thr``; with ``above`` tokens whose
    key exceeds it, the selected tokens are those above ``thr`` plus the first ``K - above``
    equal to it (lower positions win ties). A last pass walks the tokens in order and writes the
    selected ones at consecutive output rows, then 0 / -1 fill the rows left. Every pass reads
    the sequence's ``[L, BLOCK_D]`` slab, which stays in L2 between passes for moderate L.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    col = offs_d.to(tl.int64) * stride_d
    lo = tl.load(start_ptr + b)
    hi = tl.load(end_ptr + b)
    x_base = x_ptr + b * stride_b
    if IS_FP64:
        key_lo = tl.full([BLOCK_D], -0x7FFFFFFFFFFFFFFF - 1, dtype=tl.int64)
        key_hi = tl.full([BLOCK_D], 0x7FFFFFFFFFFFFFFF, dtype=tl.int64)
    else:
        key_lo = tl.full([BLOCK_D], -0x80000000, dtype=tl.int64)
        key_hi = tl.full([BLOCK_D], 0x7FFFFFFF, dtype=tl.int64)
    # Invariant: count(key >= key_lo) >= K (or key_lo is the smallest key: fewer than K valid
    # tokens select them all) and count(key >= key_hi + 1) < K.
    for _ in range(0, N_BITS):
        # ceil((key_lo + key_hi) / 2) without overflowing int64
        mid = (key_lo >> 1) + (key_hi >> 1) + ((key_lo | key_hi) & 1)
        cnt = _count_keys(x_base, col, dmask, mask_ptr, b, stride_mb, stride_ml, stride_t, lo,
                          hi, mid, False, HAS_MASK, IS_FP64, BLOCK_T, BLOCK_D)
        more = key_lo < key_hi
        key_lo = tl.where(more & (cnt >= K), mid, key_lo)
        key_hi = tl.where(more & (cnt < K), mid - 1, key_hi)
    thr = key_lo
    quota = K - _count_keys(x_base, col, dmask, mask_ptr, b, stride_mb, stride_ml, stride_t, lo,
                            hi, thr, True, HAS_MASK, IS_FP64, BLOCK_T, BLOCK_D)

    pos = tl.zeros([BLOCK_D], dtype=tl.int64)
    ties = tl.zeros([BLOCK_D], dtype=tl.int64)
    for t in range(lo, hi):
        ok = token_valid(mask_ptr, b, t, stride_mb, stride_ml, t < hi, HAS_MASK)
        m = _and(ok, dmask)
        raw = tl.load(x_base + t * stride_t + col, mask=m, other=0.0)
        key = _rank_key(to_acc(raw, IS_FP64), IS_FP64)
        tie = m & (key == thr)
        sel = m & ((key > thr) | (tie & (ties < quota)))
        ties += tie.to(tl.int64)
        out = (b * K + pos) * D + offs_d
        tl.store(val_ptr + out, raw.to(val_ptr.dtype.element_ty), mask=sel)
        tl.store(idx_ptr + out, (t - lo) + pos * 0, mask=sel)
        pos += sel.to(tl.int64)
    for r in range(0, K):
        out = (b * K + r) * D + offs_d
        rest = dmask & (r >= pos)
        tl.store(val_ptr + out, tl.zeros([BLOCK_D], dtype=tl.float32).to(val_ptr.dtype.element_ty),
                 mask=rest)
        tl.store(idx_ptr + out, tl.full([BLOCK_D], -1, dtype=tl.int64), mask=rest)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _stream_config(x: Tensor, b: int, d: int, tokens_per_seq: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_D, SPLIT, num_warps)`` of the streaming pool kernels.

    On a GPU a tile row is 1 KiB (512 half-precision features, 256 float32, 128 float64) so each
    thread issues 16-byte loads, and tiles are 8 rows deep. When ``B * cdiv(D, BLOCK_D)``
    programs cannot fill the GPU (B=32, D=4096 bf16 gives 256 for 132 SMs), the tokens are
    split into ``SPLIT`` chunks, each still at least 8 tiles long. Under the interpreter every
    program costs ~25 ms: one program per sequence (up to 1024 features), no split.
    """
    forced = _layout.FORCE_SPLIT
    if INTERPRET or x.device.type != "cuda":
        return 8, block_d(d), 1 if forced is None else forced, 1
    bd = block_d(d, cap=max(16, 1024 // x.element_size()))
    block_t = 8
    programs = b * triton.cdiv(d, bd)
    target = 8 * num_sms(x.device)
    split = 1
    if programs < target:
        split = min(triton.cdiv(target, programs), max(1, tokens_per_seq // (8 * block_t)), 64)
    if forced is not None:
        split = forced
    return block_t, bd, split, 4


def _kmax_config(x: Tensor, d: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` of the k-max kernels: narrow feature blocks, since each
    feature keeps k candidates in registers and B * D / 64 programs fill a GPU anyway."""
    if INTERPRET or x.device.type != "cuda":
        return 16, block_d(d), 1
    return 16, 64, 2


def _tokens_per_seq(x: Tensor, cu_seqlens: Tensor | None, b: int) -> int:
    """Tokens per sequence known from shapes alone: L, or T / B for packed input."""
    return x.shape[1] if cu_seqlens is None else x.shape[0] // max(b, 1)


# ----------------------------------------------------------------------------------------------
# Launchers (schema signatures, see _schema.py)
# ----------------------------------------------------------------------------------------------


def _pool(x: Tensor, mask, cu_seqlens, mean: Tensor | None, val: Tensor | None,
          idx: Tensor | None, largest: bool) -> None:
    """Fills ``mean`` ([B, D] view), and/or ``val``/``idx`` ([B, D] views)."""
    s = seqs(x, mask, cu_seqlens)
    b, d = s.batch, x.shape[-1]
    block_t, bd, split, warps = _stream_config(x, b, d, _tokens_per_seq(x, cu_seqlens, b))
    acc = acc_dtype(x.dtype)
    is_fp64 = x.dtype == torch.float64
    flags = dict(MEAN=mean is not None, EXT=val is not None, LARGEST=largest, IS_FP64=is_fp64)
    outs = (mean if mean is not None else dummy(x.device, x.dtype),
            val if val is not None else dummy(x.device, x.dtype),
            idx if idx is not None else dummy(x.device, torch.int64))
    out_strides = tuple(o.stride(0) if o.dim() == 2 else 0 for o in outs)
    common = (x, s.start, s.end, s.count, s.mask, s.stride_mb, s.stride_ml, s.stride_b,
              s.stride_t, s.stride_d)
    if split == 1:
        _pool_fwd_kernel[(b, triton.cdiv(d, bd), 1)](
            *common, *outs, *out_strides, b, d, HAS_MASK=s.has_mask, PARTIAL=False,
            BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps, **flags)
        return
    part = (split, b, d)
    psum = torch.empty(part, dtype=acc, device=x.device) if mean is not None else dummy(x.device)
    pval = torch.empty(part, dtype=acc, device=x.device) if val is not None else dummy(x.device)
    pidx = (torch.empty(part, dtype=torch.int64, device=x.device) if val is not None
            else dummy(x.device, torch.int64))
    _pool_fwd_kernel[(b, triton.cdiv(d, bd), split)](
        *common, psum, pval, pidx, 0, 0, 0, b, d, HAS_MASK=s.has_mask, PARTIAL=True,
        BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps, **flags)
    _pool_combine_kernel[(b, triton.cdiv(d, bd))](
        s.count, psum, pval, pidx, *outs, *out_strides, b, d, split, BLOCK_D=bd,
        num_warps=warps, **flags)


def masked_mean(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    """``[B, D]``: ``sum_{t valid} x[b, t] / max(n_b, 1)``."""
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    out = torch.empty(b, d, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out.zero_()
    _pool(x, mask, cu_seqlens, out, None, None, True)
    return out


def masked_extremum(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                    largest: bool) -> tuple[Tensor, Tensor]:
    """``([B, D] max (largest) or min, int64 [B, D] position within the sequence)``."""
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    val = torch.empty(b, d, dtype=x.dtype, device=x.device)
    idx = torch.empty(b, d, dtype=torch.int64, device=x.device)
    if x.numel() == 0:
        return val.zero_(), idx.fill_(-1)
    _pool(x, mask, cu_seqlens, None, val, idx, largest)
    return val, idx


def masked_mean_max(x: Tensor, mask: Tensor | None,
                    cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(cat([mean, max], -1) [B, 2D], argmax int64 [B, D])`` from one read of ``x``."""
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    out = torch.empty(b, 2 * d, dtype=x.dtype, device=x.device)
    idx = torch.empty(b, d, dtype=torch.int64, device=x.device)
    if x.numel() == 0:
        return out.zero_(), idx.fill_(-1)
    _pool(x, mask, cu_seqlens, out[:, :d], out[:, d:], idx, True)
    return out, idx


def masked_kmax(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                k: int) -> tuple[Tensor, Tensor]:
    """``(values [B, k, D], int64 positions [B, k, D])``: the k best valid tokens per feature in
    token order, then 0 / -1."""
    b, d = batch_size(x, cu_seqlens), x.shape[-1]
    val = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    idx = torch.empty(b, k, d, dtype=torch.int64, device=x.device)
    if x.numel() == 0 or k == 0:
        return val.zero_(), idx.fill_(-1)
    s = seqs(x, mask, cu_seqlens)
    block_t, bd, warps = _kmax_config(x, d)
    args = (x, s.start, s.end, s.mask, s.stride_mb, s.stride_ml, s.stride_b, s.stride_t,
            s.stride_d, val, idx, d, k)
    grid = (b, triton.cdiv(d, bd))
    is_fp64 = x.dtype == torch.float64
    if k <= SMALL_K:
        _kmax_fwd_kernel[grid](*args, HAS_MASK=s.has_mask, IS_FP64=is_fp64,
                               K_PAD=triton.next_power_of_2(k), BLOCK_T=block_t, BLOCK_D=bd,
                               num_warps=warps)
    else:
        _kmax_select_kernel[grid](*args, HAS_MASK=s.has_mask, IS_FP64=is_fp64,
                                  N_BITS=64 if is_fp64 else 32, BLOCK_T=block_t, BLOCK_D=bd,
                                  num_warps=warps)
    return val, idx


def _backward(grad_x: Tensor, cu_seqlens: Tensor | None, num_tokens: int,
              mask: Tensor | None = None, gmean: Tensor | None = None,
              gsel: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
    """Launches ``_pool_bwd_kernel`` writing all of ``grad_x`` (contiguous)."""
    b = batch_size(grad_x, cu_seqlens)
    d = grad_x.shape[-1]
    if grad_x.numel() == 0:
        return grad_x
    dev = grad_x.device
    m8, smb, sml = mask_view(mask, dev)
    count = m8.sum(1) if (mask is not None and gmean is not None) else dummy(dev, torch.int64)
    per_seq = num_tokens if cu_seqlens is None else num_tokens // max(b, 1)
    block_t, bd, split, warps = _stream_config(grad_x, b, d, per_seq)
    k = indices.shape[1] if indices is not None else 0
    pick = 0 < k <= PICK_MAX_K or (k > 0 and gmean is not None)
    packed = cu_seqlens is not None
    stride_gxb = 0 if packed else grad_x.stride(0)
    stride_gxt = grad_x.stride(0) if packed else grad_x.stride(1)
    gm = gmean if gmean is not None else dummy(dev, grad_x.dtype)
    gs = gsel if gsel is not None else dummy(dev, grad_x.dtype)
    ix = indices if indices is not None else dummy(dev, torch.int64)
    _pool_bwd_kernel[(b, triton.cdiv(d, bd), split)](
        grad_x, stride_gxb, stride_gxt,
        cu_seqlens if packed else dummy(dev, torch.int64), num_tokens, m8, smb, sml, count,
        gm, gm.stride(0) if gmean is not None else 0,
        gs, gs.stride(0) if gsel is not None else 0, gs.stride(1) if gsel is not None else 0,
        ix, *(indices.stride() if indices is not None else (0, 0, 0)),
        d, k,
        PACKED=packed, HAS_MASK=mask is not None, MEAN=gmean is not None, PICK=pick,
        PICK_ONE=pick and k == 1,
        SCATTER=k > 0 and not pick, IS_FP64=grad_x.dtype == torch.float64,
        BLOCK_T=block_t, BLOCK_D=bd, num_warps=warps)
    return grad_x


def _grad_x(grad: Tensor, cu_seqlens: Tensor | None, num_tokens: int, d: int) -> Tensor:
    shape = grad_x_shape(grad.shape[0], num_tokens, d, cu_seqlens is not None)
    return torch.empty(shape, dtype=grad.dtype, device=grad.device)


def masked_mean_backward(grad: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                         num_tokens: int) -> Tensor:
    """``grad_x[b, t, d] = grad[b, d] / max(n_b, 1)`` at valid tokens, 0 elsewhere."""
    gx = _grad_x(grad, cu_seqlens, num_tokens, grad.shape[-1])
    return _backward(gx, cu_seqlens, num_tokens, mask=mask, gmean=grad)


def index_pool_backward(grad: Tensor, indices: Tensor, cu_seqlens: Tensor | None,
                        num_tokens: int) -> Tensor:
    """``grad_x[b, indices[b, j, d], d] = grad[b, j, d]`` for ``indices >= 0``, 0 elsewhere
    (``grad``, ``indices``: ``[B, K, D]``)."""
    gx = _grad_x(grad, cu_seqlens, num_tokens, grad.shape[-1])
    return _backward(gx, cu_seqlens, num_tokens, gsel=grad, indices=indices)


def masked_mean_max_backward(grad: Tensor, indices: Tensor, mask: Tensor | None,
                             cu_seqlens: Tensor | None, num_tokens: int) -> Tensor:
    """Mean part ``grad[:, :D] / n`` at valid tokens plus ``grad[:, D:]`` at the argmax."""
    d = indices.shape[-1]
    gx = _grad_x(grad, cu_seqlens, num_tokens, d)
    return _backward(gx, cu_seqlens, num_tokens, mask=mask, gmean=grad[:, :d],
                     gsel=grad[:, None, d:], indices=indices[:, None])


IMPLEMENTATIONS = {
    "masked_mean": masked_mean,
    "masked_mean_backward": masked_mean_backward,
    "masked_extremum": masked_extremum,
    "masked_kmax": masked_kmax,
    "index_pool_backward": index_pool_backward,
    "masked_mean_max": masked_mean_max,
    "masked_mean_max_backward": masked_mean_max_backward,
}
