"""The vLLM connector test group (runs in .venv-vllm; see conftest.py)."""
