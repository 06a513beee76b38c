"""Shared pytest set-up: offline hub, tests that may compute stored tables, and a count of the notebooks nbval executed."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _tests_compute():
    """Every test runs inside the store's `writing()`: a test computes the tables it asks for (in its own temporary
    directory). The chapters, executed by nbval in their own kernels, read the store, as the book does."""
    from entity_circuits.results import writing
    with writing():
        yield


def pytest_terminal_summary(terminalreporter):
    reports = [r for key in ("passed", "failed", "error") for r in terminalreporter.stats.get(key, [])]
    nbs = sorted({r.nodeid.split("::")[0] for r in reports if r.nodeid.split("::")[0].endswith(".ipynb")})
    if nbs:
        failed = {r.nodeid.split("::")[0] for r in terminalreporter.stats.get("failed", [])}
        cells = sum(r.nodeid.split("::")[0].endswith(".ipynb") and r.when == "call" for r in reports)
        terminalreporter.write_line(
            f"notebooks executed by nbval: {len(nbs)} ({cells} cells; {len(failed & set(nbs))} notebook(s) with failures): "
            + ", ".join(os.path.basename(n) for n in nbs))
