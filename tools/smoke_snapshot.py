"""The behaviour snapshot: every table of `entity-circuits reproduce` at smoke size, committed in `tests/smoke/`.

`tests/test_behaviour.py` runs the same smoke reproduction and compares each table with the snapshot: a table that
differs while the version its function declares (`cached(..., version=N)`) did not move fails the test, naming it.
After a deliberate change of behaviour, bump that version and refresh the snapshot from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tools/smoke_snapshot.py

It writes `tests/smoke/<table>.csv` and `tests/smoke/versions.json` (table -> version). The zoo is the four
organisms and `tracker`, the base organism saved as a local model with a chat template, so that the `extras` step
(SmolLM2's chapter) runs too. About a minute on one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "smoke"
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def make_tracker(where: Path) -> str:
    "Save the base organism with a chat template as `<where>/models/tracker`; returns that path (an extra model)."
    from entity_circuits.models import load_model
    model, tok = load_model("organism-base")
    tok.chat_template = CHAT_TEMPLATE
    path = where / "models" / "tracker"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_smoke(work: Path) -> Path:
    """Run every step at smoke size on the organisms and the tracker under `work`; returns the results directory.
    The tracker is named by its relative path `models/tracker` (tables record it), so the run happens inside `work`."""
    import torch
    from entity_circuits.models import ORGANISMS
    from entity_circuits.reproduce import reproduce
    from entity_circuits.zoo import Config
    torch.set_num_threads(1)
    here = Path.cwd()
    os.chdir(work)
    try:
        tracker = str(Path(make_tracker(work)).relative_to(work))
        reproduce([*ORGANISMS, tracker], root=work / "results", config=Config.smoke(), echo=lambda line: None)
    finally:
        os.chdir(here)
    return work / "results"


def tables(root: Path) -> dict[str, int]:
    "table -> declared version, for every complete table under `root`."
    from entity_circuits.results import result_info
    return {p.stem: info["version"] for p in sorted(root.glob("*.json"))
            if (info := result_info(p.stem, root)) is not None}


def _same(a, b) -> bool:
    "Two columns of a table agree: floats to the last few digits a CPU's float kernels may change, the rest exactly."
    import numpy as np
    import pandas as pd
    if pd.api.types.is_float_dtype(a) or pd.api.types.is_float_dtype(b):
        try:
            return bool(np.allclose(a.astype(float), b.astype(float), rtol=1e-4, atol=1e-6, equal_nan=True))
        except (TypeError, ValueError):
            return False
    return a.astype(str).tolist() == b.astype(str).tolist()


def differences(root: Path, snapshot: Path = SNAPSHOT) -> list[str]:
    "What differs between the smoke tables under `root` and the snapshot: one line per table, naming what to do."
    import pandas as pd
    from entity_circuits.results import result_info
    fresh, known = tables(root), json.loads((snapshot / "versions.json").read_text())
    refresh = "refresh the snapshot (python tools/smoke_snapshot.py)"
    out = [f"{n}: no longer computed: {refresh}" for n in sorted(set(known) - set(fresh))]
    out += [f"{n}: a new table: {refresh}" for n in sorted(set(fresh) - set(known))]
    for name in sorted(set(fresh) & set(known)):
        if fresh[name] != known[name]:
            out.append(f"{name}: version {known[name]} -> {fresh[name]}: {refresh}")
            continue
        new, old = pd.read_csv(root / f"{name}.csv"), pd.read_csv(snapshot / f"{name}.csv")
        what = ("its columns" if list(new.columns) != list(old.columns) else "its rows" if len(new) != len(old)
                else ", ".join(c for c in new.columns if not _same(new[c], old[c])))
        if what:
            function = (result_info(name, root) or {}).get("function", "?")
            out.append(f"{name} (computed by {function}): behaviour changed ({what} differ) while its version stayed "
                       f"{fresh[name]}: bump its "
                       f"version (cached(..., version={fresh[name] + 1})), recompute (entity-circuits reproduce) and "
                       f"{refresh}")
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp())
    try:
        root = run_smoke(work)
        versions = tables(root)
        shutil.rmtree(SNAPSHOT, ignore_errors=True)
        SNAPSHOT.mkdir(parents=True)
        for name in versions:
            shutil.copy(root / f"{name}.csv", SNAPSHOT / f"{name}.csv")
        (SNAPSHOT / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
        print(f"{len(versions)} tables written to {SNAPSHOT.relative_to(ROOT)}/")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
