import os
import zlib

import torch

# The Triton interpreter must be chosen before any kernel is defined; only where no GPU runs them.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fused_pool as fp  # noqa: E402
from fused_pool import _dispatch  # noqa: E402

from .helpers import Target  # noqa: E402


def _targets():
    """(backend, device) pairs this machine can run; FUSED_POOL_TEST_BACKENDS=a,b narrows them."""
    only = os.environ.get("FUSED_POOL_TEST_BACKENDS")
    wanted = set(only.split(",")) if only else None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        (name, dev)
        for name in fp.available_backends()
        if wanted is None or name in wanted
        for dev in devices
        if _dispatch._runs_on(name, dev)
    ]


TARGETS = _targets()


@pytest.fixture(params=TARGETS, ids=[f"{n}-{d}" for n, d in TARGETS])
def tgt(request):
    """Every test that takes ``tgt`` runs once per available backend and device."""
    name, dev = request.param
    with fp.use_backend(name):
        yield Target(name, torch.device(dev))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per case, reproducible from the test id when it fails (crc32, not
    # hash(): Python salts string hashes per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
