"""The engine: the only part of kvswap that imports torch and transformers.

    from kvswap.engine import load_engine, GenerationResult
    eng = load_engine("tiny-qwen3", dtype="bf16")
    kv = eng.prefill(eng.tokenize(text))            # KvTensors (raw bits + last logits)
    out = eng.generate_from_kv(kv, suffix_ids)      # no re-prefill of the document

Names resolve lazily so that `kvswap.engine.catalog` (model names, no torch) stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Engine", "GenerationResult", "load_engine", "run_exact"]

if TYPE_CHECKING:  # pragma: no cover
    from .core import Engine, GenerationResult
    from .exact import run_exact
    from .models import load_engine

_WHERE = {"Engine": "core", "GenerationResult": "core", "load_engine": "models", "run_exact": "exact"}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
