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
from entity_circuits.tracing import TraceDict, attention_layout, capture_heads, split_heads, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return load_model("organism-base")[1]


@pytest.fixture(scope="module")
def batch(tok):
    # prompts of different lengths, left-padded: the key mask matters
    return encode(sample_boxes(3, 4, seed=1) + sample_boxes(3, 2, seed=2), tok)


@pytest.mark.parametrize("kv", [4, 2])
def test_rope_and_attend_reproduce_the_models_own_attention(tok, batch, kv):
    "q, k, v from the projections, `apply_rope` with the cache's tables and `_attend` give the o_proj input, per head."
    model = tiny_llama(n_layers=2, n_heads=4, n_kv_heads=kv, head_dim=8, vocab_size=len(tok), seed=kv).eval()
    lay = attention_layout(model)
    cache = pp._clean_cache(model, batch)
    want = capture_heads(model, batch, "o")                         # [L, b, T, H, d]
    names = [lay.module(l, k) for l in range(lay.n_layers) for k in "qkv"]
    with torch.no_grad(), TraceDict(model, names) as td:
        model(**batch.model_inputs())
    T = batch.input_ids.shape[1]
    for l in range(lay.n_layers):
        attn = pp.model_parts(model)[1][l].self_attn
        q, k, v = (split_heads(td[lay.module(l, x)].output, n) for x, n in
                   (("q", lay.n_heads), ("k", lay.n_kv_heads), ("v", lay.n_kv_heads)))
        q, k = pp.apply_rope(q, cache.cos, cache.sin), pp.apply_rope(k, cache.cos, cache.sin)
        z = pp._attend(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lay.group_size,
                       torch.arange(T), batch.attention_mask)
        real = batch.attention_mask.bool()                          # padded query rows are not compared
        torch.testing.assert_close(z[real], want[l][real], atol=1e-5, rtol=1e-5)


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
