"""Adapters that put fused_pool into other libraries' models.

Each submodule imports its library only when called, and nothing here is imported by
``import fused_pool``: the libraries stay optional dependencies (``pip install
fused_pool[integrations]``).

- ``fused_pool.integrations.sentence_transformers``: ``swap_pooling(model)`` computes a
  SentenceTransformer's own ``Pooling`` configuration with the fused kernels.
"""
