"""Regenerate the checked-in corruption vectors: `python tests/vectors/generate_vectors.py`.

Three tiny artifacts (one per stored codec: raw, zstd, planes) built from seeded bf16-like values, at edge
sizes: 10 tokens in blocks of 4 (two full blocks and a short last one) plus a tail. The JSON pins the
exact manifest bytes, CIDs and stored chunk bytes, so any change to the format shows up as a test failure
(bump FORMAT_VERSION and regenerate), and tests/test_artifact_corruption.py flips every bit of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from kvswap.artifact.pipeline import publish_kv
from kvswap.kvtensors import KvLayout, KvTensors

HERE = Path(__file__).parent
VECTORS = HERE / "artifact_small.json"
LAYOUT = KvLayout(layers=2, kv_heads=1, head_dim=4, dtype="bf16")
N_TOKENS, BLOCK_TOKENS, VOCAB = 10, 4, 8


def small_kv(seed: int = 2026) -> KvTensors:
    rng = np.random.default_rng(seed)

    def bf16(shape):
        return (rng.normal(0, 1, shape).astype(np.float32).view(np.uint32) >> 16).astype("<u2")

    shape = (LAYOUT.kv_heads, N_TOKENS, LAYOUT.head_dim)
    return KvTensors(LAYOUT, [int(t) for t in rng.integers(0, 151_000, N_TOKENS)],
                     [bf16(shape) for _ in range(LAYOUT.layers)], [bf16(shape) for _ in range(LAYOUT.layers)],
                     rng.normal(0, 3, VOCAB).astype(np.float32))


def build(codec: str) -> dict:
    manifest, chunks = publish_kv(small_kv(), model_id="vector-model", model_fingerprint="ab" * 32,
                                  tokenizer_fingerprint="cd" * 32, document_hash="ef" * 32, codec=codec,
                                  block_tokens=BLOCK_TOKENS)
    return {"codec": codec, "cid": str(manifest.cid), "manifest": manifest.canonical_bytes.hex(),
            "blobs": [[str(cid), data.hex()] for cid, data in chunks]}


def vectors() -> dict:
    return {"layout": LAYOUT.to_dict(), "n_tokens": N_TOKENS, "block_tokens": BLOCK_TOKENS,
            "artifacts": [build(c) for c in ("raw", "zstd", "planes")]}


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(vectors(), indent=1) + "\n")
    print(f"wrote {VECTORS}", file=sys.stderr)
