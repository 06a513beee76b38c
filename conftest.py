"""Shared pytest set-up: offline hub, and a count of the notebooks nbval executed."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_terminal_summary(terminalreporter):
    reports = [r for key in ("passed", "failed", "error") for r in terminalreporter.stats.get(key, [])]
    nbs = sorted({r.nodeid.split("::")[0] for r in reports if r.nodeid.split("::")[0].endswith(".ipynb")})
    if nbs:
        failed = {r.nodeid.split("::")[0] for r in terminalreporter.stats.get("failed", [])}
        cells = sum(r.nodeid.split("::")[0].endswith(".ipynb") and r.when == "call" for r in reports)
        terminalreporter.write_line(
            f"notebooks executed by nbval: {len(nbs)} ({cells} cells; {len(failed & set(nbs))} notebook(s) with failures): "
            + ", ".join(os.path.basename(n) for n in nbs))
