"""Tracer semantics: no-op identity, head-edit locality, input editing, LoRA-wrapped o_proj, GQA."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from entity_circuits.tracing import (
    StopForward, Trace, TraceDict, attention_layout, capture_heads, get_module, patch_heads,
    split_heads, tiny_llama,
)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_noop_edits_are_bit_identical(ids, n_kv_heads):
    model = tiny_llama(n_layers=3, n_heads=4, n_kv_heads=n_kv_heads)
    clean = logits(model, ids)
    lay = attention_layout(model)
    names = [lay.module(l, k) for l in range(3) for k in ("q", "k", "v", "o", "mlp")]
    with TraceDict(model, names, retain_input=True, edit_input=lambda x: x, edit_output=lambda y, name: y):
        assert torch.equal(logits(model, ids), clean)
    heads = capture_heads(model, ids)
    every_head = {(l, h): heads[l, :, :, h] for l in range(3) for h in range(4)}
    with patch_heads(model, every_head):
        assert torch.equal(logits(model, ids), clean)
    with patch_heads(model, {(1, 1): lambda cur: cur}, positions=torch.tensor([3, 5, 11])):
        assert torch.equal(logits(model, ids), clean)
    # hooks are removed afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("layer,head,pos", [(0, 0, 0), (1, 3, 5), (2, 2, 11)])
def test_single_head_edit_is_local(ids, layer, head, pos):
    model = tiny_llama(n_layers=3, n_heads=4)
    clean_heads, clean = capture_heads(model, ids), logits(model, ids)
    with patch_heads(model, {(layer, head): 0.0}, positions=pos):
        heads, out = capture_heads(model, ids), logits(model, ids)
    moved = (heads != clean_heads).any(-1)  # [layers, batch, seq, heads]
    # exactly the edited slice moves in its own layer
    expected = torch.zeros_like(moved[layer])
    expected[:, pos, head] = True
    assert torch.equal(moved[layer], expected)
    assert torch.equal(heads[layer, :, pos, head], torch.zeros_like(heads[layer, :, pos, head]))
    assert not moved[:layer].any()                      # layers below
    assert not moved[:, :, :pos].any()                  # earlier positions (causal)
    assert torch.equal(out[:, :pos], clean[:, :pos])
    assert not torch.equal(out[:, pos], clean[:, pos])
    if layer < 2:
        assert moved[layer + 1 :, :, pos].any()         # later layers do see it


def test_per_example_positions(ids):
    model = tiny_llama()
    other = torch.randint(0, 64, ids.shape, generator=torch.Generator().manual_seed(9))
    src_heads = capture_heads(model, other)
    pos = torch.tensor([2, 7, 11])
    rows = torch.arange(3)
    with patch_heads(model, {(1, 0): src_heads[1, rows, pos, 0]}, positions=pos):
        got = capture_heads(model, ids)
    assert torch.equal(got[1, rows, pos, 0], src_heads[1, rows, pos, 0])
    clean = capture_heads(model, ids)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[rows, pos] = False
    assert torch.equal(got[1, :, :, 0][mask], clean[1, :, :, 0][mask])
    with pytest.raises(ValueError, match="one index per example"):
        with patch_heads(model, {(1, 0): 0.0}, positions=torch.tensor([1, 2])):
            logits(model, ids)


def test_input_editing_matches_output_editing_upstream(ids):
    model = tiny_llama()
    lay = attention_layout(model)
    # the input of o_proj is exactly the attention output before projection: double it at the input
    # of o_proj == double o_proj's output (linear, no bias)
    with Trace(model, lay.module(1, "o"), edit_input=lambda x: 2 * x):
        a = logits(model, ids)
    with Trace(model, lay.module(1, "o"), edit_output=lambda y: 2 * y):
        b = logits(model, ids)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, logits(model, ids))
    # kwargs-only modules (self_attn gets hidden_states= as a keyword): input editing still works
    seen = {}
    def grab(x, layer):
        seen[layer] = x.shape
        return torch.zeros_like(x)
    with Trace(model, lay.module(0, "attn"), edit_input=grab, retain_input=True) as tr:
        logits(model, ids)
    assert seen[lay.module(0, "attn")] == (3, 12, 32)
    assert torch.equal(tr.input, torch.zeros(3, 12, 32))  # retained input is the edited one


def test_retain_clone_detach_and_stop(ids):
    model = tiny_llama()
    name = "model.layers.0.mlp"
    with Trace(model, name, clone=True, detach=True, stop=True) as tr:
        model(input_ids=ids)
        pytest.fail("stop=True should have stopped the forward pass")  # pragma: no cover
    assert tr.output.shape == (3, 12, 32) and not tr.output.requires_grad
    # stop in a TraceDict happens after the last listed layer, so the earlier one is filled too
    with TraceDict(model, ["model.layers.0.mlp", "model.layers.1.mlp"], stop=True) as td:
        model(input_ids=ids)
    assert td["model.layers.0.mlp"].output is not None
    with pytest.raises(StopForward):  # outside a with-block, StopForward propagates
        t = Trace(model, name, stop=True)
        try:
            model(input_ids=ids)
        finally:
            t.close()
    with Trace(model, name, retain_grad=True) as tr:
        model(input_ids=ids).logits.sum().backward()
    assert tr.output.grad is not None and tr.output.grad.shape == (3, 12, 32)


def test_lora_wrapped_o_proj_unmerged_equals_merged(ids):
    base = tiny_llama()
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False)).eval()
    lay = attention_layout(lora)
    o = get_module(lora, lay.module(0, "o"))
    assert type(o).__module__.startswith("peft"), "o_proj should be a peft LoRA layer"
    merged = copy.deepcopy(lora).merge_and_unload()
    assert attention_layout(merged).prefix == "model.layers"
    torch.testing.assert_close(logits(lora, ids), logits(merged, ids), rtol=1e-4, atol=1e-5)
    # head outputs captured through the tracer agree
    torch.testing.assert_close(capture_heads(lora, ids), capture_heads(merged, ids), rtol=1e-4, atol=1e-5)
    edit = {(0, 1): 0.0, (1, 3): lambda cur: 3 * cur}
    with patch_heads(lora, edit, positions=-1):
        a = logits(lora, ids)
    with patch_heads(merged, edit, positions=-1):
        b = logits(merged, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the LoRA update on o_proj is really used: dropping it (what recomputing o_proj from the base
    # weight would do) gives different logits
    with lora.disable_adapter():
        c = logits(lora, ids)
    assert not torch.allclose(a, c, atol=1e-4)


def test_gqa_views_and_value_head_groups(ids):
    model = tiny_llama(n_layers=2, n_heads=6, n_kv_heads=2)
    lay = attention_layout(model)
    assert (lay.n_heads, lay.n_kv_heads, lay.group_size) == (6, 2, 3)
    assert [lay.kv_head(h) for h in range(6)] == [0, 0, 0, 1, 1, 1]
    for kind in ("k", "v"):
        raw = capture_heads(model, ids, kind, expand_kv=False)
        full = capture_heads(model, ids, kind)
        assert raw.shape[-2] == 2 and full.shape[-2] == 6
        for h in range(6):
            assert torch.equal(full[..., h, :], raw[..., lay.kv_head(h), :])
    q = capture_heads(model, ids, "q")
    assert q.shape == (2, 3, 12, 6, 8)
    clean = capture_heads(model, ids)
    def zero_kv0(v):
        v = v.clone()
        split_heads(v, lay.n_kv_heads)[..., 0, :] = 0
        return v
    with Trace(model, lay.module(1, "v"), edit_output=zero_kv0):
        edited = capture_heads(model, ids)
    moved = (edited[1] != clean[1]).any(-1).flatten(0, 1).any(0)
    assert moved.tolist() == [True, True, True, False, False, False]
    assert torch.equal(edited[0], clean[0])


def test_errors_speak_to_the_user(ids):
    model = tiny_llama()
    with pytest.raises(LookupError, match="Did you mean"):
        Trace(model, "model.layers.0.self_attn.o_prj")
    with pytest.raises(IndexError, match="out of range"):
        with patch_heads(model, {(5, 0): 0.0}):
            pass
    with pytest.raises(IndexError, match="heads per layer"):
        with patch_heads(model, {(0, 4): 0.0}):
            pass
    with pytest.raises(ValueError, match="kind"):
        capture_heads(model, ids, "x")
    with pytest.raises(TypeError, match="does not look like a decoder-only transformer: expected a ModuleList"):
        attention_layout(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_tiny_llama_refuses_keywords_that_would_set_nothing():
    # LlamaConfig keeps any unknown keyword as an attribute nothing reads: `hidden=` / `vocab=` used to build the default model
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) 'hidden'.*'vocab' \(did you mean 'vocab_size'\?\)"):
        tiny_llama(hidden=32, vocab=50)
    with pytest.raises(TypeError, match="'hidden_size' \\(n_heads \\* head_dim\\)"):
        tiny_llama(hidden_size=32)                                      # set by tiny_llama from its own arguments
    model = tiny_llama(vocab_size=50, attn_implementation="eager", rms_norm_eps=1e-5)   # real LlamaConfig keywords pass
    assert model.config.vocab_size == 50 and model.config._attn_implementation == "eager"
    assert model.config.rms_norm_eps == 1e-5


def test_importing_the_package_leaves_the_allocator_alone():
    "No side effect at import: nothing calls mallopt until `keep_freed_memory()` is called (the opt-in)."
    import subprocess
    import sys
    code = """
