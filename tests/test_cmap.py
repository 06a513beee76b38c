"""Cross-model activation patching: head writes through each model's own o_proj (LoRA kept), input patching, errors."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from entity_circuits.cmap import (GROUP_LETTERS, cmap_accuracy, cmap_patch, cmap_predictions, cmap_table,
                                  head_activations, head_contributions, input_patch, plot_cmap)
from entity_circuits.data import encode, sample_boxes, word_level_tokenizer
from entity_circuits.evaluate import predictions
from entity_circuits.tracing import TraceDict, attention_layout, capture_heads, patch_heads, split_heads, tiny_llama

TOK = word_level_tokenizer()


def _tiny(seed=0, **kw):
    kw = dict(n_layers=2, n_heads=4, head_dim=8, vocab_size=len(TOK)) | kw
    return tiny_llama(seed=seed, **kw)


def _lora(base, seed=1):
    "A peft LoRA (q, k, v, o) on a copy of `base`, unmerged, with random non-zero A and B."
    torch.manual_seed(seed)
    m = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return m.eval()


@pytest.fixture(scope="module")
def models():
    base = _tiny()
    return base, _lora(base)


@pytest.fixture(scope="module")
def batch():
    # mixed box counts: positions differ from prompt to prompt (left padding)
    return encode(sample_boxes(3, 3, seed=0) + sample_boxes(3, 4, seed=1), TOK)


def _attn_out(model, batch, layer):
    "Output of `layer`'s o_proj (the layer's attention output) on `batch`."
    name = attention_layout(model).module(layer, "o")
    with torch.no_grad(), TraceDict(model, [name]) as td:
        model(**batch.model_inputs())
    return td[name].output


def _o_proj(model, layer):
    return model.get_submodule(attention_layout(model).module(layer, "o"))


def test_lora_o_proj_is_nontrivial(models):
    _, lora = models
    o = _o_proj(lora, 1)
    assert o.lora_B["default"].weight.abs().max() > 0 and getattr(o.base_layer, "bias", None) is None


# (a) the source's real head outputs, LoRA o_proj update included
@pytest.mark.parametrize("layer", [0, 1])
def test_patching_every_head_gives_the_source_layer_output(models, batch, layer):
    base, lora = models
    heads = [(layer, h) for h in range(4)]
    with cmap_patch(base, batch, head_contributions(lora, batch, heads, positions=None)):
        patched = _attn_out(base, batch, layer)
    torch.testing.assert_close(patched, _attn_out(lora, batch, layer), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_attn_out(base, batch, layer), _attn_out(lora, batch, layer), atol=1e-3)


def test_full_finetune_source(batch):
    base, other = _tiny(0), _tiny(7)  # every weight differs, as after a full fine-tune
    heads = [(1, h) for h in range(4)]
    with cmap_patch(base, batch, head_contributions(other, batch, heads, positions=None)):
        patched = _attn_out(base, batch, 1)
    torch.testing.assert_close(patched, _attn_out(other, batch, 1), atol=1e-5, rtol=1e-5)


def test_naive_o_proj_input_patch_drops_the_lora_update(models, batch):
    "Pins defect 3: the source's z through the base's o_proj is not the source's head output."
    base, lora = models
    z = capture_heads(lora, batch, "o")[1]                       # [b, T, heads, d]
    with patch_heads(base, {(1, h): z[:, :, h] for h in range(4)}):
        naive = _attn_out(base, batch, 1)
    with torch.no_grad():
        base_wo = _o_proj(base, 1)(z.flatten(-2))                 # exactly what the naive patch computes
    torch.testing.assert_close(naive, base_wo, atol=1e-5, rtol=1e-5)
    target = _attn_out(lora, batch, 1)
    assert (naive - target).norm() > 0.05 * target.norm()


def test_contributions_unmerged_equal_merged(models, batch):
    base, lora = models
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    heads = [(0, 1), (1, 2), (1, 3)]
    a = head_contributions(lora, batch, heads, "query_pos")
    b = head_contributions(merged, batch, heads, "query_pos")
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    assert a.values.shape == (3, len(batch), 32)


def test_contributions_add_up_to_the_layer_output(models, batch):
    _, lora = models
    c = head_contributions(lora, batch, [(1, h) for h in range(4)], positions="last_pos")
    out = _attn_out(lora, batch, 1)[torch.arange(len(batch)), batch.last_pos]
    torch.testing.assert_close(c.values.sum(0), out, atol=1e-5, rtol=1e-5)


def test_patch_only_touches_the_given_positions(models, batch):
    base, lora = models
    clean = _attn_out(base, batch, 0)
    with cmap_patch(base, batch, head_contributions(lora, batch, [(0, 2)], "prev_query_pos")):
        patched = _attn_out(base, batch, 0)
    changed = (patched - clean).abs().amax(-1) > 1e-6              # [b, T]
    expected = torch.zeros_like(changed)
    expected[torch.arange(len(batch)), batch.prev_query_pos] = True
    assert len(set(batch.prev_query_pos.tolist())) > 1 and torch.equal(changed, expected)


# (b) a model patched with itself is unchanged
@pytest.mark.parametrize("kv", [4, 2])
def test_self_patch_is_identity(batch, kv):
    m = _tiny(3, n_kv_heads=kv)
    with torch.no_grad():
        clean = m(**batch.model_inputs()).logits
        heads = [(0, 1), (1, 0), (1, 3)]
        with cmap_patch(m, batch, head_contributions(m, batch, heads, "last_pos"),
                        head_contributions(m, batch, [(0, 2)], "prev_query_pos")):
            out = m(**batch.model_inputs()).logits
        torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)
        with input_patch(m, batch, head_activations(m, batch, [0, 1]), heads, "QKV"):
            out = m(**batch.model_inputs()).logits
        torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)


def test_cmap_predictions_self_equals_predictions(models):
    base, _ = models
    ex = sample_boxes(30, 3, seed=4)
    hbg = {"value_fetcher": [(1, 0), (1, 1)], "pos_transmitter": [(0, 3)], "pos_detector": [(0, 1)],
           "struct_reader": [(0, 0)]}
    own = predictions(base, TOK, ex, 10, progress=False)
    for got in cmap_predictions(base, base, TOK, ex, [(hbg, "output"), (hbg, "QK"), (hbg, "V")], batch_size=10,
                                progress=False):
        assert (got == own).all()


def test_lora_source_changes_predictions(models):
    "Not a no-op: a different source changes the patched base's logits."
    base, lora = models
    b = encode(sample_boxes(8, 3, seed=5), TOK)
    with torch.no_grad():
        clean = base(**b.model_inputs()).logits
        with cmap_patch(base, b, head_contributions(lora, b, [(1, 0), (1, 1)])):
            out = base(**b.model_inputs()).logits
    assert not torch.allclose(out, clean, atol=1e-4)


# input patching
@pytest.mark.parametrize("kv", [4, 2])
def test_qkv_patch_gives_the_source_head_output_at_the_position(batch, kv):
    base, src = _tiny(0, n_kv_heads=kv), _tiny(5, n_kv_heads=kv)
    heads = [(1, h) for h in range(4)]
    acts = head_activations(src, batch, [1])
    z_src = capture_heads(src, batch, "o", layers=[1])[0]
    z_base = capture_heads(base, batch, "o", layers=[1])[0]
    with input_patch(base, batch, acts, heads, "qkv", positions="last_pos"):
        z = capture_heads(base, batch, "o", layers=[1])[0]
    ar = torch.arange(len(batch))
    # query, keys and values all come from the source, so z at the last position is the source's
    torch.testing.assert_close(z[ar, batch.last_pos], z_src[ar, batch.last_pos], atol=1e-5, rtol=1e-5)
    rest = torch.ones(z.shape[:2], dtype=torch.bool)
    rest[ar, batch.last_pos] = False
    torch.testing.assert_close(z[rest], z_base[rest], atol=1e-6, rtol=0)  # restored elsewhere


def test_gqa_kv_patch_reaches_the_shared_group_only(batch):
    base, src = _tiny(0, n_kv_heads=2), _tiny(5, n_kv_heads=2)    # kv head 0 serves query heads 0, 1
    acts = head_activations(src, batch, [0], "kv")
    z_base = capture_heads(base, batch, "o", layers=[0])[0]
    with input_patch(base, batch, acts, [(0, 0)], "K"):
        z = capture_heads(base, batch, "o", layers=[0])[0]
    ar = torch.arange(len(batch))
    diff = (z - z_base).abs().amax(-1)[ar, batch.last_pos]          # [b, heads]
    assert (diff[:, :2] > 1e-4).all() and (diff[:, 2:] < 1e-6).all()
    rest = torch.ones(z.shape[:2], dtype=torch.bool)
    rest[ar, batch.last_pos] = False
    torch.testing.assert_close(z[rest], z_base[rest], atol=1e-6, rtol=0)


def test_q_patch_only_changes_the_query_position(models, batch):
    base, lora = models
    z_base = capture_heads(base, batch, "o", layers=[0])[0]
    with input_patch(base, batch, head_activations(lora, batch, [0], "q"), [(0, 1)], "Q", "prev_query_pos"):
        z = capture_heads(base, batch, "o", layers=[0])[0]
    changed = (z - z_base).abs().amax(-1) > 1e-6                      # [b, T, heads]
    expected = torch.zeros_like(changed)
    expected[torch.arange(len(batch)), batch.prev_query_pos, 1] = True
    assert torch.equal(changed, expected)


def test_lora_on_qkv_is_kept(models, batch):
    _, lora = models
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    a, b = head_activations(lora, batch, [0, 1]), head_activations(merged, batch, [0, 1])
    for key in a.acts:
        torch.testing.assert_close(a.acts[key], b.acts[key], atol=1e-5, rtol=1e-5)


# (c) clear errors
def test_contributions_from_other_prompts(models, batch):
    base, lora = models
    other = encode(sample_boxes(6, 3, seed=9), TOK)
    c = head_contributions(lora, other, [(1, 0)])
    with pytest.raises(ValueError, match="other prompts"):
        with cmap_patch(base, batch, c):
            pass
    with pytest.raises(ValueError, match="other prompts"):
        with input_patch(base, batch, head_activations(lora, other, [1]), [(1, 0)]):
            pass
    with pytest.raises(ValueError, match="other prompts"):
        head_contributions(lora, batch, [(1, 0)], acts=head_activations(lora, other, [1], "o"))


def test_running_on_another_batch_inside_the_patch(models, batch):
    base, lora = models
    other = encode(sample_boxes(2, 3, seed=9), TOK)
    with pytest.raises(ValueError, match="run the model on that batch"):
        with torch.no_grad(), cmap_patch(base, batch, head_contributions(lora, batch, [(1, 0)])):
            base(**other.model_inputs())


def test_unknown_group_and_bad_arguments(models, batch):
    base, lora = models
    ex = sample_boxes(4, 3, seed=0)
    with pytest.raises(ValueError, match="unknown group"):
        cmap_accuracy(base, lora, TOK, ex, {"value fetcher": [(1, 0)]})
    with pytest.raises(ValueError, match="unknown group"):
        cmap_table("organism-base", [], {"A": [(1, 0)]})
    with pytest.raises(ValueError, match="Q, K, V"):
        cmap_accuracy(base, lora, TOK, ex, {"value_fetcher": [(1, 0)]}, patch="QX")
    with pytest.raises(ValueError, match="unknown position"):
        head_contributions(base, batch, [(1, 0)], "answer")
    with pytest.raises(IndexError):
        head_contributions(base, batch, [(2, 0)])
    with pytest.raises(ValueError, match="twice"):
        c = head_contributions(lora, batch, [(1, 0)])
        with cmap_patch(base, batch, c, c):
            pass
    with pytest.raises(ValueError, match="architecture"):
        cmap_accuracy(base, _tiny(0, n_heads=2, head_dim=16), TOK, ex, {"value_fetcher": [(1, 0)]})


def test_o_proj_with_bias_or_in_training_mode(batch):
    # a bias is the layer's, written once: each head's write leaves it out, and patching a model's own writes into
    # it changes nothing (GPT-2's c_proj and GPT-NeoX's dense have one; tests/test_families.py runs them)
    biased = _tiny(0, attention_bias=True)
    heads = [(1, h) for h in range(4)]
    every = head_contributions(biased, batch, heads, None)
    o = _o_proj(biased, 1)
    with torch.no_grad(), TraceDict(biased, [attention_layout(biased).module(1, "o")]) as td:
        biased(**batch.model_inputs())
    torch.testing.assert_close(every.values.sum(0) + o.bias, next(iter(td.values())).output, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = biased(**batch.model_inputs()).logits
        with cmap_patch(biased, batch, head_contributions(biased, batch, heads, "last_pos")):
            torch.testing.assert_close(biased(**batch.model_inputs()).logits, plain, atol=1e-5, rtol=1e-5)
        with cmap_patch(biased, batch, head_contributions(_tiny(1, attention_bias=True), batch, heads, "last_pos")):
            assert not torch.allclose(biased(**batch.model_inputs()).logits, plain)
    lora = _lora(_tiny()).train()
    with pytest.raises(ValueError, match="eval"):
        head_contributions(lora, batch, [(1, 0)])


# the table and the figure, on the shipped organisms
def test_cmap_table_on_organisms():
    hbg = {"struct_reader": [], "pos_transmitter": [(0, 6)], "value_fetcher": [(1, 0), (1, 1)]}
    t = cmap_table("organism-base", ["organism-math-lora"], hbg, n=20, seed=3, patches=("output", "QK"))
    alone = t[t.group == "alone"].set_index("source")
    assert list(alone.index) == ["organism-base", "organism-math-lora"] and (t.n == 20).all() and (t.seed == 3).all()
    patched = t[t.group != "alone"]
    assert sorted(patched.group.unique()) == ["A", "B", "D", "full"] and set(patched.patch) == {"output", "QK"}
    assert patched[patched.group == "D"].accuracy.isna().all() and (patched[patched.group == "D"].heads == 0).all()
    assert (patched[patched.group == "full"].heads == 3).all()
    ok = patched.dropna(subset=["accuracy"])
    assert ((ok.ci_low <= ok.accuracy) & (ok.accuracy <= ok.ci_high)).all()
    np.testing.assert_allclose(ok.delta, ok.accuracy - alone.loc["organism-base", "accuracy"])
    import matplotlib
    matplotlib.use("Agg")
    fig = plot_cmap(t)
    assert len(fig.axes[0].patches) == 4  # one source x groups D (empty: a zero-height bar), B, A, full
    assert set(GROUP_LETTERS.values()) == {"A", "B", "C", "D"}
