"""The results store: reuse only what is current, recompute what is not (only when writing), never trust a half-written
result. The tests run inside `writing()` (conftest.py); `reading` puts a test back in the default mode."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from entity_circuits import results
from entity_circuits.results import (MissingResult, auditing, cached, is_current, load_result, result_info, results_dir,
                                     save_figure, writing)


class Counter:
    "A compute function that counts its calls and returns a small tidy table."

    def __init__(self, value=0.5):
        self.calls, self.value = 0, value

    def __call__(self, **params):       # `cached` passes the recorded parameters
        self.calls += 1
        return pd.DataFrame({"model": ["a", "b"], "metric": "accuracy", "value": [self.value, 1 / 3], "n": 10})


def test_same_params_reuse_without_calling_compute(tmp_path):
    f = Counter()
    first = cached("t", f, {"n": 10, "seeds": (0, 1)}, root=tmp_path)
    mtime = (tmp_path / "t.json").stat().st_mtime_ns
    again = cached("t", f, {"seeds": [0, 1], "n": 10}, root=tmp_path)  # same params: order and tuple/list do not matter
    assert f.calls == 1 and first.equals(again)
    assert (tmp_path / "t.json").stat().st_mtime_ns == mtime
    assert again.value.tolist() == [0.5, 1 / 3]  # floats round-trip exactly


def test_params_change_recomputes(tmp_path):
    f = Counter()
    cached("t", f, {"n": 10}, root=tmp_path)
    cached("t", f, {"n": 11}, root=tmp_path)
    assert f.calls == 2
    assert result_info("t", tmp_path)["params"] == {"n": 11}
    assert is_current("t", {"n": 11}, root=tmp_path) and not is_current("t", {"n": 10}, root=tmp_path)


def test_version_or_model_change_recomputes(tmp_path):
    f = Counter()
    cached("t", f, {}, models=["organism-base"], root=tmp_path)
    cached("t", f, {}, models=["organism-base"], root=tmp_path)
    assert f.calls == 1
    cached("t", f, {}, models=["organism-base"], root=tmp_path, version=2)    # a declared change of behaviour
    assert f.calls == 2 and result_info("t", tmp_path)["version"] == 2
    cached("t", f, {}, models=["organism-base", "organism-chat"], root=tmp_path, version=2)
    assert f.calls == 3


@pytest.fixture
def reading():
    "The default mode, as a chapter has it: outside `writing()`."
    token = results._MODE.set(results._Mode())
    yield
    results._MODE.reset(token)


def test_a_reader_computes_nothing(tmp_path, reading, caplog):
    f = Counter()
    with pytest.raises(MissingResult, match="entity-circuits reproduce"):
        cached("t", f, {"n": 1}, root=tmp_path)
    assert f.calls == 0 and not list(tmp_path.iterdir())
    with writing():
        cached("t", f, {"n": 1}, root=tmp_path)
    assert cached("t", f, {"n": 1}, root=tmp_path).value[0] == 0.5 and f.calls == 1    # current: read
    with caplog.at_level("WARNING", logger="entity_circuits.results"):
        stale = cached("t", Counter(0.9), {"n": 2}, root=tmp_path)                     # stale: the stored table ...
    assert stale.value[0] == 0.5 and "stale (parameters n: 1 -> 2)" in caplog.text     # ... and what changed
    assert result_info("t", tmp_path)["params"] == {"n": 1}


def test_an_audit_lists_and_computes_nothing(tmp_path):
    f = Counter()
    cached("t", f, {"n": 1}, root=tmp_path)
    with auditing() as seen:
        assert cached("t", f, {"n": 1}, root=tmp_path).value[0] == 0.5
        assert cached("t", f, {"n": 2}, root=tmp_path).value[0] == 0.5
        with pytest.raises(MissingResult):
            cached("u", f, {}, root=tmp_path)
    assert [(s.name, s.state) for s in seen] == [("t", "current"), ("t", "stale"), ("u", "missing")]
    assert f.calls == 1


def test_model_fingerprint_follows_the_manifest(tmp_path, monkeypatch):
    def manifest(sha):
        files = {"base/model.safetensors": {"sha256": sha, "bytes": 1}, "tokenizer/t.json": {"sha256": "t", "bytes": 1},
                 "chat/model.safetensors": {"sha256": "c", "bytes": 1}}
        (tmp_path / "MANIFEST.json").write_text(json.dumps({"files": files}))

    monkeypatch.setenv("ENTITY_CIRCUITS_ORGANISMS", str(tmp_path))
    manifest("a")
    base, chat = results.model_fingerprint("organism-base"), results.model_fingerprint("organism-chat")
    manifest("b")  # the base's weights changed; the chat model's did not
    assert results.model_fingerprint("organism-base") != base
    assert results.model_fingerprint("organism-chat") == chat
    assert "huggyllama/llama-7b" in results.model_fingerprint("llama-7b")


def test_crash_inside_compute_leaves_no_result(tmp_path):
    def boom(**params):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached("t", boom, {}, root=tmp_path)
    assert load_result("t", tmp_path) is None and list(tmp_path.iterdir()) == []


def test_crash_on_recompute_keeps_the_old_result_valid_but_not_current(tmp_path):
    f = Counter(0.5)
    cached("t", f, {"n": 1}, root=tmp_path)

    def boom(**params):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached("t", boom, {"n": 2}, root=tmp_path)
    assert load_result("t", tmp_path).value[0] == 0.5
    assert is_current("t", {"n": 1}, root=tmp_path) and not is_current("t", {"n": 2}, root=tmp_path)


def test_crash_between_csv_and_json_is_not_a_result(tmp_path, monkeypatch):
    cached("t", Counter(0.5), {"n": 1}, root=tmp_path)
    real = results._atomic_write

    def csv_only(path, data):
        if path.suffix == ".json":
            raise KeyboardInterrupt  # the process dies after the new CSV, before its JSON
        real(path, data)

    monkeypatch.setattr(results, "_atomic_write", csv_only)
    with pytest.raises(KeyboardInterrupt):
        cached("t", Counter(0.9), {"n": 2}, root=tmp_path)
    monkeypatch.setattr(results, "_atomic_write", real)
    # the new CSV is on disk, but the JSON on disk describes the old one: neither is taken for a result
    assert pd.read_csv(tmp_path / "t.csv").value[0] == 0.9
    assert load_result("t", tmp_path) is None
    f = Counter(0.9)
    assert cached("t", f, {"n": 1}, root=tmp_path).value[0] == 0.9 and f.calls == 1  # recomputed, not reused
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_sigkill_during_compute_then_rerun(tmp_path):
    "A real kill: the process dies (SIGKILL) after writing a CSV by hand; the rerun computes and commits."
    script = textwrap.dedent(f"""
        import os, signal, pandas as pd
        from entity_circuits.results import cached, writing
        def compute(**params):
            pd.DataFrame({{"value": [1]}}).to_csv({str(tmp_path / 't.csv')!r}, index=False)  # junk at the final path
            os.kill(os.getpid(), signal.SIGKILL)
        with writing():
            cached("t", compute, {{}}, root={str(tmp_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert load_result("t", tmp_path) is None
    f = Counter()
    assert cached("t", f, {}, root=tmp_path).value[0] == 0.5 and f.calls == 1


def test_force_recomputes_and_does_not_leak(tmp_path):
    f = Counter()
    cached("t", f, {}, root=tmp_path)
    with writing(force=True):
        cached("t", f, {}, root=tmp_path)
    assert f.calls == 2
    cached("t", f, {}, root=tmp_path)
    assert f.calls == 2


def test_named_index_is_kept_as_columns_row_numbers_are_not(tmp_path):
    wide = pd.DataFrame({"full": [0.6, 0.1]}, index=pd.Index(["base", "chat"], name="model"))
    t = cached("t", lambda: wide, {}, root=tmp_path)
    assert list(t.columns) == ["model", "full"] and t.model.tolist() == ["base", "chat"]
    rows = pd.concat([pd.DataFrame({"v": [1, 2]}), pd.DataFrame({"v": [3]})])  # row numbers 0, 1, 0: not data
    assert list(cached("u", lambda: rows, {}, root=tmp_path).columns) == ["v"]


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="DataFrame"):
        cached("t", lambda: [1, 2], {}, root=tmp_path)
    for bad in ("../t", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="result name"):
            cached(bad, Counter(), {}, root=tmp_path)


def test_results_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTITY_CIRCUITS_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path
    monkeypatch.delenv("ENTITY_CIRCUITS_RESULTS")
    assert results_dir().name == "results" and (results_dir().parent / "settings.ini").exists()
    f = Counter()
    monkeypatch.setenv("ENTITY_CIRCUITS_RESULTS", str(tmp_path / "r"))
    cached("t", f, {})
    assert (tmp_path / "r" / "t.csv").exists() and (tmp_path / "r" / "t.json").exists()


def test_save_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, svg = save_figure(fig, "fig", root=tmp_path)
    plt.close(fig)
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()[:1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig.svg"]


def test_files_get_the_usual_mode(tmp_path):
    "Atomic writes go through a private temporary file; the result must still have an ordinary file's mode."
    cached("t", Counter(), {}, root=tmp_path)
    (tmp_path / "plain").write_text("")
    mode = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "t.csv").stat().st_mode == mode and (tmp_path / "t.json").stat().st_mode == mode


def test_the_recorded_parameters_are_the_ones_passed(tmp_path):
    "`cached` calls compute(**params): what the key records is what ran; a compute that cannot take them is refused."
    seen = []

    def compute(n, seed):
        seen.append((n, seed))
        return pd.DataFrame({"n": [n], "seed": [seed]})

    t = cached("t", compute, {"n": 3, "seed": 7}, root=tmp_path)
    assert seen == [(3, 7)] and result_info("t", tmp_path)["params"] == {"n": 3, "seed": 7} and t.n[0] == 3
    with pytest.raises(TypeError, match="exactly the recorded parameters"):
        cached("u", compute, {"n": 3}, root=tmp_path)                      # seed missing
    with pytest.raises(TypeError, match="exactly the recorded parameters"):
        cached("u", compute, {"n": 3, "seed": 7, "context": "keep"}, root=tmp_path)   # recorded, never passed
    assert seen == [(3, 7)] and load_result("u", tmp_path) is None          # refused before anything ran


def test_committed_records_are_in_the_store_format():
    """Every committed table has a complete record with its key (params, models, version) and the step that wrote it.
    Whether each is current is `entity-circuits status`'s to say (CI runs it: it loads the models)."""
    root = Path(__file__).resolve().parents[1] / "results"
    records = sorted(root.glob("*.json"))
    assert len(records) >= 40
    for p in records:
        info = result_info(p.stem, root)
        assert info is not None, f"{p.name}: its CSV does not have the recorded sha256"
        assert {"params", "models", "version", "step"} <= set(info) and "code" not in info, p.name
