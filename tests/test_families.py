"""The toolkit on every model family it is tested on, each a tiny random model of the pinned transformers (Llama,
Mistral, Qwen 2, Qwen 3, Gemma 2, Gemma 3, OLMo 2, Phi-3, GPT-2, GPT-NeoX), plain and with an unmerged peft LoRA on
its attention projections, on left-padded prompts: the layout's q/k/v split agrees with what the attention computes,
head capture round-trips, a head patched with itself changes nothing, attention knockout, CMAP (outputs and q/k/v
inputs) and DCM's mask. (The path-patching engine's family tests live with the engine.)"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy

import pytest
import torch
from torch import nn

from entity_circuits.cmap import cmap_patch, head_activations, head_contributions, input_patch
from entity_circuits.data import encode, make_desiderata, sample_boxes, word_level_tokenizer
from entity_circuits.dcm import encode_pairs, group_data, masked_patch, patched_accuracy, train_mask
from entity_circuits.knockout import block_attention
from entity_circuits.tracing import (TINY_FAMILIES, AttentionLayout, Trace, TraceDict, attention_layout,
                                     capture_heads, merge_heads, patch_heads, tiny_model)

TOK = word_level_tokenizer()
FAMILIES = list(TINY_FAMILIES)
SPLITS = {"phi3": "concat", "gpt2": "concat", "gpt_neox": "interleaved"}
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj"], "gpt2": ["attn.c_attn", "attn.c_proj"],
                "gpt_neox": ["query_key_value", "dense"]}
ATOL = 1e-5


def build(family: str, lora: bool = False, seed: int = 0):
    model = tiny_model(family, n_layers=3, vocab_size=len(TOK), seed=seed)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model
    targets = LORA_TARGETS.get(family, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        cfg = LoraConfig(r=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=family == "gpt2")
        return get_peft_model(model, cfg).eval()


@pytest.fixture(scope="module")
def batch():
    "Left-padded prompts of 3 and 5 boxes, so that padding really occurs."
    b = encode(sample_boxes(3, 3, seed=3) + sample_boxes(3, 5, seed=4), TOK)
    assert (b.attention_mask[:, 0] == 0).any() and (b.attention_mask[:, -1] == 1).all()
    return b


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "lora"])
def lora(request):
    return request.param


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def _maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_layout(family, lora):
    model = build(family, lora)
    lay = attention_layout(model)
    gqa = TINY_FAMILIES[family][2]
    assert (lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.head_dim) == (3, 4, 2 if gqa else 4, 16)
    assert lay.qkv_split == SPLITS.get(family, "separate") and lay.family == family
    for kind in ("o", "q", "k", "v", "attn", "mlp", "block"):
        assert isinstance(model.get_submodule(lay.module(2, kind)), nn.Module)
    assert isinstance(model.get_submodule(lay.final_norm), nn.Module)
    if lora:
        assert any("lora_A" in n for n, _ in model.get_submodule(lay.module(0, "o")).named_parameters())


def _moved(model, lay, batch, layer, kind, head, pos):
    "Zero `kind` of `head` (a kv head for k, v) at `pos` (None: everywhere); which (position, query head) outputs moved."
    def zero(out):
        out = out.clone()
        view = lay.heads(out, kind)
        view[:, slice(None) if pos is None else pos, head] = 0
        return out
    clean = capture_heads(model, batch, "o", layers=[layer])[0]
    with Trace(model, lay.module(layer, kind), edit_output=zero, retain_output=False):
        edited = capture_heads(model, batch, "o", layers=[layer])[0]
    return (edited - clean).abs().amax(dim=(0, 3)) > 1e-6          # [T, heads]


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_split_is_the_attentions_own(family, batch):
    """Zeroing one head's slice of q, k or v through `AttentionLayout.heads` moves exactly the outputs that slice
    feeds in the model's own attention: a value head its query heads, a query at one position that position only,
    a key at one position that position and the later ones."""
    model = build(family)
    lay = attention_layout(model)
    T, g = batch.input_ids.shape[1], lay.group_size
    mine = torch.zeros(lay.n_heads, dtype=torch.bool)
    mine[g:2 * g] = True                                        # the query heads of key/value head 1
    v = _moved(model, lay, batch, 1, "v", 1, None)
    assert v[:, mine].any() and not v[:, ~mine].any()
    full_norm = family == "olmo2"                               # OLMo 2 normalises q and k over all heads at once
    q = _moved(model, lay, batch, 1, "q", 1, T - 2)
    assert q[T - 2, 1] and not q[torch.arange(T) != T - 2].any()
    assert full_norm or not q[:, torch.arange(lay.n_heads) != 1].any()
    k = _moved(model, lay, batch, 1, "k", 1, T - 2)
    assert k[T - 2:, mine].all() and not k[:T - 2].any()
    assert full_norm or not k[:, ~mine].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_round_trip_and_self_patch(family, batch, lora):
    model = build(family, lora)
    lay = attention_layout(model)
    names = [lay.module(l, "o") for l in range(lay.n_layers)]
    with torch.no_grad(), TraceDict(model, names, retain_input=True, retain_output=False) as td:
        model(**batch.model_inputs())
    z = capture_heads(model, batch, "o")
    assert z.shape == (3, *batch.input_ids.shape, 4, 16)
    for l, name in enumerate(names):                            # re-assembled heads are the output projection's input
        assert torch.equal(merge_heads(z[l]), td[name].input)
    for kind in "qkv":                                          # q/k/v heads are the projection's output, split
        with torch.no_grad(), Trace(model, lay.module(1, kind)) as tr:
            model(**batch.model_inputs())
        raw = capture_heads(model, batch, kind, layers=[1], expand_kv=False)[0]
        assert torch.equal(raw, lay.heads(tr.output, kind))
    plain = _logits(model, batch)
    every = {(l, h): z[l, :, :, h] for l in range(3) for h in range(4)}
    with patch_heads(model, every):
        assert _maxdiff(_logits(model, batch), plain) < ATOL
    with patch_heads(model, {(1, 2): 0.0}, positions=batch.last_pos):
        assert _maxdiff(_logits(model, batch), plain) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout(family, batch, lora):
    model = build(family, lora)
    plain = _logits(model, batch)
    with block_attention(model, []):
        assert torch.equal(_logits(model, batch), plain)        # nothing blocked, nothing changed
    edge = (batch.last_pos, batch.object_pos[:, 0])
    with block_attention(model, edge, [1, 2]):
        blocked = _logits(model, batch)
    rows = torch.arange(len(batch))
    assert _maxdiff(blocked[rows, batch.last_pos], plain[rows, batch.last_pos]) > 1e-4
    real = batch.attention_mask.bool()                          # every real token but the last is untouched
    real[rows, batch.last_pos] = False
    assert _maxdiff(blocked[real], plain[real]) < ATOL


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3", "gemma3_text", "qwen3"])   # Gemma 2: eager only
def test_knockout_under_sdpa_equals_eager(family, batch):
    "The mask is edited in sdpa's form too: the same blocked logits as under eager attention."
    out = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(family, n_layers=3, vocab_size=len(TOK), attn_implementation=impl)
        with block_attention(model, (batch.last_pos, batch.object_pos[:, 0]), [1, 2]):
            out[impl] = _logits(model, batch)
    rows = torch.arange(len(batch))
    assert _maxdiff(out["eager"][rows, batch.last_pos], out["sdpa"][rows, batch.last_pos]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_cmap_outputs_and_inputs(family, batch, lora):
    model = build(family, lora)
    lay = attention_layout(model)
    heads = [(1, 0), (1, 3), (2, 1)]
    plain = _logits(model, batch)
    own = head_activations(model, batch, [1, 2])
    with input_patch(model, batch, own, heads, "qkv", "last_pos"):   # its own q/k/v: nothing changes
        assert _maxdiff(_logits(model, batch), plain) < ATOL
    for kinds in ("q", "kv"):
        with input_patch(model, batch, own, heads, kinds, None):
            assert _maxdiff(_logits(model, batch), plain) < ATOL
    with cmap_patch(model, batch, head_contributions(model, batch, heads, "last_pos", acts=own)):
        assert _maxdiff(_logits(model, batch), plain) < ATOL
    # the heads' writes (a bias, as in GPT-2 and GPT-NeoX, left out) plus the bias are the layer's output
    every = head_contributions(model, batch, [(1, h) for h in range(4)], None, acts=own)
    with torch.no_grad(), Trace(model, lay.module(1, "o")) as tr:
        model(**batch.model_inputs())
    o = model.get_submodule(lay.module(1, "o"))
    bias = o.forward(torch.zeros(1, 64)) if family in ("gpt2", "gpt_neox") else 0
    assert _maxdiff(every.values.sum(0) + bias, tr.output) < ATOL
    other = build(family, lora, seed=1)
    src = head_activations(other, batch, [1, 2])
    with input_patch(model, batch, src, heads, "qkv", "last_pos"):
        assert _maxdiff(_logits(model, batch), plain) > 1e-4
    # a layer's heads QKV-patched compute the source's outputs (the whole layer: OLMo 2 normalises q and k over all
    # heads at once, so there one head's query depends on the others')
    with input_patch(model, batch, src, [(1, h) for h in range(4)], "qkv", "last_pos"):
        z = capture_heads(model, batch, "o", layers=[1], positions=batch.last_pos)[0]
    z_src = capture_heads(other, batch, "o", layers=[1], positions=batch.last_pos)[0]
    assert _maxdiff(z, z_src) < ATOL
    with cmap_patch(model, batch, head_contributions(other, batch, heads, "last_pos", acts=src)):
        assert _maxdiff(_logits(model, batch), plain) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_dcm_mask(family, lora):
    model = build(family, lora)
    pairs = make_desiderata(16, 3, seed=5)
    heads = [(1, 0), (2, 1), (2, 3)]
    data = group_data(model, encode_pairs(pairs, TOK), heads, "value_fetcher")["object"]
    with torch.no_grad():
        plain = model(**data.inputs).logits
        with masked_patch(model, heads, data.source, data.positions, torch.ones(3)):
            assert _maxdiff(model(**data.inputs).logits, plain) < ATOL
        with masked_patch(model, heads, data.source, data.positions):
            assert _maxdiff(model(**data.inputs).logits, plain) > 1e-4
    before = [p.detach().clone() for p in model.parameters()]
    mask, history = train_mask(model, heads, data.rows(slice(0, 12)), data.rows(slice(12, 16)), epochs=1,
                               batch_size=6, eval_every=1, progress=False)
    assert mask.shape == (3,) and set(mask.tolist()) <= {0.0, 1.0} and len(history)
    soft = torch.full((3,), 0.5, requires_grad=True)             # the mask's gradient comes through the model
    with masked_patch(model, heads, data.source, data.positions, soft):
        model(**data.inputs).logits[torch.arange(data.n), data.last, data.targets].sum().backward()
    assert soft.grad.abs().min() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # only the mask learned
    assert 0 <= patched_accuracy(model, heads, data, mask) <= 1


def test_unreadable_models_get_one_clear_error():
    with pytest.raises(TypeError, match=r"expected a ModuleList of decoder blocks, each with an attention module "
                                        r"\(self_attn, attn, attention\)"):
        attention_layout(nn.Sequential(nn.Linear(2, 2)))
    model = tiny_model("phi3")
    model.config.model_type = "falcon"                          # a fused projection whose split is not known
    with pytest.raises(TypeError, match="falcon attention fuses q, k, v in qkv_proj, whose split entity_circuits "
                                        "knows only for phi3"):
        attention_layout(model)
    gpt2 = tiny_model("gpt2")
    for block in gpt2.transformer.h:
        del block.attn.c_proj
    with pytest.raises(TypeError, match=r"gpt2 attention transformer\.h\.0\.attn \(GPT2Attention, children: c_attn, "
                                        r"attn_dropout, resid_dropout\) has no output projection"):
        attention_layout(gpt2)


def test_lora_merged_and_unmerged_agree_on_a_fused_family(batch):
    model = build("gpt_neox", lora=True)
    merged = copy.deepcopy(model).merge_and_unload()
    assert attention_layout(merged).prefix == "gpt_neox.layers"
    for kind in "oqkv":
        torch.testing.assert_close(capture_heads(model, batch, kind), capture_heads(merged, batch, kind),
                                   rtol=1e-4, atol=1e-5)


def test_layout_fields_keep_their_defaults():
    "A layout built by hand as before (five fields) is a Llama one."
    lay = AttentionLayout("model.layers", 2, 4, 2, 8)
    assert (lay.attn, lay.o, lay.q, lay.qkv_split, lay.fused) == ("self_attn", "o_proj", "q_proj", "separate", False)
