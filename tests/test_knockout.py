"""Attention knockout: the mask edit blocks exactly the requested edges, in the requested layers only, for eager and
sdpa attention, GQA and unmerged LoRA; the paper's edges point at the right tokens; the curves and paper data."""
import json

import numpy as np
import pytest
import torch

from entity_circuits.data import encode, sample_boxes
from entity_circuits.evaluate import TEST_SEED, predictions
from entity_circuits.knockout import (EDGES, block_attention, edge_positions, knockout_curves, paper_knockout,
                                      plot_knockout, random_earlier)
from entity_circuits.models import load_model
from entity_circuits.path_patching import paper_asset
from entity_circuits.tracing import tiny_llama


def _inputs(padded: bool = True):
    ids = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    if not padded:
        return dict(input_ids=ids)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


Q, K = torch.tensor([11, 11, 7]), torch.tensor([2, 5, 1])
ROWS = torch.arange(3)


@pytest.fixture(scope="module")
def base():
    return load_model("organism-base")


@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("blocked", [[0], [1], [0, 1]])
def test_blocked_weights_are_zero_in_blocked_layers_only(n_kv, blocked):
    model = tiny_llama(n_layers=2, n_heads=4, n_kv_heads=n_kv, attn_implementation="eager")
    with torch.no_grad():
        before = model(**_inputs(), output_attentions=True).attentions
        with block_attention(model, (Q, K), layers=blocked):
            after = model(**_inputs(), output_attentions=True).attentions
    for layer in range(2):
        a0, a1 = before[layer], after[layer]
        assert (a0[ROWS, :, Q, K] > 0).all()
        if layer in blocked:
            assert (a1[ROWS, :, Q, K] == 0).all()                    # every head, every prompt
            old = a0[ROWS, :, Q].clone()
            old[ROWS, :, K] = 0
            if layer == min(blocked):                                # its inputs are unchanged: exact renormalisation
                torch.testing.assert_close(a1[ROWS, :, Q], old / old.sum(-1, keepdim=True))
        else:
            assert (a1[ROWS, :, Q, K] > 0).all()
        if layer < min(blocked):
            assert torch.equal(a0, a1)                               # layers before the first blocked one: untouched
        if layer == min(blocked):
            other = torch.ones(a0.shape, dtype=torch.bool)
            other[ROWS, :, Q] = False
            assert torch.equal(a0[other], a1[other])                 # other query rows of that layer: unchanged


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_blocking_nothing_is_the_identity(impl):
    model = tiny_llama(n_heads=4, n_kv_heads=2, attn_implementation=impl)
    with torch.no_grad():
        ref = model(**_inputs()).logits
        with block_attention(model, (Q, K), layers=[]):
            assert torch.equal(model(**_inputs()).logits, ref)
        with block_attention(model, [], layers=[0, 1]):
            assert torch.equal(model(**_inputs()).logits, ref)
        with block_attention(model, (Q, K)):
            assert not torch.allclose(model(**_inputs()).logits, ref, atol=1e-4)
        assert torch.equal(model(**_inputs()).logits, ref)          # hooks removed on exit


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_sdpa_equals_eager(padded, n_kv):
    eager = tiny_llama(n_heads=4, n_kv_heads=n_kv, attn_implementation="eager")
    sdpa = tiny_llama(n_heads=4, n_kv_heads=n_kv, attn_implementation="sdpa")
    inputs = _inputs(padded)
    real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    edges = [(Q, K), (torch.tensor(9), torch.tensor(4))]             # a list of pairs; ints apply to every prompt
    with torch.no_grad(), block_attention(eager, edges, layers=[1]):
        ref = eager(**inputs).logits[real]
    with torch.no_grad(), block_attention(sdpa, edges, layers=[1]):
        got = sdpa(**inputs).logits[real]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_an_error():
    model = tiny_llama()
    with torch.no_grad():
        ref = model(**_inputs()).logits
        with pytest.raises(RuntimeError, match="inside"):
            with block_attention(model, (Q, K)):
                raise RuntimeError("inside")
        assert torch.equal(model(**_inputs()).logits, ref)


