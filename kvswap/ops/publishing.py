"""Publish a document: tokenize, prefill block by block, chunk, compress, sign and store (and, through a
running node, provide and announce it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..artifact.limits import DEFAULT_BLOCK_TOKENS
from ..artifact.pipeline import publish_kv
from ..control import routes
from ..control.client import wait_job
from ..document import Document
from ..home import Home, as_home
from .ledgerlog import log_prefill
from .source import engine_for, node_for


def publish_here(home: Home, engine, document: Document, *, codec: str = "auto",
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, progress: Callable[[dict], None] | None = None) -> dict:
    """Prefill, chunk, compress, sign and store `document` with `engine` in this process; logs the prefill.
    `progress({"stage": "prefill", "tokens": done, "tokens_total": n})` after each prefill block.

    The manifest is registered before its chunks are written, so a crash mid-publish leaves an incomplete
    artifact (and maybe a temp file), never a half-written chunk. Returns a JSON-friendly summary."""
    ids = engine.tokenize(document.text)
    t0 = time.perf_counter()

    def tokens(done: int, total: int) -> None:
        progress({"stage": "prefill", "tokens": done, "tokens_total": total})

    # block-aligned: auditable exactly, shared prefixes share chunks
    kv = engine.prefill(ids, step=block_tokens, progress=tokens if progress is not None else None)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    manifest, chunks = publish_kv(
        kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
        tokenizer_fingerprint=engine.tokenizer_fingerprint, document_hash=document.hash, codec=codec,
        block_tokens=block_tokens, compute=engine.compute_identity(prefill_step=block_tokens))
    envelope = home.key.sign_manifest(manifest.cid)
    home.store.put_artifact(manifest, [envelope], chunks)
    store_s = time.perf_counter() - t1
    codecs_used: dict[str, int] = {}
    for c in manifest.chunks:
        codecs_used[c.codec] = codecs_used.get(c.codec, 0) + 1
    result = {
        "cid": str(manifest.cid),
        "document_hash": document.hash,
        "model_id": manifest.model_id,
        "model_fingerprint": manifest.model_fingerprint,
        "dtype": manifest.dtype,
        "n_tokens": manifest.n_tokens,
        "chunks": len(manifest.chunks),
        "codecs": codecs_used,
        "raw_size": manifest.raw_size,
        "kv_stored_size": manifest.kv_stored_size,
        "tail_stored_size": manifest.tail.stored_size if manifest.tail is not None else 0,
        "stored_size": manifest.stored_size,
        "ratio": round(manifest.raw_size / max(1, manifest.kv_stored_size), 4),
        "signer": home.key.public_hex,
        "prefill_s": round(prefill_s, 4),
        "encode_store_s": round(store_s, 4),
    }
    log_prefill(home, engine, result)
    return result


def publish(document: Document | str | Path, *, home: Home | str | Path | None = None, model: Any = None,
            dtype: str | None = None, codec: str = "auto", block_tokens: int = DEFAULT_BLOCK_TOKENS,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Publish a document (a path or Document): through the running node (which also provides and announces
    it), else in this process. Returns the artifact's summary (cid, document_hash, n_tokens, sizes, ...)."""
    h, owned = as_home(home)
    try:
        doc = document if isinstance(document, Document) else Document.read(document)
        client = node_for(h, model)
        if client is not None:
            body = routes.PublishBody(text=doc.text, codec=codec, block_tokens=block_tokens)
            return wait_job(client, client.call(routes.PUBLISH, body), progress=progress)
        engine = engine_for(model, dtype or h.config["node.dtype"])
        return publish_here(h, engine, doc, codec=codec, block_tokens=block_tokens, progress=progress)
    finally:
        if owned:
            h.close()


__all__ = ["publish", "publish_here"]
