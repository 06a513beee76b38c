# The README's two commands: `make reproduce` and `make test`. Each sets up .venv/ first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: setup test reproduce book export clean

# torch must be pinned in the same pip call as everything else: 2.13.0 is a CPU wheel on local
# disk, and an unpinned torch would pull a multi-GB CUDA build. constraints.txt pins the rest
# to the versions this repository was last tested with.
setup: $(STAMP)
$(STAMP): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

# Unit tests + every chapter executed by nbval, after checking the notebooks are the source.
test: setup
	$(BIN)/python tools/check_sources.py
	$(BIN)/python -m pytest tests/ --nbval-lax --nbval-current-env nbs/ -p no:cacheprovider

# The main job on the shipped defaults, then the book (which executes every chapter) in _build/html/.
reproduce: setup book

book: setup
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)
	@echo "Book: $(CURDIR)/_build/html/index.html"

# After editing notebooks: export the package and strip outputs.
export: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

clean:
	rm -rf _build $(VENV)
