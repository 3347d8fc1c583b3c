"""The artifact format's limits, beside the parser that enforces them (kvswap/artifact/manifest.py), as
safetensors keeps its own: what a valid artifact may hold, in bytes, chunks and tokens, with the reason for
each. FORMAT.md ("Limits") lists the same values; tests/test_limits_doc.py checks that they agree.

Sizes a manifest declares are never trusted beyond these bounds: a validator rejects a manifest that exceeds
one before any tensor is allocated. The wire has its own bounds (protocol/limits.py), each at least as large
as the format's (tests/test_limits_doc.py checks that too), so every valid artifact can travel.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

#: Largest canonical manifest (bytes). A 3774-token Qwen3-4B artifact with 64-token blocks lists 59
#: chunks (~10 KB); 4 MiB leaves room for ~100k-token documents while stopping a hostile peer early.
MAX_MANIFEST_BYTES = 4 * MiB
#: Largest signature envelope list for one manifest (bytes): a few attestations, not a database.
MAX_ENVELOPES_BYTES = 256 * KiB
#: Largest audit attestation list for one manifest (bytes): a full audit's statement is ~0.5 KB, so dozens fit.
MAX_ATTESTATIONS_BYTES = 256 * KiB
#: Most attestations a store keeps per artifact (one per auditor, the newest); when full, one by an auditor
#: the node trusts replaces one by an auditor it does not (a flood of throwaway auditor keys evicts nothing
#: the node relies on).
MAX_ATTESTATIONS_PER_ARTIFACT = 64
#: Largest raw (decompressed) chunk (bytes). Qwen3-4B at 64 tokens per block is 9.4 MB raw; 64 MiB
#: bounds memory per in-flight chunk and caps a zstd bomb before any allocation.
MAX_CHUNK_RAW_BYTES = 64 * MiB
#: Largest stored (on-disk / on-the-wire) chunk (bytes); a stored chunk is never larger than raw + header.
MAX_CHUNK_STORED_BYTES = MAX_CHUNK_RAW_BYTES + 64 * KiB
#: Most chunks in one artifact.
MAX_CHUNKS = 65_536
#: Most tokens in one artifact (longer than any context window we serve).
MAX_TOKENS = 1_048_576
#: Largest raw "tail" blob (bytes): the float32 logits at the document's last position. Qwen3's
#: 151,669-token vocabulary is 607 KB; 4 MiB admits vocabularies up to ~1M entries.
MAX_TAIL_RAW_BYTES = 4 * MiB
#: Default tokens per chunk block: a Qwen3-4B chunk (147,456 B/token) is ~9.4 MB, "a few MB".
DEFAULT_BLOCK_TOKENS = 64
