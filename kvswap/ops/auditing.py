"""Audit a stored artifact: recompute sampled blocks with an engine and judge them (kvswap/artifact/audit.py).

The mode (SECURITY.md, "Audits"): exact whenever the auditor's compute identity is the one the artifact
declares (the recomputation is then the same computation, so any differing bit is a poisoning), tolerance
otherwise; `mode=exact` or `mode=tolerance` forces one. The result and the signed attestation name the mode
used and why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..artifact import audit as rules
from ..artifact.attestation import make_statement, sign_attestation
from ..artifact.pipeline import check_compatible
from ..control import routes
from ..document import Document
from ..home import Home, as_home
from ..modes import AuditMode
from ..protocol.cid import Cid
from ..protocol.errors import NotFound
from .checks import check_complete, check_document
from .ledgerlog import log_audit
from .loading import load_artifact
from .source import Source, engine_for, node_for, resolve


def audit_here(home: Home, engine, cid: Cid, *, fraction: float | None = None, blocks: int | None = None,
               full: bool = False, seed: int | None = None, mode: AuditMode | str = AuditMode.AUTO,
               sign: bool = True, document: Document | None = None) -> dict:
    """Audit a stored artifact in this process: every chunk verified on load, sampled blocks recomputed and
    judged; logged. A passing audit is signed by the home's key (unless `sign=False`) and kept as an
    attestation. Raises AuditFailed (the first failing block, layer and difference), NotFound, ModelMismatch,
    IntegrityError (token binding)."""
    from ..version import __version__

    store = home.store
    manifest = store.get_manifest(cid)
    check_compatible(manifest, engine)
    check_complete(store, cid)
    if document is not None:
        check_document(engine, manifest, document)
    declared, here = manifest.compute, engine.compute_identity(prefill_step=manifest.block_tokens)
    threads = rules.threads_to_match(declared, here)  # reproduced by choice, so it never forces a tolerance audit
    if threads is not None:
        here = {**here, "threads": str(threads)}
    used, why = rules.choose_mode(AuditMode.parse(mode, "audit mode"), declared, here)
    chosen, drawn = rules.choose_blocks(len(manifest.chunks), fraction=fraction, blocks=blocks, full=full, seed=seed)
    t0 = time.perf_counter()
    loaded = load_artifact(engine, store, manifest, keep_raw=home.config["store.keep_raw"], tier=home.tier)
    load_s = time.perf_counter() - t0
    with engine.threads(threads):
        result = rules.run_audit(engine, loaded, manifest, chosen, drawn, used, why)
    out = result.to_dict()
    out["load_s"] = round(load_s, 4)
    if sign:
        statement = make_statement(blocks=result.blocks, drawn=drawn, n_blocks=result.n_blocks,
                                   dtype=manifest.dtype, engine=engine.fingerprint, device=engine.device,
                                   exact=used is AuditMode.EXACT, max_rel=result.max_rel, tool=f"kvswap {__version__}")
        att = sign_attestation(home.key, cid, statement)
        store.add_attestations(cid, [att], prefer=set(home.policy().auditors) | {home.key.public_bytes})
        out["attestation"] = att.summary()
    log_audit(home, engine, cid, out, tokens=sum(manifest.chunks[i].n_tokens for i in result.blocks))
    return out


def audit(source: Any, *, home: Home | str | Path | None = None, model: Any = None, fraction: float | None = None,
          blocks: int | None = None, full: bool = False, seed: int | None = None,
          mode: AuditMode | str = AuditMode.AUTO, sign: bool = True) -> dict:
    """Audit a stored artifact: through the running node's model, else in this process with `model` (default:
    the artifact's). A given document is bound first. Raises AuditFailed on a failing block; a passing audit
    is signed by the home's key unless `sign=False`."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        mode = AuditMode.parse(mode, "audit mode")
        client = node_for(h, model)
        if client is not None:
            key = src.key
            if src.cid is None:
                found = h.store.find_by_document(client.status().get("model_fingerprint") or "",
                                                 src.document_hash, True)
                if not found:
                    raise NotFound(f"no complete artifact of document {src.document_hash[:12]} for the node's model")
                key = found[0]
            body = routes.AuditBody(key=key, fraction=fraction, blocks=blocks, full=full, seed=seed, mode=mode.value,
                                    sign=sign, document=src.document.text if src.document else None)
            return client.call(routes.AUDIT, body)
        if model is None and src.cid is not None:
            manifest = h.store.get_manifest(src.cid)
            engine = engine_for(manifest.model_id, manifest.dtype)
        else:
            engine = engine_for(model, h.config["node.dtype"])
        cid = resolve(h, engine, src)
        return audit_here(h, engine, cid, fraction=fraction, blocks=blocks, full=full, seed=seed, mode=mode,
                          sign=sign, document=src.document)
    finally:
        if owned:
            h.close()


__all__ = ["audit", "audit_here"]
