"""The organism recipe: deterministic from its seed, and the CLI's smoke run."""
import json

import pytest
import torch

from entity_circuits.models import ChecksumError, verify_manifest
from entity_circuits.organisms import OrganismRecipe, grow, main, new_llama, organism_tokenizer, train_organisms


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    "The smoke recipe twice: once as a function, once through the command line."
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
