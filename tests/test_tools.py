"The store's maintenance tools (`tools/`): what they rewrite, and what they refuse."
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from adopt_renames import rename_identifiers  # noqa: E402

from entity_circuits import results  # noqa: E402

SOURCE = b'''def _rope(x):
    "calls _rope"  # _rope in a comment
    return x


def attend(q, k_rope):
    q = _rope(q) if q is not None else\\
        getattr(q, "_rope")
    return q, k_rope, "_rope is here", obj._rope
'''


def test_rename_identifiers_renames_names_attributes_and_identifier_strings_only():
    out = rename_identifiers(SOURCE, {"_rope": "apply_rope"}).decode()
    assert "def apply_rope(x):" in out and "q = apply_rope(q) if q is not None else\\\n" in out
    assert 'getattr(q, "apply_rope")' in out and "obj.apply_rope" in out
    assert "k_rope" in out and '"_rope is here"' in out                  # other identifiers, other strings: kept
    assert '"calls _rope"  # _rope in a comment' in out                   # text is not code
    assert out.count("\n") == SOURCE.decode().count("\n")                # nothing moves to another line


def test_a_rename_changes_the_callers_fingerprint_and_the_tool_sees_through_only_the_rename():
    unit = "entity_circuits.m:attend"
    old = {"entity_circuits.m": SOURCE}
    new = {"entity_circuits.m": (SOURCE.replace(b"_rope(", b"apply_rope(").replace(b'"_rope"', b'"apply_rope"')
                                   .replace(b"obj._rope", b"obj.apply_rope"))}   # by hand
    assert results.code_fingerprint(unit, old) != results.code_fingerprint(unit, new)
    renamed = {"entity_circuits.m": rename_identifiers(SOURCE, {"_rope": "apply_rope"})}
    assert results.code_fingerprint(unit, renamed) == results.code_fingerprint(unit, new)
    changed = {"entity_circuits.m": new["entity_circuits.m"].replace(b"return x", b"return -x")}
    assert results.code_fingerprint(unit, changed) != results.code_fingerprint(unit, renamed)


def test_adopt_rewrites_only_a_record_that_olds_rule_gives_olds_code(tmp_path):
    import hashlib
    import json
    import types
    from adopt_code_units import adopt
    unit, old = "entity_circuits.m:attend", {"entity_circuits.m": SOURCE}
    # OLD's results module as `recorded_by` reads it: a unit-based rule (it has `code_units`) and its fingerprint
    old_rule = types.SimpleNamespace(code_units=None, code_fingerprint=lambda u, files: f"old rule of {u}")
    for name, code in (("current", f"old rule of {unit}"), ("stale", "something else")):
        data = b"x\n1\n"
        (tmp_path / f"{name}.csv").write_bytes(data)
        results.write_record(tmp_path / f"{name}.json", dict(name=name, code_unit=unit, code=code, params={},
                                                             csv_sha256=hashlib.sha256(data).hexdigest()))
    assert adopt("current", unit, old, old_rule, tmp_path)
    assert json.loads((tmp_path / "current.json").read_text())["code"] == results.code_fingerprint(unit, old)
    assert not adopt("stale", unit, old, old_rule, tmp_path)              # not what OLD computed: left to recompute
    assert json.loads((tmp_path / "stale.json").read_text())["code"] == "something else"
    assert not adopt("current", unit, old, old_rule, tmp_path)            # already adopted: nothing to do