def test_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="earlier position"):
        with block_attention(model, (torch.tensor([3, 3, 3]), torch.tensor([1, 3, 2]))):
            pass
    with pytest.raises(ValueError, match="one query and one key"):
        with block_attention(model, (torch.tensor([3, 4]), torch.tensor([1, 2, 0]))):
            pass
    with pytest.raises(ValueError, match="batch has 3"):
        with torch.no_grad(), block_attention(model, (torch.tensor([5, 5]), torch.tensor([1, 2]))):
            model(**_inputs())
    with pytest.raises(IndexError, match="layer 2"):
        with block_attention(model, (Q, K), layers=[2]):
            pass
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        with block_attention(model, (Q, K)):
            pass


def test_kv_cache_is_refused():
    model = tiny_llama()
    ids = torch.randint(4, 64, (1, 6))
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="full forward pass"):
            with block_attention(model, (torch.tensor([3]), torch.tensor([1]))):
                model(input_ids=ids[:, :1], past_key_values=past, use_cache=True)


def test_unmerged_lora_equals_merged():
    lora, tok = load_model("organism-math-lora")
    merged, _ = load_model("organism-math-lora", merge_lora=True)
    b = encode(sample_boxes(20, 7, seed=3), tok)
    rows = torch.arange(len(b))
    edges = (b.last_pos, b.object_pos[rows, b.query_index])
    with torch.no_grad():
        plain = lora(**b.model_inputs()).logits
        with block_attention(lora, edges):
            got = lora(**b.model_inputs()).logits
        with block_attention(merged, edges):
            ref = merged(**b.model_inputs()).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_object_edge_changes_predictions_on_the_base_organism(base):
    model, tok = base
    b = encode(sample_boxes(500, 7, seed=TEST_SEED), tok)
    rows = torch.arange(len(b))
    edges = (b.last_pos, b.object_pos[rows, b.query_index])
    with torch.no_grad():
        ref = model(**b.model_inputs()).logits[rows, b.last_pos]
        with block_attention(model, edges, layers=[0, 1]):
            every = model(**b.model_inputs()).logits[rows, b.last_pos]
        with block_attention(model, edges, layers=[]):
            none = model(**b.model_inputs()).logits[rows, b.last_pos]
    assert torch.equal(none, ref)
    assert (every.argmax(-1) != ref.argmax(-1)).any()               # some top-1 predictions change ...
    assert (every - ref).abs().max() > 0.1                           # ... and the logits move
    # the same through evaluate.predictions: no layer = the model's own predictions
    examples = sample_boxes(100, 7, seed=TEST_SEED)
    own = predictions(model, tok, examples, progress=False)
    knock = lambda bb: block_attention(model, edge_positions(bb, "last -> correct object"), layers=[])
    assert (predictions(model, tok, examples, progress=False, intervene=knock) == own).all()


def test_query_label_edge_matters_on_the_base_organism(base):
    model, tok = base
    examples = sample_boxes(200, 7, seed=TEST_SEED)
    own = predictions(model, tok, examples, progress=False).mean()
    knock = lambda b: block_attention(model, edge_positions(b, "last -> query label"))
    assert predictions(model, tok, examples, progress=False, intervene=knock).mean() < 0.5 * own


def _mixed_batch(tok):
    examples = sample_boxes(6, 3, seed=5) + sample_boxes(6, 7, seed=6)   # two lengths: left padding
    return examples, encode(examples, tok)


