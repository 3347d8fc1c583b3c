"""Shared fixtures: the tiny Qwen3 engine, built once per test session and shared by every test module.

tiny-qwen3 is a seeded random Qwen3 with the real Qwen3 vocabulary, built into the model cache
($KVSWAP_MODEL_CACHE, default ~/.cache/kvswap/models) on first use and loaded through from_pretrained like
a real checkpoint. Loading takes a few seconds, so engines are session-scoped: treat them as read-only.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

#: the host-memory tiers of every home the suite makes (daemons and CLI subprocesses inherit it), in one folder
#: that goes when the session ends, instead of one /dev/shm folder per throwaway home left behind
_TIER_ROOT = tempfile.mkdtemp(prefix="kvswap-test-tiers-",
                              dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
os.environ["KVSWAP_HOST_TIER_DIR"] = _TIER_ROOT


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TIER_ROOT, ignore_errors=True)

#: English prose long enough for several 16-token blocks, short enough to prefill in milliseconds
DOC_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a "
    "screw press, movable metal type and an oil-based ink into a system that could produce books far faster "
    "than any scribe. Before his workshop in Mainz, most books in Europe were copied by hand, which made them "
    "rare and expensive. Within a few decades, printing shops had spread to more than two hundred cities, and "
    "millions of books were in circulation. Cheaper books changed who could read, what they read, and how "
    "quickly new ideas travelled between scholars, merchants and churches."
)
QUESTION_TEXT = " Question: who combined the screw press with movable type? Answer:"


@pytest.fixture(scope="session")
def doc_text() -> str:
    return DOC_TEXT


@pytest.fixture(scope="session")
def question_text() -> str:
    return QUESTION_TEXT


@pytest.fixture(scope="session")
def tiny_engine():
    """tiny-qwen3 in bf16 (the dtype artifacts use by default)."""
    from kvswap.engine import load_engine

    return load_engine("tiny-qwen3", dtype="bf16", device="cpu")


@pytest.fixture(scope="session")
def tiny_engine_fp32():
    """tiny-qwen3 in fp32: same fingerprint as bf16 (weights as stored), different dtype."""
    from kvswap.engine import load_engine

    return load_engine("tiny-qwen3", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_engine_fp16():
    """tiny-qwen3 in fp16."""
    from kvswap.engine import load_engine

    return load_engine("tiny-qwen3", dtype="fp16", device="cpu")


@pytest.fixture(scope="session")
def tiny_doc_kv(tiny_engine, doc_text):
    """The bf16 KvTensors of DOC_TEXT (read-only: copy before mutating)."""
    return tiny_engine.prefill(tiny_engine.tokenize(doc_text))
