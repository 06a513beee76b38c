"""`benchmarks/scale.py` in its smoke form (a small random LLaMA on the CPU): every stage runs and is reported."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_benchmark_smoke(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert list(result["stages"]) == ["model", "path_patching", "cmap", "dcm"]
    assert all(s["seconds"] > 0 and s["peak_gib"] > 0 for s in result["stages"].values())
    assert result["scores_finite"] and result["shape"]["num_hidden_layers"] == 4


PATCHING = SCRIPT.parent / "patching.py"


def test_patching_benchmark_runs_and_compares(tmp_path):
    "The engine and the paper's loop on a few prompts, one group, in their own workers: equal scores (exit 0), saved."
    out = tmp_path / "patching.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(PATCHING), "--n", "6", "--batch-size", "3", "--skip-nnsight", "--skip-hooks",
                          "--groups", "value_fetcher", "pos_transmitter", "--save", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["scores_identical"] and result["groups"] == ["value_fetcher", "pos_transmitter"]
    assert set(result["results"]) == {"engine", "naive"} and result["max_abs_difference"]["naive vs engine"] < 1e-5
