"""Load a stored artifact onto an engine's device through the one load path (kvswap/artifact/loader.py),
and `load_cache`, the Python entry point from a document or CID to a verified DynamicCache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import loader
from ..artifact.manifest import Manifest
from ..artifact.pipeline import check_compatible
from ..home import Home, as_home
from ..hosttier import HostTier
from ..kvtensors import KvTensors
from ..modes import Verify
from ..protocol.errors import NotFound
from ..store import Store
from .checks import check_document, check_trust
from .ledgerlog import log_load
from .source import Source, engine_for, resolve


def _tier_hit(tier: HostTier | None, plan: loader.LoadPlan):
    """(the entry's mapped pages, the logits or None) when the tier holds this plan whole, else None."""
    if tier is None:
        return None
    manifest = plan.manifest
    tail_raw = manifest.tail.raw_size if plan.whole and manifest.tail is not None else 0
    hit = tier.lookup(manifest.cid, plan.n_tokens, plan.nbytes, tail_raw)  # with the logits a whole load needs
    if hit is None:
        return None
    pages, tail = hit
    logits = np.frombuffer(tail, dtype="<u4").view("<f4").astype(np.float32) if tail_raw else None
    return pages, logits


def _keep(tier: HostTier | None, plan: loader.LoadPlan, payload, logits: np.ndarray | None) -> None:
    """Keep a load's verified layer buffer in the tier when there is room (the next load maps it), in the
    background: the load returns without waiting for the copy."""
    if tier is not None and payload is not None:
        tier.keep_in_background(plan.manifest.cid, plan.n_tokens, payload,
                                logits.astype("<f4").tobytes() if logits is not None else None)


def load_artifact(engine, store: Store, manifest: Manifest, n_tokens: int | None = None, *,
                  verify: Verify | str = loader.DEFAULT_VERIFY, keep_raw: bool = True,
                  threads: int = loader.LOAD_THREADS, tier: HostTier | None = None):
    """A stored artifact (or its first `n_tokens`) on `engine`'s device through the load path: every chunk
    verified, read straight into the engine's cache tensors (or its staging buffer, copied to a GPU as it is
    verified); or, when the home's host-memory tier holds it, views of the tier's pages (one copy to a GPU).
    A load from the store is then kept in the tier when there is room. Returns the engine's LoadedKv
    (`meta["tier"]`: hit, miss or off); the model sees nothing if any chunk fails."""
    verify = Verify.parse(verify, "verify")
    check_compatible(manifest, engine)
    plan = loader.LoadPlan.of(manifest, n_tokens)
    token_ids = list(manifest.token_ids[:plan.n_tokens])
    chunk_tokens = [s.ref.n_tokens for s in plan.slots]
    meta = {"artifact_cid": str(manifest.cid), "model_id": manifest.model_id, "dtype": manifest.dtype,
            "model_fingerprint": manifest.model_fingerprint, "document_hash": manifest.document_hash,
            "tier": "off" if tier is None else "miss"}
    hit = _tier_hit(tier, plan)
    if hit is not None:
        pages, logits = hit
        return engine.load_layers(manifest.layout, token_ids, sum(chunk_tokens), pages, logits,
                                  {**meta, "tier": "hit"}, step=manifest.block_tokens, whole=plan.whole)
    logits = loader.read_tail(manifest, store, verify) if plan.whole else None

    def fill(dest):  # the engine's destination: a staging buffer, or runs per chunk index
        where = (lambda slot: dest(slot.index)) if callable(dest) else dest
        for slot in loader.fill(plan, where, store, verify=verify, keep_raw=keep_raw, threads=threads):
            yield slot.index

    loaded = engine.load_chunks(manifest.layout, token_ids, chunk_tokens, fill, logits, meta,
                                step=manifest.block_tokens, whole=plan.whole)
    if tier is not None:
        from ..engine.kvload import host_layer_bytes

        _keep(tier, plan, host_layer_bytes(loaded), logits)
    return loaded


def load_kvtensors(store: Store, manifest: Manifest, n_tokens: int | None = None, *,
                   verify: Verify | str = loader.DEFAULT_VERIFY, keep_raw: bool = True,
                   threads: int = loader.LOAD_THREADS, tier: HostTier | None = None) -> KvTensors:
    """The first `n_tokens` of a stored artifact's KV as raw bits, through the same load path (and tier) as
    `load_artifact`: for a consumer without a kvswap engine, the vLLM connector. The chunks are read straight
    into one [layers, 2, kv_heads, tokens, head_dim] array (the tier's layout), whose per-layer views are
    returned; nothing is returned if any chunk fails."""
    verify = Verify.parse(verify, "verify")
    plan = loader.LoadPlan.of(manifest, n_tokens)
    layout = manifest.layout
    chunk_tokens = [s.ref.n_tokens for s in plan.slots]
    total = sum(chunk_tokens)
    shape = (layout.layers, 2, layout.kv_heads, total, layout.head_dim)
    hit = _tier_hit(tier, plan)
    if hit is not None:
        pages, logits = hit
        out = np.frombuffer(pages, dtype=layout.raw_dtype).reshape(shape)
    else:
        logits = loader.read_tail(manifest, store, verify) if plan.whole else None
        out = np.empty(shape, dtype=layout.raw_dtype)
        starts = np.cumsum([0] + chunk_tokens)

        def runs(slot) -> list[memoryview]:
            lo, hi = int(starts[slot.index]), int(starts[slot.index + 1])
            return [memoryview(out[layer, kv, head, lo:hi]).cast("B") for layer in range(layout.layers)
                    for kv in (0, 1) for head in range(layout.kv_heads)]

        for _ in loader.fill(plan, runs, store, verify=verify, keep_raw=keep_raw, threads=threads):
            pass
        _keep(tier, plan, out, logits)
    n = plan.n_tokens
    return KvTensors(layout=layout, token_ids=list(manifest.token_ids[:n]),
                     keys=[out[layer, 0, :, :n] for layer in range(layout.layers)],
                     values=[out[layer, 1, :, :n] for layer in range(layout.layers)], last_logits=logits,
                     meta={"artifact_cid": str(manifest.cid), "model_fingerprint": manifest.model_fingerprint,
                           "tier": "off" if tier is None else "hit" if hit is not None else "miss"})


def load_cache(source: Any, *, model: Any, home: Home | str | Path | None = None, device: str | None = None,
               n_tokens: int | None = None, accept_any: bool = False, dtype: str | None = None):
    """One call from a document or CID to a verified `DynamicCache` for your model (a `LoadedCache`).

    `source`: an artifact CID (Cid or string), a path to the document's file, `kvswap.Document(text)`, or a
    document hash. `model`: a built-in name, a hub id or folder, or `(transformers_model, tokenizer)` you
    loaded. The artifact comes from the home's store (fetch it first with `kvswap.get` when it is not there);
    every chunk is verified, the signatures against the home's trust policy, and a given document is checked
    to hash and tokenize to the artifact's document and tokens. The load is logged in the home's ledger.
    Raises NotFound, ModelMismatch, IntegrityError (UntrustedSigner), UsageError."""
    from ..engine.loaded import LoadedCache

    h, owned = as_home(home)
    try:
        src = Source.of(source)
        engine = engine_for(model, dtype, device=device)
        cid = resolve(h, engine, src)
        manifest = h.store.get_manifest(cid)
        check_trust(h.store, manifest, h.policy(accept_any or None))
        if src.document is not None:
            check_document(engine, manifest, src.document)
        missing = h.store.missing_chunks(cid)
        if missing and (n_tokens is None or any(c.cid in missing for c in manifest.chunks_for(n_tokens))):
            raise NotFound(f"artifact {cid.short()} is incomplete in {h.path} (`kvswap get {cid}`)")
        t0 = time.perf_counter()
        loaded = load_artifact(engine, h.store, manifest, n_tokens, keep_raw=h.config["store.keep_raw"], tier=h.tier)
        cache = LoadedCache.of(cid, engine, loaded)
        load_s = time.perf_counter() - t0
        log_load(h, engine, cid, load_s, loaded.n_tokens, extra={"api": "load_cache", "tier": loaded.meta["tier"]})
        h.store.touch(cid)
        return cache.timed(load_s)
    finally:
        if owned:
            h.close()


__all__ = ["load_artifact", "load_cache", "load_kvtensors"]
