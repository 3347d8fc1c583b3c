"""KvTensors -> (manifest, chunk stream) and back, verifying every byte on the way in.

publish_kv encodes block by block. The manifest must list every chunk's CID before the first chunk is
handed on (the store registers the artifact first, then its chunks), yet a 3774-token Qwen3-4B artifact
is 557 MB raw, so the compressed chunks are not all held at once: a first pass computes each chunk's
codec, CID and size, keeping stored bytes only up to PUBLISH_BUFFER_BYTES; the stream re-encodes the rest
(compression is deterministic and ~100x cheaper than the prefill that produced the KV) and checks the
CID again.

assemble_kv is the previous load path, kept measurable beside the current one (bench loadpath, the tests'
reference): every consumer loads through kvswap/artifact/loader.py (kvswap/ops/loading.py). It reads only the
chunks covering the tokens asked for, checks each one's stored size and CID,
decodes it within its declared raw size, and only after every chunk has passed returns the KvTensors a
model may see. Output arrays are allocated from manifest sizes that decode_manifest has already bounded.
Chunks are loaded on loader.LOAD_THREADS threads at once (the one thread count of every load path): sha256, zstd and numpy copies all release the GIL, and
hashing every byte on one core is what bounds a verified load (BENCHMARKS.md, load path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..protocol.cid import Cid
from ..protocol.errors import IntegrityError, ModelMismatch, UsageError
from ..kvtensors import KvTensors
from .limits import DEFAULT_BLOCK_TOKENS, MAX_TAIL_RAW_BYTES
from . import chunking, codecs
from .manifest import BlobRef, ChunkRef, Manifest

#: stored chunk bytes publish_kv keeps from its first pass instead of re-encoding them (bytes)
PUBLISH_BUFFER_BYTES = 64 * 1024 * 1024


ReadChunk = Callable[[Cid], "bytes | memoryview"]


def _tail_raw(kv: KvTensors) -> bytes | None:
    if kv.last_logits is None:
        return None
    logits = np.ascontiguousarray(kv.last_logits)
    if logits.dtype != np.float32 or logits.ndim != 1 or logits.size == 0:
        raise UsageError(f"last_logits must be a 1-D float32 array, got {logits.dtype} {logits.shape}")
    if logits.nbytes > MAX_TAIL_RAW_BYTES:
        raise UsageError(f"last_logits are {logits.nbytes} bytes, over MAX_TAIL_RAW_BYTES ({MAX_TAIL_RAW_BYTES})")
    return logits.astype("<f4").view("<u4").tobytes()


def publish_kv(
    kv: KvTensors,
    *,
    model_id: str,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    document_hash: str,
    codec: str = "auto",
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    level: int = codecs.DEFAULT_ZSTD_LEVEL,
    compute: dict[str, str] | None = None,
) -> tuple[Manifest, Iterator[tuple[Cid, bytes]]]:
    """The manifest, and an iterator of (CID, stored bytes) for every chunk then the tail. `compute`: how the
    KV was computed (kvswap/engine/identity.py; a version-2 manifest records it, None makes version 1).

    Same KV + same arguments -> same manifest bytes -> same artifact CID."""
    if codec not in codecs.CODEC_CHOICES:
        raise UsageError(f"unknown codec {codec!r} (expected one of {', '.join(codecs.CODEC_CHOICES)})")
    kv.check_shapes()
    lay = kv.layout
    chunking.check_block_tokens(lay, block_tokens)
    ranges = chunking.block_ranges(kv.n_tokens, block_tokens)
    keys = chunking.prefix_keys(kv.token_ids, block_tokens)
    refs: list[ChunkRef] = []
    kept: dict[int, bytes] = {}
    buffered = 0
    for i, ((t0, t1), key) in enumerate(zip(ranges, keys)):
        raw = chunking.chunk_payload(kv, t0, t1)
        used, stored = codecs.encode_best(codec, raw, lay.itemsize, level)
        refs.append(ChunkRef(Cid.of(stored), used, len(raw), len(stored), t0=t0, t1=t1, prefix_key=key))
        if buffered + len(stored) <= PUBLISH_BUFFER_BYTES:
            kept[i] = stored
            buffered += len(stored)
    tail_ref, tail_stored = None, None
    tail_raw = _tail_raw(kv)
    if tail_raw is not None:
        used, tail_stored = codecs.encode_best(codec, tail_raw, 4, level)
        tail_ref = BlobRef(Cid.of(tail_stored), used, len(tail_raw), len(tail_stored))
    manifest = Manifest(
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        layout=lay,
        block_tokens=block_tokens,
        token_ids=tuple(int(t) for t in kv.token_ids),
        token_hash=chunking.token_hash(kv.token_ids),
        document_hash=document_hash,
        chunks=tuple(refs),
        tail=tail_ref,
        compute_identity=tuple(sorted((compute or {}).items())),
        version=2 if compute else 1,
    )

    def stream() -> Iterator[tuple[Cid, bytes]]:
        for i, ref in enumerate(refs):
            stored = kept.pop(i, None)
            if stored is None:
                stored = codecs.encode(ref.codec, chunking.chunk_payload(kv, ref.t0, ref.t1), lay.itemsize, level)
                if Cid.of(stored) != ref.cid:
                    raise IntegrityError(f"chunk {i} re-encoded to different bytes (KV changed during publish?)")
            yield ref.cid, stored
        if tail_ref is not None:
            yield tail_ref.cid, tail_stored

    return manifest, stream()


def verified_blob(ref: BlobRef, stored: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    """Raw bytes of one blob after checking its stored size and CID and decoding within its raw size."""
    if len(stored) != ref.stored_size:
        raise IntegrityError(f"chunk {ref.cid.short()} is {len(stored)} bytes, manifest says {ref.stored_size}")
    ref.cid.verify(stored)
    return codecs.decode(ref.codec, stored, ref.raw_size, itemsize)


def assemble_kv(manifest: Manifest, read_chunk: ReadChunk, n_tokens: int | None = None,
                with_tail: bool = True, threads: int | None = None) -> KvTensors:
    """KvTensors for the first `n_tokens` tokens (all by default), every chunk verified first.

    A prefix reads only the blocks that cover it and slices the last one. The tail (last-position
    logits) is read only for the whole document and only `with_tail`; a prefix has no last_logits.
    `read_chunk` is called from up to `threads` threads at once."""
    k = manifest.n_tokens if n_tokens is None else int(n_tokens)
    lay = manifest.layout
    refs = manifest.chunks_for(k)
    keys = [np.empty((lay.kv_heads, k, lay.head_dim), dtype=lay.raw_dtype) for _ in range(lay.layers)]
    values = [np.empty((lay.kv_heads, k, lay.head_dim), dtype=lay.raw_dtype) for _ in range(lay.layers)]

    def load(ref: ChunkRef) -> None:  # each chunk fills its own token range: threads never overlap
        raw = verified_blob(ref, read_chunk(ref.cid), lay.itemsize)
        parts = chunking.split_payload(raw, lay, ref.n_tokens)
        hi = min(ref.t1, k)
        for layer in range(lay.layers):
            keys[layer][:, ref.t0:hi, :] = parts[2 * layer][:, : hi - ref.t0, :]
            values[layer][:, ref.t0:hi, :] = parts[2 * layer + 1][:, : hi - ref.t0, :]

    if threads is None:
        from .loader import LOAD_THREADS

        threads = LOAD_THREADS
    if threads <= 1 or len(refs) <= 1:
        for ref in refs:
            load(ref)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(refs)), thread_name_prefix="kvswap-load") as pool:
            for done in [pool.submit(load, ref) for ref in refs]:
                done.result()  # the first failure (IntegrityError, NotFound) is raised here
    last_logits = None
    if with_tail and k == manifest.n_tokens and manifest.tail is not None:
        raw = verified_blob(manifest.tail, read_chunk(manifest.tail.cid), 4)
        last_logits = np.frombuffer(raw, dtype="<u4").view("<f4").astype(np.float32)
    meta = {
        "artifact_cid": str(manifest.cid),
        "model_id": manifest.model_id,
        "model_fingerprint": manifest.model_fingerprint,
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
        "dtype": manifest.dtype,
        "document_hash": manifest.document_hash,
    }
    kv = KvTensors(lay, list(manifest.token_ids[:k]), keys, values, last_logits, meta)
    kv.check_shapes()
    return kv


def check_compatible(manifest: Manifest, engine) -> None:
    """ModelMismatch (naming both sides) unless `engine` can load this artifact: same model fingerprint,
    tokenizer fingerprint, dtype and KV layout. `engine` is anything with .model_id, .fingerprint,
    .tokenizer_fingerprint, .dtype and .layout (kvswap.engine's Engine, or the daemon's description)."""
    if manifest.model_fingerprint != engine.fingerprint:
        raise ModelMismatch(
            f"artifact is for model {manifest.model_id} ({manifest.model_fingerprint[:12]}), this engine is "
            f"{engine.model_id} ({engine.fingerprint[:12]})")
    if manifest.tokenizer_fingerprint != engine.tokenizer_fingerprint:
        raise ModelMismatch(
            f"artifact tokenizer {manifest.tokenizer_fingerprint[:12]} != engine tokenizer "
            f"{engine.tokenizer_fingerprint[:12]}")
    if manifest.dtype != engine.dtype:
        raise ModelMismatch(f"artifact dtype is {manifest.dtype}, engine dtype is {engine.dtype}")
    if manifest.layout != engine.layout:
        raise ModelMismatch(f"artifact layout {manifest.layout.to_dict()} != engine layout {engine.layout.to_dict()}")
