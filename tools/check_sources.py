"""Check that the notebooks are the single source: no stored outputs, and `nbdev_export` is a no-op.

Run from the repository root: `python tools/check_sources.py` (`--clear-outputs` empties the notebooks' outputs instead). Exits non-zero, naming the files, if
a committed notebook carries outputs or execution counts, if exporting the notebooks would
change `entity_circuits/` (someone edited the package by hand, or forgot to export).
"""
import difflib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "entity_circuits"


def notebooks_with_outputs() -> list[str]:
    bad = []
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                bad.append(f"{nb_path.relative_to(ROOT)} (cell {i})")
                break
    return bad


def clear_outputs() -> list[str]:
    """Empty every code cell's outputs and execution count in place (what `make export` runs after `nbdev_clean`, which
    keeps outputs because `clear_all = False` lets cell tags such as "hide-input" survive); returns the files changed."""
    changed = []
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        text = nb_path.read_text(encoding="utf-8")
        nb = json.loads(text)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new != text:
            nb_path.write_text(new, encoding="utf-8")
            changed.append(str(nb_path.relative_to(ROOT)))
    return changed


def snapshot() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(LIB.rglob("*.py"))}


def main() -> int:
    ok = True
    bad = notebooks_with_outputs()
    if bad:
        ok = False
        print("Notebooks with stored outputs (run `make export`):\n  " + "\n  ".join(bad))
    before = snapshot()
    exe = Path(sys.executable).with_name("nbdev_export")
    subprocess.run([str(exe)], cwd=ROOT, check=True)
    after = snapshot()
    if before != after:
        ok = False
        print("`nbdev_export` changed the package: entity_circuits/ does not match nbs/.")
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                diff = difflib.unified_diff(
                    before.get(name, "").splitlines(), after.get(name, "").splitlines(),
                    f"committed/{name}", f"exported/{name}", lineterm="", n=1)
                print("\n".join(list(diff)[:40]))
    n_nbs = len(list((ROOT / "nbs").glob("*.ipynb")))
    print(f"check_sources: {n_nbs} notebooks, {len(after)} exported modules: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--clear-outputs"]:
        print("outputs cleared:", ", ".join(clear_outputs()) or "none")
        sys.exit(0)
    sys.exit(main())
