"DCM: the masked patch is exact at both ends of the mask, and the mask training finds a planted head."
import pytest
import torch

from entity_circuits.dcm import (DCMData, group_positions, masked_patch, source_cache, train_mask, patched_accuracy,
                                 variant_data)
from entity_circuits.tracing import capture_heads, patch_heads, tiny_llama

torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=50, seed=1).eval()


def _ids(seed, n=4, t=7):
    return {"input_ids": torch.randint(3, 50, (n, t), generator=torch.Generator().manual_seed(seed))}


HEADS = [(0, 3), (1, 0), (1, 2)]


def test_cache_holds_only_the_requested_heads_and_positions(tiny):
    pos = torch.tensor([6, 5, 6, 2])
    src = source_cache(tiny, _ids(1), pos, HEADS)
    full = capture_heads(tiny, _ids(1), "o")              # [layers, b, T, heads, d]
    assert src.shape == (4, 3, 8)
    for j, (l, h) in enumerate(HEADS):
        assert torch.allclose(src[:, j], full[l, torch.arange(4), pos, h])


def test_mask_of_ones_is_the_base_and_zeros_is_the_source(tiny):
    base, pos = _ids(0), torch.tensor([6, 6, 4, 6])
    src = source_cache(tiny, _ids(1), pos, HEADS)
    with torch.no_grad():
        plain = tiny(**base).logits
        with masked_patch(tiny, HEADS, src, pos, torch.ones(3)):
            ones = tiny(**base).logits
        with masked_patch(tiny, HEADS, src, pos, torch.zeros(3)):
            zeros = tiny(**base).logits
            got = capture_heads(tiny, base, "o")            # the heads' outputs inside the patch
        with patch_heads(tiny, {h: src[:, j] for j, h in enumerate(HEADS)}, pos):
            swapped = tiny(**base).logits
    assert torch.equal(ones, plain)
    assert torch.allclose(zeros, swapped, atol=1e-6) and not torch.allclose(zeros, plain)


def test_half_mask_interpolates(tiny):
    base, pos = _ids(0), torch.full((4,), 6)
    src = source_cache(tiny, _ids(1), pos, [(1, 1)])
    own = source_cache(tiny, base, pos, [(1, 1)])
    seen = {}
    with torch.no_grad(), masked_patch(tiny, [(1, 1)], src, pos, torch.tensor([0.25])):
        from entity_circuits.tracing import TraceDict, split_heads
        with TraceDict(tiny, ["model.layers.1.self_attn.o_proj"], retain_input=True, retain_output=False) as td:
            tiny(**base)
    z = split_heads(td["model.layers.1.self_attn.o_proj"].input, 4)[:, 6, 1]
    assert torch.allclose(z, 0.25 * own[:, 0] + 0.75 * src[:, 0], atol=1e-6)


def test_dcm_selects_the_planted_head():
    toy = tiny_llama(n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, vocab_size=50, seed=3).eval()
    with torch.no_grad():
        toy.model.layers[1].self_attn.o_proj.weight[:, 8:16] *= 30     # head 1 of layer 1 dominates the logits
    g = torch.Generator().manual_seed(5)
    layer1 = [(1, h) for h in range(4)]

    def split(n):
        base = {"input_ids": torch.randint(3, 50, (n, 8), generator=g)}
        pos = torch.full((n,), 7)
        src = source_cache(toy, {"input_ids": torch.randint(3, 50, (n, 8), generator=g)}, pos, layer1)
        with torch.no_grad(), masked_patch(toy, [(1, 1)], src[:, 1:2], pos):
            targets = toy(**base).logits[:, -1].argmax(-1)
        return DCMData(base, pos, pos, src, targets)

    train, val = split(256), split(128)
    mask, hist = train_mask(toy, layer1, train, val, progress=False)
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert patched_accuracy(toy, layer1, val, mask) == 1.0
    assert patched_accuracy(toy, layer1, val, torch.ones(4)) < 0.5     # nothing patched: the targets are not free


def test_clear_errors(tiny):
    with pytest.raises(ValueError, match="unknown group"):
        group_positions(None, "value_fetchers")
    with pytest.raises(ValueError, match="holds 1 heads but 2"):
        with masked_patch(tiny, [(0, 0), (0, 1)], torch.zeros(4, 1, 8), torch.zeros(4, dtype=torch.long)):
            pass
    with pytest.raises(ValueError, match="at least one head"):
        train_mask(tiny, [], None, None)
    with pytest.raises(IndexError, match="layer 5 out of range"):
        source_cache(tiny, _ids(0), torch.zeros(4, dtype=torch.long), [(5, 0)])
    with pytest.raises(ValueError, match="unknown variant"):
        variant_data(tiny, None, [], "no_such_variant", [(0, 0)])


def test_plot_functionality_runs_from_the_package():
    "The figure function needs nothing the chapter imported for it (it once used the notebook's `plt`)."
    import subprocess, sys, textwrap
    code = textwrap.dedent("""
        import matplotlib; matplotlib.use("Agg")
        import pandas as pd
        from entity_circuits.dcm import PAPER_FIG3, plot_functionality
        df = pd.DataFrame([dict(model=m, group=g, desideratum=d, run=r, accuracy=0.5 + 0.1 * r)
                           for m in ("a", "b") for g, d in [("value_fetcher", "object"), ("pos_transmitter", "label")]
                           for r in range(3)])
        fig = plot_functionality(df, ["a", "b"], PAPER_FIG3)
        assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 4
        print("ok")""")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
