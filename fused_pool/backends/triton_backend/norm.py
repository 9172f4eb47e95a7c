"""Triton kernels of the normalization operators (formulas: ``backends/reference/norm.py``).

Two kernel families:

* **Row norms** (LayerNorm, RMSNorm, InstanceNorm). ``x`` is seen as rows ``[M, N]``: for
  LayerNorm/RMSNorm a row is the flattened normalized dims, for InstanceNorm ``x [B, C, *]`` has
  one row per (b, c) over the ``S = prod(*)`` spatial elements. Element ``(r, j)`` of ``x`` is at
  ``(r // M1) * s0 + (r % M1) * s1 + j * sn``, so any view whose leading dims merge into at most
  two strided dims and whose normalized dims merge into one (a strided row slice, a ``[L, B, D]``
  tensor transposed to ``[B, L, D]``, a channels-last ``[B, C, L]``...) is read in place; in
  the backward, ``grad`` and ``x`` share the split of the row index. Only other layouts
  (normalized dims that do not merge, e.g. ``x[..., ::2]`` normalized over two dims; more than
  two unmergeable leading dims) are copied once with ``.contiguous()``: a fallback for rare
  layouts that keeps the kernels to one row addressing, not a measured speed choice.

  A program normalizes a ``[BLOCK_M, BLOCK_N]`` tile of rows. When a row fits in registers
  (``N <= _MAX_SINGLE_N``: 16K elements forward, 8K backward, half that in float64; ``SINGLE``)
  it is read once and its statistics are exact two-pass values in registers; longer rows are
  walked in ``BLOCK_N`` chunks, the statistics merged chunk by chunk (Chan et al.'s parallel
  variance), then read a second time (mostly from L2) for the output. Several rows per program
  for small ``N`` keep every program busy with ~4K elements. Traffic per element at
  ``N <= 8K``: forward reads x and writes y once; backward reads x and g once and writes dx
  (``F.layer_norm``'s backward reads x and g a second time for the weight/bias gradients).

  Backward: ``dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))`` with ``wdy = g * w``
  (the ``mean(wdy)`` term only when centered). The weight/bias gradients are deterministic: the
  backward grid is persistent (a fixed number of programs for a given shape and GPU), each
  program adds the ``g * xhat`` and ``g`` of its rows into its own fp32 (fp64) partial row of a
  ``[num_programs, N]`` buffer, and torch sums the buffer over programs afterwards. No atomics.
  InstanceNorm's parameters are per row (channel ``r % C``), so its backward writes per-row sums
  ``[B * C]`` instead, summed over ``B`` afterwards.

* **Masked InstanceNorm** over the token layout of ``_layout.seqs`` (padded + mask, or packed +
  ``cu_seqlens``): a program owns (sequence ``b``, a block of ``BLOCK_D`` features), merges the
  statistics of its valid tokens tile by tile (padding is never loaded), then writes every output
  row it owns (``_layout.owned_rows``): normalized at valid tokens, 0 at padding. A sequence's
  column block does not fit on chip at long L, so x is read twice (statistics, output) and the
  backward reads x and g twice.

Launch parameters are heuristics (no autotuning): tile sizes and warps were chosen so that no
kernel spills registers on sm_90 (ptxas resource usage of the compiled kernels: backward
~100-128 registers a thread, forward ~40-100), not yet timed on a GPU.

Numerics: statistics and arithmetic are float32 for half/bfloat16/float32 input and float64 for
float64 input. ``eps`` enters a kernel as a float32 argument (Triton's type for a Python float),
so ``var + eps`` is float32 arithmetic like torch's, never a silent float64 promotion. Float64
kernels get ``eps`` as the float32 pair ``eps_hi + eps_lo`` (summed in float64) so that
``gradcheck`` sees the float64 value.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._schema import acc_dtype
from ._layout import INTERPRET, cast_to, dummy, num_sms, owned_rows, seqs, to_acc, token_valid

# Longest row (elements) held in registers by the forward and by the backward (which also holds
# the gradient and the weight/bias partial sums); half as long for float64. Longer rows are
# walked in chunks. Chosen so that no kernel spills registers on sm_90 (ptxas resource usage).
_MAX_SINGLE_N = 16384
_MAX_SINGLE_N_BWD = 8192
# Chunk width of the looping path, and the tile size (elements) a program aims for.
_LOOP_BLOCK_N = 4096
_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------------------------
# Small device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rstd(var, eps_hi, eps_lo, IS_FP64: tl.constexpr):
    """``1 / sqrt(var + eps)`` in ``var``'s dtype (``eps = eps_hi + eps_lo`` for float64)."""
    if IS_FP64:
        out = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)  # float64 + float32 is float64
    else:
        out = tl.rsqrt(var + eps_hi)
    return out


# ----------------------------------------------------------------------------------------------
# Row norms: LayerNorm, RMSNorm, InstanceNorm
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_affine(xhat, W, Bb, rows, cols, rmask, cmask, M1, ROW_AFFINE: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_FP64: tl.constexpr):
    """``xhat * w + b`` for a ``[BLOCK_M, BLOCK_N]`` tile; parameters per column, or per row
    (channel ``row % M1``) when ``ROW_AFFINE``."""
    y = xhat
    if HAS_W:
        if ROW_AFFINE:
            y = y * to_acc(tl.load(W + rows % M1, mask=rmask, other=0.0), IS_FP64)[:, None]
        else:
            y = y * to_acc(tl.load(W + cols, mask=cmask, other=0.0), IS_FP64)[None, :]
    if HAS_B:
        if ROW_AFFINE:
            y = y + to_acc(tl.load(Bb + rows % M1, mask=rmask, other=0.0), IS_FP64)[:, None]
        else:
            y = y + to_acc(tl.load(Bb + cols, mask=cmask, other=0.0), IS_FP64)[None, :]
    return y


