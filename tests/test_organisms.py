"""The organism recipe: deterministic from its seed, and the CLI's smoke run."""
import json

import pytest
import torch

from entity_circuits.models import ChecksumError, verify_manifest
from entity_circuits.cli import main
from entity_circuits.corpus import organism_tokenizer
from entity_circuits.organisms import OrganismRecipe, grow, new_llama, train_organisms


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    "The smoke recipe twice: once as a function, once through the command line (the cli chapter's parser)."
    root = tmp_path_factory.mktemp("organisms")
    a = train_organisms(OrganismRecipe.smoke(), root / "a")
    assert main(["train-organisms", "--smoke", "--out", str(root / "b")]) == 0
    b = json.loads((root / "b" / "MANIFEST.json").read_text())
    return root, a, b


def test_same_seed_same_weights(smoke_runs):
    _, a, b = smoke_runs
    wa = {k: v["sha256"] for k, v in a["files"].items() if k.endswith(".safetensors")}
    wb = {k: v["sha256"] for k, v in b["files"].items() if k.endswith(".safetensors")}
    assert sorted(wa) == ["base/model.safetensors", "chat/model.safetensors", "math-full/model.safetensors",
                          "math-lora/adapter_model.safetensors"]
    assert wa == wb


def test_other_seed_other_weights(smoke_runs, tmp_path):
    _, a, _ = smoke_runs
    c = train_organisms(OrganismRecipe.smoke(seed=1), tmp_path)
    assert a["files"]["base/model.safetensors"]["sha256"] != c["files"]["base/model.safetensors"]["sha256"]


def test_manifest_detects_tampering(smoke_runs):
    root, _, _ = smoke_runs
    assert verify_manifest(root / "a", "chat") >= 2
    target = root / "b" / "chat" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="differs from the manifest"):
        verify_manifest(root / "b", "chat")


def test_grow_preserves_function():
    tok = organism_tokenizer()
    small = new_llama(OrganismRecipe.smoke(), tok, n_layers=2)
    big = grow(small, 4)
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, big(ids).logits)
    with pytest.raises(ValueError, match="multiple"):
        grow(small, 3)


def test_cli_smoke(smoke_runs):
    _, a, b = smoke_runs
    assert a["command"] == b["command"] == "entity-circuits train-organisms --smoke --seed 0"
    assert b["recipe"]["n_layers"] == 2 and b["pretraining"]["selected_step"] > 0
    with pytest.raises(SystemExit):
        main(["train-organisms", "--smoke"])  # refuses to overwrite the shipped organisms with a smoke run


# --- the fine-tuning data stream: never the boxes task --------------------------------------------------------

from entity_circuits import corpus, organisms as org
from entity_circuits.data import load_objects


@pytest.mark.parametrize("name", sorted(org.DESIGNS))
def test_fine_tune_stream_holds_no_boxes_text(name):
    "Every batch a shipped-recipe fine-tune trains on, read as text: no 'Box', no boxes object word."
    tok, recipe = organism_tokenizer(), OrganismRecipe()
    banned_words = {"Box", *load_objects()}
    assert len(corpus.forbidden_ids(tok)) == len(banned_words) == 86  # each a single token of the organisms
    stream = org.fine_tune_stream(tok, org.DESIGNS[name], recipe, seed=len(name))  # the seed fine_tune uses
    n_replay = round(recipe.ft_replay * recipe.batch_size)
    replayed = set()
    for _ in range(recipe.ft_steps):
        ids, mask = next(stream)
        assert ids.shape == mask.shape == (recipe.batch_size, recipe.ft_seq_len)
        words = set(tok.convert_ids_to_tokens(ids.flatten().unique().tolist()))
        assert not words & banned_words, words & banned_words
        replayed |= set(tok.convert_ids_to_tokens(ids[-n_replay:].flatten().unique().tolist()))
    # the replayed rows hold every other binding format (their marker words) and the other text
    assert {"Jar", "Room", "with", "has", "=", "Assistant", "sees"} <= replayed


def test_fine_tune_stream_refuses_boxes_documents(monkeypatch):
    "The guard can fire: a task that (wrongly) produced boxes documents stops the stream."
    tok, recipe = organism_tokenizer(), OrganismRecipe.smoke()
    objects = load_objects()
    monkeypatch.setattr(org, "task_doc", lambda enc, rng, task, recipe: corpus.binding_doc(enc, rng, "boxes", 3, objects))
    with pytest.raises(org.BoxesLeakError, match="boxes tokens"):
        next(org.fine_tune_stream(tok, org.DESIGNS["chat"], recipe))


