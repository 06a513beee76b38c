"""The boxes data: prompt text, positions from tokens (any padding, BOS, lengths), the single-token
check, counterfactuals and DCM desiderata."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import random

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from entity_circuits.data import (
    DESIDERATA, LABELS, BoxesExample, DesiderataPair, MultiTokenWordError, corrupt_for_path_patching,
    encode, encode_desiderata, load_objects, make_desiderata, sample_boxes, token_table, usable_labels,
    usable_objects, word_level_tokenizer,
)

OBJECTS = load_objects()


# ---------------------------------------------------------------- tokenizers used below

@pytest.fixture(scope="module")
def word_tok():
    return word_level_tokenizer()  # prepends <bos>


@pytest.fixture(scope="module")
def word_tok_nobos():
    return word_level_tokenizer(add_bos=False)


def _bpe(add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on prompts that mention only some objects: the others get split."""
    seen = OBJECTS[:30]
    corpus = [f"The {o} is in Box {l}, the {o} is in Box {l}. Box {l} contains the {o}" for o in seen for l in LABELS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2, special_tokens=["<s>", "<pad>"], show_progress=False)
    backend = Tokenizer.from_str(bpe.to_str())
    if add_bos:
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]),
        ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>")


def sentencepiece_dir(tmp_path_factory):
    """A folder holding the real LLaMA-family SentencePiece model (32k pieces) that the PyPI package mistral-common
    ships as `mistral_common/data/tokenizer.model.v1` (installed by `make setup`), as `tokenizer.model`."""
    import importlib.util
    import shutil
    from pathlib import Path

    spec = importlib.util.find_spec("mistral_common")   # found, not imported: only its data file is used
    assert spec is not None, "mistral-common is not installed: run `make setup`"
    d = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1", d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    from transformers import LlamaTokenizerFast
    tok = LlamaTokenizerFast.from_pretrained(sentencepiece_dir(tmp_path_factory))
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(scope="module")
def bpe_tok():
    return _bpe(add_bos=False)


@pytest.fixture(scope="module")
def bpe_tok_bos():
    return _bpe(add_bos=True)


def split_words(tokenizer, words):
    "Words whose ' word' is more than one token: computed directly, independently of the module."
    return {w for w in words if len(tokenizer(" " + w, add_special_tokens=False).input_ids) > 1}


# ---------------------------------------------------------------- prompts

def test_objects_and_labels():
    assert len(OBJECTS) == 85 and len(set(OBJECTS)) == 85
    assert OBJECTS[:3] == ["book", "car", "paper"] and OBJECTS[-1] == "magnet"
    assert LABELS == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    OBJECTS_copy = load_objects()
    OBJECTS_copy.append("x")
    assert len(load_objects()) == 85  # callers cannot corrupt the cached list


def test_prompt_text_is_the_papers():
    ex = BoxesExample(("apple", "computer", "bell"), ("F", "Q", "Z"), 2)
    assert ex.prompt == ("The apple is in Box F, the computer is in Box Q, the bell is in Box Z. "
                         "Box Z contains the")
    assert (ex.answer, ex.query_label, ex.query_object, ex.n_boxes) == (" bell", "Z", "bell", 3)
    one = BoxesExample(["apple"], ["F"], 0)
    assert one.prompt == "The apple is in Box F. Box F contains the" and one.objects == ("apple",)


@pytest.mark.parametrize("objects,labels,query,err", [
    (("a", "a"), ("F", "Q"), 0, ValueError),
    (("a", "b"), ("F", "F"), 0, ValueError),
    (("a", "b"), ("F",), 0, ValueError),
    (("a b", "c"), ("F", "Q"), 0, ValueError),
    (("a", "b"), ("F", "Q"), 2, ValueError),
    (("a", "b"), ("F", "Q"), -1, ValueError),
    (("a", "b"), ("F", "Q"), 1.0, TypeError),
    ((), (), 0, ValueError),
])
def test_example_rejects_invalid(objects, labels, query, err):
    with pytest.raises(err):
        BoxesExample(objects, labels, query)


