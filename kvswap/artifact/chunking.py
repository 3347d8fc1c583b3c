"""Token-block chunking: which tokens a chunk holds, its byte layout, and its chained prefix key.

A chunk is the KV of tokens [t0, t1) for ALL layers, so two documents that share their first blocks of
tokens share the leading chunks byte for byte (hence by CID), and a consumer that needs only a prefix
fetches only the chunks that cover it. Layers-per-chunk would make every chunk depend on the whole
document length. Byte layout (FORMAT.md "Chunk payload"): for each layer in order, K[:, t0:t1, :] then
V[:, t0:t1, :], each [kv_heads, n, head_dim] C-order little-endian raw element bits.

The prefix key of block i is sha256(key of block i-1 + the block's token ids as little-endian uint32),
starting from 32 zero bytes: equal keys mean equal token prefixes (vLLM's prefix-cache hash), so a node
can ask "who holds the KV for this prefix" without knowing any chunk CID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..protocol.errors import FormatError, UsageError
from ..kvtensors import KvLayout, KvTensors
from .limits import MAX_CHUNK_RAW_BYTES, MAX_TOKENS

#: the chain's starting value (the "key" of the empty prefix)
PREFIX_ROOT = bytes(32)


def block_ranges(n_tokens: int, block_tokens: int) -> list[tuple[int, int]]:
    """[t0, t1) of every block: full blocks of `block_tokens`, the last one possibly shorter."""
    if not 0 < n_tokens <= MAX_TOKENS:
        raise UsageError(f"token count {n_tokens} outside 1..{MAX_TOKENS}")
    if block_tokens <= 0:
        raise UsageError(f"block size must be positive, got {block_tokens}")
    return [(t0, min(t0 + block_tokens, n_tokens)) for t0 in range(0, n_tokens, block_tokens)]


def check_block_tokens(layout: KvLayout, block_tokens: int) -> None:
    """A block must fit MAX_CHUNK_RAW_BYTES for this layout."""
    if not isinstance(block_tokens, int) or block_tokens <= 0:
        raise UsageError(f"block size must be a positive int, got {block_tokens!r}")
    if block_tokens * layout.bytes_per_token > MAX_CHUNK_RAW_BYTES:
        most = MAX_CHUNK_RAW_BYTES // layout.bytes_per_token
        raise UsageError(
            f"{block_tokens}-token blocks are {block_tokens * layout.bytes_per_token} bytes for this model, over "
            f"MAX_CHUNK_RAW_BYTES ({MAX_CHUNK_RAW_BYTES}); use at most {most} tokens per block"
        )


def tokens_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 (the form hashed and stored in the manifest)."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
        raise UsageError("token ids must fit in uint32")
    return arr.astype("<u4").tobytes()


def token_hash(token_ids: Sequence[int]) -> str:
    """sha256 hex of the token ids as little-endian uint32."""
    return hashlib.sha256(tokens_bytes(token_ids)).hexdigest()


def prefix_keys(token_ids: Sequence[int], block_tokens: int) -> list[bytes]:
    """The chained prefix key of every block (32 bytes each)."""
    packed = tokens_bytes(token_ids)
    keys, prev = [], PREFIX_ROOT
    for t0, t1 in block_ranges(len(token_ids), block_tokens):
        prev = hashlib.sha256(prev + packed[4 * t0 : 4 * t1]).digest()
        keys.append(prev)
    return keys


def chunk_payload(kv: KvTensors, t0: int, t1: int) -> bytes:
    """Raw bytes of tokens [t0, t1): per layer K then V slices, C order, little-endian."""
    lay = kv.layout
    want = lay.raw_dtype
    parts = []
    for k, v in zip(kv.keys, kv.values):
        for arr in (k, v):
            part = np.ascontiguousarray(arr[:, t0:t1, :], dtype=want)
            parts.append(part.data)
    return b"".join(parts)


def split_payload(raw: bytes, layout: KvLayout, n: int) -> list[np.ndarray]:
    """Views of a chunk's raw bytes as 2*layers arrays [kv_heads, n, head_dim] (K0, V0, K1, V1, ...)."""
    per = layout.kv_heads * n * layout.head_dim
    if len(raw) != 2 * layout.layers * per * layout.itemsize:
        raise FormatError(f"chunk payload is {len(raw)} bytes, expected {n} tokens x {layout.bytes_per_token}")
    flat = np.frombuffer(raw, dtype=layout.raw_dtype)
    return [flat[i * per : (i + 1) * per].reshape(layout.kv_heads, n, layout.head_dim) for i in range(2 * layout.layers)]
