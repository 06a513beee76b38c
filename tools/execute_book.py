"""Execute the book's chapters in parallel into Jupyter Book's execution cache.

`jupyter-book build` executes the chapters one after another, on one core. This runs them first, one kernel per core
(jupyter-cache's local-parallel executor, in the chapters' own directory, as the build would), into the cache the
build reads (`_build/.jupyter_cache`, with `execute_notebooks: cache` in `_config.yml`); the build then takes their
outputs. The cache is emptied first, so every chapter runs afresh: the book never shows a stale page, even when only
the stored results changed. Exits non-zero, printing each failing chapter's traceback, if a chapter fails.

Run from anywhere: `python tools/execute_book.py` (the Makefile's `book` target does, with one torch thread per
kernel).
"""
import logging
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


def chapters() -> list[Path]:
    "The notebooks of the book, from `_toc.yml` (its root and every `- file:` entry)."
    toc = (ROOT / "_toc.yml").read_text()
    return [ROOT / f"{name}.ipynb" for name in re.findall(r"^(?:root|- file):\s*(\S+)\s*$", toc, re.M)]


def main() -> int:
    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    shutil.rmtree(CACHE, ignore_errors=True)
    cache = get_cache(CACHE)
    for nb in chapters():
        cache.add_nb_to_project(str(nb))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = load_executor("local-parallel", cache, logger=logging.getLogger("execute_book")).run_and_cache(timeout=1200)
    failed = result.errored + result.excepted
    for uri in failed:
        print(f"--- {uri} failed:\n{cache.get_project_record(uri).traceback}", file=sys.stderr)
    print(f"execute_book: {len(result.succeeded)} chapters executed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
