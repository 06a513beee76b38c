"""Benchmark of entity_circuits' path-patching engine against the paper's naive loop (twice: with this package's
hooks, and written with nnsight), on the base organism, all four groups, every head as a sender.

    .venv/bin/python benchmarks/patching.py            # 300 prompts (a few minutes on 2 cores)
    .venv/bin/python benchmarks/patching.py --quick    # 60 prompts

Each method runs in a fresh subprocess, so that its peak resident memory (torch's CPU tensors are invisible to
tracemalloc) is its own: the worker resets the kernel's high-water mark (/proc/self/clear_refs) once the model
and the prompts are loaded, and reports VmHWM minus the RSS at that moment. The nnsight worker runs with the
Python of `benchmarks/.venv-nnsight` (see README.md). Everything runs with one torch thread.

The engine runs first: the heads it keeps for each group (`top_heads(scores, choose_k(scores))`) are the receivers
of the next group, and the naive loops are then given the SAME receivers. The run fails (exit 1) only if the three
methods' scores differ by 1e-5 or more; timings and ratios are printed, never asserted.

The hook overhead (a forward pass under `TraceDict(every o_proj, retain_input=True)` against a plain one) is
measured in two more fresh workers: one with glibc's default malloc settings (`ENTITY_CIRCUITS_MALLOC=default`),
one that opts in to the settings `entity_circuits.tracing.keep_freed_memory()` makes (importing changes nothing): on a
full batch, under glibc's defaults, the retained activations cost page faults, not hooks.
`--save FILE` writes every number printed to a JSON file (the path-patching chapter shows
`benchmarks/results/patching.json`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NNSIGHT_PYTHON = HERE / ".venv-nnsight" / "bin" / "python"
TOLERANCE = 1e-5
METHODS = ("naive", "nnsight", "engine")
EXTRA_GROUPS = ("pos_detector", "struct_reader")   # re-run with every last-layer head as a receiver (see worker)
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# the hook-overhead workers' environments (glibc's own MALLOC_* variables are removed from both)
ALLOCATORS = {"glibc defaults": {"ENTITY_CIRCUITS_MALLOC": "default"}, "opted in": {}}
SPEED_TARGET, HOOK_TARGET = 10.0, 1.02                           # the issues' targets: engine >= 10x, hooks <= 1.02x
DEEP_SPEED_TARGET, DEEP_LAYERS = 30.0, 12                        # ... and >= 30x on a deep model (SmolLM2: 30 layers;
                                                                  # the organisms have 4)
DEFAULT_SAVE = HERE / "results" / "patching.json"
TINY_MODELS = {   # built here with random weights (no download): deep models of families other than Llama
    "tiny-gemma2": dict(family="gemma2", n_layers=12, n_heads=8, n_kv_heads=4, head_dim=32, sliding_window=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def _load(name: str):
    "`(model, tokenizer)`: a registered model (`load_model`), or one of `TINY_MODELS` with the word-level tokenizer."
    if name in TINY_MODELS:
        from entity_circuits.data import word_level_tokenizer
        from entity_circuits.tracing import tiny_model
        tok = word_level_tokenizer()
        spec = dict(TINY_MODELS[name])
        return tiny_model(spec.pop("family"), vocab_size=len(tok), seed=0, **spec), tok
    from entity_circuits.models import load_model
    return load_model(name)


def _single_thread():
    "One torch thread everywhere (set before torch is imported, and again after)."
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    "Peak resident memory of this process between `start()` and `stop()`, in MiB above the RSS at `start()`."

    def start(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
            self.exact = True
        except OSError:
            self.exact = False                               # fall back on ru_maxrss: a lower bound of the peak
        self.base_kib = _status_kib("VmRSS")
        self.maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def stop(self) -> dict:
        peak = _status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mib": peak / 1024, "base_mib": self.base_kib / 1024,
                "delta_mib": max(peak - self.base_kib, 0) / 1024, "exact": self.exact}


# ----------------------------------------------------------------------------------------------- prompts
def _save_batches(path: Path, clean, corrupt):
    import torch
    torch.save({"clean": dict(vars(clean)), "corrupt": dict(vars(corrupt))}, path)


def _load_batches(path: Path):
    import torch
    from entity_circuits.data import BoxesBatch
    d = torch.load(path)
    return BoxesBatch(**d["clean"]), BoxesBatch(**d["corrupt"])


# ----------------------------------------------------------------------------------------------- nnsight
def _chunks(batch, size: int):
    from dataclasses import fields, replace
    for i in range(0, len(batch), size):
        yield replace(batch, **{f.name: getattr(batch, f.name)[i:i + size] for f in fields(batch)})


def nnsight_path_patching(nm, clean, corrupt, group: str, receivers, batch_size: int = 100):
    """The paper's two-step path patching written with nnsight (`nm = nnsight.NNsight(model)`), chunk by chunk:
    the same scores as `path_patching(..., method="naive")`, `[n_layers, n_heads]` numpy."""
    import torch
    from entity_circuits.path_patching import PATHS
    path, cfg = PATHS[group], nm.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    total, n = torch.zeros(L, H), 0
    with torch.no_grad():
        for c, x in zip(_chunks(clean, batch_size), _chunks(corrupt, batch_size)):
            total += _nnsight_chunk(nm, c, x, path, receivers or (), L, H).sum(-1)
            n += len(c)
    return (total / n).numpy()


def _nnsight_chunk(nm, clean, corrupt, path, receivers, L: int, H: int):
    import torch
    cfg = nm.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or H
    layers = nm.model.layers
    inputs = clean.model_inputs()
    b, T = clean.input_ids.shape
    ar = torch.arange(b)
    pos = getattr(clean, f"{path.position}_pos")     # each example's sender (and receiver) position

    def prob(logits):                                  # p(answer) at the last position, float32 softmax
        return logits[ar, clean.last_pos].float().softmax(-1)[ar, clean.answer_ids]

    # every head's output (the input of o_proj) on the clean and on the corrupt prompts, and p_clean
    # (a trace's body hands back to this frame only the names bound to saved values: lists and dicts made
    # outside the body and filled inside it carry everything else)
    clean_z, corrupt_z = [None] * L, [None] * L
    with nm.trace(**inputs):
        for l in range(L):
            clean_z[l] = layers[l].self_attn.o_proj.input.save()
        clean_logits = nm.output.logits.save()
    with nm.trace(**corrupt.model_inputs()):
        for l in range(L):
            corrupt_z[l] = layers[l].self_attn.o_proj.input.save()
    p_clean = prob(clean_logits)
    d = clean_z[0].shape[-1] // H

    out = torch.zeros(L, H, b)
    for layer in range(L):
        recv = {}
        for l, h in sorted(set(map(tuple, receivers))):
            if l > layer:
                recv.setdefault(l, []).append(h)
        if path.receivers is not None and not recv:
            continue                                   # nothing above this layer receives: scores stay 0
        proj = "q_proj" if path.receiver_kind == "q" else "v_proj"
        n_recv = H if path.receiver_kind == "q" else n_kv
        for head in range(H):
            # step 1: clean run, every head frozen to its clean output, except the sender at the sender position
            sender = clean_z[layer].clone()
            sl = slice(head * d, (head + 1) * d)
            sender[ar, pos, sl] = corrupt_z[layer][ar, pos, sl]
            frozen = [sender if l == layer else clean_z[l] for l in range(L)]
            got = {}
            with nm.trace(**inputs):
                for l in range(L):                     # modules in the order the forward pass runs them
                    if l in recv:
                        got[l] = getattr(layers[l].self_attn, proj).output.save()
                    layers[l].self_attn.o_proj.input = frozen[l]
                logits = nm.output.logits.save()
            if path.receivers is not None:
                # step 2: clean run, everything free, the receivers' q (or v) at the position taken from step 1
                with nm.trace(**inputs):
                    for l in sorted(recv):
                        o = getattr(layers[l].self_attn, proj).output
                        ov, new = o.view(b, T, n_recv, d), got[l].view(b, T, n_recv, d)
                        for h in recv[l]:
                            j = h if path.receiver_kind == "q" else h // (H // n_kv)
                            ov[ar, pos, j] = new[ar, pos, j]
                    logits = nm.output.logits.save()
            out[layer, head] = (prob(logits) - p_clean) / p_clean
    return out


# ----------------------------------------------------------------------------------------------- workers
def worker(method: str, workdir: Path, batch_size: int, model_name: str = "organism-base",
           groups: tuple = ()):
    """Run one method on the saved prompts, in this (fresh) process; write its scores, time and peak memory.
    `groups`: the groups to run, in the paper's order (default all four, then the `EXTRA_GROUPS` runs)."""
    _single_thread()
    import numpy as np
    import torch
    from entity_circuits.path_patching import GROUPS

    model, _ = _load(model_name)
    clean, corrupt = _load_batches(workdir / "prompts.pt")
    groups = tuple(groups) or GROUPS
    with torch.no_grad():                              # warm-up: first-call costs are nobody's
        model(**next(_chunks(clean, 2)).model_inputs())
    if method == "nnsight":
        import nnsight
        nm = nnsight.NNsight(model)
        with torch.no_grad(), nm.trace(**next(_chunks(clean, 2)).model_inputs()):
            nm.output.logits.save()
    given = None if method == "engine" else json.loads((workdir / "receivers.json").read_text())

    if method == "engine":
        from entity_circuits.path_patching import choose_k, patching_cache, path_patching, top_heads
    elif method == "naive":
        from entity_circuits.path_patching import path_patching

    def run(group, recv, cache=None):
        if method == "nnsight":
            return nnsight_path_patching(nm, clean, corrupt, group, recv, batch_size)
        return path_patching(model, clean, corrupt, group, recv, batch_size, method, progress=False, cache=cache)

    scores, group_time, receivers, cache = {}, {}, {}, None
    mem = PeakRSS().start()
    t0 = time.perf_counter()
    if method == "engine":
        cache = patching_cache(model, clean, corrupt, batch_size)
        group_time["cache"] = time.perf_counter() - t0
    recv = None
    for i, g in enumerate(groups):
        if method != "engine" and i > 0:
            recv = [tuple(h) for h in given[GROUPS[i - 1]]]
        t = time.perf_counter()
        scores[g] = run(g, recv, cache)
        group_time[g] = time.perf_counter() - t
        if method == "engine":
            receivers[g] = recv = top_heads(scores[g], choose_k(scores[g]))
    wall = time.perf_counter() - t0
    memory = mem.stop()

    # Not part of the timed discovery run: C and D again, with every head of the last layer as a receiver, so
    # that the value-input paths (at the query and previous-query positions) are compared on non-zero scores.
    cfg = model.config
    every_last = [(cfg.num_hidden_layers - 1, h) for h in range(cfg.num_attention_heads)]
    for g in (EXTRA_GROUPS if groups == GROUPS else ()):
        t = time.perf_counter()
        scores[g + "*"] = run(g, every_last, cache)
        group_time[g + "*"] = time.perf_counter() - t
    if method == "engine":
        # the yardstick ("one suffix forward per sender"): a full forward pass over every prompt, timed
        # here, scaled by the share of layers above each sender layer, summed over every head
        with torch.no_grad():
            times = []
            for _ in range(3):
                t = time.perf_counter()
                for c in _chunks(clean, batch_size):
                    model(**c.model_inputs())
                times.append(time.perf_counter() - t)
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        group_time["forward"] = statistics.median(times)
        group_time["suffix bound"] = group_time["forward"] * H * sum((L - 1 - l) / L for l in range(L))
    result = {"method": method, "wall_s": wall, "group_s": group_time, **memory,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    if method == "nnsight":
        import nnsight
        result["nnsight"] = nnsight.__version__
    np.savez(workdir / f"scores_{method}.npz", **scores)
    if method == "engine":
        (workdir / "receivers.json").write_text(json.dumps(receivers))
    (workdir / f"result_{method}.json").write_text(json.dumps(result))


def hooks_worker(workdir: Path, batch_size: int, reps: int, tag: str):
    "Hook overhead on 1 prompt and on a full batch, in this (fresh) process: its malloc settings are its own."
    _single_thread()
    from entity_circuits.tracing import keep_freed_memory
    malloc = keep_freed_memory()                       # the opt-in; "opted out" under ENTITY_CIRCUITS_MALLOC=default
    from entity_circuits.models import load_model
    model, _ = load_model("organism-base")
    clean, _ = _load_batches(workdir / "prompts.pt")
    rows = []
    for size, r in ((1, reps), (batch_size, max(reps // 25, 8))):
        before = resource.getrusage(resource.RUSAGE_SELF)
        h = hook_overhead(model, next(_chunks(clean, size)), r)
        after = resource.getrusage(resource.RUSAGE_SELF)
        passes = 4 * (r + 3)                           # every arm, warm-up turns included
        h["minflt_per_pass"] = (after.ru_minflt - before.ru_minflt) / passes
        h["malloc"] = malloc                           # what keep_freed_memory() did to the allocator
        rows.append(h)
    (workdir / f"result_hooks_{tag}.json").write_text(json.dumps(rows))


def _run_worker(python: Path, method: str, workdir: Path, batch_size: int, extra: tuple = (),
                env_extra: dict | None = None, result: str | None = None):
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", method, "--workdir", str(workdir),
           "--batch-size", str(batch_size), *extra]
    env = {k: v for k, v in os.environ.items() if env_extra is None or k not in MALLOC_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}, **(env_extra or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {method} worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads((workdir / (result or f"result_{method}.json")).read_text())


# ----------------------------------------------------------------------------------------------- hooks
def hook_overhead(model, batch, reps: int) -> dict:
    """A forward pass under `TraceDict` on every o_proj (retain_input=True) against a plain one, two ways:
    'with' = the TraceDict entered and left around the pass (timed), 'registered' = its hooks set up beforehand
    (only the pass timed); and, as a control, a second plain pass, whose ratio to the first is the noise floor.
    The four run in turns, their order rotating, so that a neighbour's load hits them alike; a ratio is the
    median of the per-turn ratios, a cost the median of the per-turn differences."""
    import torch
    from entity_circuits.tracing import TraceDict, attention_layout
    lay = attention_layout(model)
    names = [lay.module(l, "o") for l in range(lay.n_layers)]
    inputs = batch.model_inputs()

    def plain():
        t = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - t

    def plain_again():
        t = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - t

    def with_block():
        t = time.perf_counter()
        with TraceDict(model, names, retain_input=True):
            model(**inputs)
        return time.perf_counter() - t

    def registered():
        with TraceDict(model, names, retain_input=True):
            t = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - t

    arms = (plain, with_block, registered, plain_again)
    times = {f: [] for f in arms}
    with torch.no_grad():
        for _ in range(3):
            for f in arms:
                f()
        for i in range(reps):
            for f in arms[i % 4:] + arms[:i % 4]:
                times[f].append(f())
    med = statistics.median
    ratio = lambda f: med(h / p for p, h in zip(times[plain], times[f]))
    cost = lambda f: med(h - p for p, h in zip(times[plain], times[f]))
    return {"batch": len(batch), "reps": reps, "plain_ms": 1e3 * med(times[plain]),
            "with_ms": 1e3 * med(times[with_block]), "registered_ms": 1e3 * med(times[registered]),
            "ratio_with": ratio(with_block), "ratio_registered": ratio(registered),
            "ratio_control": ratio(plain_again),
            "cost_with_us": 1e6 * cost(with_block), "cost_registered_us": 1e6 * cost(registered)}


# ----------------------------------------------------------------------------------------------- main
def _machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 prompts and fewer hook repetitions")
    ap.add_argument("--n", type=int, default=None, help="number of prompts (default 300, 60 with --quick)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--hook-reps", type=int, default=None,
                    help="turns of forward passes on one prompt (default 1000, 200 quick; 1/25 on a full batch)")
    ap.add_argument("--nnsight-python", type=Path, default=NNSIGHT_PYTHON,
                    help="Python of a venv with nnsight and this package (default benchmarks/.venv-nnsight)")
    ap.add_argument("--skip-nnsight", action="store_true", help="benchmark without the nnsight loop")
    ap.add_argument("--model", default="organism-base",
                    help="a registered model (default organism-base; e.g. smollm2-135m-instruct, 30 layers x 9 heads) or "
                         f"one of {', '.join(TINY_MODELS)} (random weights, built here): "
                         "other models than the base organism get seeded 7-box prompts of their usable words, "
                         "answered correctly or not (the sweep is timed, the scores compared)")
    ap.add_argument("--groups", nargs="+", default=None, help="groups to run, in the paper's order (default all four)")
    ap.add_argument("--skip-hooks", action="store_true", help="do not measure the hook overhead")
    ap.add_argument("--save", type=Path, nargs="?", const=DEFAULT_SAVE, default=None,
                    help=f"write every number to this JSON file (default {DEFAULT_SAVE.relative_to(HERE.parent)})")
    ap.add_argument("--worker", choices=METHODS + ("hooks",), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n or (60 if args.quick else 300)
    reps = args.hook_reps or (200 if args.quick else 1000)
    if args.worker == "hooks":
        return hooks_worker(args.workdir, args.batch_size, reps, args.tag)
    if args.worker:
        return worker(args.worker, args.workdir, args.batch_size, args.model, tuple(args.groups or ()))

    methods = [m for m in ("engine", "naive", "nnsight") if not (m == "nnsight" and args.skip_nnsight)]
    if "nnsight" in methods and not args.nnsight_python.exists():
        raise SystemExit(f"no nnsight venv at {args.nnsight_python}: create it as README.md says, "
                         "or pass --skip-nnsight.")

    if "nnsight" in methods and args.model not in TINY_MODELS:   # before any timing: the nnsight venv must load the model too (e.g. SmolLM2's extra)
        check = subprocess.run([str(args.nnsight_python), "-c", "import sys; from entity_circuits.models import "
                                "load_model; load_model(sys.argv[1])", args.model], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        if check.returncode != 0:
            why = (check.stderr.strip().splitlines() or [f"exit {check.returncode}"])[-1]
            raise SystemExit(f"the nnsight venv ({args.nnsight_python}) cannot load {args.model}:\n{why}\n"
                             "(see README.md), or pass --skip-nnsight.")

    _single_thread()
    import numpy as np
    import torch
    from entity_circuits.path_patching import GROUPS, discovery_prompts
    from entity_circuits.tracing import MALLOC_SETTINGS

    groups = tuple(args.groups or GROUPS)
    if [g for g in GROUPS if g in groups] != list(groups):
        raise SystemExit(f"--groups must be names of {GROUPS}, in that order; got {list(groups)}")
    model, tok = _load(args.model)
    if args.model == "organism-base":
        clean, corrupt = discovery_prompts(model, tok, n=n, seed=0)
    else:
        from entity_circuits.data import corrupt_for_path_patching, encode, sample_boxes, usable_labels, usable_objects
        words = dict(objects=usable_objects(tok), labels=usable_labels(tok))
        examples = sample_boxes(n, 7, seed=0, **words)
        clean, corrupt = encode(examples, tok), encode(corrupt_for_path_patching(examples, seed=1, **words), tok)
    cfg = model.config
    setup = (f"{args.model} ({cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads), {n} prompts of "
             f"{clean.input_ids.shape[1]} tokens, batch size {args.batch_size}, {len(groups)} group(s), every head a sender; "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread, {_machine()}")
    print(setup, flush=True)

    results, scores, hooks = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="patching-bench-") as tmp:
        workdir = Path(tmp)
        _save_batches(workdir / "prompts.pt", clean, corrupt)
        for m in methods:                                # the engine first: it picks every group's receivers
            print(f"running {m} ...", flush=True)
            python = args.nnsight_python if m == "nnsight" else Path(sys.executable)
            results[m] = _run_worker(python, m, workdir, args.batch_size,
                                     ("--model", args.model, "--groups", *groups))
            with np.load(workdir / f"scores_{m}.npz") as f:
                scores[m] = {g: f[g] for g in f.files}
        receivers = json.loads((workdir / "receivers.json").read_text())
        for i, (name, env) in enumerate(() if args.skip_hooks else ALLOCATORS.items()):
            print(f"running hook overhead ({name}) ...", flush=True)
            hooks[name] = _run_worker(Path(sys.executable), "hooks", workdir, args.batch_size,
                                      ("--hook-reps", str(reps), "--tag", str(i)), env, f"result_hooks_{i}.json")

    print("\nreceivers (found by the engine, given to every method):")
    for g in groups:
        print(f"  {g:16s} {[tuple(h) for h in receivers[g]]}")

    eng = results["engine"]
    labels = {"naive": "naive (package hooks)", "nnsight": f"naive (nnsight {results.get('nnsight', {}).get('nnsight', '')})",
              "engine": "engine (+ shared cache)"}
    print("\n| method | wall time (s) | peak RSS above baseline (MiB) | time / engine | memory / engine |")
    print("|---|---:|---:|---:|---:|")
    for m in ("naive", "nnsight", "engine"):
        if m not in results:
            continue
        r = results[m]
        r["speedup"] = r["wall_s"] / eng["wall_s"]
        r["memory_ratio"] = r["delta_mib"] / eng["delta_mib"] if eng["delta_mib"] > 0 else float("nan")
        print(f"| {labels[m]} | {r['wall_s']:.2f} | {r['delta_mib']:.1f} | {r['speedup']:.1f}x "
              f"| {r['memory_ratio']:.2f}x |")
    if not all(r["exact"] for r in results.values()):
        print("(peak memory from ru_maxrss deltas: /proc/self/clear_refs was not writable, so a lower bound)")

    print("\nper group (s); * = not in the timed run above: C and D again with every head of the last layer as "
          "a receiver, so that their paths are compared on non-zero scores")
    cols = ["cache"] + list(groups) + [g + "*" for g in (EXTRA_GROUPS if groups == GROUPS else ())]
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for m in ("naive", "nnsight", "engine"):
        if m in results:
            gt = results[m]["group_s"]
            print(f"| {m} | " + " | ".join(f"{gt[c]:.2f}" if c in gt else "-" for c in cols) + " |")

    ok, diffs = True, {}
    print("\nmax |score difference| over every sender head, per grid:")
    pairs = [(a, b) for a, b in (("naive", "engine"), ("nnsight", "engine"), ("nnsight", "naive"))
             if a in scores and b in scores]
    for a, b in pairs:
        per_group = {g: float(np.abs(scores[a][g] - scores[b][g]).max()) for g in scores["engine"]}
        worst = diffs[f"{a} vs {b}"] = max(per_group.values())
        ok &= worst < TOLERANCE
        detail = ", ".join(f"{g} {v:.1e}" for g, v in per_group.items())
        print(f"  {a} vs {b}: {worst:.2e} ({detail}) {'OK' if worst < TOLERANCE else 'FAIL'} (< {TOLERANCE:g})")
    eg = results["engine"]["group_s"]
    per_group = {g: eg[g] for g in groups}
    print(f"\nthe issue's yardstick, one suffix forward per sender over every position (a full forward over the prompts "
          f"takes {eg['forward']:.2f} s; scaled by the layers above each sender, summed over heads): {eg['suffix bound']:.2f} s "
          f"per group. The engine's groups took " + ", ".join(f"{g} {t:.2f} s ({t / eg['suffix bound']:.2f}x)"
                                                             for g, t in per_group.items())
          + " (below 1x: step 1 recomputes only the patched position, not every position above the sender)")
    print(f"scores identical (max |difference| {max(diffs.values()):.1e} < {TOLERANCE:g})" if ok else
          f"scores DIFFER (max |difference| {max(diffs.values()):.1e} >= {TOLERANCE:g})")

    if not hooks:
        print("\nhook overhead: not measured (--skip-hooks)")
    else:
        print("\nhook overhead: forward pass under TraceDict(every o_proj, retain_input=True) / plain forward pass "
              "(median of per-turn ratios; 'with' times entering and leaving the TraceDict too, 'registered' only "
              "the pass; 'control' is a plain pass over another plain pass: the noise floor), each allocator in its "
              f"own fresh worker ('opted in' = with `keep_freed_memory()` called: "
              f"{', '.join(f'{k}={v}' for k, (_, v) in MALLOC_SETTINGS.items())}; 'glibc defaults' = ENTITY_CIRCUITS_MALLOC=default)")
        print("| malloc | prompts | turns | plain (ms) | with (ms) | registered (ms) | ratio with | ratio registered "
              "| ratio control | cost with (us) | cost registered (us) | page faults / pass |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, rows in hooks.items():
            for h in rows:
                print(f"| {name} | {h['batch']} | {h['reps']} | {h['plain_ms']:.3f} | {h['with_ms']:.3f} "
                      f"| {h['registered_ms']:.3f} | {h['ratio_with']:.3f} | {h['ratio_registered']:.3f} "
                      f"| {h['ratio_control']:.3f} | {h['cost_with_us']:.0f} | {h['cost_registered_us']:.0f} "
                      f"| {h['minflt_per_pass']:.0f} |")

    print("\ntargets (printed, not asserted: one run on a shared machine is not a verdict):")
    target = DEEP_SPEED_TARGET if cfg.num_hidden_layers >= DEEP_LAYERS else SPEED_TARGET
    for m in ("naive", "nnsight"):
        if m in results:
            x = results[m]["speedup"]
            print(f"  engine >= {target:g}x faster than {labels[m]}: {x:.1f}x {'met' if x >= target else 'NOT met'}")
    for name, rows in hooks.items():
        for h in rows:
            print(f"  hooked forward <= {HOOK_TARGET}x a plain one ({name}, {h['batch']} prompt(s), hooks registered"
                  f" / with block): {h['ratio_registered']:.3f} / {h['ratio_with']:.3f} "
                  f"{'met' if max(h['ratio_registered'], h['ratio_with']) <= HOOK_TARGET else 'NOT met'}")
    load = os.getloadavg()
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in load)} ({os.cpu_count()} cores)")

    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps({
            "command": "benchmarks/patching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "setup": setup, "machine": _machine(), "n_prompts": n,
            "model": args.model, "groups": list(groups),
            "torch": torch.__version__, "results": results, "receivers": receivers, "max_abs_difference": diffs,
            "scores_identical": ok, "tolerance": TOLERANCE, "hooks": hooks,
            "malloc_settings": {k: v for k, (_, v) in MALLOC_SETTINGS.items()},
            "load_average": load, "targets": {"speedup": target, "hook_ratio": HOOK_TARGET}}, indent=1) + "\n")
        print(f"saved: {args.save}")

    if not ok:
        print("\nFAIL: the methods' scores differ by 1e-5 or more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
