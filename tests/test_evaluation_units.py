"""Unit tests of three evaluation functions the chapters run only at full size: `completeness` (circuit chapter),
DCM's `functionality` (Fig. 3) and `variant_text` (the prompt variants of the DCM chapter)."""
import random

import numpy as np
import pytest
import torch

from entity_circuits.circuit import circuit_accuracy, completeness, head_means
from entity_circuits.data import BoxesExample, DesiderataPair, make_desiderata, sample_boxes
from entity_circuits.dcm import FILLER, VARIANTS, encode_pairs, functionality, variant_text
from entity_circuits.models import load_model
from entity_circuits.path_patching import Circuit


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_model("organism-base")


CIRCUIT = Circuit(value_fetcher=[(3, 0), (3, 1), (2, 5)], pos_transmitter=[(1, 2)], pos_detector=[], struct_reader=[])


# ------------------------------------------------------------------------------------------------ completeness
def test_completeness_sets_and_values(base):
    model, tok = base
    examples, means = sample_boxes(12, 7, seed=5), head_means(model, tok, n=12)
    t = completeness(model, tok, CIRCUIT, examples, means, n_random=3, random_seed=1)
    assert list(t.K) == ["group value_fetcher", "group pos_transmitter", "random 0", "random 1", "random 2"]
    assert list(t["size"][:2]) == [3, 1] and (t["size"][2:] >= 1).all() and (t["size"] <= 4).all()
    assert t[["circuit without K", "model without K"]].apply(lambda c: c.between(0, 1)).all().all()
    # a group's row: the circuit without that group is the circuit accuracy of the rest, computed directly
    rest = [h for h in CIRCUIT.heads() if h not in CIRCUIT["value_fetcher"]]
    assert t["circuit without K"][0] == pytest.approx(circuit_accuracy(model, tok, rest, examples, means, context="keep"))
    again = completeness(model, tok, CIRCUIT, examples, means, n_random=3, random_seed=1)
    assert again.equals(t)                                             # the random sets are a function of the seed
    other = completeness(model, tok, CIRCUIT, examples, means, n_random=3, random_seed=2)
    assert list(other["size"][2:]) != list(t["size"][2:]) or not other.equals(t)


# ------------------------------------------------------------------------------------------------ functionality
def test_functionality_rows_and_the_no_head_floor(base):
    model, tok = base
    heads = {("value_fetcher", "object"): [(3, 0), (3, 1)], ("pos_transmitter", "position"): [(1, 2)],
             ("pos_detector", "position"): []}
    t = functionality({"m": model}, tok, heads, runs=2, n=8, seed=11, progress=False)
    assert len(t) == 2 * len(heads) and set(t.run) == {0, 1} and (t.n == 8).all()
    assert list(t.heads[:3]) == [2, 1, 0] and t.accuracy.between(0, 1).all()
    # no heads: nothing is patched, so the "accuracy" is how often the plain base already answers the object target
    enc = encode_pairs(make_desiderata(8, seed=11), tok)
    with torch.no_grad():
        logits = model(**enc.base.model_inputs()).logits[torch.arange(8), enc.base.last_pos]
    floor = (logits.argmax(-1) == enc.targets["position"]).float().mean().item()
    assert t.query("group == 'pos_detector' and run == 0").accuracy.item() == pytest.approx(floor)
    assert t.equals(functionality({"m": model}, tok, heads, runs=2, n=8, seed=11, progress=False))   # deterministic


# ------------------------------------------------------------------------------------------------ variant_text
def _pair():
    base = BoxesExample(("apple", "ball", "cup"), ("A", "B", "C"), 0)
    source = BoxesExample(("dog", "egg", "fan"), ("B", "C", "A"), 1)   # asks about box C: a third box of the base
    return DesiderataPair(base, source)


def test_variant_text_of_each_variant():
    pair, extra = _pair(), ("hat", "G")
    text = lambda v: variant_text(pair, v, random.Random(0), extra)
    plain = "The dog is in Box B, the egg is in Box C, the fan is in Box A. Box C contains the"
    assert text("no_comma") == plain.replace(", ", " ")
    assert text("add_comma") == plain.replace(", ", ", , ")
    assert text("is_not_in") == plain.replace(" is in", " is not in")
    assert text("altered_box_obj_order") == "Box B contains the dog, Box C contains the egg, Box A contains the fan. Box C contains the"
    assert text("add_seg_start") == "The hat is in Box G, t" + plain[1:]
    assert text("add_seg_end") == plain.replace("Box A.", "Box A, the hat is in Box G.")
    assert text("add_box_before_correct_segment") == plain.replace("the egg", "the hat is in Box G, the egg")
    start, end = text("random_text_start"), text("random_text_end")
    assert start.endswith(". " + plain[0].upper() + plain[1:]) and start.startswith("The ")
    assert end.startswith(plain.split(". Box C")[0] + ". the ") and end.endswith(". Box C contains the")
    assert all(w in FILLER for w in end.split(". Box C")[0].split(". the ")[1].split())
    between = text("add_tokens_btw_box_and_obj")
    assert between.count(" is in the ") == 3 and between.endswith("Box C contains the")
    assert set(VARIANTS) == {"random_text_start", "random_text_end", "add_tokens_btw_box_and_obj", "add_seg_start",
                             "add_seg_end", "add_box_before_correct_segment", "altered_box_obj_order", "is_not_in",
                             "no_comma", "add_comma"}


def test_variant_text_is_a_function_of_the_rng():
    pair = _pair()
    a = variant_text(pair, "random_text_end", random.Random(3), ("hat", "G"))
    assert a == variant_text(pair, "random_text_end", random.Random(3), ("hat", "G"))
    assert {variant_text(pair, "random_text_end", random.Random(s), ("hat", "G")) for s in range(5)} != {a}