def test_lora_adapts_every_linear_module():
    tok = organism_tokenizer()
    recipe = OrganismRecipe.smoke(ft_steps=1)
    base = new_llama(recipe, tok)
    lora = org.fine_tune(base, tok, "math-lora", recipe)
    adapted = {n.split(".")[-2] for n, _ in lora.named_modules() if n.endswith("lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lora.peft_config["default"].lora_alpha == 2 * recipe.ft_lora_r


def test_unknown_design_and_task_are_refused():
    with pytest.raises(ValueError, match="unknown fine-tune"):
        org.fine_tune(None, None, "poetry", OrganismRecipe.smoke())
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        org.FineTune("poetry", lora=False)
    with pytest.raises(ValueError, match="include every role"):
        train_organisms(OrganismRecipe.smoke(), "/nonexistent", designs=("chat",))


# --- the controlled experiment's stream: the exposed objects in, the unseen ones and the template out ----------

from entity_circuits.controlled import ARMS  # noqa: E402


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_shared_vocabulary_stream_exposes_e_and_never_u(arm):
    """Every batch of a controlled-experiment arm, read as text: no 'Box' and no unseen (U) object word; the replay
    shows exposed (E) words; a replay-only arm's batch is exactly the replay rows of a task arm of the same seed."""
    tok, recipe = organism_tokenizer(), OrganismRecipe()
    design, n_replay = ARMS[arm], round(recipe.ft_replay * recipe.batch_size)
    stream = org.fine_tune_stream(tok, design, recipe, seed=0, vocabulary="shared")
    matched = org.fine_tune_stream(tok, ARMS["math-full"], recipe, seed=0, vocabulary="shared")
    banned, seen = {"Box", *corpus.UNSEEN}, set()
    for _ in range(100):
        ids, mask = next(stream)
        rows = n_replay if design.task is None else recipe.batch_size
        assert ids.shape == (rows, recipe.ft_seq_len)
        words = set(tok.convert_ids_to_tokens(ids.flatten().unique().tolist()))
        assert not words & banned, words & banned
        seen |= set(tok.convert_ids_to_tokens(ids[-n_replay:].flatten().unique().tolist()))
        other, _ = next(matched)
        assert torch.equal(ids[-n_replay:], other[-n_replay:])          # the same replay rows, step by step
    assert len(seen & set(corpus.EXPOSED)) >= 30                         # most E words appear within 100 steps


def test_vocabulary_is_checked():
    with pytest.raises(ValueError, match="unknown vocabulary"):
        next(org.fine_tune_stream(organism_tokenizer(), ARMS["chat"], OrganismRecipe(), vocabulary="mixed"))


def test_plain_replay_holds_no_binding_document():
    """The second regime's replay ("plain") is other text only: no binding format's key words in its replay rows (the
    "binding" replay of the same seed has them), and the matched replay-only arm still sees the task arm's replay."""
    tok, recipe = organism_tokenizer(), OrganismRecipe()
    n_replay = round(recipe.ft_replay * recipe.batch_size)
    plain = org.fine_tune_stream(tok, ARMS["math-full"], recipe, seed=0, vocabulary="shared", replay="plain")
    control = org.fine_tune_stream(tok, ARMS["replay-full"], recipe, seed=0, vocabulary="shared", replay="plain")
    binding = org.fine_tune_stream(tok, ARMS["math-full"], recipe, seed=0, vocabulary="shared")
    objects = set(corpus.EXPOSED) | set(corpus.THINGS)
    plain_words, binding_words = set(), set()
    for _ in range(50):
        ids, _ = next(plain)
        plain_words |= set(tok.convert_ids_to_tokens(ids[-n_replay:].flatten().unique().tolist()))
        binding_words |= set(tok.convert_ids_to_tokens(next(binding)[0][-n_replay:].flatten().unique().tolist()))
        assert torch.equal(ids[-n_replay:], next(control)[0])
    assert not plain_words & objects and binding_words & objects
    with pytest.raises(ValueError, match="unknown replay"):
        next(org.fine_tune_stream(tok, ARMS["chat"], recipe, vocabulary="shared", replay="none"))
