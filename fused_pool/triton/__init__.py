"""The ``"triton"`` backend: Triton kernels for every operator in ``fused_pool/_schema.py``.

One module per family, each exporting ``IMPLEMENTATIONS`` (schema name -> Python launcher):

* ``reduce.py``: masked mean, max/min, k-max, mean+max, and the index-scatter backward.
* ``weighted.py``: attention pooling and the weighted-layer ops.
* ``norm.py``: LayerNorm, RMSNorm, InstanceNorm, masked InstanceNorm.

``_common.py`` holds what they share: the token layout of padded/packed input, launch helpers
and the interpreter switch. Kernels run on CUDA tensors, and on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how CI tests them.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._schema import SCHEMAS
from . import norm, reduce, weighted

IMPLEMENTATIONS = {**reduce.IMPLEMENTATIONS, **weighted.IMPLEMENTATIONS, **norm.IMPLEMENTATIONS}

_missing = sorted(set(SCHEMAS) - set(IMPLEMENTATIONS))
if _missing:
    raise ImportError(f"fused_pool.triton lacks kernels for {', '.join(_missing)}")


def dispatch_keys(devices: Iterable[str]) -> tuple[str, ...]:
    """The dispatch keys to register the launchers for, given the devices Triton runs on here."""
    return tuple({"cuda": "CUDA", "cpu": "CPU"}[d] for d in sorted(devices))
