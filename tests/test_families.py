"""The toolkit on the model families people use besides Llama, each a tiny random model of the pinned transformers:
head views, patching, attention knockout and CMAP work on all of them; the path-patching engine equals the paper's
loop where it runs and refuses, with one clear error, the families whose decoder layer it does not reproduce."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import transformers

from entity_circuits.cmap import cmap_predictions
from entity_circuits.data import corrupt_for_path_patching, encode, sample_boxes, word_level_tokenizer
from entity_circuits.evaluate import predictions
from entity_circuits.knockout import block_attention
from entity_circuits.path_patching import ENGINE_MODEL_TYPES, EngineUnsupportedError, engine_unsupported, path_patching
from entity_circuits.tracing import attention_layout, capture_heads, patch_heads

TOK = word_level_tokenizer()
COMMON = dict(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1)
FAMILIES = {   # config class, model class, extra config, whether the engine reproduces its decoder layer
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, True),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, False),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, False),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, False),
}


def tiny(family: str, seed: int = 0):
    config, model, extra, _ = FAMILIES[family]
    cfg = getattr(transformers, config)(**COMMON, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    return getattr(transformers, model)(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    ex = sample_boxes(6, 4, seed=3)
    return ex, encode(ex, TOK), encode(corrupt_for_path_patching(ex, seed=4), TOK)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_patching_knockout_and_cmap(family, pair):
    examples, clean, _ = pair
    model = tiny(family)
    lay = attention_layout(model)
    assert (lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.head_dim) == (3, 4, 2, 16)
    z = capture_heads(model, clean, "o")
    assert z.shape == (3, len(clean), clean.input_ids.shape[1], 4, 16)
    with torch.no_grad():
        plain = model(**clean.model_inputs()).logits
        with patch_heads(model, {(1, 0): lambda cur: cur}):          # patching a head with itself changes nothing
            same = model(**clean.model_inputs()).logits
        with patch_heads(model, {(1, 0): lambda cur: torch.zeros_like(cur)}):
            zeroed = model(**clean.model_inputs()).logits
        edge = (clean.last_pos, clean.object_pos[:, 0])
        with block_attention(model, edge, range(lay.n_layers)):
            blocked = model(**clean.model_inputs()).logits
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(zeroed, plain) and not torch.allclose(blocked, plain)
    # CMAP: a model's own heads patched into itself leave its predictions; another model's heads run through it
    heads = {"value_fetcher": [(2, 0), (2, 3)], "pos_transmitter": [(1, 1)]}
    own = predictions(model, TOK, examples, progress=False)
    for patch in ("output", "QKV"):
        (self_patched,) = cmap_predictions(model, model, TOK, examples, [(heads, patch)], progress=False)
        np.testing.assert_array_equal(self_patched, own)
    (other,) = cmap_predictions(model, tiny(family, seed=1), TOK, examples, [(heads, "output")], progress=False)
    assert other.shape == own.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_the_papers_loop_or_refuses(family, pair):
    _, clean, corrupt = pair
    model, supported = tiny(family), FAMILIES[family][3]
    assert (engine_unsupported(model) is None) == supported and (family in ENGINE_MODEL_TYPES) == supported
    for group, receivers in (("value_fetcher", None), ("pos_transmitter", [(2, 1), (1, 0)])):
        slow = path_patching(model, clean, corrupt, group, receivers, batch_size=6, method="naive", progress=False)
        assert np.isfinite(slow).all() and np.abs(slow).max() > 0
        if supported:
            fast = path_patching(model, clean, corrupt, group, receivers, batch_size=6, progress=False)
            np.testing.assert_allclose(fast, slow, atol=1e-6)
        else:
            with pytest.raises(EngineUnsupportedError, match=f"{model.config.model_type}.*method='naive'"):
                path_patching(model, clean, corrupt, group, receivers, batch_size=6, progress=False)


def test_fused_qkv_is_named_in_the_error():
    cfg = transformers.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, attn_implementation="eager")
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with pytest.raises(TypeError, match=r"phi3 attention has no q_proj, k_proj, v_proj \(it fuses them in qkv_proj\)"):
        attention_layout(model)


def test_mistral_sliding_window_shorter_than_the_prompt_is_refused(pair):
    _, clean, _ = pair
    cfg = transformers.MistralConfig(**COMMON, sliding_window=8, attn_implementation="eager")
    model = transformers.MistralForCausalLM(cfg).eval()
    assert "sliding window of 8" in engine_unsupported(model, clean.input_ids.shape[1])
    assert engine_unsupported(model, 8) is None
