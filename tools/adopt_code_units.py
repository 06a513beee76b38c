"""Carry the store's records over to a new rule for code fingerprints without recomputing a table.

Until commit 97ba99f a record's `code` was a sha256 over the package modules that the computing module imports,
transitively (`code_module` named that module). Since then it is a sha256 over the code units the computing function
can reach (`code_unit`; see the results chapter), and the rule for what a unit's code is may change again. A record
whose `code` equals the hash that OLD's own rule gives OLD's package was computed by OLD's code, so the running
rule's hash *of OLD's code* describes it exactly. This runs `entity-circuits reproduce` with `cached` wrapped: before
each stored table is looked up, such a record is rewritten with that hash. `cached` then compares it with the running
code, as it always does, and recomputes the tables whose code changed since OLD. A record that does not match OLD is
left as it is (and is recomputed as stale).

A record is only ever rewritten to describe OLD's code, so a table whose code changed since OLD is still recomputed.
With `--records`, every record that names its unit (`code_unit`) is adopted in place, and nothing is run.

usage: python tools/adopt_code_units.py OLD_COMMIT [reproduce options, e.g. --only dcm]
       python tools/adopt_code_units.py OLD_COMMIT --records
"""
import ast
import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_at(commit: str) -> dict[str, bytes]:
    "The package's modules (not `_modidx.py`) at `commit`, by module name."
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "entity_circuits/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {"entity_circuits." + Path(n).stem if Path(n).stem != "__init__" else "entity_circuits":
            subprocess.run(["git", "show", f"{commit}:{n}"], cwd=ROOT, check=True, capture_output=True).stdout
            for n in names if n.endswith(".py") and not n.endswith("_modidx.py")}


def old_fingerprint(module: str | None, files: dict[str, bytes]) -> str:
    "The rule of 97ba99f: sha256 over `module` and the package modules it imports, transitively."
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m not in files:
            continue
        seen.add(m)
        for node in ast.walk(ast.parse(files[m])):
            if isinstance(node, ast.ImportFrom):
                name = ".".join(filter(None, ["entity_circuits" if node.level else "", node.module]))
                todo += [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    h = hashlib.sha256()
    for m in (sorted(seen) if module in files else sorted(files)):
        h.update(m.encode() + b"\0" + files[m] + b"\0")
    return h.hexdigest()


def rule_at(commit: str) -> types.ModuleType:
    "The results module of `commit`, loaded apart from the running package: its rule for unit fingerprints."
    source = subprocess.run(["git", "show", f"{commit}:entity_circuits/results.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    module = types.ModuleType(f"results_at_{commit}")
    exec(compile(source, f"{commit}:entity_circuits/results.py", "exec"), module.__dict__)
    return module


def recorded_by(info: dict, files: dict[str, bytes], rule: types.ModuleType) -> bool:
    "Whether record `info` is what OLD's own rule gives OLD's code (`files`, `rule`: OLD's package and results module)."
    if "code_unit" not in info:
        return info.get("code") == old_fingerprint(info.get("code_module"), files)
    return hasattr(rule, "code_units") and info.get("code") == rule.code_fingerprint(info["code_unit"], files)


def adopt(name: str, unit: str | None, files: dict[str, bytes], rule: types.ModuleType, root=None) -> bool:
    "Rewrite table `name`'s record with the running rule's hash of OLD's code for `unit`, if OLD computed it; True if rewritten."
    from entity_circuits import results
    info = results.result_info(name, root)
    if info is None or not recorded_by(info, files, rule):
        return False
    unit_based = {k: v for k, v in info.items() if k != "code_module"}     # the old rule's field goes
    new = dict(unit_based, code_unit=unit, code=results.code_fingerprint(unit, files))
    if new == info:
        return False
    _, meta = results._paths(name, root)
    results.write_record(meta, new)
    return True


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    old, rest = argv[0], argv[1:]
    from entity_circuits import results
    files, rule = package_at(old), rule_at(old)
    if rest == ["--records"]:          # every record already names its unit: nothing to run
        records = [json.loads(p.read_text()) for p in sorted(results.results_dir().glob("*.json"))]
        adopted = [i["name"] for i in records if "code_unit" in i and adopt(i["name"], i["code_unit"], files, rule)]
        print(f"adopted {len(adopted)} records: {', '.join(adopted)}")
        return 0
    adopted, original = [], results.cached

    def adopting(name, compute, params, models=(), root=None):
        if adopt(name, results._code_unit(compute), files, rule, root):
            adopted.append(name)
        return original(name, compute, params, models, root)

    results.cached = adopting          # before any module that stores tables imports it
    from entity_circuits.cli import main as cli
    code = cli(["reproduce", *rest])
    print(f"adopted {len(adopted)} records: {', '.join(adopted)}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
