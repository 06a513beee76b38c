"""The path-patching engine's private helpers, each against an independent computation, and the circuit chapter's
small functions (prune, overlap, minimality with a planted backup head) on hand-built inputs."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

from entity_circuits import path_patching as pp
from entity_circuits.circuit import minimality, overlap, prune
from entity_circuits.data import corrupt_for_path_patching, encode, sample_boxes
from entity_circuits.models import load_model
from entity_circuits.path_patching import GROUPS, Circuit
from entity_circuits.tracing import attention_layout, capture_heads, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return load_model("organism-base")[1]


@pytest.fixture(scope="module")
def batch(tok):
    # prompts of different lengths, left-padded: the key mask matters
    return encode(sample_boxes(3, 4, seed=1) + sample_boxes(3, 2, seed=2), tok)


@pytest.mark.parametrize("kv", [4, 2])
def test_clean_cache_holds_the_models_own_keys_and_values(tok, batch, kv):
    "The cache's keys are the k projections rotated by RoPE (`apply_rope`), its values the v projections, per layer."
    model = tiny_llama(n_layers=2, n_heads=4, n_kv_heads=kv, head_dim=8, vocab_size=len(tok), seed=kv).eval()
    lay = attention_layout(model)
    cache = pp._clean_cache(model, batch)
    k = capture_heads(model, batch.model_inputs(), "k", expand_kv=False)            # [L, b, T, kv, d], before RoPE
    v = capture_heads(model, batch.model_inputs(), "v", expand_kv=False)
    cos, sin = pp.model_parts(model).rotary(k[0], batch.position_ids)
    for l in range(lay.n_layers):
        torch.testing.assert_close(cache.values[l], v[l].transpose(1, 2))
        torch.testing.assert_close(cache.keys[l], pp.apply_rope(k[l], cos, sin).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.z[1], capture_heads(model, batch.model_inputs(), "o")[1].flatten(-2))


def test_start_at_puts_the_layers_back_even_after_an_error(tok, batch):
    model = tiny_llama(n_layers=3, n_heads=4, vocab_size=len(tok)).eval()
    layers = list(model.model.layers)
    with pytest.raises(RuntimeError, match="boom"), pp._start_at(model.model.layers, 2, torch.zeros(1)):
        assert isinstance(model.model.layers[1], pp._Known) and model.model.layers[2] is layers[2]
        raise RuntimeError("boom")
    assert list(model.model.layers) == layers


def test_prefix_cache_repeats_without_growing(tok, batch):
    model = tiny_llama(n_layers=2, n_heads=4, vocab_size=len(tok)).eval()
    cache = pp._clean_cache(model, batch)
    past = pp._prefix_cache(cache, 5, repeats=3)
    _, n_kv, _, d = cache.keys[1].shape
    k_new = torch.randn(3 * len(batch), n_kv, 2, d)
    k, v = past.layers[1].update(k_new, k_new)
    assert k.shape == (3 * len(batch), n_kv, 7, d) and torch.equal(k[2 * len(batch):, :, :5], cache.keys[1][:, :, :5])
    assert torch.equal(k[:, :, 5:], k_new) and past.get_seq_length() == 5 and past.layers[1].used
    assert not past.layers[0].used


def test_answer_prob_is_the_softmax_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = pp._answer_prob(logits, torch.tensor([0, 2]))
    torch.testing.assert_close(p, torch.tensor([logits[0].softmax(-1)[0].item(), 1 / 3]))


def test_chunks_cover_the_batch_in_order(batch):
    parts = list(pp._chunks(batch, 4))
    assert [len(c) for c in parts] == [4, 2]
    assert torch.equal(torch.cat([c.input_ids for c in parts]), batch.input_ids)
    assert torch.equal(torch.cat([c.last_pos for c in parts]), batch.last_pos)


def test_check_pair_refuses_different_layouts(tok):
    ex = sample_boxes(2, 4, seed=0)
    clean = encode(ex, tok)
    pp._check_pair(clean, encode(corrupt_for_path_patching(ex, seed=1), tok))   # same layout: fine
    with pytest.raises(ValueError, match="same token layout"):
        pp._check_pair(clean, encode(sample_boxes(2, 3, seed=0), tok))


def test_receivers_by_layer_keeps_only_heads_above_the_sender():
    got = pp._receivers_by_layer([(2, 1), (1, 0), (2, 0), (0, 3), (2, 1)], sender_layer=0)
    assert got == {1: [0], 2: [0, 1]}
    assert pp._receivers_by_layer([(1, 0)], sender_layer=1) == {}


def test_prune_keeps_heads_at_or_above_the_threshold():
    circuit = Circuit(value_fetcher=[(2, 0), (2, 1), (2, 2)], pos_transmitter=[(0, 7)])
    scores = {"value_fetcher": pd.DataFrame({"head": [(2, 0), (2, 1), (2, 2)], "relative drop": [0.5, 0.009, 0.01]})}
    pruned = prune(circuit, scores, threshold=0.01)
    assert list(pruned["value_fetcher"]) == [(2, 0), (2, 2)]          # 0.009 < 0.01 goes, exactly 0.01 stays
    assert list(pruned["pos_transmitter"]) == [(0, 7)]                  # a group without scores is kept whole


def test_overlap_is_precision_and_recall():
    mine = Circuit(value_fetcher=[(2, 0), (2, 1)], pos_transmitter=[(0, 7)])
    ref = Circuit(value_fetcher=[(2, 0), (2, 5), (2, 6), (2, 7)], pos_transmitter=[(0, 7)])
    t = overlap(mine, ref)
    assert t.loc["value_fetcher", "precision"] == 0.5 and t.loc["value_fetcher", "recall"] == 0.25
    assert t.loc["pos_transmitter", "precision"] == 1.0 and t.loc["all", "recall"] == 2 / 5
    assert np.isnan(t.loc["pos_detector", "precision"])             # an empty group has no precision


def test_minimality_finds_a_backup_head(monkeypatch):
    """A planted backup: heads a and b each suffice alone, so removing a alone costs nothing; minimality must grow
    K = {b} and then see a's full effect. Head c never matters."""
    a, b, c = (2, 0), (2, 1), (2, 2)
    circuit = Circuit(value_fetcher=[a, b, c])

    def fake_accuracy(model, tokenizer, heads, examples, means, context="keep"):
        return 0.8 if (a in heads or b in heads) else 0.1

    monkeypatch.setattr("entity_circuits.circuit.circuit_accuracy", fake_accuracy)
    t = minimality(None, None, circuit, "value_fetcher", [], None, max_k=2).set_index("head")
    assert t.loc[[a], "relative drop"].item() == pytest.approx((0.8 - 0.1) / 0.8)
    assert t.loc[[a], "K"].item() == [b]
    assert t.loc[[c], "relative drop"].item() == 0.0
    # with K limited to nothing, the backup hides a's effect
    t0 = minimality(None, None, circuit, "value_fetcher", [], None, max_k=0).set_index("head")
    assert t0.loc[[a], "relative drop"].item() == 0.0
