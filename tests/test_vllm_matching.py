"""The vLLM connector's prefix matching (pure: no torch, no vllm), and that importing the integration
package pulls in neither."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvswap.artifact.chunking import prefix_keys
from kvswap.integrations.vllm.matching import Candidate, best_match, shared_prefix, usable_tokens


def cand(ids, bt=16, cid="a") -> Candidate:
    return Candidate(cid, bt, tuple(ids), tuple(prefix_keys(ids, bt)), "0" * 64)


DOC = list(range(1000, 1100))  # 100 tokens: 6 full 16-token blocks and a 4-token tail


def test_whole_artifact_including_its_short_last_block():
    assert shared_prefix(cand(DOC), DOC + [7, 8, 9]) == 100


def test_divergence_stops_at_the_last_equal_block():
    prompt = DOC[:40] + [1] + DOC[41:]
    assert shared_prefix(cand(DOC), prompt) == 32  # block 2 (tokens 32..47) differs


def test_prompt_shorter_than_the_artifact_uses_its_full_blocks():
    assert shared_prefix(cand(DOC), DOC[:50]) == 48


def test_hash_equal_but_ids_differ_is_no_match():
    c = cand(DOC)
    forged = Candidate("x", 16, tuple([0] * 100), c.prefix_keys, c.document_hash)  # keys copied, ids not
    assert shared_prefix(forged, DOC + [1]) == 0


def test_usable_tokens_round_to_vllm_blocks_and_leave_the_last_token():
    assert usable_tokens(100, 200, 32) == 96
    assert usable_tokens(100, 101, 32) == 96
    assert usable_tokens(128, 128, 64) == 64  # the prompt IS the artifact: vLLM must compute the last token
    assert usable_tokens(31, 200, 32) == 0


@pytest.mark.parametrize("bt", [16, 64])
def test_best_match_prefers_the_longest_and_respects_a_named_cid(bt):
    short, long = cand(DOC[:40], bt, "short"), cand(DOC, bt, "long")
    prompt = DOC + [5] * 30
    assert best_match([short, long], prompt, 32).cid == "long"
    assert best_match([short, long], prompt, 32).n_tokens == 96
    assert best_match([short, long], prompt, 32, only_cid="short").n_tokens == 32
    assert best_match([short, long], [1, 2, 3] + prompt, 32) is None
    assert best_match([], prompt, 32) is None


def test_importing_the_integration_needs_neither_torch_nor_vllm():
    code = ("import sys, kvswap, kvswap.integrations.vllm, kvswap.integrations.vllm.matching; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