def test_edge_positions_point_at_the_right_tokens(base):
    _, tok = base
    examples, b = _mixed_batch(tok)
    assert (b.attention_mask == 0).any()
    gen = torch.Generator().manual_seed(0)
    for r, ex in enumerate(examples):
        toks = tok.convert_ids_to_tokens(b.input_ids[r].tolist())
        at = {e: [(int(q[r]), int(k[r])) for q, k in edge_positions(b, e, gen)] for e in EDGES}
        last, query = int(b.last_pos[r]), int(b.query_pos[r])
        assert at["last -> correct object"] == [(last, int(b.object_pos[r, ex.query]))]
        assert toks[at["last -> correct object"][0][1]] == ex.query_object
        assert at["last -> query label"] == [(last, query)] and toks[query] == ex.query_label
        q, k = at["query label -> previous query label"][0]
        assert q == query and k < q and toks[k] == ex.query_label and toks[at["last -> previous query label"][0][1]] == ex.query_label
        segment = [k for _, k in at["last -> correct segment"]]
        start = int(b.object_pos[r, ex.query])
        end = int(b.object_pos[r, ex.query + 1]) if ex.query + 1 < ex.n_boxes else query
        assert set(segment) == set(range(start, end))
        assert toks[start] == ex.query_object and ex.query_label in [toks[p] for p in range(start, end)]


def test_random_targets(base):
    _, tok = base
    _, b = _mixed_batch(tok)
    rows = torch.arange(len(b))
    obj = b.object_pos[rows, b.query_index]
    draws = []
    for _ in range(20):
        k = random_earlier(b, b.last_pos, (obj, b.query_pos, b.prev_query_pos), torch.Generator().manual_seed(len(draws)))
        assert (k < b.last_pos).all() and (b.attention_mask[rows, k] == 1).all()
        assert ((k != obj) & (k != b.query_pos) & (k != b.prev_query_pos)).all()
        draws.append(k)
    assert len({tuple(d.tolist()) for d in draws}) > 1                 # seeds matter ...
    again = random_earlier(b, b.last_pos, (obj,), torch.Generator().manual_seed(7))
    assert torch.equal(again, random_earlier(b, b.last_pos, (obj,), torch.Generator().manual_seed(7)))   # ... and fix the draw
    q, k = edge_positions(b, "query label -> random", torch.Generator().manual_seed(0))[0]
    assert torch.equal(q, b.query_pos) and (k < q).all() and (k != b.prev_query_pos).all()
    with pytest.raises(KeyError, match="unknown edge"):
        edge_positions(b, "last -> nowhere")


def test_knockout_curves_table(base):
    model, tok = base
    edges = ["last -> query label", "last -> random"]
    df = knockout_curves({"base": base}, n=40, edges=edges, progress=False)
    assert list(df.columns) == ["model", "edge", "layer_from", "n_layers", "accuracy", "ci_low", "ci_high", "n", "seed",
                                "control_seed"]
    L = model.config.num_hidden_layers                      # layer_from 0..L; L blocks nothing
    assert len(df) == 2 * (L + 1) and set(df.layer_from) == set(range(L + 1)) and (df.n == 40).all()
    own = predictions(model, tok, sample_boxes(40, 7, seed=TEST_SEED), progress=False).mean()
    assert np.allclose(df[df.layer_from == L].accuracy, own)
    assert df.equals(knockout_curves({"base": base}, n=40, edges=edges, progress=False))   # deterministic
    with pytest.raises(KeyError, match="unknown edges"):
        knockout_curves({"base": base}, n=4, edges=["last -> nowhere"], progress=False)


def test_paper_curves_and_plot():
    paper = paper_knockout()
    published = [e for e, stem in EDGES.items() if stem]
    assert len(published) == 5 and len(paper) == 5 * 32 and (paper.n_layers == 32).all()
    raw = json.loads(paper_asset("knockout", "from_query_box_to_prev_query_box.json").read_text())
    got = paper[paper.edge == "query label -> previous query label"].set_index("layer_from").accuracy
    assert all(got[int(L) - 1] == v for L, v in raw.items())      # 1-based file keys -> 0-based layer_from
    fig = plot_knockout(paper, paper)
    assert [ax.get_title() for ax in fig.axes[:5]] == published
