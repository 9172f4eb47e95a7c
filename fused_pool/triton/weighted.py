"""PLACEHOLDER (being replaced by Triton kernels): delegates to the torch reference."""

from ..backends import reference

IMPLEMENTATIONS = {
    "attention_pool": reference.attention_pool,
    "attention_pool_backward": reference.attention_pool_backward,
    "weighted_layer_pool": reference.weighted_layer_pool,
    "weighted_layer_pool_backward": reference.weighted_layer_pool_backward,
    "weighted_layer_mean": reference.weighted_layer_mean,
    "weighted_layer_mean_backward": reference.weighted_layer_mean_backward,
}
