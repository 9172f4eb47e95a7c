"""The ``"torch"`` backend: the pure-PyTorch reference of every operator in ``_schema.py``.

This is the ground truth the kernels are tested against. It is written to be obviously right,
not fast: every op turns its input into a padded ``[B, L, D]`` tensor plus a bool ``valid``
mask (``_layout.py``), then applies the formula with ``torch.where`` so that padded values, NaN
and Inf included, are never used. Arithmetic runs in float32 for half/bfloat16/float32 input and
in float64 for float64 input; outputs are cast back.

Each backward is written out explicitly (not derived by autograd) so kernel authors can read the
formula they must match; ``gradcheck`` in the tests checks every one against finite differences.
One module per op family: ``pool.py``, ``weighted.py``, ``norm.py``.
"""

from __future__ import annotations

from . import norm, pool, weighted

#: schema name -> implementation: every op of ``_schema.SCHEMAS``, family by family.
IMPLEMENTATIONS = {**pool.IMPLEMENTATIONS, **weighted.IMPLEMENTATIONS, **norm.IMPLEMENTATIONS}
