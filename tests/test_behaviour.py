"""Behaviour, not spelling, decides what is stale: every table of `reproduce` at smoke size against the committed
snapshot (`tests/smoke/`, written by `tools/smoke_snapshot.py`). A refactor passes untouched; a change of what a table
holds fails here, naming the table, until its version is bumped and the snapshot refreshed."""
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from smoke_snapshot import SNAPSHOT, differences, run_smoke, tables  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("smoke"))


def test_every_table_behaves_as_its_version_says(smoke):
    assert len(tables(smoke)) >= 40
    problems = differences(smoke)
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_changed_table_and_on_a_bumped_version(smoke, tmp_path):
    "The comparison itself must be able to fail: a number nudged, a row gone, a version moved, a table added."
    copy = tmp_path / "snapshot"
    shutil.copytree(SNAPSHOT, copy)
    assert differences(smoke, copy) == []
    t = pd.read_csv(copy / "accuracy.csv")
    t.loc[0, "value"] += 0.01
    t.to_csv(copy / "accuracy.csv", index=False)
    pd.read_csv(copy / "table1.csv").iloc[1:].to_csv(copy / "table1.csv", index=False)
    (copy / "versions.json").write_text((copy / "versions.json").read_text().replace('"dcm_base": 1', '"dcm_base": 2'))
    problems = "\n".join(differences(smoke, copy))
    assert "accuracy (computed by entity_circuits.evaluate.stored_accuracy.<locals>.<lambda>): behaviour changed (value " \
           "differ) while its version stayed 1: bump its version" in problems, problems
    assert "table1 (computed by entity_circuits.circuit.stored_table1.<locals>.table1): behaviour changed (its rows " \
           "differ)" in problems, problems
    assert "dcm_base: version 2 -> 1" in problems
