"""fused_pool: fused masked pooling and normalization for transformer hidden states.

Public API (``docs/api.md``; semantics: ``docs/semantics.md``)::

    import fused_pool as fp
    fp.masked_mean(x, mask)                 # [B, L, D] -> [B, D]
    fp.set_backend("torch")                 # or use_backend(...), FUSED_POOL_BACKEND
    fp.nn.MeanPooling()(last_hidden_state, attention_mask)
"""

from . import _dispatch, nn
from ._dispatch import available_backends, backend_status, get_backend, set_backend, use_backend
from .functional import (
    add_layer_norm,
    add_rms_norm,
    attention_pool,
    instance_norm,
    layer_norm,
    masked_instance_norm,
    masked_kmax,
    masked_max,
    masked_mean,
    masked_mean_max,
    masked_min,
    rms_norm,
    weighted_layer_mean,
    weighted_layer_pool,
)

__version__ = "0.1.0"

_dispatch.probe_all()

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "attention_pool",
    "available_backends",
    "backend_status",
    "get_backend",
    "instance_norm",
    "layer_norm",
    "masked_instance_norm",
    "masked_kmax",
    "masked_max",
    "masked_mean",
    "masked_mean_max",
    "masked_min",
    "nn",
    "rms_norm",
    "set_backend",
    "use_backend",
    "weighted_layer_mean",
    "weighted_layer_pool",
]
