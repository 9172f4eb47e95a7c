"""Smoke test of a build of the "cpp" backend: every op family's ops, forward and backward, on
CPU float64 tensors, must equal the "torch" reference. Used by the CI checks of other builds
than the test venv's (scripts/ci_cuda_build.sh, scripts/ci_pip_install.sh), which import
fused_pool from where that build put it.

    python scripts/cpp_smoke.py LABEL      # exits non-zero on a mismatch
"""

from __future__ import annotations

import sys

import torch

import fused_pool as fp


def check(label: str) -> int:
    """Compare cpp with torch on each op; print one line; return the number of ops checked."""
    torch.manual_seed(0)
    b, length, d, h = 3, 7, 12, 3
    x = torch.randn(b, length, d, dtype=torch.float64)
    mask = torch.rand(b, length) > 0.3
    mask[1] = False  # an empty sequence
    scores = torch.randn(b, length, h, dtype=torch.float64)
    layers = [torch.randn(b, length, d, dtype=torch.float64) for _ in range(3)]
    weights = torch.rand(3, dtype=torch.float64) + 0.5
    cases = {
        "masked_mean": lambda: fp.masked_mean(x, mask),
        "masked_max": lambda: fp.masked_max(x, mask),
        "masked_min": lambda: fp.masked_min(x, mask),
        "masked_kmax": lambda: fp.masked_kmax(x, mask, k=2),
        "masked_mean_max": lambda: fp.masked_mean_max(x, mask),
        "attention_pool": lambda: fp.attention_pool(x, scores, mask),
        "weighted_layer_pool": lambda: fp.weighted_layer_pool(layers, weights),
        "weighted_layer_mean": lambda: fp.weighted_layer_mean(layers, weights, mask),
        "layer_norm": lambda: fp.layer_norm(x, (d,)),
        "rms_norm": lambda: fp.rms_norm(x, (d,)),
        "masked_instance_norm": lambda: fp.masked_instance_norm(x, mask),
    }
    inputs = [x, scores, weights, *layers]

    def run(backend, fn):
        for t in inputs:
            t.requires_grad_(True)
            t.grad = None
        with fp.use_backend(backend):
            out = fn()
            out.backward(torch.ones_like(out))
        return out.detach(), [t.grad.clone() if t.grad is not None else None for t in inputs]

    for name, fn in cases.items():
        out, grads = run("cpp", fn)
        ref, ref_grads = run("torch", fn)
        torch.testing.assert_close(out, ref, msg=lambda m, n=name: f"{n}: {m}")
        for g, r in zip(grads, ref_grads):
            assert (g is None) == (r is None), name
            if g is not None:
                torch.testing.assert_close(g, r, msg=lambda m, n=name: f"{n} grad: {m}")
    print(f"{label}: cpp == torch on {len(cases)} ops, forward and backward")
    return len(cases)


if __name__ == "__main__":
    check(sys.argv[1] if len(sys.argv) > 1 else "cpp-smoke")
