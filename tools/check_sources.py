"""Check that the notebooks are the single source: no stored outputs, and `nbdev_export` is a no-op.

Run from the repository root: `python tools/check_sources.py`. Exits non-zero, naming the files, if
a committed notebook carries outputs or execution counts, if exporting the notebooks would
change `entity_circuits/` (someone edited the package by hand, or forgot to export), or if a chapter
calls its own notebook definition of a function that stores results (see `shadowed_stored_calls`).
"""
import ast
import difflib
import json
import re
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


def shadowed_stored_calls() -> list[str]:
    """Plain cells that call a stored function (an exported function whose body calls `cached(`) through the notebook's
    own definition. That definition lives in `__main__`, so the results store labels its tables with the whole
    package's fingerprint instead of the module's, and the chapter and `entity-circuits reproduce` recompute each
    other's tables. Each chapter must import the package's copy (`from entity_circuits.<module> import name`) after
    the export cell that defines it and before it is called."""
    bad = []
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
        sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        module = next((m.group(1) for s in sources if (m := re.match(r"#\| default_exp (\S+)", s))), None)
        if module is None:
            continue
        shadowed = set()
        for s in sources:
            if s.startswith("#| export"):
                for node in ast.parse(s).body:
                    if isinstance(node, ast.FunctionDef) and any(
                            isinstance(n, ast.Call) and getattr(n.func, "id", None) == "cached" for n in ast.walk(node)):
                        shadowed.add(node.name)
                continue
            imported = {a.asname or a.name for node in ast.walk(ast.parse(s)) if isinstance(node, ast.ImportFrom)
                        and node.module == f"entity_circuits.{module}" for a in node.names}
            shadowed -= imported
            called = {n.func.id for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            bad += [f"{nb_path.relative_to(ROOT)}: {name}() called through the notebook's own definition"
                    for name in sorted(called & shadowed)]
    return bad


def snapshot() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(LIB.rglob("*.py"))}


def main() -> int:
    ok = True
    bad = notebooks_with_outputs()
    if bad:
        ok = False
        print("Notebooks with stored outputs (run `nbdev_clean`):\n  " + "\n  ".join(bad))
    shadow = shadowed_stored_calls()
    if shadow:
        ok = False
        print("Chapters that must import the package's copy of a stored function before calling it:\n  "
              + "\n  ".join(shadow))
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
    sys.exit(main())