import ctypes
class Guard(ctypes.CDLL):
    def __getattr__(self, name):
        if name == "mallopt":
            raise AssertionError("mallopt called")
        return super().__getattr__(name)
ctypes.CDLL = Guard
import entity_circuits, entity_circuits.tracing, entity_circuits.cmap, entity_circuits.knockout, entity_circuits.dcm
import entity_circuits.path_patching, entity_circuits.evaluate, entity_circuits.zoo
assert not hasattr(entity_circuits.tracing, "MALLOC")
try:
    entity_circuits.tracing.keep_freed_memory({})
except AssertionError as e:
    print("opt-in calls mallopt:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    import platform
    if platform.libc_ver()[0] == "glibc":
        assert "opt-in calls mallopt" in out.stdout


def test_hooks_decide_how_to_call_an_edit_once():
    "The layer-argument convention is read from the edit's signature when the trace is made, not on every call."
    import inspect
    model, calls = tiny_llama(), []
    real = inspect.signature
    def counting(fn, *a, **k):
        calls.append(fn)
        return real(fn, *a, **k)
    ids = torch.randint(0, 64, (1, 5))
    inspect.signature = counting
    try:
        with torch.no_grad(), TraceDict(model, ["model.layers.0.mlp", "model.layers.1.mlp"],
                                        edit_output=lambda y, layer: y):
            calls.clear()
            for _ in range(3):
                model(ids)
    finally:
        inspect.signature = real
    assert calls == []
