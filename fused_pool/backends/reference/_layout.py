"""The token layout every reference formula uses: padded ``[B, Lp, D]`` + a bool ``valid`` mask.

Padded input (``x [B, L, D]`` + optional mask) is used as is; packed input (``x [T, D]`` +
``cu_seqlens``) is gathered into that form, and gradients are scattered back. The formulas then
use ``torch.where`` so that padded values, NaN and Inf included, never reach an output.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Padded:
    """``x`` viewed as padded ``[B, Lp, D]`` with a bool ``valid [B, Lp]`` (``Lp >= 1``).

    Padded input is used as is. Packed input (``cu_seqlens``) is gathered row by row; ``scatter``
    maps a padded gradient back onto the packed ``[T, D]`` layout.
    """

    def __init__(self, x: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None):
        if cu_seqlens is None:
            b, length = x.shape[0], x.shape[1]
            self.rows = None
            valid = (
                torch.ones(b, length, dtype=torch.bool, device=x.device)
                if mask is None
                else mask.to(torch.bool)
            )
            xp = x
        else:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
            lengths = cu[1:] - cu[:-1]
            lmax = int(lengths.max()) if lengths.numel() else 0
            pos = torch.arange(lmax, device=x.device)
            valid = pos[None, :] < lengths[:, None]
            rows = cu[:-1, None] + pos[None, :]
            self.rows = torch.where(valid, rows, 0)
            xp = x[self.rows] if x.shape[0] > 0 else x.new_zeros(*self.rows.shape, x.shape[1])
        # An all-padded column keeps every reduction well defined when L == 0.
        if xp.shape[1] == 0:
            xp = xp.new_zeros(xp.shape[0], 1, *xp.shape[2:])
            valid = valid.new_zeros(valid.shape[0], 1)
        self.x = xp
        self.valid = valid
        self.count = valid.sum(1)  # [B] int64
        self.num_tokens = x.shape[1] if cu_seqlens is None else x.shape[0]

    def vmask(self, t: Tensor) -> Tensor:
        """``valid`` broadcast against a ``[B, Lp, ...]`` tensor ``t``."""
        return self.valid.reshape(*self.valid.shape, *([1] * (t.dim() - 2)))

    def scatter(self, gp: Tensor) -> Tensor:
        """A padded ``[B, Lp, ...]`` gradient (zero at padding) in the input's layout."""
        if self.rows is None:
            return gp[:, : self.num_tokens]
        out = gp.new_zeros(self.num_tokens, *gp.shape[2:])
        out[self.rows[self.valid]] = gp[self.valid]
        return out


def zeros_like_grad(num_tokens: int, grad: Tensor, padded: bool) -> Tensor:
    b, d = grad.shape[0], grad.shape[-1]
    shape = (b, num_tokens, d) if padded else (num_tokens, d)
    return grad.new_zeros(shape)

