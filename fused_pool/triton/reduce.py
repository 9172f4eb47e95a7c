"""PLACEHOLDER (being replaced by Triton kernels): delegates to the torch reference."""

from ..backends import reference

IMPLEMENTATIONS = {
    "masked_mean": reference.masked_mean,
    "masked_mean_backward": reference.masked_mean_backward,
    "masked_extremum": reference.masked_extremum,
    "masked_kmax": reference.masked_kmax,
    "index_pool_backward": reference.index_pool_backward,
    "masked_mean_max": reference.masked_mean_max,
    "masked_mean_max_backward": reference.masked_mean_max_backward,
}