def test_sampling_is_deterministic_and_valid():
    a = sample_boxes(50, seed=3)
    random.seed(999)
    random.random()
    assert sample_boxes(50, seed=3) == a  # global random state is irrelevant
    assert sample_boxes(50, seed=4) != a
    for ex in a:
        assert ex.n_boxes == 7 and len(set(ex.objects)) == 7 and len(set(ex.labels)) == 7
        assert set(ex.objects) <= set(OBJECTS) and set(ex.labels) <= set(LABELS)
    assert len({ex.query for ex in a}) > 1
    small = sample_boxes(20, n_boxes=3, seed=0, objects=["x", "y", "z", "x"], labels=list("ABC"))
    assert all(set(ex.objects) == {"x", "y", "z"} for ex in small)
    with pytest.raises(ValueError, match="at least 4 distinct objects"):
        sample_boxes(1, n_boxes=4, objects=["x", "y", "z"])
    with pytest.raises(TypeError):
        sample_boxes(1, objects="apple")


# ---------------------------------------------------------------- the word-level tokenizer

def test_word_level_tokenizer(word_tok, word_tok_nobos):
    apple = word_tok.convert_tokens_to_ids("apple")
    assert word_tok(" apple", add_special_tokens=False).input_ids == [apple]
    assert word_tok.tokenize("Box F, the 12.") == ["Box", "F", ",", "the", "1", "2", "."]
    assert word_tok.convert_tokens_to_ids("The") != word_tok.convert_tokens_to_ids("the")
    assert word_tok("apple").input_ids == [word_tok.bos_token_id, apple]
    assert word_tok_nobos("apple").input_ids == [apple]
    assert word_tok.unk_token_id not in word_tok(" ".join(OBJECTS + list(LABELS))).input_ids
    assert word_tok(" zebra", add_special_tokens=False).input_ids == [word_tok.unk_token_id]
    extra = word_level_tokenizer(extra_words=["zebra", "plus"])
    assert extra(" zebra", add_special_tokens=False).input_ids != [extra.unk_token_id]
    with pytest.raises(ValueError, match="don't"):
        word_level_tokenizer(extra_words=["don't"])


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_word_level_tokenizer_round_trip(word_tok, tmp_path, loader):
    word_tok.save_pretrained(tmp_path)
    loaded = loader.from_pretrained(tmp_path)
    texts = [ex.prompt for ex in sample_boxes(5, seed=0)] + ["Box F, 12 zebra."]
    assert loaded(texts).input_ids == word_tok(texts).input_ids  # BOS post-processor survives
    assert loaded.get_vocab() == word_tok.get_vocab()
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    ex = sample_boxes(4, seed=1)
    a, b = encode(ex, loaded), encode(ex, word_tok)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.query_pos, b.query_pos)


# ---------------------------------------------------------------- positions

def token_text(tokenizer, token_id) -> str:
    return tokenizer.decode([int(token_id)]).strip()


def check_positions(batch, examples, tokenizer, padding_side):
    "Decode the token at every computed position and compare it with the word it should be."
    width = batch.input_ids.shape[1]
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape
    for r, ex in enumerate(examples):
        mask = batch.attention_mask[r]
        real = mask.nonzero().flatten()
        n = ex.n_boxes
        assert int(batch.n_boxes[r]) == n and int(batch.query_index[r]) == ex.query
        for i in range(n):
            assert token_text(tokenizer, batch.input_ids[r, batch.object_pos[r, i]]) == ex.objects[i]
            assert token_text(tokenizer, batch.input_ids[r, batch.label_pos[r, i]]) == ex.labels[i]
        assert batch.object_pos[r, n:].eq(-1).all() and batch.label_pos[r, n:].eq(-1).all()
        assert token_text(tokenizer, batch.input_ids[r, batch.query_pos[r]]) == ex.query_label
        assert token_text(tokenizer, batch.input_ids[r, batch.query_pos[r] - 1]) == "Box"
        assert token_text(tokenizer, batch.input_ids[r, batch.query_pos[r] + 1]) == "contains"
        assert int(batch.prev_query_pos[r]) == int(batch.label_pos[r, ex.query])
        assert int(batch.prev_query_pos[r]) < int(batch.query_pos[r]) < int(batch.last_pos[r])
        # the last real token is "the", and it really is the last unmasked one
        assert int(batch.last_pos[r]) == int(real[-1])
        assert token_text(tokenizer, batch.input_ids[r, batch.last_pos[r]]) == "the"
        if padding_side == "left":
            assert int(batch.last_pos[r]) == width - 1
        else:
            assert int(real[0]) == 0
        # the answer is the token of the queried object in the context
        assert int(batch.answer_ids[r]) == int(batch.input_ids[r, batch.object_pos[r, ex.query]])
        assert tokenizer.decode([int(batch.answer_ids[r])]).strip() == ex.query_object
        # position ids count real tokens from 0
        assert torch.equal(batch.position_ids[r, real], torch.arange(len(real)))


