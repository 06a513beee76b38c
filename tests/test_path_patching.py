"Path patching: the engine equals the paper's loop; the circuit type round-trips the authors' files; clear errors."
import json

import numpy as np
import pytest
import torch

from entity_circuits.circuit import ablated_predictions, evaluate_circuit, head_means, random_circuits
from entity_circuits.data import corrupt_for_path_patching, encode, sample_boxes
from entity_circuits.models import load_model
from entity_circuits.path_patching import (ENGINE_MODEL_TYPES, GROUPS, Circuit, EngineUnsupportedError,
                                           attribution_patching, choose_k, engine_unsupported, paper_asset,
                                           paper_circuit, path_patching, top_heads)
from entity_circuits.tracing import TINY_FAMILIES, patch_heads, tiny_llama, tiny_model


@pytest.fixture(scope="module")
def tok():
    return load_model("organism-base")[1]


@pytest.fixture(scope="module")
def pair(tok):
    ex = sample_boxes(6, 4, seed=3)
    return encode(ex, tok), encode(corrupt_for_path_patching(ex, seed=4), tok)


RECEIVERS = {"value_fetcher": None, "pos_transmitter": [(2, 1), (1, 0)], "pos_detector": [(1, 2)],
             "struct_reader": [(1, 1), (2, 3)]}


@pytest.mark.parametrize("kv", [4, 1])
@pytest.mark.parametrize("group", GROUPS)
def test_engine_equals_naive(tok, pair, group, kv):
    model = tiny_llama(n_layers=3, n_heads=4, n_kv_heads=kv, head_dim=8, vocab_size=len(tok), seed=kv).eval()
    clean, corrupt = pair
    fast = path_patching(model, clean, corrupt, group, RECEIVERS[group], batch_size=4, progress=False)
    slow = path_patching(model, clean, corrupt, group, RECEIVERS[group], batch_size=4, method="naive", progress=False)
    assert np.abs(slow).max() > 0
    np.testing.assert_allclose(fast, slow, atol=1e-6)


def test_engine_on_unmerged_lora_equals_naive(tok, pair):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(n_layers=2, n_heads=4, vocab_size=len(tok), seed=1),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)).eval()
    clean, corrupt = pair
    for g, r in (("value_fetcher", None), ("pos_transmitter", [(1, 0), (1, 2)])):
        fast = path_patching(model, clean, corrupt, g, r, progress=False)
        slow = path_patching(model, clean, corrupt, g, r, method="naive", progress=False)
        np.testing.assert_allclose(fast, slow, atol=1e-6)


# ---------------------------------------------------------------------------------------------- every family
FAMILY_RECEIVERS = {"value_fetcher": None, "pos_transmitter": [(3, 1), (2, 0)], "pos_detector": [(2, 2), (1, 3)],
                    "struct_reader": [(1, 0), (2, 1), (3, 3)]}
WINDOWED = {"mistral", "gemma2", "gemma3_text", "qwen2"}   # given a sliding window (8) shorter than the prompts


@pytest.fixture(scope="module")
def word_tok():
    from entity_circuits.data import word_level_tokenizer
    return word_level_tokenizer()


@pytest.fixture(scope="module")
def padded_pair(word_tok):
    "Prompts of two lengths, left-padded, and their corrupt counterparts (same token layout)."
    a, b = sample_boxes(4, 4, seed=3), sample_boxes(3, 2, seed=5)
    clean = encode(a + b, word_tok)
    corrupt = encode(corrupt_for_path_patching(a, seed=4) + corrupt_for_path_patching(b, seed=6), word_tok)
    assert (clean.attention_mask == 0).any()
    return clean, corrupt


def family_model(family, vocab_size, seed=0):
    extra = {"sliding_window": 8} if family in WINDOWED else {}
    if family == "qwen2":
        extra |= {"use_sliding_window": True, "max_window_layers": 1}   # layers 1-3 windowed
    if family == "gemma2":
        extra |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    return tiny_model(family, n_layers=4, vocab_size=vocab_size, seed=seed, **extra)


def test_every_tiny_family_is_checked():
    assert set(ENGINE_MODEL_TYPES) <= set(TINY_FAMILIES)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2"} <= set(ENGINE_MODEL_TYPES)


@pytest.mark.parametrize("family", ENGINE_MODEL_TYPES)
def test_engine_equals_the_papers_loop_on_every_family(family, word_tok, padded_pair):
    "All four groups, left padding, grouped-query attention where the family has it, sliding windows, soft-capping."
    clean, corrupt = padded_pair
    model = family_model(family, len(word_tok))
    assert model.config.model_type == family and engine_unsupported(model) is None
    for group, receivers in FAMILY_RECEIVERS.items():
        slow = path_patching(model, clean, corrupt, group, receivers, batch_size=4, method="naive", progress=False)
        fast = path_patching(model, clean, corrupt, group, receivers, batch_size=4, progress=False)
        assert np.isfinite(slow).all() and np.abs(slow).max() > 0, group
        assert np.abs(fast - slow).max() < 1e-5, (group, np.abs(fast - slow).max())


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "gpt2"])
def test_engine_on_unmerged_lora_equals_the_papers_loop_on_other_families(family, word_tok, padded_pair):
    from peft import LoraConfig, get_peft_model
    targets = {"gemma2": ["q_proj", "v_proj", "o_proj", "up_proj"], "qwen3": ["q_proj", "v_proj", "o_proj"],
               "gpt2": ["c_attn", "c_proj", "c_fc"]}[family]
    torch.manual_seed(0)
    model = get_peft_model(family_model(family, len(word_tok)),
                           LoraConfig(r=2, target_modules=targets, init_lora_weights=False,
                                      fan_in_fan_out=family == "gpt2")).eval()
    clean, corrupt = padded_pair
    for group, receivers in FAMILY_RECEIVERS.items():
        slow = path_patching(model, clean, corrupt, group, receivers, batch_size=7, method="naive", progress=False)
        fast = path_patching(model, clean, corrupt, group, receivers, batch_size=7, progress=False)
        assert np.abs(slow).max() > 0 and np.abs(fast - slow).max() < 1e-5, group


