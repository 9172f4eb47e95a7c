"""The ``"triton"`` backend: Triton kernels for every operator in ``fused_pool/_schema.py``.

One module per op family, each ending in its ``IMPLEMENTATIONS`` table (schema name -> Python
launcher):

* ``pool.py``: masked mean, max/min, k-max, mean+max, and the index-scatter backward.
* ``weighted.py``: attention pooling and the weighted-layer ops.
* ``norm.py``: LayerNorm, RMSNorm, InstanceNorm, masked InstanceNorm.

``_layout.py`` holds what they share: the token layout of padded/packed input (tokens read,
output rows written), the accumulator dtype, the SM count, the tests' forced token split and the
interpreter switch. Kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported), which is how CI tests them.

(The package is not called ``triton``: a subpackage of that name would shadow the real Triton
for tools that resolve imports by directory, such as ruff's import sorting.)
"""

from __future__ import annotations

from collections.abc import Iterable

from . import norm, pool, weighted

#: schema name -> launcher: every op of ``_schema.SCHEMAS``, family by family.
IMPLEMENTATIONS = {**pool.IMPLEMENTATIONS, **weighted.IMPLEMENTATIONS, **norm.IMPLEMENTATIONS}


def dispatch_keys(devices: Iterable[str]) -> tuple[str, ...]:
    """The dispatch keys to register the launchers for, given the devices Triton runs on here."""
    return tuple({"cuda": "CUDA", "cpu": "CPU"}[d] for d in sorted(devices))
