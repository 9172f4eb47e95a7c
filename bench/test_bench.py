"""Regression tracking with pytest-benchmark: ``pytest bench/ --benchmark-only``.

Times every op's forward (and forward+backward) through the public API on every available
backend, at a small shape so the suite runs in about a minute on a CPU; compare runs with
``--benchmark-autosave`` and ``pytest-benchmark compare``. The speed claims themselves come from
``python -m fused_pool bench``, which times every implementation side by side.
"""

from __future__ import annotations

import pytest
import torch

import fused_pool as fp
from fused_pool import _dispatch
from fused_pool.bench.cases import OPS, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (8, 256, 768) if DEVICE.type == "cpu" else (32, 2048, 4096)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
BACKENDS = [b for b in fp.available_backends() if _dispatch._runs_on(b, DEVICE.type)]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_forward(benchmark, op, backend):
    case = OPS[op]
    inp = make_inputs(*SHAPE, DTYPE, DEVICE, "uniform", case.need)
    benchmark.group = f"{op} fwd"

    def call():
        with torch.no_grad():
            case.fused(inp)
        _sync()

    with fp.use_backend(backend):
        benchmark(call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_forward_backward(benchmark, op, backend):
    case = OPS[op]
    inp = make_inputs(*SHAPE, DTYPE, DEVICE, "uniform", case.need)
    leaves = case.grad_inputs(inp)
    for t in leaves:
        t.requires_grad_(True)
    benchmark.group = f"{op} fwd+bwd"

    def call():
        for t in leaves:
            t.grad = None
        case.fused(inp).sum().backward()
        _sync()

    with fp.use_backend(backend):
        benchmark(call)


@pytest.mark.parametrize("op", list(OPS))
def test_eager_seed_baseline(benchmark, op):
    case = OPS[op]
    inp = make_inputs(*SHAPE, DTYPE, DEVICE, "uniform", case.need)
    benchmark.group = f"{op} fwd"

    def call():
        with torch.no_grad():
            case.eager(inp)
        _sync()

    benchmark(call)