def mixed_batch(objects=None, labels=None):
    "Prompts of different lengths: 7, 3, 5 and 1 boxes."
    return [ex for n_boxes, seed in ((7, 0), (3, 1), (5, 2), (1, 3)) for ex in
            sample_boxes(2, n_boxes=n_boxes, seed=seed, objects=objects, labels=labels)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("tok_name", ["word_tok", "word_tok_nobos", "bpe_tok", "bpe_tok_bos", "sp_tok"])
def test_positions_point_at_the_right_tokens(request, tok_name, padding_side):
    tokenizer = request.getfixturevalue(tok_name)
    objects, labels = usable_objects(tokenizer), usable_labels(tokenizer)
    assert len(objects) >= 14 and len(labels) >= 7
    examples = mixed_batch(objects, labels)
    batch = encode(examples, tokenizer, padding_side=padding_side)
    lengths = batch.attention_mask.sum(-1)
    assert len(set(lengths.tolist())) == 4  # really of different lengths, so padding is exercised
    check_positions(batch, examples, tokenizer, padding_side)
    first = batch.input_ids[torch.arange(len(batch)), batch.attention_mask.argmax(-1)]
    has_bos = tok_name in ("word_tok", "bpe_tok_bos")  # positions are right with and without a BOS in front
    if tok_name != "sp_tok":                             # (the SentencePiece folder has no config saying either)
        assert (first == tokenizer.bos_token_id).all() == has_bos


def test_left_and_right_padding_agree(word_tok):
    examples = mixed_batch()
    left, right = encode(examples, word_tok, "left"), encode(examples, word_tok, "right")
    shift = left.input_ids.shape[1] - right.attention_mask.sum(-1)
    assert torch.equal(left.query_pos, right.query_pos + shift)
    assert torch.equal(left.last_pos, right.last_pos + shift)
    valid = right.object_pos >= 0
    assert torch.equal(left.object_pos[valid], (right.object_pos + shift[:, None])[valid])
    assert torch.equal(left.answer_ids, right.answer_ids)
    assert not right.last_pos.eq(right.input_ids.shape[1] - 1).all()


def test_left_padding_does_not_change_the_model(word_tok):
    "With `model_inputs()` (which carries position_ids), a padded prompt gives its unpadded logits."
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(word_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    short, long = sample_boxes(1, n_boxes=2, seed=0)[0], sample_boxes(1, n_boxes=7, seed=0)[0]
    padded, alone = encode([short, long], word_tok, "left"), encode([short], word_tok)
    with torch.no_grad():
        a = model(**padded.model_inputs()).logits[0, padded.last_pos[0]]
        b = model(**alone.model_inputs()).logits[0, alone.last_pos[0]]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_encode_options_and_errors(word_tok):
    ex = sample_boxes(2, seed=0)
    batch = encode(ex, word_tok, device="cpu")
    assert batch.input_ids.dtype == torch.long and len(batch) == 2
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask", "position_ids"}
    table = token_table(batch, word_tok, row=1)
    assert table.loc[int(batch.query_pos[1]), "role"] == "query label"
    assert "queried object" in table.loc[int(batch.object_pos[1, ex[1].query]), "role"]
    with pytest.raises(ValueError, match="padding_side"):
        encode(ex, word_tok, padding_side="middle")
    with pytest.raises(ValueError):
        encode([], word_tok)
    with pytest.raises(TypeError, match="sequence"):
        encode(ex[0], word_tok)

    class Slow:  # stands in for a slow (Python) tokenizer: no offsets
        is_fast = False
    with pytest.raises(TypeError, match="not a fast tokenizer"):
        encode(ex, Slow())


# ---------------------------------------------------------------- the single-token check

def test_multi_token_error_names_every_split_word(bpe_tok):
    examples = sample_boxes(40, seed=0)
    used = {o for ex in examples for o in ex.objects}
    expected = split_words(bpe_tok, used)
    assert expected and used - expected  # some words split, some not
    with pytest.raises(MultiTokenWordError) as info:
        encode(examples, bpe_tok)
    err = info.value
    assert isinstance(err, ValueError)
    assert set(err.words) == expected
    message = str(err)
    assert all(repr(w) in message for w in expected)
    assert "usable_objects(tokenizer)" in message


def test_usable_objects_is_the_single_token_subset(bpe_tok, word_tok):
    usable = usable_objects(bpe_tok)
    assert usable == [o for o in OBJECTS if o not in split_words(bpe_tok, OBJECTS)]  # same set, file order
    encode(sample_boxes(30, seed=0, objects=usable, labels=usable_labels(bpe_tok)), bpe_tok)  # no error
    assert usable_objects(word_tok) == OBJECTS and usable_labels(word_tok) == list(LABELS)
    assert usable_objects(word_tok, ["apple", "zebra", "apple"]) == ["apple"]  # unknown -> unusable


def test_merged_and_unknown_words_are_refused():
    # a tokenizer that only splits on whitespace, so "F," is one (known) token: F is merged with ","
    vocab = {w: i for i, w in enumerate(["<unk>", "The", "the", "is", "in", "Box", "contains", "apple",
                                         "bell", "F", "F,", "Q", "Q.", "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    merging = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ex = BoxesExample(("apple", "bell"), ("F", "Q"), 0)
    with pytest.raises(MultiTokenWordError) as info:
        encode([ex], merging)
    assert info.value.words == ["F", "Q"] and "merged" in str(info.value)
    assert usable_labels(merging, ["F", "Q"]) == []

    tok = word_level_tokenizer()
    with pytest.raises(MultiTokenWordError, match="unknown") as info:
        encode([BoxesExample(("zebra", "apple"), ("F", "Q"), 1)], tok)
    assert info.value.words == ["zebra"]


# ---------------------------------------------------------------- path patching counterfactuals

@pytest.mark.parametrize("n_boxes", [1, 3, 7])
def test_corrupt_prompt(word_tok, n_boxes):
    clean = sample_boxes(100, n_boxes=n_boxes, seed=5)
    corrupt = corrupt_for_path_patching(clean, seed=0)
    assert corrupt == corrupt_for_path_patching(clean, seed=0) != corrupt_for_path_patching(clean, seed=1)
    for c, x in zip(clean, corrupt):
        assert x.n_boxes == c.n_boxes
        assert x.query == (c.query + 1) % n_boxes
        assert x.query_label != c.query_label
        assert not set(x.objects) & set(c.objects)
    a, b = encode(clean, word_tok), encode(corrupt, word_tok)
    assert a.input_ids.shape == b.input_ids.shape and a.attention_mask.all() and b.attention_mask.all()
    assert torch.equal(a.last_pos, b.last_pos) and torch.equal(a.query_pos, b.query_pos)
    assert (a.input_ids.gather(1, a.query_pos[:, None]) != b.input_ids.gather(1, b.query_pos[:, None])).all()
    with pytest.raises(ValueError, match="labels"):
        corrupt_for_path_patching(clean[:1], labels=[clean[0].query_label])


# ---------------------------------------------------------------- DCM desiderata

def test_desiderata_invariants_over_many_seeds(word_tok):
    for seed in range(10):
        pairs = make_desiderata(60, n_boxes=3 + seed % 5, seed=seed)
        for p in pairs:
            b, s = p.base, p.source
            i, j, k = b.query, p.position_index, p.label_index
            assert not set(b.objects) & set(s.objects)
            assert sorted(b.labels) == sorted(s.labels)
            assert s.query == j != i and k not in (i, j)
            assert s.query_label == b.labels[k]
            t = p.targets
            assert t == {"object": " " + s.objects[j], "position": " " + b.objects[j], "label": " " + b.objects[k]}
            assert len({b.answer, *t.values()}) == 4
            assert t["object"].strip() not in b.objects
        encoded = {d: encode_desiderata(pairs, d, word_tok) for d in DESIDERATA}
        ids = torch.stack([encoded[d].target_ids for d in DESIDERATA])
        base = encoded["object"].base
        assert (ids != base.answer_ids).all()
        assert (ids[0] != ids[1]).all() and (ids[0] != ids[2]).all() and (ids[1] != ids[2]).all()
        rows = torch.arange(len(pairs))
        pos_j = torch.tensor([p.position_index for p in pairs])
        pos_k = torch.tensor([p.label_index for p in pairs])
        # targets are the tokens the model actually read in the prompts (defect 1 cannot recur)
        assert torch.equal(encoded["position"].target_ids, base.input_ids[rows, base.object_pos[rows, pos_j]])
        assert torch.equal(encoded["label"].target_ids, base.input_ids[rows, base.object_pos[rows, pos_k]])
        src = encoded["object"].source
        assert torch.equal(encoded["object"].target_ids, src.answer_ids)


def test_desiderata_are_deterministic_and_cover_positions():
    a = make_desiderata(200, seed=7)
    assert a == make_desiderata(200, seed=7) != make_desiderata(200, seed=8)
    assert {p.position_index for p in a} == set(range(7)) and {p.label_index for p in a} == set(range(7))


def test_desiderata_errors(word_tok):
    with pytest.raises(ValueError, match="n_boxes >= 3"):
        make_desiderata(5, n_boxes=2)
    pair = make_desiderata(1, seed=0)[0]
    with pytest.raises(ValueError, match="unknown desideratum 'colour'.*object.*position.*label"):
        encode_desiderata([pair], "colour", word_tok)
    with pytest.raises(ValueError, match="unknown desideratum"):
        pair.target("value")
    assert pair.target("Position") == pair.targets["position"]
    b = pair.base
    with pytest.raises(ValueError, match="different box"):  # source asks about the base's own box
        DesiderataPair(b, BoxesExample(pair.source.objects, pair.source.labels, b.query))
    with pytest.raises(ValueError, match="disjoint"):
        DesiderataPair(b, BoxesExample(b.objects, pair.source.labels, pair.source.query))
    i = b.query
    j = (i + 1) % b.n_boxes
    labels = list(b.labels)
    labels[i], labels[j] = labels[j], labels[i]  # now the source's query label labels base box i
    with pytest.raises(ValueError, match="third box"):
        DesiderataPair(b, BoxesExample(pair.source.objects, tuple(labels), j))


# ---------------------------------------------------------------- the paper's tokenizer family

def test_sentencepiece_llama_tokenizer_runs_the_data_module(sp_tok):
    "The paper's models use a LLaMA SentencePiece vocabulary: words carry a '▁' prefix, not a byte-level space."
    assert sp_tok.vocab_size == 32000 and sp_tok.convert_ids_to_tokens(sp_tok(" pen", add_special_tokens=False).input_ids) == ["▁pen"]
    objects, labels = usable_objects(sp_tok), usable_labels(sp_tok)
    assert set(objects) == set(OBJECTS) and len(labels) == len(LABELS)   # every paper word is one piece here
    examples = sample_boxes(40, 7, seed=3, objects=objects, labels=labels)
    batch = encode(examples, sp_tok)
    check_positions(batch, examples, sp_tok, "left")
    assert sp_tok.convert_ids_to_tokens(batch.input_ids[0, batch.last_pos[0]].item()) == "▁the"
    # the path-patching counterfactual: same length, fresh objects, the query moved one box on
    corrupt = corrupt_for_path_patching(examples, objects=objects, labels=labels)
    cb = encode(corrupt, sp_tok)
    assert torch.equal(cb.attention_mask.sum(-1), batch.attention_mask.sum(-1))
    assert all(not set(c.objects) & set(e.objects) and c.query == (e.query + 1) % 7 for c, e in zip(corrupt, examples))
    # DCM desiderata: each target is one piece, the first token of its answer text
    pairs = make_desiderata(30, 7, seed=4, objects=objects, labels=labels)
    for name in DESIDERATA:
        d = encode_desiderata(pairs, name, sp_tok)
        want = [sp_tok(p.target(name), add_special_tokens=False).input_ids for p in pairs]
        assert all(len(w) == 1 for w in want) and d.target_ids.tolist() == [w[0] for w in want]
        assert torch.equal(d.base.last_pos, d.source.last_pos)
