"""Load a stored artifact onto an engine's device through the one load path (kvswap/artifact/loader.py),
and `load_cache`, the Python entry point from a document or CID to a verified DynamicCache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..artifact import loader
from ..artifact.manifest import Manifest
from ..artifact.pipeline import check_compatible
from ..home import Home, as_home
from ..modes import Verify
from ..protocol.errors import NotFound
from ..store import Store
from .checks import check_document, check_trust
from .ledgerlog import log_load
from .source import Source, engine_for, resolve


def load_artifact(engine, store: Store, manifest: Manifest, n_tokens: int | None = None, *,
                  verify: Verify | str = loader.DEFAULT_VERIFY, keep_raw: bool = True,
                  threads: int = loader.LOAD_THREADS):
    """A stored artifact (or its first `n_tokens`) on `engine`'s device through the load path: every chunk
    verified, read straight into the engine's staging buffer, copied to a GPU as it is verified. Returns the
    engine's LoadedKv; the model sees nothing if any chunk fails."""
    verify = Verify.parse(verify, "verify")
    check_compatible(manifest, engine)
    plan = loader.LoadPlan.of(manifest, n_tokens)
    logits = loader.read_tail(manifest, store, verify) if plan.whole else None

    def fill(dest):  # the engine's destination: a staging buffer, or runs per chunk index
        where = (lambda slot: dest(slot.index)) if callable(dest) else dest
        for slot in loader.fill(plan, where, store, verify=verify, keep_raw=keep_raw, threads=threads):
            yield slot.index

    meta = {"artifact_cid": str(manifest.cid), "model_id": manifest.model_id, "dtype": manifest.dtype,
            "model_fingerprint": manifest.model_fingerprint, "document_hash": manifest.document_hash}
    return engine.load_chunks(manifest.layout, list(manifest.token_ids[:plan.n_tokens]),
                              [s.ref.n_tokens for s in plan.slots], fill, logits, meta,
                              step=manifest.block_tokens, whole=plan.whole)


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
        loaded = load_artifact(engine, h.store, manifest, n_tokens, keep_raw=h.config["store.keep_raw"])
        cache = LoadedCache.of(cid, engine, loaded)
        load_s = time.perf_counter() - t0
        log_load(h, engine, cid, load_s, loaded.n_tokens, extra={"api": "load_cache"})
        h.store.touch(cid)
        return cache.timed(load_s)
    finally:
        if owned:
            h.close()


__all__ = ["load_artifact", "load_cache"]
