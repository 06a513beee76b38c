"""The toolkit at the paper's scale: a randomly initialised model of LLaMA-7B's shape (32 layers x 32 heads, hidden
4096, MLP 11008, vocabulary 32000) in fp16 on a CUDA device, timed stage by stage with its peak GPU memory.

    python benchmarks/scale.py                 # 7B shape on CUDA (under 8 minutes on one H200)
    python benchmarks/scale.py --smoke         # a small shape on the CPU in seconds (CI runs this)

Stages, each timed, with the peak memory of the stage (CUDA: torch.cuda.max_memory_allocated, reset before each
stage; CPU: the process's resident high-water mark):

1. `model`: build the base and a second model of the same shape (the "fine-tune" for CMAP), random weights;
2. `path_patching`: the engine's sweep for group A (value fetcher: every head a sender, no receivers) over a fixed
   prompt set (`--prompts`, seed 0), through one `patching_cache`;
3. `cmap`: `cmap_predictions` with the second model's heads of four groups patched into the base, outputs and
   q/k/v inputs;
4. `dcm`: DCM's source cache for 40 heads (the paper's value-fetcher group size) and `train_mask` for one epoch.

Random weights track nothing, so no accuracy is meaningful here: this measures time and memory only. It needs
torch, transformers, peft, accelerate, pandas and this package (`pip install --no-deps -e .` on a machine without a
package registry). `--out FILE` writes the stages as JSON (default `benchmarks/results/scale.json` on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "smoke": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
}


def _peak_reset(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB -> GiB (process high-water mark)


def _random_llama(shape: dict, device, dtype, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, max_position_embeddings=512, attn_implementation="eager")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small shape on the CPU (seconds)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts of the fixed set (default: 64; smoke 8)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    import torch
    from entity_circuits.cmap import cmap_predictions
    from entity_circuits.data import corrupt_for_path_patching, encode, make_desiderata, sample_boxes, word_level_tokenizer
    from entity_circuits.dcm import encode_pairs, group_data, train_mask
    from entity_circuits.path_patching import path_patching, patching_cache

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    shape = SHAPES["smoke" if args.smoke or not cuda else "7b"]
    n = args.prompts or (8 if args.smoke else 64)
    tok = word_level_tokenizer()      # every boxes word one token; its ids index the 32000-row embedding
    stages, t_all = {}, time.time()

    def stage(name, fn):
        _peak_reset(device)
        t = time.time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stages[name] = {"seconds": round(time.time() - t, 3), "peak_gib": round(_peak_gib(device), 3)}
        print(f"{name:14s} {stages[name]['seconds']:8.2f} s   peak {stages[name]['peak_gib']:7.2f} GiB", flush=True)
        return out

    base, other = stage("model", lambda: (_random_llama(shape, device, dtype, 0), _random_llama(shape, device, dtype, 1)))
    examples = sample_boxes(n, 7, seed=0)
    clean, corrupt = encode(examples, tok, device=device), encode(corrupt_for_path_patching(examples, seed=1), tok, device=device)

    def sweep():
        cache = patching_cache(base, clean, corrupt, batch_size=args.batch_size)
        return path_patching(base, clean, corrupt, "value_fetcher", cache=cache, progress=False)
    scores = stage("path_patching", sweep)

    L, H = shape["num_hidden_layers"], shape["num_attention_heads"]
    heads = [(l, h) for l in range(L) for h in range(H)]
    groups = {"value_fetcher": heads[-40:], "pos_transmitter": heads[L * H // 2:L * H // 2 + 7],
              "pos_detector": heads[L * H // 3:L * H // 3 + 20], "struct_reader": heads[L * H // 4:L * H // 4 + 5]}
    configs = [(groups, "output"), ({g: groups[g] for g in ("value_fetcher", "pos_transmitter")}, "QKV")]
    stage("cmap", lambda: cmap_predictions(base, other, tok, examples, configs, batch_size=args.batch_size, progress=False))

    def dcm():
        pairs = make_desiderata(2 * n, 7, seed=2)
        on = lambda e: type(e)(e.base.to(device), e.source.to(device), {k: v.to(device) for k, v in e.targets.items()})
        train, val = on(encode_pairs(pairs[:n], tok)), on(encode_pairs(pairs[n:], tok))
        tr = group_data(base, train, groups["value_fetcher"], "value_fetcher")
        va = group_data(base, val, groups["value_fetcher"], "value_fetcher")
        return train_mask(base, groups["value_fetcher"], tr["object"], va["object"], epochs=1, batch_size=args.batch_size,
                          eval_every=max(1, n // args.batch_size), progress=False)
    stage("dcm", dcm)

    result = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "dtype": str(dtype).removeprefix("torch."), "shape": shape, "prompts": n, "batch_size": args.batch_size,
              "torch": torch.__version__, "stages": stages, "total_seconds": round(time.time() - t_all, 1),
              "scores_finite": bool(torch.isfinite(torch.as_tensor(scores)).all())}
    out = args.out or (HERE / "results" / "scale.json" if cuda else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", out)
    return 0 if result["scores_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
