# Two entry points (see README): `make demo` and `make test`. Both set up .venv from this repository's
# own files first; torch is pinned to the 2.13.0 CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_MODEL ?= checkpoints/llama-small

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

demo: install
	$(BIN)/stagemesh make-checkpoint --arch llama --preset small --out $(DEMO_MODEL)
	$(BIN)/stagemesh demo --model $(DEMO_MODEL) --tp 2 --pp 2

test: install
	$(BIN)/python -m pytest