@triton.jit
def _row_norm_fwd_kernel(
    X, Y, W, Bb, MEAN, RSTD,
    M, N, M1, sx0, sx1, sxn, eps_hi, eps_lo,
    CENTERED: tl.constexpr, ROW_AFFINE: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    """Normalizes rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)`` of ``x`` seen as ``[M, N]``.

    ``mean = sum_j x[r, j] / N`` (0 unless ``CENTERED``), ``var = sum_j (x - mean)^2 / N``,
    ``rstd = 1 / sqrt(var + eps)``, ``y = (x - mean) * rstd * w + b``. ``x[r, j]`` is at
    ``X + (r // M1) * sx0 + (r % M1) * sx1 + j * sxn``; ``Y`` is contiguous ``[M, N]``;
    ``MEAN``/``RSTD`` are ``[M]`` (``MEAN`` written only when ``CENTERED``).
    Grid: ``(cdiv(M, BLOCK_M),)``.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xrow = (rows // M1) * sx0 + (rows % M1) * sx1
    yrow = rows * N
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        cmask = cols < N
        m2d = rmask[:, None] & cmask[None, :]
        xp = X + xrow[:, None] + cols.to(tl.int64)[None, :] * sxn
        x = to_acc(tl.load(xp, mask=m2d, other=0.0), IS_FP64)
        if CENTERED:
            mean = tl.sum(x, 1) / N
            x = tl.where(m2d, x - mean[:, None], 0.0)
        rstd = _rstd(tl.sum(x * x, 1) / N, eps_hi, eps_lo, IS_FP64)
        y = _row_affine(x * rstd[:, None], W, Bb, rows, cols, rmask, cmask, M1,
                        ROW_AFFINE, HAS_W, HAS_B, IS_FP64)
        tl.store(Y + yrow[:, None] + cols[None, :], cast_to(y, Y.dtype.element_ty), mask=m2d)
    else:
        # Chunk statistics merged into running (mean, M2): exact two-pass within a chunk, and
        # no cancellation of sum(x^2) - N mean^2 across chunks.
        mean = to_acc(tl.zeros([BLOCK_M], tl.float32), IS_FP64)
        m2 = to_acc(tl.zeros([BLOCK_M], tl.float32), IS_FP64)
        for n0 in range(0, N, BLOCK_N):
            c = n0 + cols
            cmask = c < N
            m2d = rmask[:, None] & cmask[None, :]
            xp = X + xrow[:, None] + c.to(tl.int64)[None, :] * sxn
            x = to_acc(tl.load(xp, mask=m2d, other=0.0), IS_FP64)
            if CENTERED:
                cnt = tl.minimum(N - n0, BLOCK_N)
                cmean = tl.sum(x, 1) / cnt
                dev = tl.where(m2d, x - cmean[:, None], 0.0)
                delta = cmean - mean
                # Float arithmetic first: int * int could overflow, int / int is float32.
                mean = mean + delta * cnt / (n0 + cnt)
                m2 = m2 + tl.sum(dev * dev, 1) + delta * delta * n0 * cnt / (n0 + cnt)
            else:
                m2 = m2 + tl.sum(x * x, 1)
        rstd = _rstd(m2 / N, eps_hi, eps_lo, IS_FP64)
        for n0 in range(0, N, BLOCK_N):
            c = n0 + cols
            cmask = c < N
            m2d = rmask[:, None] & cmask[None, :]
            xp = X + xrow[:, None] + c.to(tl.int64)[None, :] * sxn
            x = to_acc(tl.load(xp, mask=m2d, other=0.0), IS_FP64)
            if CENTERED:
                x = x - mean[:, None]
            y = _row_affine(x * rstd[:, None], W, Bb, rows, c, rmask, cmask, M1,
                            ROW_AFFINE, HAS_W, HAS_B, IS_FP64)
            tl.store(Y + yrow[:, None] + c[None, :], cast_to(y, Y.dtype.element_ty), mask=m2d)
    if CENTERED:
        tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _row_norm_bwd_kernel(
    G, X, W, MEAN, RSTD, DX, DWP, DBP,
    M, N, M1, sg0, sg1, sgn, sx0, sx1, sxn, tiles_per_prog,
    CENTERED: tl.constexpr, ROW_AFFINE: tl.constexpr, HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    """Backward of ``_row_norm_fwd_kernel`` over the row tiles ``pid, pid + P, pid + 2P, ...``
    (``P`` programs, ``tiles_per_prog`` tiles each; tiles past ``M`` are fully masked).

    ``xhat = (x - mean) * rstd``, ``wdy = g * w``,
    ``dx = rstd * (wdy - xhat * sum(wdy * xhat) / N - sum(wdy) / N)`` (last term if CENTERED).
    Column parameters: ``DWP``/``DBP`` are ``[P, N]``; row ``pid`` receives
    ``sum_{rows of pid} g * xhat`` and ``sum g``. Row parameters (``ROW_AFFINE``): ``DWP``/``DBP``
    are ``[M]`` per-row ``sum_j g * xhat`` and ``sum_j g``. ``DX`` is contiguous ``[M, N]``;
    ``g``/``x`` use their own two-level row strides (see the forward kernel).
    Grid: ``(P,)``.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        cmask = cols < N
        dw_acc = to_acc(tl.zeros([BLOCK_N], tl.float32), IS_FP64)
        db_acc = to_acc(tl.zeros([BLOCK_N], tl.float32), IS_FP64)
    part = pid.to(tl.int64) * N  # this program's row of the partial buffers
    for i in range(0, tiles_per_prog):
        tile = (pid + i * nprog).to(tl.int64)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        xrow = (rows // M1) * sx0 + (rows % M1) * sx1
        grow = (rows // M1) * sg0 + (rows % M1) * sg1
        dxrow = rows * N
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if CENTERED:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        if HAS_W and ROW_AFFINE:
            wr = to_acc(tl.load(W + rows % M1, mask=rmask, other=0.0), IS_FP64)
        if SINGLE:
            m2d = rmask[:, None] & cmask[None, :]
            c64 = cols.to(tl.int64)[None, :]
            x = to_acc(tl.load(X + xrow[:, None] + c64 * sxn, mask=m2d, other=0.0), IS_FP64)
            g = to_acc(tl.load(G + grow[:, None] + c64 * sgn, mask=m2d, other=0.0), IS_FP64)
            if CENTERED:
                x = x - mean[:, None]
            xhat = tl.where(m2d, x * rstd[:, None], 0.0)
            if HAS_W:
                if ROW_AFFINE:
                    wdy = g * wr[:, None]
                else:
                    # Reloaded per tile (an L1 hit) rather than held: registers are the limit.
                    w = to_acc(tl.load(W + cols, mask=cmask, other=0.0), IS_FP64)
                    wdy = g * w[None, :]
            else:
                wdy = g
            c1 = tl.sum(wdy * xhat, 1) / N
            dx = wdy - xhat * c1[:, None]
            if CENTERED:
                dx = dx - (tl.sum(wdy, 1) / N)[:, None]
            dx = dx * rstd[:, None]
            tl.store(DX + dxrow[:, None] + cols[None, :],
                     cast_to(dx, DX.dtype.element_ty), mask=m2d)
            if ROW_AFFINE:
                if NEED_DW:
                    tl.store(DWP + rows, tl.sum(g * xhat, 1), mask=rmask)
                if NEED_DB:
                    tl.store(DBP + rows, tl.sum(g, 1), mask=rmask)
            else:
                if NEED_DW:
                    dw_acc += tl.sum(g * xhat, 0)
                if NEED_DB:
                    db_acc += tl.sum(g, 0)
        else:
            # Pass 1: the row sums (of g, not w * g, for row parameters: w is then a scalar).
            s_gx = to_acc(tl.zeros([BLOCK_M], tl.float32), IS_FP64)
            s_g = to_acc(tl.zeros([BLOCK_M], tl.float32), IS_FP64)
            for n0 in range(0, N, BLOCK_N):
                c = n0 + cols
                cmask = c < N
                m2d = rmask[:, None] & cmask[None, :]
                c64 = c.to(tl.int64)[None, :]
                x = to_acc(tl.load(X + xrow[:, None] + c64 * sxn, mask=m2d, other=0.0), IS_FP64)
                g = to_acc(tl.load(G + grow[:, None] + c64 * sgn, mask=m2d, other=0.0), IS_FP64)
                if CENTERED:
                    x = x - mean[:, None]
                xhat = tl.where(m2d, x * rstd[:, None], 0.0)
                if HAS_W and not ROW_AFFINE:
                    g = g * to_acc(tl.load(W + c, mask=cmask, other=0.0), IS_FP64)[None, :]
                s_gx += tl.sum(g * xhat, 1)
                s_g += tl.sum(g, 1)
            if ROW_AFFINE:
                if NEED_DW:
                    tl.store(DWP + rows, s_gx, mask=rmask)
                if NEED_DB:
                    tl.store(DBP + rows, s_g, mask=rmask)
                if HAS_W:
                    s_gx = s_gx * wr
                    s_g = s_g * wr
            c1 = s_gx / N
            c2 = s_g / N
            # Pass 2: dx, and (column parameters) this program's partial rows, updated in place:
            # only this program touches row `pid`, the barrier orders its loads after its stores.
            for n0 in range(0, N, BLOCK_N):
                c = n0 + cols
                cmask = c < N
                m2d = rmask[:, None] & cmask[None, :]
                c64 = c.to(tl.int64)[None, :]
                x = to_acc(tl.load(X + xrow[:, None] + c64 * sxn, mask=m2d, other=0.0), IS_FP64)
                g = to_acc(tl.load(G + grow[:, None] + c64 * sgn, mask=m2d, other=0.0), IS_FP64)
                if CENTERED:
                    x = x - mean[:, None]
                xhat = tl.where(m2d, x * rstd[:, None], 0.0)
                if HAS_W:
                    if ROW_AFFINE:
                        wdy = g * wr[:, None]
                    else:
                        wdy = g * to_acc(tl.load(W + c, mask=cmask, other=0.0), IS_FP64)[None, :]
                else:
                    wdy = g
                dx = wdy - xhat * c1[:, None]
                if CENTERED:
                    dx = dx - c2[:, None]
                dx = dx * rstd[:, None]
                tl.store(DX + dxrow[:, None] + c[None, :],
                         cast_to(dx, DX.dtype.element_ty), mask=m2d)
                if not ROW_AFFINE:
                    if NEED_DW:
                        p = tl.load(DWP + part + c, mask=cmask, other=0.0)
                        tl.store(DWP + part + c, p + tl.sum(g * xhat, 0), mask=cmask)
                    if NEED_DB:
                        p = tl.load(DBP + part + c, mask=cmask, other=0.0)
                        tl.store(DBP + part + c, p + tl.sum(g, 0), mask=cmask)
            tl.debug_barrier()
    if SINGLE and not ROW_AFFINE:
        if NEED_DW:
            tl.store(DWP + part + cols, dw_acc, mask=cmask)
        if NEED_DB:
            tl.store(DBP + part + cols, db_acc, mask=cmask)


def _vec(t: Tensor) -> Tensor:
    """A parameter or statistics tensor as a contiguous 1-D vector (small: copying is fine)."""
    return t.contiguous().view(-1)


def _eps_pair(eps: float) -> tuple[float, float]:
    """``eps`` as float32 ``hi`` plus the float32-rounded remainder ``lo``."""
    try:
        hi = struct.unpack("f", struct.pack("f", eps))[0]
    except OverflowError:
        return math.inf, 0.0
    return hi, eps - hi


def _merge_dims(sizes, strides) -> list[tuple[int, int]]:
    """Adjacent dims that address memory like one dim, merged: ``[(size, stride), ...]``
    outermost first, size-1 dims dropped."""
    groups: list[tuple[int, int]] = []
    for n, s in zip(sizes, strides):
        if n == 1:
            continue
        if groups and groups[-1][1] == s * n:
            groups[-1] = (groups[-1][0] * n, s)
        else:
            groups.append((n, s))
    return groups


def _layout_at(t: Tensor, lead: int, k: int) -> tuple[int, int, int, int] | None:
    """The row layout ``(M1, s0, s1, sn)`` of ``t`` seen as ``[M, N]`` (``M`` = its first
    ``lead`` dims, ``N`` = the rest), splitting the row index between dims ``[:k]`` (outer) and
    ``[k:lead]`` (inner, ``M1`` rows): element ``(r, j)`` is at
    ``(r // M1) * s0 + (r % M1) * s1 + j * sn``. ``None`` when a part does not merge into one
    strided dim."""
    parts = [_merge_dims(t.shape[a:b], t.stride()[a:b])
             for a, b in ((0, k), (k, lead), (lead, t.dim()))]
    if any(len(p) > 1 for p in parts):
        return None
    (s0,), (s1,), (sn,) = ((p[0][1] if p else 0,) for p in parts)
    return max(1, math.prod(t.shape[k:lead])), s0, s1, sn


def _row_layouts(tensors: list[Tensor], lead: int, split: int | None = None,
                 ) -> tuple[list[Tensor], list[tuple[int, int, int, int]]]:
    """The tensors (same shape) with one shared row split: the first split (or ``split``) at
    which every tensor's layout exists. Where none is common, tensors after the first that do
    not fit the first one's split are copied with ``.contiguous()`` (always addressable); so is
    the first one when it has no layout at all (normalized dims that do not merge: rare)."""
    splits = range(lead + 1) if split is None else (split,)
    for k in splits:
        layouts = [_layout_at(t, lead, k) for t in tensors]
        if all(lay is not None for lay in layouts):
            return tensors, layouts
    k = next((k for k in splits if _layout_at(tensors[0], lead, k) is not None), splits[0])
    out = [t if _layout_at(t, lead, k) is not None else t.contiguous() for t in tensors]
    return out, [_layout_at(t, lead, k) for t in out]


def _row_config(m: int, n: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Launch meta-parameters for ``[m, n]`` rows: one register-resident row per program up to
    ``_MAX_SINGLE_N`` (several rows for small ``n``), ``_LOOP_BLOCK_N`` chunks beyond; warps
    grow with the tile so each thread holds ~8-16 elements (two 16-byte vectors of bf16)."""
    cap = _MAX_SINGLE_N_BWD if backward else _MAX_SINGLE_N
    cap = cap // 2 if dtype == torch.float64 else cap
    single = n <= cap
    block_n = max(16, triton.next_power_of_2(n)) if single else _LOOP_BLOCK_N
    block_m = max(1, min(_TILE_ELEMS // block_n, 64, triton.next_power_of_2(m)))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SINGLE": single, "num_warps": num_warps}


def _backward_programs(tiles: int, num_warps: int, device: torch.device) -> int:
    """Persistent backward grid: as many programs as fit on the GPU at once (16 warps per SM:
    the backward kernels use ~100-128 registers a thread), never more than tiles. A fixed
    function of the shape and the GPU, so the summation order of the parameter gradients is
    reproducible. Two programs under the interpreter (each costs ~25 ms) still exercise the
    partial buffers."""
    if INTERPRET or device.type != "cuda":
        return min(tiles, 2)
    return max(1, min(tiles, num_sms(device) * max(1, 16 // num_warps)))


def _row_norm_forward(x: Tensor, lead: int, weight: Tensor | None, bias: Tensor | None,
                      eps: float, *, centered: bool, m1: int | None = None,
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Shared launcher: ``x`` as ``[M = prod(shape[:lead]), N]`` rows; parameters per column
    (``m1 is None``) or per channel ``r % m1`` (InstanceNorm). Returns ``(y, mean, rstd)``,
    stats shaped ``x.shape[:lead]`` (``mean`` is an empty placeholder unless ``centered``)."""
    acc = acc_dtype(x.dtype)
    stat_shape = x.shape[:lead]
    m, n = math.prod(stat_shape), math.prod(x.shape[lead:])
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(stat_shape if centered else (0,), dtype=acc, device=x.device)
    rstd = torch.empty(stat_shape, dtype=acc, device=x.device)
    if m == 0:
        return y, mean, rstd
    if n == 0:  # statistics of an empty row: mean 0, variance 0 (as the C++ kernels define)
        mean.zero_()
        rstd.fill_(1 / math.sqrt(eps) if eps > 0 else math.inf)
        return y, mean, rstd
    (xv,), ((M1, s0, s1, sn),) = _row_layouts([x], lead, None if m1 is None else 1)
    cfg = _row_config(m, n, x.dtype)
    eps_hi, eps_lo = _eps_pair(eps)
    dev = x.device
    w = dummy(dev) if weight is None else _vec(weight)
    b = dummy(dev) if bias is None else _vec(bias)
    _row_norm_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        xv, y, w, b, mean if centered else dummy(dev, acc), rstd,
        m, n, M1, s0, s1, sn, eps_hi, eps_lo,
        CENTERED=centered, ROW_AFFINE=m1 is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, IS_FP64=x.dtype == torch.float64, **cfg,
    )
    return y, mean, rstd


def _row_norm_backward(grad: Tensor, x: Tensor, lead: int, weight: Tensor | None,
                       need_db: bool, mean: Tensor | None, rstd: Tensor, *, m1: int | None = None,
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Shared backward launcher. Returns ``(grad_x, dw, db)``: ``dw``/``db`` in the accumulation
    dtype, ``[N]`` for column parameters or ``[C]`` for per-channel ones (``None`` when not
    wanted)."""
    acc = acc_dtype(x.dtype)
    m, n = math.prod(x.shape[:lead]), math.prod(x.shape[lead:])
    dev = x.device
    gx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    need_dw = weight is not None
    pn = m1 if m1 is not None else n  # length of a parameter vector
    if m == 0 or n == 0:
        zeros = torch.zeros(pn, dtype=acc, device=dev)
        return gx, (zeros if need_dw else None), (zeros if need_db else None)
    (xv, gv), ((M1, sx0, sx1, sxn), (_, sg0, sg1, sgn)) = _row_layouts(
        [x, grad], lead, None if m1 is None else 1)
    cfg = _row_config(m, n, x.dtype, backward=True)
    tiles = triton.cdiv(m, cfg["BLOCK_M"])
    progs = _backward_programs(tiles, cfg["num_warps"], dev)
    if m1 is not None:  # per-row sums, summed over B below
        dwp = torch.empty(m if need_dw else 1, dtype=acc, device=dev)
        dbp = torch.empty(m if need_db else 1, dtype=acc, device=dev)
    else:  # per-program partial rows; the looping path adds into them, so they start at 0
        alloc = torch.empty if cfg["SINGLE"] else torch.zeros
        dwp = alloc((progs, n) if need_dw else (1,), dtype=acc, device=dev)
        dbp = alloc((progs, n) if need_db else (1,), dtype=acc, device=dev)
    _row_norm_bwd_kernel[(progs,)](
        gv, xv, dummy(dev) if weight is None else _vec(weight),
        dummy(dev, acc) if mean is None else _vec(mean), _vec(rstd),
        gx, dwp, dbp, m, n, M1, sg0, sg1, sgn, sx0, sx1, sxn, triton.cdiv(tiles, progs),
        CENTERED=mean is not None, ROW_AFFINE=m1 is not None, HAS_W=need_dw,
        NEED_DW=need_dw, NEED_DB=need_db, IS_FP64=x.dtype == torch.float64, **cfg,
    )
    if m1 is not None:
        b = m // m1
        dw = dwp.view(b, m1).sum(0) if need_dw else None
        db = dbp.view(b, m1).sum(0) if need_db else None
    else:
        dw = dwp.sum(0) if need_dw else None
        db = dbp.sum(0) if need_db else None
    return gx, dw, db


def layer_norm(x: Tensor, normalized_ndim: int, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``F.layer_norm`` over the last ``normalized_ndim`` dims: ``(y, mean, rstd)``."""
    return _row_norm_forward(x, x.dim() - normalized_ndim, weight, bias, eps, centered=True)


def layer_norm_backward(grad: Tensor, x: Tensor, normalized_ndim: int, weight: Tensor | None,
                        bias: Tensor | None, mean: Tensor, rstd: Tensor,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    gx, dw, db = _row_norm_backward(grad, x, x.dim() - normalized_ndim, weight,
                                    bias is not None, mean, rstd)
    return gx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


def rms_norm(x: Tensor, normalized_ndim: int, weight: Tensor | None,
             eps: float) -> tuple[Tensor, Tensor]:
    """``F.rms_norm`` over the last ``normalized_ndim`` dims: ``(y, rstd)``."""
    y, _, rstd = _row_norm_forward(x, x.dim() - normalized_ndim, weight, None, eps,
                                   centered=False)
    return y, rstd


def rms_norm_backward(grad: Tensor, x: Tensor, normalized_ndim: int, weight: Tensor | None,
                      rstd: Tensor) -> tuple[Tensor, Tensor]:
    gx, dw, _ = _row_norm_backward(grad, x, x.dim() - normalized_ndim, weight, False, None, rstd)
    return gx, _param_grad(dw, weight, x)


def instance_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``x [B, C, *]``, rows (b, c) over the spatial dims; ``(y, mean [B, C], rstd [B, C])``."""
    return _row_norm_forward(x, 2, weight, bias, eps, centered=True, m1=x.shape[1])


def instance_norm_backward(grad: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                           mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gx, dw, db = _row_norm_backward(grad, x, 2, weight, bias is not None, mean, rstd,
                                    m1=x.shape[1])
    return gx, _param_grad(dw, weight, x), _param_grad(db, bias, x)


def _param_grad(g: Tensor | None, p: Tensor | None, x: Tensor) -> Tensor:
    """A parameter's gradient in its dtype and shape; zero-size when the parameter is None."""
    return x.new_zeros(0) if p is None else g.to(p.dtype).view(p.shape)


# ----------------------------------------------------------------------------------------------
# Masked InstanceNorm over the token layout of `_layout.seqs`
# ----------------------------------------------------------------------------------------------


@triton.jit
def _masked_instance_norm_fwd_kernel(
    X, Y, W, Bb, MEAN, RSTD,
    start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml, stride_b, stride_t, stride_d,
    D, num_tokens, sy_b, sy_t, eps_hi, eps_lo,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sequence ``b = pid0``, features ``d`` of block ``pid1``, over the valid tokens ``t``:
    ``mean = sum_t x / n``, ``var = sum_t (x - mean)^2 / n`` (``n`` = valid tokens, at least 1),
    ``rstd = 1 / sqrt(var + eps)``, ``y = (x - mean) * rstd * w + b`` at valid tokens and 0 at
    every other row the sequence owns (``owned_rows``; ``num_tokens`` is L, or T packed).
    ``Y`` is contiguous (strides ``sy_b``, ``sy_t``, 1); ``MEAN``/``RSTD`` are ``[B, D]``.
    Grid: ``(B, cdiv(D, BLOCK_D))``.
    """
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    toks = tl.arange(0, BLOCK_T)
    s = tl.load(start_ptr + b)
    e = tl.load(end_ptr + b)
    xb = X + b * stride_b
    dx_off = d.to(tl.int64)[None, :] * stride_d
    # Per-tile statistics merged into running (n, mean, M2) (Chan et al.).
    n = to_acc(tl.zeros([BLOCK_D], tl.float32), IS_FP64)
    mean = to_acc(tl.zeros([BLOCK_D], tl.float32), IS_FP64)
    m2 = to_acc(tl.zeros([BLOCK_D], tl.float32), IS_FP64)
    for t0 in range(s, e, BLOCK_T):
        t = t0 + toks
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, (t >= s) & (t < e), HAS_MASK)
        m2d = valid[:, None] & dmask[None, :]
        x = to_acc(tl.load(xb + t[:, None] * stride_t + dx_off, mask=m2d, other=0.0), IS_FP64)
        cnt = tl.sum(valid.to(tl.int32), 0)
        cmean = tl.sum(x, 0) / tl.maximum(cnt, 1)
        dev = tl.where(m2d, x - cmean[None, :], 0.0)
        n_new = n + cnt
        ratio = cnt / tl.maximum(n_new, 1.0)
        delta = cmean - mean
        mean = mean + delta * ratio
        m2 = m2 + tl.sum(dev * dev, 0) + delta * delta * n * ratio
        n = n_new
    rstd = _rstd(m2 / tl.maximum(n, 1.0), eps_hi, eps_lo, IS_FP64)
    tl.store(MEAN + b * D + d, mean, mask=dmask)
    tl.store(RSTD + b * D + d, rstd, mask=dmask)
    scale = rstd
    if HAS_W:
        scale = scale * to_acc(tl.load(W + d, mask=dmask, other=0.0), IS_FP64)
    shift = to_acc(tl.zeros([BLOCK_D], tl.float32), IS_FP64)
    if HAS_B:
        shift = to_acc(tl.load(Bb + d, mask=dmask, other=0.0), IS_FP64)
    lo, hi = owned_rows(s, e, b, num_tokens, PACKED)
    yb = Y + b * sy_b
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + toks
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, (t >= s) & (t < e), HAS_MASK)
        m2d = valid[:, None] & dmask[None, :]
        x = to_acc(tl.load(xb + t[:, None] * stride_t + dx_off, mask=m2d, other=0.0), IS_FP64)
        # (x - mean) first: folding mean into the shift cancels badly when rstd is large.
        y = tl.where(m2d, (x - mean[None, :]) * scale[None, :] + shift[None, :], 0.0)
        tl.store(yb + t[:, None] * sy_t + d[None, :], cast_to(y, Y.dtype.element_ty),
                 mask=(t < hi)[:, None] & dmask[None, :])


@triton.jit
def _masked_instance_norm_bwd_kernel(
    G, X, W, MEAN, RSTD, DX, DWP, DBP,
    start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml, stride_b, stride_t, stride_d,
    sg_b, sg_t, sg_d, D, num_tokens, sdx_b, sdx_t,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, HAS_W: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of ``_masked_instance_norm_fwd_kernel`` (same grid and token ranges):
    ``xhat = (x - mean) * rstd``, ``S_g = sum_t g``, ``S_gx = sum_t g * xhat`` over valid tokens;
    ``dx = rstd * (w * g - w * S_g / n - xhat * w * S_gx / n)`` at valid tokens, 0 elsewhere.
    ``DWP``/``DBP`` are ``[B, D]`` per-sequence ``S_gx``/``S_g``, summed over ``B`` afterwards.
    """
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    toks = tl.arange(0, BLOCK_T)
    s = tl.load(start_ptr + b)
    e = tl.load(end_ptr + b)
    xb = X + b * stride_b
    gb = G + b * sg_b
    x_off = d.to(tl.int64)[None, :] * stride_d
    g_off = d.to(tl.int64)[None, :] * sg_d
    mean = tl.load(MEAN + b * D + d, mask=dmask, other=0.0)
    rstd = tl.load(RSTD + b * D + d, mask=dmask, other=0.0)
    # 2-D accumulators, reduced once after the loop.
    acc_g = to_acc(tl.zeros([BLOCK_T, BLOCK_D], tl.float32), IS_FP64)
    acc_gx = to_acc(tl.zeros([BLOCK_T, BLOCK_D], tl.float32), IS_FP64)
    acc_n = tl.zeros([BLOCK_T], tl.int32)
    for t0 in range(s, e, BLOCK_T):
        t = t0 + toks
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, (t >= s) & (t < e), HAS_MASK)
        m2d = valid[:, None] & dmask[None, :]
        x = to_acc(tl.load(xb + t[:, None] * stride_t + x_off, mask=m2d, other=0.0), IS_FP64)
        g = to_acc(tl.load(gb + t[:, None] * sg_t + g_off, mask=m2d, other=0.0), IS_FP64)
        xhat = tl.where(m2d, (x - mean[None, :]) * rstd[None, :], 0.0)
        acc_g += g
        acc_gx += g * xhat
        acc_n += valid.to(tl.int32)
    s_g = tl.sum(acc_g, 0)
    s_gx = tl.sum(acc_gx, 0)
    n = tl.maximum(tl.sum(acc_n, 0), 1)
    tl.store(DWP + b * D + d, s_gx, mask=dmask)
    tl.store(DBP + b * D + d, s_g, mask=dmask)
    w = to_acc(tl.full([BLOCK_D], 1.0, tl.float32), IS_FP64)
    if HAS_W:
        w = to_acc(tl.load(W + d, mask=dmask, other=0.0), IS_FP64)
    a = w * s_g / n
    c = w * s_gx / n
    lo, hi = owned_rows(s, e, b, num_tokens, PACKED)
    dxb = DX + b * sdx_b
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + toks
        valid = token_valid(mask_ptr, b, t, stride_mb, stride_ml, (t >= s) & (t < e), HAS_MASK)
        m2d = valid[:, None] & dmask[None, :]
        x = to_acc(tl.load(xb + t[:, None] * stride_t + x_off, mask=m2d, other=0.0), IS_FP64)
        g = to_acc(tl.load(gb + t[:, None] * sg_t + g_off, mask=m2d, other=0.0), IS_FP64)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = rstd[None, :] * (w[None, :] * g - a[None, :] - xhat * c[None, :])
        dx = tl.where(m2d, dx, 0.0)
        tl.store(dxb + t[:, None] * sdx_t + d[None, :], cast_to(dx, DX.dtype.element_ty),
                 mask=(t < hi)[:, None] & dmask[None, :])


def _masked_config(d: int, dtype: torch.dtype) -> dict:
    """Token tiles of ~4K elements (2K for float64, whose backward would spill) on a GPU, 128
    features wide (256-byte bf16 segments per token); tiny tiles under the interpreter so that
    the tile merging is exercised."""
    if INTERPRET:
        return {"BLOCK_T": 4, "BLOCK_D": max(16, min(64, triton.next_power_of_2(d)))}
    block_d = max(16, min(128, triton.next_power_of_2(d)))
    elems = 2048 if dtype == torch.float64 else 4096
    return {"BLOCK_T": max(8, elems // block_d), "BLOCK_D": block_d, "num_warps": 8}


def masked_instance_norm(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                         weight: Tensor | None, bias: Tensor | None,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y like x, mean [B, D], rstd [B, D])``; see ``_masked_instance_norm_fwd_kernel``."""
    acc = acc_dtype(x.dtype)
    dev = x.device
    sq = seqs(x, mask, cu_seqlens)
    d = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    mean = torch.empty(sq.batch, d, dtype=acc, device=dev)
    rstd = torch.empty(sq.batch, d, dtype=acc, device=dev)
    if d == 0:
        return y, mean, rstd
    if sq.batch == 0:
        return y.zero_(), mean, rstd
    packed = cu_seqlens is not None
    num_tokens = x.shape[0] if packed else x.shape[1]
    cfg = _masked_config(d, x.dtype)
    eps_hi, eps_lo = _eps_pair(eps)
    _masked_instance_norm_fwd_kernel[(sq.batch, triton.cdiv(d, cfg["BLOCK_D"]))](
        x, y, dummy(dev) if weight is None else _vec(weight),
        dummy(dev) if bias is None else _vec(bias),
        mean, rstd, *sq.kernel_args(), d, num_tokens, 0 if packed else y.stride(0), y.stride(-2),
        eps_hi, eps_lo, HAS_MASK=sq.has_mask, PACKED=packed, HAS_W=weight is not None,
        HAS_B=bias is not None, IS_FP64=x.dtype == torch.float64, **cfg,
    )
    return y, mean, rstd


def masked_instance_norm_backward(grad: Tensor, x: Tensor, mask: Tensor | None,
                                  cu_seqlens: Tensor | None, weight: Tensor | None,
                                  bias: Tensor | None, mean: Tensor, rstd: Tensor,
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x like x, grad_weight, grad_bias)``; see ``_masked_instance_norm_bwd_kernel``."""
    acc = acc_dtype(x.dtype)
    dev = x.device
    sq = seqs(x, mask, cu_seqlens)
    d = x.shape[-1]
    gx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    if d == 0 or sq.batch == 0:
        zeros = torch.zeros(d, dtype=acc, device=dev)
        return (gx.zero_(), _param_grad(zeros, weight, x), _param_grad(zeros, bias, x))
    packed = cu_seqlens is not None
    num_tokens = x.shape[0] if packed else x.shape[1]
    cfg = _masked_config(d, x.dtype)
    dwp = torch.empty(sq.batch, d, dtype=acc, device=dev)
    dbp = torch.empty(sq.batch, d, dtype=acc, device=dev)
    sg = grad.stride()
    _masked_instance_norm_bwd_kernel[(sq.batch, triton.cdiv(d, cfg["BLOCK_D"]))](
        grad, x, dummy(dev) if weight is None else _vec(weight), _vec(mean), _vec(rstd),
        gx, dwp, dbp, *sq.kernel_args(), 0 if packed else sg[0], sg[-2], sg[-1], d, num_tokens,
        0 if packed else gx.stride(0), gx.stride(-2),
        HAS_MASK=sq.has_mask, PACKED=packed, HAS_W=weight is not None,
        IS_FP64=x.dtype == torch.float64, **cfg,
    )
    return gx, _param_grad(dwp.sum(0), weight, x), _param_grad(dbp.sum(0), bias, x)


# ----------------------------------------------------------------------------------------------
# Fused residual-add norms: the row norms of s = x + residual.
# ----------------------------------------------------------------------------------------------


def _residual_sum(x: Tensor, residual: Tensor) -> Tensor:
    acc = acc_dtype(x.dtype)
    return x.to(acc) + residual.to(acc)


def add_layer_norm(x: Tensor, residual: Tensor, normalized_ndim: int, weight: Tensor | None,
                   bias: Tensor | None, eps: float, return_residual: bool):
    """``(y, x + residual or zero-size, mean, rstd)``: LayerNorm of the sum formed in fp32."""
    s = _residual_sum(x, residual)
    y, mean, rstd = layer_norm(s, normalized_ndim, weight, bias, eps)
    out = s.to(x.dtype) if return_residual else x.new_empty(0)
    return y.to(x.dtype), out, mean, rstd


def add_layer_norm_backward(grad: Tensor, grad_sum: Tensor | None, x: Tensor, residual: Tensor,
                            normalized_ndim: int, weight: Tensor | None, bias: Tensor | None,
                            mean: Tensor, rstd: Tensor):
    s = _residual_sum(x, residual)
    gs, gw, gb = layer_norm_backward(grad.to(s.dtype), s, normalized_ndim, weight, bias, mean,
                                     rstd)
    if grad_sum is not None:
        gs = gs + grad_sum.to(gs.dtype)
    return gs.to(x.dtype), gw, gb


def add_rms_norm(x: Tensor, residual: Tensor, normalized_ndim: int, weight: Tensor | None,
                 eps: float, return_residual: bool):
    """``(y, x + residual or zero-size, rstd)``: RMSNorm of the sum formed in fp32."""
    s = _residual_sum(x, residual)
    y, rstd = rms_norm(s, normalized_ndim, weight, eps)
    out = s.to(x.dtype) if return_residual else x.new_empty(0)
    return y.to(x.dtype), out, rstd


def add_rms_norm_backward(grad: Tensor, grad_sum: Tensor | None, x: Tensor, residual: Tensor,
                          normalized_ndim: int, weight: Tensor | None, rstd: Tensor):
    s = _residual_sum(x, residual)
    gs, gw = rms_norm_backward(grad.to(s.dtype), s, normalized_ndim, weight, rstd)
    if grad_sum is not None:
        gs = gs + grad_sum.to(gs.dtype)
    return gs.to(x.dtype), gw


IMPLEMENTATIONS = {
    "layer_norm": layer_norm,
    "layer_norm_backward": layer_norm_backward,
    "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward,
    "add_layer_norm": add_layer_norm,
    "add_layer_norm_backward": add_layer_norm_backward,
    "add_rms_norm": add_rms_norm,
    "add_rms_norm_backward": add_rms_norm_backward,
    "instance_norm": instance_norm,
    "instance_norm_backward": instance_norm_backward,
    "masked_instance_norm": masked_instance_norm,
    "masked_instance_norm_backward": masked_instance_norm_backward,
}
