"""What the Triton kernels share: the token layout, launch helpers and the interpreter switch.

Token layout. Every pooling-style kernel walks the tokens of sequence ``b`` the same way, for
padded (``x [B, L, D]`` + optional bool ``mask [B, L]``) and packed (``x [T, D]`` +
``cu_seqlens [B + 1]``) input alike::

    for t in range(start[b], end[b]):              # int64 token positions
        row = x_ptr + b * stride_b + t * stride_t  # stride_b is 0 for packed input
        valid = mask[b, t - start[b]] if HAS_MASK else True
        # index within the sequence (what argmax returns): t - start[b]

``start``/``end`` are computed once per call on the device (no host synchronization): for padded
input ``start = 0`` and ``end`` = one past the last valid token (so trailing padding is never
visited; holes inside are skipped by the mask, and masked lanes are never loaded); for packed
input they are ``cu_seqlens[b]``/``cu_seqlens[b + 1]``. ``count[b]`` is the number of valid tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

#: True when kernels run on CPU tensors through Triton's interpreter (tests, CI).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: The interpreter converts float32 to bfloat16 by truncation; GPUs round to nearest even.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(v, ty: tl.constexpr):
    """``v`` converted to dtype ``ty`` (pass ``ptr.dtype.element_ty``), rounding to nearest even
    as a GPU does: under the interpreter bfloat16 is rounded by hand first, so CPU tests see GPU
    numerics (a truncating conversion fails the bf16 tolerance). NaN stays NaN."""
    if _ROUND_BF16_BY_HAND:
        if ty == tl.bfloat16:
            f = v.to(tl.float32)
            bits = f.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = tl.where(f != f, f, bits.to(tl.float32, bitcast=True))
    return v.to(ty)


@dataclass
class Seqs:
    """Per-sequence token ranges of a padded or packed input (see the module docstring).

    ``start``, ``end``, ``count`` are contiguous int64 ``[B]`` tensors on ``x``'s device.
    ``mask`` is the padded mask viewed as uint8 (or a 1-element dummy with ``has_mask=False``),
    with its strides in ``stride_mb``/``stride_ml``. ``stride_b``/``stride_t``/``stride_d`` are
    ``x``'s strides for (sequence, token, feature).
    """

    batch: int
    start: Tensor
    end: Tensor
    count: Tensor
    mask: Tensor
    has_mask: bool
    stride_mb: int
    stride_ml: int
    stride_b: int
    stride_t: int
    stride_d: int

    def kernel_args(self) -> tuple:
        """The layout as kernel arguments, in this order:
        ``start_ptr, end_ptr, mask_ptr, stride_mb, stride_ml, stride_b, stride_t, stride_d``
        (pass ``HAS_MASK=self.has_mask`` as a constexpr)."""
        return (self.start, self.end, self.mask, self.stride_mb, self.stride_ml,
                self.stride_b, self.stride_t, self.stride_d)


def seqs(x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> Seqs:
    """The token layout of ``x`` (padded ``[B, L, D]`` + mask, or packed ``[T, D]`` + cu_seqlens).

    Costs one small pass over the mask (padded) or over ``cu_seqlens``; never reads ``x``.
    """
    dev = x.device
    if cu_seqlens is not None:
        # Clamped: values are validated on the host except while tracing (torch.compile, CUDA
        # graphs), and a bad offset must not become an out-of-bounds read.
        cu = cu_seqlens.to(device=dev, dtype=torch.int64).clamp(0, x.shape[0])
        start, end = cu[:-1].contiguous(), cu[1:].contiguous()
        return Seqs(cu.shape[0] - 1, start, end, end - start, dummy(dev, torch.uint8), False,
                    0, 0, 0, x.stride(0), x.stride(1))
    b, length = x.shape[0], x.shape[1]
    start = torch.zeros(b, dtype=torch.int64, device=dev)
    if mask is None:
        full = torch.full((b,), length, dtype=torch.int64, device=dev)
        return Seqs(b, start, full, full, dummy(dev, torch.uint8), False, 0, 0,
                    x.stride(0), x.stride(1), x.stride(2))
    m = mask if mask.dtype == torch.bool else mask != 0
    if length == 0:
        end = torch.zeros(b, dtype=torch.int64, device=dev)
    else:
        pos = torch.arange(1, length + 1, dtype=torch.int64, device=dev)
        end = torch.where(m, pos, 0).amax(1)
    count = m.sum(1)
    m8 = m.view(torch.uint8)
    return Seqs(b, start, end, count, m8, True, m8.stride(0), m8.stride(1),
                x.stride(0), x.stride(1), x.stride(2))


def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-element tensor for a pointer argument a constexpr flag switches off."""
    return torch.empty(1, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_d(d: int, cap: int = 1024) -> int:
    """A power-of-two feature block: ``d`` rounded up, at most ``cap`` (at least 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(d, 1))))
