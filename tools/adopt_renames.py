"""Carry the store's records over a change that only renames identifiers, without recomputing a table.

A record's `code` is the fingerprint of the code units its table's function reaches (see the results chapter).
Renaming a helper (`_rope` -> `apply_rope`) changes the text of every unit that calls it, so every table reaching
it would be recomputed, though no computation changed. This tool proves that it did not, record by record: OLD's
package with the renames applied to its identifiers (names, attribute names, and string constants that equal an old
name; comments and docstrings are not code) must have, for the record's unit, exactly the fingerprint of the
running package. A record is rewritten only if

1. its `code` is the fingerprint of OLD's package (it was current at OLD), and
2. the fingerprint of OLD's package, renamed, equals the running package's: the code it reaches differs from
   OLD's by the renames and nothing else.

Anything else (a record stale at OLD, or a unit whose code changed beyond the renames) is left as it is, and
`entity-circuits reproduce` recomputes it as usual. A new name that OLD already uses is refused: the rename would
merge two identifiers.

usage: python tools/adopt_renames.py OLD_COMMIT OLD=NEW [OLD=NEW ...] [--dry-run]
"""
import io
import json
import sys
import tokenize
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adopt_code_units import package_at  # noqa: E402


def rename_identifiers(source: bytes, renames: dict[str, str]) -> bytes:
    "`source` with every NAME token in `renames`, and every string literal equal to one, renamed; nothing else moves."
    lines = source.decode().splitlines(keepends=True)
    edits = []
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        text = tok.string
        if tok.type == tokenize.NAME and text in renames:
            edits.append((tok.start, tok.end, renames[text]))
        elif tok.type == tokenize.STRING and text[0] == text[-1] and text[0] in "'\"" and text[1:-1] in renames:
            edits.append((tok.start, tok.end, text[0] + renames[text[1:-1]] + text[0]))
    for (row, col), (erow, ecol), text in reversed(edits):   # tokens renamed here never span lines
        assert row == erow
        lines[row - 1] = lines[row - 1][:col] + text + lines[row - 1][ecol:]
    return "".join(lines).encode()


def _identifiers(source: bytes) -> set[str]:
    return {t.string for t in tokenize.generate_tokens(io.StringIO(source.decode()).readline) if t.type == tokenize.NAME}


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__)
        return 2
    old = argv[0]
    renames = dict(a.split("=", 1) for a in argv[1:])
    bad = [n for pair in renames.items() for n in pair if not n.isidentifier()]
    if bad:
        raise SystemExit(f"not identifiers: {bad}")
    from entity_circuits import results
    files = package_at(old)
    taken = set().union(*map(_identifiers, files.values())) & set(renames.values())
    if taken:
        raise SystemExit(f"{old} already uses {sorted(taken)}: renaming to them would merge identifiers")
    renamed = {m: rename_identifiers(s, renames) for m, s in files.items()}
    adopted, kept = [], []
    for meta in sorted(results.results_dir().glob("*.json")):
        info = json.loads(meta.read_text())
        unit = info.get("code_unit")
        if "code" not in info or "name" not in info or unit is None:
            continue
        now = results.code_fingerprint(unit)
        if info["code"] == now:
            continue
        if info["code"] == results.code_fingerprint(unit, files) and results.code_fingerprint(unit, renamed) == now:
            adopted.append(info["name"])
            if not dry:
                results.write_record(meta, dict(info, code=now))
        else:
            kept.append(info["name"])
    print(f"{'would adopt' if dry else 'adopted'} {len(adopted)} records: {', '.join(adopted)}")
    print(f"stale beyond the renames ({len(kept)}, recomputed by the next reproduce): {', '.join(kept)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
