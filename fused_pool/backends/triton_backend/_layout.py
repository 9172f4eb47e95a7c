"""What every Triton kernel of fused_pool shares: the token layout of padded and packed input
(which tokens a program reads, which output rows it writes), the accumulator dtype, the GPU's SM
count, the forced token split of the tests, and the interpreter switch.

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
A mask exists only for padded input, where ``start[b] = 0``: ``token_valid`` reads ``mask[b, t]``.

Output rows. A kernel that writes a ``[B, L, D]`` / ``[T, D]`` output (gradients of ``x``, the
masked InstanceNorm output) writes, for sequence ``b``, the rows ``owned_rows`` gives: all ``L``
rows (padded), or the sequence's own rows ``[cu[b], cu[b+1])`` (packed) — and the first / last
sequence also own the rows before / after every sequence. Those exist only when ``cu_seqlens``
does not cover ``[0, T)``, which is not checked while tracing (torch.compile, CUDA graphs); they
get zeros, never uninitialized memory.
"""

from __future__ import annotations

import functools
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

#: Tests force the token split (chunks per sequence) of every kernel that splits tokens with
#: this; None leaves it to the launch heuristics.
FORCE_SPLIT: int | None = None


#: The SM count the launch heuristics assume instead of asking the device (set by
#: ``fused_pool.gpu_profile``, which sizes the grids of a GPU it does not have).
SMS_OVERRIDE: int | None = None


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device)."""
    if device.type != "cuda":
        return 1
    if SMS_OVERRIDE is not None:
        return SMS_OVERRIDE
    return _device_sms(device)


@functools.cache
def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def to_acc(v, IS_FP64: tl.constexpr):
    """``v`` in the accumulation dtype: float64 stays float64, every other float type is widened
    to float32 (``IS_FP64``: the input is float64)."""
    if IS_FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def token_valid(mask_ptr, b, t, stride_mb, stride_ml, in_range, HAS_MASK: tl.constexpr):
    """``in_range & mask[b, t]`` for token rows ``t`` (uint8 mask of padded input), loading the
    mask only where ``in_range``. Without a mask (``HAS_MASK`` false): ``in_range``."""
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + t * stride_ml, mask=in_range, other=0)
        return tl.where(in_range, m != 0, False)
    else:
        return in_range


@triton.jit
def owned_rows(seq_lo, seq_hi, b, num_tokens, PACKED: tl.constexpr):
    """``[lo, hi)``: the output rows of sequence ``b`` (tokens ``[seq_lo, seq_hi)``) that its
    programs write (see the module docstring). ``num_tokens`` is ``L`` (padded) or ``T``."""
    if PACKED:
        lo = tl.where(b == 0, 0, seq_lo)
        hi = tl.where(b == tl.num_programs(0) - 1, num_tokens, seq_hi)
    else:
        lo = seq_lo * 0
        hi = lo + num_tokens
    return lo, hi


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
    m8, stride_mb, stride_ml = mask_view(mask, dev)
    m = m8.view(torch.bool)
    if length == 0:
        end = torch.zeros(b, dtype=torch.int64, device=dev)
    else:
        pos = torch.arange(1, length + 1, dtype=torch.int64, device=dev)
        end = torch.where(m, pos, 0).amax(1)
    count = m.sum(1)
    return Seqs(b, start, end, count, m8, True, stride_mb, stride_ml,
                x.stride(0), x.stride(1), x.stride(2))


def mask_view(mask: Tensor | None, device: torch.device) -> tuple[Tensor, int, int]:
    """``(mask as uint8, stride_mb, stride_ml)`` for a kernel (any mask dtype; a token is valid
    where ``mask != 0``), or a dummy and zero strides without a mask. A bool mask is viewed, not
    copied."""
    if mask is None:
        return dummy(device, torch.uint8), 0, 0
    m8 = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    return m8, m8.stride(0), m8.stride(1)


def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-element tensor for a pointer argument a constexpr flag switches off."""
    return torch.empty(1, dtype=dtype, device=device)


def block_d(d: int, cap: int = 1024) -> int:
    """A power-of-two feature block: ``d`` rounded up, at most ``cap`` (at least 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(d, 1))))