def test_engine_refuses_what_it_cannot_run(word_tok, padded_pair):
    "Layers that mix positions outside attention are refused up front; an attention that ignores the cache, at run time."
    clean, corrupt = padded_pair
    model = family_model("llama", len(word_tok))
    model.config.layer_types = ["full_attention", "linear_attention"] * 2
    assert "linear_attention" in engine_unsupported(model)
    with pytest.raises(EngineUnsupportedError, match="method='naive'"):
        path_patching(model, clean, corrupt, "value_fetcher", progress=False)
    model.config.layer_types = None
    attn = model.model.layers[3].self_attn
    forward = attn.forward
    attn.forward = lambda *a, past_key_values=None, attention_mask=None, **k: forward(   # ignores the cache
        *a, past_key_values=None, attention_mask=None, **k)
    with pytest.raises(EngineUnsupportedError, match="cache of keys and values"):
        path_patching(model, clean, corrupt, "pos_transmitter", [(3, 1)], progress=False)


def test_clean_as_corrupt_scores_zero(tok, pair):
    model = tiny_llama(n_layers=3, n_heads=4, vocab_size=len(tok)).eval()
    clean, _ = pair
    assert np.abs(path_patching(model, clean, clean, "pos_detector", [(2, 0)], progress=False)).max() < 1e-6
    assert np.abs(attribution_patching(model, clean, clean)).max() < 1e-6


def test_errors(tok, pair):
    model = tiny_llama(n_layers=2, n_heads=4, vocab_size=len(tok)).eval()
    clean, corrupt = pair
    with pytest.raises(ValueError, match="receivers"):
        path_patching(model, clean, corrupt, "pos_transmitter", None)
    with pytest.raises(ValueError, match="unknown group"):
        path_patching(model, clean, corrupt, "value_fetchers")
    with pytest.raises(IndexError, match="layer 5"):
        path_patching(model, clean, corrupt, "pos_transmitter", [(5, 0)])
    other = encode(sample_boxes(6, 3, seed=0), tok)
    with pytest.raises(ValueError, match="token layout"):
        path_patching(model, clean, other, "value_fetcher")


def test_paper_circuits_round_trip(tmp_path):
    for name in ("llama", "goat", "float"):
        c = paper_circuit(name)
        assert c.to_dict() == json.loads(paper_asset(f"{name}_circuit.json").read_text())
        c.save(tmp_path / "c.json")
        assert Circuit.load(tmp_path / "c.json") == c
    assert paper_circuit("llama").sizes() == {"value_fetcher": 40, "pos_transmitter": 7, "pos_detector": 20,
                                              "struct_reader": 5}
    with pytest.raises(ValueError, match="unknown circuit groups"):
        Circuit.from_dict({"value_fetcher": [], "name_mover": []})
    with pytest.raises(ValueError, match="pair of ints"):
        Circuit(value_fetcher=[(1, 2, 3)])


def test_choose_k_and_top_heads():
    s = np.array([[0.0, -1.0, -0.05], [-0.2, 0.3, -0.09]])
    assert choose_k(s) == 2 and top_heads(s, 2) == [(0, 1), (1, 0)]
    assert choose_k(np.zeros((2, 2))) == 0


def test_random_circuits_without_replacement():
    c = Circuit(value_fetcher=[(0, 0), (0, 1), (1, 1)], pos_transmitter=[(1, 2)])
    for r in random_circuits(c, 2, 4, n=20, seed=1):
        assert r.sizes() == c.sizes() and len(r.heads()) == 4


def test_mean_ablation_of_nothing_is_identity(tok):
    model = tiny_llama(n_layers=2, n_heads=4, vocab_size=len(tok)).eval()
    means = head_means(model, tok, n=20, n_boxes=3)
    ex = sample_boxes(10, 3, seed=5)
    b = encode(ex, tok)
    with patch_heads(model, {}):
        ref = model(**b.model_inputs()).logits[torch.arange(10), b.last_pos].argmax(-1) == b.answer_ids
    assert (ablated_predictions(model, tok, ex, means) == ref.numpy()).all()
    with pytest.raises(ValueError, match="same number of boxes"):
        ablated_predictions(model, tok, sample_boxes(3, 4, seed=0), means)


def test_faithfulness_of_every_head_is_one_and_of_no_head_near_zero(tok):
    "The two ends of `evaluate_circuit` on the base organism: every head kept (context kept) is the model; none is not."
    model = load_model("organism-base")[0]
    ex = sample_boxes(100, 7, seed=11)
    means = {"base": head_means(model, tok, n=100)}
    cfg = model.config
    every = Circuit(value_fetcher=[(l, h) for l in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)])
    t = evaluate_circuit({"base": (model, tok)}, every, ex, means, n_random=0, contexts=("keep",),
                         progress=False).set_index("metric").value
    assert t["full"] > 0.3 and t["circuit"] == t["full"] and t["faithfulness"] == 1.0
    e = evaluate_circuit({"base": (model, tok)}, Circuit(), ex, means, n_random=0,
                         progress=False).set_index(["context", "metric"]).value
    assert e["ablate", "circuit"] <= 0.05 and e["keep", "circuit"] <= 0.05
    assert e["ablate", "faithfulness"] < 0.1 and e["keep", "faithfulness"] < 0.1
