"""Input builders and the correctness policy shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fused_pool as fp

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The absolute floor added to 2x plain torch's own error (docs/testing.md).
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@dataclass
class Target:
    backend: str
    device: torch.device

    @property
    def interpreted(self) -> bool:
        """Triton's CPU interpreter: ~25 ms per program, so tests keep shapes tiny there."""
        return self.backend == "triton" and self.device.type == "cpu"


def poison(device: torch.device, nbytes: int = 1 << 22) -> None:
    """Fill freed memory with NaN so an output a kernel forgets to write cannot look right."""
    torch.full((nbytes // 4,), float("nan"), device=device)


def make_mask(b: int, length: int, device, *, kind: str = "holes", dtype=torch.bool,
              empty_rows: bool = True) -> torch.Tensor:
    """A [B, L] mask. ``prefix``: right padding; ``holes``: random gaps anywhere; the last row
    is all padding when ``empty_rows`` (and B > 1)."""
    if kind == "prefix":
        lengths = torch.randint(1, length + 1, (b,))
        m = torch.arange(length)[None, :] < lengths[:, None]
    elif kind == "left":
        lengths = torch.randint(1, length + 1, (b,))
        m = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    else:
        m = torch.rand(b, length) < 0.6
        m[:, 0] |= torch.rand(b) < 0.5
    if empty_rows and b > 1:
        m[-1] = False
    return m.to(device=device, dtype=dtype)


def poison_padding(x: torch.Tensor, mask: torch.Tensor | None, value=float("nan")):
    """x with every padded token set to ``value`` (NaN, Inf, ...): padding must never leak."""
    if mask is None:
        return x
    return torch.where((mask != 0)[..., None], x, torch.tensor(value, dtype=x.dtype,
                                                               device=x.device))


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False) -> torch.Tensor:
    t = (torch.randn(*shape, dtype=torch.float64) * 2).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def pack(x: torch.Tensor, mask: torch.Tensor):
    """Padded [B, L, D] + prefix mask -> packed [T, D] and cu_seqlens (int32)."""
    lengths = (mask != 0).sum(1)
    rows = [x[b, : int(n)] for b, n in enumerate(lengths)]
    packed = torch.cat(rows) if rows else x.new_zeros(0, x.shape[-1])
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return packed, cu


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in float64, NaN where both are NaN counting as equal, one-sided NaN as inf."""
    a, b = a.double(), b.double()
    both = a.isnan() & b.isnan()
    diff = (a - b).abs()
    diff = torch.where(both, 0, diff)
    diff = torch.where(a.isnan() ^ b.isnan(), float("inf"), diff)
    same_inf = torch.isinf(a) & (a == b)
    diff = torch.where(same_inf, 0, diff)
    return diff.max().item() if diff.numel() else 0.0


def assert_policy(out: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor,
                  dtype: torch.dtype, what: str = "output") -> None:
    """The correctness policy (docs/testing.md): error vs float64 <= 2 x (plain torch's error
    in ``dtype``) + floor."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    base = max_err(ref_low, ref64)
    bound = 2 * base + FLOOR[dtype]
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


def grads(fn, inputs, proj):
    """Gradients of ``<fn(*inputs), proj>`` w.r.t. every input that requires grad."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, leaves, proj.to(out.dtype), allow_unused=True)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def assert_policy_grads(run, ref, inputs, dtype, what):
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


#: Marks the tests of Triton launchers and kernels (they skip where the backend is unavailable).
needs_triton = pytest.mark.skipif("triton" not in fp.available_backends(),
                                  reason="the triton backend is not available here")
