"""`entity-circuits reproduce`: resumable after a kill, a verdict that follows the result tables (`verdict`), the zoo, the command line (`cli`)."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from entity_circuits.models import ORGANISMS
from entity_circuits.evaluate import ratio_ci
from entity_circuits.cli import main
from entity_circuits.reproduce import STEPS, reproduce, root_for
from entity_circuits.verdict import CLAIMS, NOT_COMPUTED, compare, judge, verdict_table
from entity_circuits.zoo import Zoo, default_models, table_name
from entity_circuits.results import cached, result_info, results_dir

MODELS = ["organism-base", "organism-math-full"]  # two organisms keep the smoke run short
COMMAND = [sys.executable, "-c", "import sys; from entity_circuits.cli import main; sys.exit(main())",
           "reproduce", "--smoke", "--models", *MODELS]
ENV = {**os.environ, "ENTITY_CIRCUITS_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def committed(root) -> dict:
    "name -> mtime of the JSON of every complete result under `root`."
    return {p.stem: p.stat().st_mtime_ns for p in root.glob("*.json") if result_info(p.stem, root) is not None}


def test_killed_after_the_first_step_resumes_without_recomputing(tmp_path):
    proc = subprocess.Popen(COMMAND + ["--results", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.match(r"\[\d+/\d+\] accuracy: done", line):
            proc.send_signal(signal.SIGKILL)  # a hard kill: no cleanup, no exception handlers
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    before = committed(tmp_path)
    assert {"accuracy", "accuracy_by_boxes", "accuracy_vs_base"} <= set(before)
    assert not (tmp_path / "table1.json").exists()  # killed long before Table 1

    time.sleep(0.01)
    rerun = subprocess.run(COMMAND + ["--results", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=900)
    out = rerun.stdout
    assert rerun.returncode == 0, out + rerun.stderr
    for name in before:  # everything finished before the kill is reused, its files untouched
        assert f"{name}: reused" in out and f"{name}: computing" not in out, name
        assert committed(tmp_path)[name] == before[name], name
    assert "table1: computing" in out and "cross_circuit: computing" in out  # the rest was done now
    assert "Verdict" in out and "math fine-tuning raises accuracy:" in out
    after = committed(tmp_path)
    assert {"circuit_base", "table1", "cross_circuit", "completeness", "circuit_math-full"} <= set(after)
    # every step ran at smoke size, the heavy ones too
    assert {"head_ablation_base", "dcm_base", "dcm_functionality", "cmap_outputs", "knockout_curves"} <= set(after)
    assert (tmp_path / "path_patching_base.png").exists() and (tmp_path / "completeness.svg").exists()

    # a third run computes nothing, and prints the same verdict
    again = subprocess.run(COMMAND + ["--results", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and ": computing" not in again.stdout
    assert again.stdout.split("Verdict", 1)[1] == out.split("Verdict", 1)[1]
    assert committed(tmp_path) == after


def _store(root, name, rows, **params):
    return cached(name, lambda **_: pd.DataFrame(rows), params, root=root)   # `params` label the fake table


def test_verdict_follows_the_result_tables(tmp_path):
    v = verdict_table(tmp_path)
    assert len(v) == len(CLAIMS) and (v.verdict == NOT_COMPUTED).all() and (v.organisms == NOT_COMPUTED).all()

    def deltas(lora, full, chat):
        return [dict(model=m, role=r, value=d, ci_low=d - 0.05, ci_high=d + 0.05)
                for m, r, d in [("organism-chat", "chat", chat), ("organism-math-lora", "math-lora", lora),
                                ("organism-math-full", "math-full", full)]]

    _store(tmp_path, "accuracy_vs_base", deltas(0.2, 0.15, 0.0), v=1)
    v = verdict_table(tmp_path).set_index("claim").verdict
    assert v["math fine-tuning raises accuracy"] == "holds"
    assert v["chat fine-tuning does not raise accuracy"] == "holds"
    _store(tmp_path, "accuracy_vs_base", deltas(-0.5, 0.15, -0.4), v=2)  # the file changes, so does the verdict
    v = verdict_table(tmp_path).set_index("claim")
    assert v.verdict["math fine-tuning raises accuracy"] == "partly"
    assert v.verdict["chat fine-tuning does not raise accuracy"] == "partly"
    assert "math-lora -0.50 [-0.55, -0.45]" in v.organisms["math fine-tuning raises accuracy"]
    _store(tmp_path, "accuracy_vs_base", deltas(-0.5, -0.2, 0.3), v=3)
    v = verdict_table(tmp_path).set_index("claim").verdict
    assert v["math fine-tuning raises accuracy"] == "does not hold"
    assert v["chat fine-tuning does not raise accuracy"] == "does not hold"

    faith = lambda vals: [dict(role=r, metric="faithfulness", context="keep", value=x, ci_low=x - 0.05, ci_high=x + 0.05)
                          for r, x in zip(["base", "chat", "math-lora", "math-full"], vals)]
    _store(tmp_path, "table1", faith([1.0, 0.95, 0.9, 0.97]), v=1)
    assert verdict_table(tmp_path).verdict[2] == "holds"
    _store(tmp_path, "table1", faith([1.0, 0.2, 0.1, 0.3]), v=2)
    assert verdict_table(tmp_path).verdict[2] == "does not hold"

    rng = np.random.default_rng(0)
    fn = [dict(model=m, group=g, desideratum=d, run=r, accuracy=acc * (1 + 0.01 * rng.standard_normal()))
          for r in range(10) for m, scale in [("organism-base", 1.0), ("organism-math-full", 1.2)]
          for g, d, acc in [("value_fetcher", "object", 0.4 * scale), ("pos_transmitter", "position", 0.3 * scale)]]
    _store(tmp_path, "dcm_functionality", fn, v=1)
    assert verdict_table(tmp_path).verdict[3] == "holds"
    # the organism's shape: DCM selects no B head for position (both models at the floor, a ratio near 1) and one for
    # the query label; the claim must test B on the label, where the fine-tune keeps 0.3 of the base's accuracy
    fn = [dict(model=m, group=g, desideratum=d, run=r, heads=k, accuracy=acc * (1 + 0.01 * rng.standard_normal()))
          for r in range(10) for m, scale in [("organism-base", 1.0), ("organism-math-full", 0.3)]
          for g, d, k, acc in [("value_fetcher", "object", 8, 0.6 * scale), ("pos_transmitter", "position", 0, 0.05),
                               ("pos_transmitter", "label", 1, 0.5 * scale)]]
    _store(tmp_path, "dcm_functionality", fn, v=2)
    v = verdict_table(tmp_path).set_index("claim")
    assert v.verdict["group functions persist (DCM)"] == "does not hold"
    assert "B label (not position) math-full 0.30" in v.organisms["group functions persist (DCM)"]
    assert "B position" not in v.organisms["group functions persist (DCM)"]

    def cmap(gains, ci=0.03):
        rows = [dict(source="organism-base", group="alone", patch="none", accuracy=0.6, delta=0.0, delta_ci_low=0.0,
                     delta_ci_high=0.0)]
        return rows + [dict(source="organism-math-full", group=g, patch="output", accuracy=0.6 + d, delta=d,
                            delta_ci_low=d - ci, delta_ci_high=d + ci) for g, d in gains.items()]

    _store(tmp_path, "cmap_outputs", cmap({"D": 0.0, "C": -0.02, "B": 0.1, "A": 0.15, "full": 0.16}), v=1)  # the paper's shape
    assert verdict_table(tmp_path).verdict[4] == "holds"
    _store(tmp_path, "cmap_outputs", cmap({"B": 0.1, "A": 0.02, "full": 0.16}), v=2)   # B carries the gain, not A
    assert verdict_table(tmp_path).verdict[4] == "does not hold"
    _store(tmp_path, "cmap_outputs", cmap({"B": -0.05, "A": -0.2, "full": -0.25}), v=3)  # no gain to carry
    assert verdict_table(tmp_path).verdict[4] == "does not hold"
    _store(tmp_path, "cmap_outputs", cmap({"B": 0.0, "A": 0.01, "full": 0.01}, ci=0.05), v=4)  # cannot tell
    assert verdict_table(tmp_path).verdict[4] == "partly"


def test_rules():
    assert compare(0.01, 0.2) == "above" and compare(-0.2, -0.01) == "below" and compare(-0.1, 0.1) == "unclear"
    assert compare(0.85, 0.95, 0.8) == "above" and compare(np.nan, np.nan) == "unclear"
    assert judge(["above"] * 3) == "holds" and judge(["below"] * 2) == "does not hold"
    assert judge(["below", "unclear"]) == "partly" and judge(["unclear"]) == "partly" and judge([]) == NOT_COMPUTED
    num, den = np.r_[np.ones(30), np.zeros(70)], np.r_[np.ones(60), np.zeros(40)]
    lo, hi = ratio_ci(num, den)
    assert lo < 0.5 < hi
    assert ratio_ci(num, num) == (1.0, 1.0)


def test_zoo_roles_and_roots(tmp_path, monkeypatch):
    assert Zoo(ORGANISMS).by_role() == dict(zip(["base", "chat", "math-lora", "math-full"], ORGANISMS))
    z = Zoo(["organism-math-full", "smollm2-135m-instruct", "organism-base"])
    assert list(z.by_role()) == ["base", "math-full"] and z.extras == ["smollm2-135m-instruct"]
    with pytest.raises(ValueError, match="both stand for"):
        Zoo(["organism-base", "llama-7b"])
    with pytest.raises(ValueError, match="unknown steps"):
        reproduce(MODELS, only=["nope"], root=tmp_path)
    monkeypatch.setenv("ENTITY_CIRCUITS_RESULTS", str(tmp_path))
    assert root_for(None) == tmp_path and root_for(default_models()) == tmp_path
    assert root_for(["llama-7b", "goat-7b"]) == tmp_path / "llama-7b+goat-7b"
    assert list(STEPS)[:5] == ["organisms", "accuracy", "controlled", "circuit", "table1"]


def test_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--models", "--only", "--results", "--force", "--smoke"):
        assert flag in text
    with pytest.raises(SystemExit) as e:  # train-organisms: the same parser, its own options
        main(["train-organisms", "--help"])
    assert e.value.code == 0 and "--reuse-base" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--smoke"])
    assert e.value.code == 2 and "--smoke needs --results" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--only", "nope", "--results", str(tmp_path)])
    assert e.value.code == 2


def test_only_and_force(tmp_path, capsys):
    "--only runs just those steps; --force recomputes a current table."
    assert main(["reproduce", "--smoke", "--models", *MODELS, "--results", str(tmp_path), "--only", "accuracy"]) == 0
    first = committed(tmp_path)
    assert set(first) == {"accuracy", "accuracy_by_boxes", "accuracy_vs_base", "accuracy_restricted", "revival"}
    out = capsys.readouterr().out
    assert "1. math fine-tuning raises accuracy:" in out and "not computed" in out.lower()
    time.sleep(0.01)
    main(["reproduce", "--smoke", "--models", *MODELS, "--results", str(tmp_path), "--only", "accuracy"])
    assert committed(tmp_path) == first
    main(["reproduce", "--smoke", "--models", *MODELS, "--results", str(tmp_path), "--only", "accuracy", "--force"])
    assert all(committed(tmp_path)[k] > first[k] for k in first)
    assert "ENTITY_CIRCUITS_RECOMPUTE" not in os.environ  # --force does not leak


def test_the_papers_tier_end_to_end_from_local_directories(tmp_path):
    """The paper's four models by their registry names, read from $ENTITY_CIRCUITS_MODELS/<name> with no hub: a
    small LLaMA base (the base organism's weights), a LoRA adapter in Goat's layout (adapter_model.bin beside the
    base's copy, as tiedong/goat-lora-7b ships), a full fine-tune and a chat model; `reproduce --smoke` runs every
    step on them and the verdict reads their tables."""
    from entity_circuits.models import load_model
    models = tmp_path / "models"
    base, tok = load_model("organism-base")
    for name, organism in (("llama-7b", "organism-base"), ("goat-7b", "organism-base"),
                           ("float-7b", "organism-math-full"), ("vicuna-7b", "organism-chat")):
        load_model(organism)[0].save_pretrained(models / name)
        tok.save_pretrained(models / name)
    lora, _ = load_model("organism-math-lora")                  # a PeftModel, unmerged
    lora.peft_config["default"].base_model_name_or_path = "huggyllama/llama-7b"
    lora.save_pretrained(models / "goat-7b-adapter", safe_serialization=False)
    assert (models / "goat-7b-adapter" / "adapter_model.bin").exists()
    names = ["llama-7b", "vicuna-7b", "goat-7b", "float-7b"]
    env = {**ENV, "ENTITY_CIRCUITS_MODELS": str(models), "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(COMMAND[:4] + ["--smoke", "--models", *names, "--results", str(tmp_path / "results")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    done = committed(tmp_path / "results")
    assert {"accuracy", "circuit_base", "table1", "dcm_base", "dcm_chat", "dcm_functionality", "cmap_outputs",
            "knockout_curves", "mechanisms_base", "mechanisms_vs_base"} <= set(done), sorted(done)   # tables by role
    cmap = pd.read_csv(tmp_path / "results" / "cmap_outputs.csv")
    assert set(cmap.source) == {"llama-7b", "goat-7b", "float-7b", "vicuna-7b"}
    acc = pd.read_csv(tmp_path / "results" / "accuracy.csv").set_index("model")
    assert set(acc.index) >= set(names)
    # goat-7b is the base with the Goat-layout adapter on top: the adapter's update changes the logits
    os.environ["ENTITY_CIRCUITS_MODELS"] = str(models)
    try:
        goat, _ = load_model("goat-7b")
        llama, _ = load_model("llama-7b")
    finally:
        del os.environ["ENTITY_CIRCUITS_MODELS"]
    assert type(goat).__name__ == "PeftModel"
    ids = tok("The pen is in Box F. Box F contains the", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(goat(ids).logits, llama(ids).logits)
    v = verdict_table(tmp_path / "results")
    assert (v.verdict != NOT_COMPUTED).sum() >= 4, v[["claim", "verdict"]]


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    """An extra model that tracks: the base organism saved as a local model with a chat template, in a directory given
    by a relative path with a '/' (its tables are named by the folder: `table_name`)."""
    from entity_circuits.models import load_model
    model, tok = load_model("organism-base")
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("models/tracker")
    tok.save_pretrained("models/tracker")
    return "models/tracker", tok


def test_extras_step_where_an_extra_model_tracks(tracker, tmp_path):
    """Where the extra model tracks best, the `extras` step stores path patching, the circuit's faithfulness and
    minimality, DCM on its groups, the binding mechanism and the knockout, all under that template and box count."""
    from entity_circuits.reproduce import EXTRA_KNOCKOUT_EDGES, step_extras
    from entity_circuits.smollm2 import best_setting, template_prefix
    from entity_circuits.zoo import Config
    name, tok = tracker
    named = lambda kind: table_name(kind, name)
    assert named("dcm") == "dcm_tracker"                      # the folder's name: a table's name is a file name
    zoo = Zoo([name], Config.smoke())
    assert zoo.extras == [name] and not zoo.by_role()
    out = step_extras(zoo, tmp_path / "results")
    best = best_setting(out[named("accuracy_grid")])
    assert best is not None, out[named("accuracy_grid")]
    template, k = best
    assert {named("path_patching"), named("mechanisms"), named("knockout")} <= set(out)
    assert (out[named("path_patching")].template == template).all()
    assert (out[named("mechanisms")].n_boxes == k).all()
    ko = out[named("knockout")]
    assert list(dict.fromkeys(ko.edge)) == list(EXTRA_KNOCKOUT_EDGES) and set(ko.layer_from) == {0, 4}
    info = result_info(named("knockout"), tmp_path / "results")
    assert info["params"]["prefix"] == template_prefix(tok, template) and info["params"]["restrict"]
    assert result_info(named("mechanisms"), tmp_path / "results")["params"]["prefix"] == template_prefix(tok, template)
    # the circuit's checks and DCM: on the heads path patching kept, under the same template and box count
    kept = out[named("path_patching")].query("kept")
    faith, mini, dcm = out[named("faithfulness")], out[named("minimality")], out[named("dcm")]
    assert (faith.template == template).all() and (faith.n_boxes == k).all()
    assert set(faith.metric) == {"full", "circuit", "random", "faithfulness"} and (faith.heads == len(kept)).all()
    assert len(mini) == len(kept) and (mini.n_boxes == k).all()
    assert set(zip(mini.layer, mini["head"])) == set(zip(kept.layer, kept["head"]))
    assert set(dcm.group) == set(kept.group) and (dcm["size"] == dcm.group.map(kept.group.value_counts())).all()
    dcm_params = result_info(named("dcm"), tmp_path / "results")["params"]
    assert dcm_params.get("prefix", "") == template_prefix(tok, template) and dcm_params["restrict"]   # "" not recorded
    assert dcm_params["words"] == "usable" and dcm_params["n_boxes"] == k


def test_extras_step_with_too_few_boxes_for_the_mechanisms(tracker, tmp_path):
    "Tracking best at 3 boxes: the three mechanisms and the original's answer need 4, so no mechanism table; the rest runs."
    import dataclasses
    from entity_circuits.reproduce import step_extras
    from entity_circuits.smollm2 import best_setting
    from entity_circuits.zoo import Config
    name, _ = tracker
    named = lambda kind: table_name(kind, name)
    out = step_extras(Zoo([name], dataclasses.replace(Config.smoke(), box_counts=(3,))), tmp_path / "results")
    assert best_setting(out[named("accuracy_grid")])[1] == 3
    assert named("knockout") in out and named("path_patching") in out and named("mechanisms") not in out


def test_targeted_claim_reads_the_circuit_against_random_heads(tmp_path):
    "The targeted row: A+B heads minus random heads, top-1; its CI decides, and the replay-only effects stand beside."
    from entity_circuits.verdict import claim_targeted

    def rows(effect):
        return [dict(against=a, arm=arm, metric="top1", trainable=10, effect=e, ci_low=e - 0.05, ci_high=e + 0.05,
                     control=c, vs_base=0.0, vs_base_low=0.0, vs_base_high=0.0)
                for a, arm, c, e in [("random", "math-circuit-AB", "math-random", effect),
                                     ("replay-only", "math-circuit-AB", "replay-full", -0.1),
                                     ("replay-only", "math-random", "replay-full", -0.2)]]

    assert claim_targeted(tmp_path)["verdict"] == NOT_COMPUTED
    for v, (effect, verdict) in enumerate([(0.2, "holds"), (-0.2, "does not hold"),
                                           (0.0, "unclear (the interval straddles 0)")]):
        _store(tmp_path, "targeted_effects", rows(effect), v=v)
        row = claim_targeted(tmp_path)
        assert row["verdict"] == verdict and "10 trainable" in row["organisms"]
    assert {p["what"] for p in row["points"]} == {"top-1, against random heads", "top-1, against replay-only"}
