"""fused_pool inside a sentence-transformers model, with the model's own pooling configuration.

::

    from sentence_transformers import SentenceTransformer
    from fused_pool.integrations.sentence_transformers import swap_pooling

    model = swap_pooling(SentenceTransformer("all-MiniLM-L6-v2"))   # in place; returns the model
    emb = model.encode(sentences)                                   # same embeddings as before

``swap_pooling`` finds every ``Pooling`` module of the model and replaces its ``forward`` (on
that instance only) by :class:`FusedPoolingForward`, which reads the module's own configuration
(``pooling_mode``: ``"cls"``, ``"max"``, ``"mean"``, ``"mean_sqrt_len_tokens"``,
``"weightedmean"``, ``"lasttoken"`` or a tuple of them, concatenated in the tuple's order;
``include_prompt``) at every call and computes it with the fused kernels:

- ``mean`` / ``mean_sqrt_len_tokens`` / ``max``: ``masked_mean`` / ``masked_max``, or one
  ``masked_mean_max`` pass when both kinds are asked for; ``mean_sqrt_len_tokens`` is
  ``mean * sqrt(n)`` (``n`` valid tokens), as ``sum / sqrt(n)``.
- ``weightedmean``: ``attention_pool`` with scores ``log(w_t)``, since
  ``softmax(log w) = w / sum(w)``; ``w_t`` is the library's position weight.
- ``cls`` and ``lasttoken`` pick one token: a ``[B, D]`` gather, as the library does (without its
  ``[B, L, D]`` ``x * mask`` product for ``lasttoken``).

Why the instance's ``forward`` and not a subclass: ``model.save`` records each module's class in
``modules.json``, and sentence-transformers >= 6 loads a class outside its own package only with
``trust_remote_code=True``. The swapped module stays a stock ``Pooling`` (same class, same config,
no parameters), so a saved model reloads with plain sentence-transformers, without fused_pool
installed; call ``swap_pooling`` again after loading. Pickling and ``copy.deepcopy`` keep the swap.

Numbers: the stock module's, for every mode and combination, with right or left padding,
``include_prompt=False`` and a ``token_weights_sum`` feature (float32 within 1e-5; the tests in
``tests/integrations`` compare them on the real all-MiniLM-L6-v2). Two deliberate limits: NaN or
Inf at *padded* positions never reach the output here (stock ``mean`` multiplies them by 0, which
gives NaN), and the mask is read as binary (``!= 0``), as every Hugging Face tokenizer makes it.
An empty sequence (possible with ``include_prompt=False``) gives what the library gives: 0 for the
means, ``-inf`` for ``max``.

Supported: sentence-transformers >= 6.0 (the ``pooling_mode`` API). Before 6.2, ``weightedmean``
weighted absolute positions; from 6.2 on, positions counted from the first non-padding token
(they differ under left padding); both are followed, by the installed version. The packed
(``cu_seq_lens_q``, flash-attention unpadded) input goes through the fused packed kernels too,
except with a prompt to exclude, where the stock code runs. Exporting the model (ONNX, OpenVINO)
traces the fused operators, which those formats do not know: ``unswap_pooling`` first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as fpf

__all__ = ["FusedPoolingForward", "is_swapped", "swap_pooling", "unswap_pooling"]

_MIN_VERSION = (6, 0)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _library():
    """``(Pooling class, version tuple)`` of the installed sentence-transformers."""
    try:
        import sentence_transformers
    except ImportError as err:
        raise ImportError("fused_pool.integrations.sentence_transformers needs "
                          "sentence-transformers: pip install 'fused_pool[integrations]' "
                          "(or sentence-transformers>=6)") from err
    version = _version_tuple(sentence_transformers.__version__)
    if version < _MIN_VERSION:
        raise RuntimeError(
            f"swap_pooling: sentence-transformers {sentence_transformers.__version__} is too old; "
            f"it needs >= {'.'.join(map(str, _MIN_VERSION))} (the `pooling_mode` API, whose "
            "semantics the fused module reproduces)")
    from sentence_transformers.sentence_transformer.modules import Pooling
    return Pooling, version


class FusedPoolingForward:
    """Replacement ``forward(features, **kwargs) -> features`` for one ``Pooling`` module.

    Reads ``pooling.pooling_mode`` and ``pooling.include_prompt`` at each call (so later changes,
    e.g. ``model.set_pooling_include_prompt(False)``, apply), pools
    ``features["token_embeddings"]`` (``[B, L, D]``, or ``[1, T, D]`` with
    ``features["cu_seq_lens_q"]``) under ``features["attention_mask"]`` (``[B, L]``) and sets
    ``features["sentence_embedding"]`` (``[B, len(modes) * D]``, the input dtype).
    """

    def __init__(self, pooling: torch.nn.Module, library_version: tuple[int, ...]):
        self.pooling = pooling
        # From 6.2 on, weightedmean's position weights start at the first non-padding token.
        self.weights_from_first_token = library_version >= (6, 2)

    def __repr__(self) -> str:
        return f"FusedPoolingForward({self.pooling.get_config_dict()})"

    def modes(self) -> tuple[str, ...]:
        mode = self.pooling.pooling_mode
        return (mode,) if isinstance(mode, str) else tuple(mode)

    def __call__(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        x = features["token_embeddings"]
        prompt_length = None
        if not self.pooling.include_prompt and "prompt_length" in features:
            # An int at inference; a tensor of equal values in training (the library's reading).
            pl = features["prompt_length"]
            prompt_length = int(pl[0].item()) if isinstance(pl, Tensor) else int(pl)

        if "cu_seq_lens_q" in features:
            if prompt_length:
                # Rare (unpadded flash-attention input and a prompt to drop): the stock code.
                return type(self.pooling).forward(self.pooling, features, **kwargs)
            vectors = self._packed(x.squeeze(0), features)
        else:
            mask = features.get("attention_mask")
            if mask is None or mask.size(-1) != x.size(1):
                mask = torch.ones(x.shape[:-1], device=x.device, dtype=torch.int64)
            vectors = self._padded(x, mask, features, prompt_length)
        features["sentence_embedding"] = torch.cat(vectors, dim=-1)
        return features

    def _padded(self, x: Tensor, mask: Tensor, features: dict[str, Any],
                prompt_length: int | None) -> list[Tensor]:
        """``x [B, L, D]``, ``mask [B, L]`` -> one ``[B, D]`` tensor per mode, in mode order."""
        modes = self.modes()
        original_mask = mask
        if prompt_length:
            mask = self.pooling._exclude_prompt_from_mask(mask, prompt_length)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        count = (mask != 0).sum(1, dtype=acc)  # [B] valid tokens
        tws = features.get("token_weights_sum")  # [B], replaces the count as the mean's divisor
        mean, maximum = self._mean_max(x, mask, modes)

        out = []
        for mode in modes:
            if mode == "cls":
                if "cls_token_embeddings" in features:
                    out.append(features["cls_token_embeddings"])
                else:  # the first valid token (argmax of the 0/1 mask; token 0 if none)
                    first = mask.to(torch.int).argmax(dim=1)
                    out.append(_take(x, first))
            elif mode == "max":
                out.append(maximum.masked_fill((count == 0).unsqueeze(-1), float("-inf")))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                out.append(_rescale_mean(mean, count, tws, acc, sqrt=mode != "mean"))
            elif mode == "weightedmean":
                out.append(self._weighted_mean(x, mask, original_mask, tws, acc))
            elif mode == "lasttoken":
                # The last valid token times its mask value (0 for an empty row, at token 0).
                seq_len = x.size(1)
                values, from_end = mask.flip(1).max(1)
                from_end = torch.where(values == 0, seq_len - 1, from_end)
                last = seq_len - 1 - from_end
                out.append(_take(x, last) * values.to(x.dtype).unsqueeze(-1))
        return out

    @staticmethod
    def _mean_max(x: Tensor, mask: Tensor | None, modes: tuple[str, ...],
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The masked mean and max ``[B, D]`` the modes need, in one pass when both are."""
        want_mean = "mean" in modes or "mean_sqrt_len_tokens" in modes
        want_max = "max" in modes
        if want_mean and want_max:
            both = fpf.masked_mean_max(x, mask, cu_seqlens=cu_seqlens)
            return both[..., : x.size(-1)], both[..., x.size(-1):]
        mean = fpf.masked_mean(x, mask, cu_seqlens=cu_seqlens) if want_mean else None
        maximum = fpf.masked_max(x, mask, cu_seqlens=cu_seqlens) if want_max else None
        return mean, maximum

    def _weighted_mean(self, x: Tensor, mask: Tensor, original_mask: Tensor,
                       tws: Tensor | None, acc: torch.dtype) -> Tensor:
        """``sum_t w_t m_t x_t / sum_t w_t m_t`` with ``w_t = t + 1`` (``- first`` from 6.2,
        ``first`` the first non-padding token of the mask before dropping a prompt)."""
        batch, seq_len = mask.shape
        weights = torch.arange(1, seq_len + 1, device=x.device, dtype=acc).expand(batch, seq_len)
        if self.weights_from_first_token and original_mask.numel():
            weights = weights - original_mask.to(torch.int32).argmax(dim=1, keepdim=True)
        # Valid tokens lie at or after the first one, so their weights are >= 1; the clamp only
        # keeps padded scores finite (attention_pool ignores them anyway).
        pooled = fpf.attention_pool(x, weights.clamp(min=1).log(), mask)
        if tws is None:
            return pooled
        # The library divides the weighted sum by token_weights_sum instead of sum(w).
        weight_sum = (weights * (mask != 0)).sum(1)
        out_dtype = torch.promote_types(x.dtype, tws.dtype)
        divisor = tws.to(torch.promote_types(acc, tws.dtype)).clamp(min=1e-9)
        return (pooled.to(acc) * (weight_sum / divisor).unsqueeze(-1)).to(out_dtype)

    def _packed(self, x: Tensor, features: dict[str, Any]) -> list[Tensor]:
        """``x [T, D]`` with ``cu_seq_lens_q [B + 1]`` -> one ``[B, D]`` per mode."""
        modes = self.modes()
        cu = features["cu_seq_lens_q"]
        lengths = cu[1:] - cu[:-1]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        mean, maximum = self._mean_max(x, None, modes, cu_seqlens=cu)
        out = []
        for mode in modes:
            if mode == "cls":
                out.append(features["cls_token_embeddings"] if "cls_token_embeddings" in features
                           else x[cu[:-1]])
            elif mode == "lasttoken":
                out.append(x[cu[1:] - 1])
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                out.append(_rescale_mean(mean, lengths.to(acc), None, acc,
                                         sqrt=mode != "mean"))
            elif mode == "max":
                out.append(maximum.masked_fill((lengths == 0).unsqueeze(-1), float("-inf")))
            elif mode == "weightedmean":
                # Weight of a token: its position within its sequence, plus 1.
                starts = torch.repeat_interleave(cu[:-1], lengths)
                positions = torch.arange(x.size(0), device=x.device) - starts
                out.append(fpf.attention_pool(x, (positions + 1).to(acc).log(), cu_seqlens=cu))
        return out


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for ``x [B, L, D]``, ``index [B]`` -> ``[B, D]``."""
    return x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.size(-1))).squeeze(1)


def _rescale_mean(mean: Tensor, count: Tensor, tws: Tensor | None, acc: torch.dtype,
                  sqrt: bool) -> Tensor:
    """The library's mean (``sum / n``) or ``mean_sqrt_len_tokens`` (``sum / sqrt(n)``) from the
    fused mean; ``n`` is the valid-token count ``[B]`` or, if given, ``token_weights_sum``."""
    if tws is None:
        if not sqrt:
            return mean
        return (mean.to(acc) * count.sqrt().unsqueeze(-1)).to(mean.dtype)
    total = mean.to(acc) * count.unsqueeze(-1)
    divisor = tws.unsqueeze(-1).to(torch.promote_types(acc, tws.dtype)).clamp(min=1e-9)
    out = total / (divisor.sqrt() if sqrt else divisor)
    return out.to(torch.promote_types(mean.dtype, tws.dtype))


def _pooling_modules(model: torch.nn.Module, pooling_class: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, pooling_class)]


def swap_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Compute every sentence-transformers ``Pooling`` in ``model`` with fused_pool, in place.

    ``model`` is a ``SentenceTransformer`` (or any module containing ``Pooling`` modules, or a
    ``Pooling`` itself). Each module keeps its class, configuration and save format; only its
    ``forward`` changes (see the module docstring). Idempotent. Returns ``model``.
    Raises ``ValueError`` if ``model`` has no ``Pooling`` module.
    """
    pooling_class, version = _library()
    found = _pooling_modules(model, pooling_class)
    if not found:
        raise ValueError(f"swap_pooling: no sentence-transformers Pooling module in "
                         f"{type(model).__name__}")
    for module in found:
        if not is_swapped(module):
            # An instance attribute: nn.Module.__call__ looks up self.forward.
            module.forward = FusedPoolingForward(module, version)
    return model


def unswap_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`swap_pooling`: every ``Pooling`` in ``model`` runs the stock code again."""
    for module in model.modules():
        if is_swapped(module):
            del module.forward
    return model


def is_swapped(module: torch.nn.Module) -> bool:
    """Whether ``module`` (a ``Pooling``) currently runs fused_pool."""
    return isinstance(module.__dict__.get("forward"), FusedPoolingForward)
