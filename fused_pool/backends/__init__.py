"""The backends, and the one place that maps a backend's name to its code and namespace.

=========  =======================================  =====================  ====================
name       kernels                                  ``torch.library``      devices
=========  =======================================  =====================  ====================
"triton"   ``fused_pool/backends/triton_backend/``  ``fused_pool_triton``  CUDA (CPU when
                                                                           ``TRITON_INTERPRET=1``)
"cpp"      ``fused_pool._C``, built from ``csrc/``  ``fused_pool_cpp``     CPU, CUDA if built so
"torch"    ``fused_pool/backends/reference/``       ``fused_pool_torch``   every device
=========  =======================================  =====================  ====================

"cpp" loads ``fused_pool._C`` when the install compiled it, else the kernels compiled from
``csrc/`` for this torch on first use (``fused_pool/_extension.py``). "torch" is the pure-PyTorch
reference: the formulas every other backend is tested against.
Each backend implements every operator of ``fused_pool/_schema.py``, one file per op family
(``pool``, ``weighted``, ``norm``); ``fused_pool/_dispatch.py`` chooses between them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str  #: the public name (``fused_pool.set_backend``, ``FUSED_POOL_BACKEND``)
    module: str  #: the module whose import provides the kernels
    namespace: str  #: the ``torch.library`` namespace of its operators


#: In ``"auto"``'s order of preference.
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", "fused_pool.backends.triton_backend", "fused_pool_triton"),
        Backend("cpp", "fused_pool._C", "fused_pool_cpp"),
        Backend("torch", "fused_pool.backends.reference", "fused_pool_torch"),
    )
}
