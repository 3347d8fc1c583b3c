"""Whole operations over an engine, a store and a key: publish a document, generate from a stored
artifact, verify one. The CLI and the daemon's control API both call these, so the logic lives once.

None of this imports torch: the caller passes an engine (kvswap.engine.Engine or anything with the same
attributes), which keeps `kvswap ls` and `kvswap verify` fast.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..cid import Cid
from ..document import Document
from ..errors import IntegrityError, NotFound, UsageError
from ..protocol.limits import DEFAULT_BLOCK_TOKENS
from ..store import Store
from .manifest import Manifest
from . import loader
from .pipeline import check_compatible, publish_kv, verified_blob
from .signing import NodeKey, TrustPolicy, verify_envelopes


def publish_document(engine, store: Store, key: NodeKey, text: str | Document, codec: str = "auto",
                     block_tokens: int = DEFAULT_BLOCK_TOKENS, progress=None) -> dict:
    """Tokenize, prefill, chunk, compress, sign and store one document. Returns a JSON-friendly summary.

    The manifest is registered before its chunks are written, so a crash mid-publish leaves an incomplete
    artifact (and maybe a temp file), never a half-written chunk."""
    doc = text if isinstance(text, Document) else Document(text)
    doc_hash = doc.hash
    ids = engine.tokenize(doc.text)
    t0 = time.perf_counter()
    # block-aligned: auditable exactly, shared prefixes share chunks; progress(tokens done, total) per block
    kv = engine.prefill(ids, step=block_tokens, progress=progress)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    manifest, chunks = publish_kv(
        kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
        tokenizer_fingerprint=engine.tokenizer_fingerprint, document_hash=doc_hash, codec=codec,
        block_tokens=block_tokens)
    envelope = key.sign_manifest(manifest.cid)
    store.put_artifact(manifest, [envelope], chunks)
    store_s = time.perf_counter() - t1
    codecs_used: dict[str, int] = {}
    for c in manifest.chunks:
        codecs_used[c.codec] = codecs_used.get(c.codec, 0) + 1
    return {
        "cid": str(manifest.cid),
        "document_hash": doc_hash,
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
        "signer": key.public_hex,
        "prefill_s": round(prefill_s, 4),
        "encode_store_s": round(store_s, 4),
    }


def verify_artifact(store: Store, cid: Cid, policy: TrustPolicy) -> dict:
    """Re-check everything about a stored artifact: manifest vs CID, every blob's CID and decoding, every
    signature, and the trust policy. Raises on the first failure; returns a summary when all pass."""
    manifest = store.get_manifest(cid)
    missing = store.missing_chunks(cid)
    if missing:
        raise NotFound(f"artifact {cid.short()} is incomplete: {len(missing)} of {len(manifest.blobs())} blobs missing")
    accepted = check_trust(store, manifest, policy)
    for blob in manifest.chunks:
        verified_blob(blob, store.read_chunk_for_verifier(blob.cid), manifest.layout.itemsize)
    if manifest.tail is not None:
        verified_blob(manifest.tail, store.read_chunk_for_verifier(manifest.tail.cid), 4)
    return {
        "cid": str(cid),
        "ok": True,
        "blobs_verified": len(manifest.blobs()),
        "signatures": len(store.get_envelopes(cid)),
        "trusted_signers": sorted({e.signer.hex() for e in accepted}),
        "accept_any": policy.accept_any,
    }


def resolve_artifact(store: Store, engine, *, cid: Cid | None = None,
                     document_text: str | Document | None = None) -> Manifest:
    """The stored manifest named by CID, or the newest complete artifact of `document_text` for this
    engine's model."""
    if cid is None:
        if document_text is None:
            raise UsageError("give an artifact CID or a document")
        doc = document_text if isinstance(document_text, Document) else Document(document_text)
        found = store.find_by_document(engine.fingerprint, doc.hash, complete_only=True)
        if not found:
            raise NotFound("no complete artifact of this document for this model in the local store "
                           "(publish it, or fetch it with `kvswap get --doc FILE`)")
        cid = found[0]
    return store.get_manifest(cid)


def check_trust(store: Store, manifest: Manifest, policy: TrustPolicy) -> list:
    """The trust policy over a stored artifact's envelopes and audit attestations (signing.verify_envelopes)."""
    cid = manifest.cid
    return verify_envelopes(store.get_envelopes(cid), cid, policy, store.get_attestations(cid),
                            manifest.model_fingerprint)


def check_document(engine, manifest: Manifest, document: Document) -> None:
    """Token binding: the artifact is about `document`, the text the caller holds. Its bytes must hash to the
    manifest's document_hash and it must tokenize to the manifest's tokens (a publisher cannot pass KV of other
    tokens off as this document's). IntegrityError naming what differs; cheap next to any load."""
    if document.hash != manifest.document_hash:
        raise IntegrityError(f"artifact {manifest.cid.short()} is for document {manifest.document_hash[:12]}, "
                             f"this document hashes to {document.hash[:12]}")
    ids = engine.tokenize(document.text)
    if tuple(ids) != tuple(manifest.token_ids):
        at = next((i for i, (a, b) in enumerate(zip(ids, manifest.token_ids)) if a != b), min(len(ids), manifest.n_tokens))
        raise IntegrityError(f"artifact {manifest.cid.short()} holds KV of other tokens than this document's: "
                             f"they differ from token {at} ({len(ids)} tokens here, {manifest.n_tokens} in the manifest)")


def audit_stored(engine, store: Store, cid: Cid, *, fraction: float | None = None, blocks: int | None = None,
                 full: bool = False, seed: int | None = None, require_exact: bool = False,
                 key: NodeKey | None = None, document: Document | None = None,
                 prefer: frozenset = frozenset()) -> dict:
    """Audit a stored artifact (kvswap/audit.py): every chunk verified on load, sampled blocks recomputed
    and judged. With `key`, a passing audit is signed and kept as an attestation. Raises AuditFailed (the
    first failing block, layer and difference), NotFound, ModelMismatch, IntegrityError (token binding)."""
    from .. import audit as auditing
    from .attestation import make_statement, sign_attestation

    manifest = store.get_manifest(cid)
    check_compatible(manifest, engine)
    if store.missing_chunks(cid):
        raise NotFound(f"artifact {cid.short()} is incomplete here (fetch it first)")
    if document is not None:
        check_document(engine, manifest, document)
    chosen, drawn = auditing.choose_blocks(len(manifest.chunks), fraction=fraction, blocks=blocks, full=full,
                                           seed=seed)
    t0 = time.perf_counter()
    loaded = load_artifact(engine, store, manifest)
    load_s = time.perf_counter() - t0
    result = auditing.run_audit(engine, loaded, manifest, chosen, drawn, require_exact)
    out = result.to_dict()
    out["load_s"] = round(load_s, 4)
    if key is not None:
        from .. import __version__

        statement = make_statement(blocks=result.blocks, drawn=drawn, n_blocks=result.n_blocks,
                                   dtype=manifest.dtype, engine=engine.fingerprint, device=engine.device,
                                   exact=result.exact, max_rel=result.max_rel, tool=f"kvswap {__version__}")
        att = sign_attestation(key, cid, statement)
        store.add_attestations(cid, [att], prefer=set(prefer) | {key.public_bytes})
        out["attestation"] = att.summary()
    return out


def load_artifact(engine, store: Store, manifest: Manifest, n_tokens: int | None = None, *,
                  verify: str = "sha256", keep_raw: bool = True, threads: int = loader.LOAD_THREADS):
    """A stored artifact (or its first `n_tokens`) on `engine`'s device through the load path
    (kvswap/artifact/loader.py: every chunk verified, read straight into the engine's staging buffer, copied
    to a GPU as it is verified). Returns the engine's LoadedKv; the model sees nothing if any chunk fails."""
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


def generate_from_store(engine, store: Store, cid: Cid, prompt: str, max_new_tokens: int = 24,
                        policy: TrustPolicy | None = None, seed: int | None = None,
                        document: Document | None = None, temperature: float = 1.0) -> dict:
    """Load a stored artifact into `engine` (every chunk verified) and generate after the prompt.

    The prompt's token ids are appended to the document's (never re-tokenizing the joined text). With a
    policy, the artifact's signatures are checked against it first; with the `document` the caller holds, the
    artifact is checked to be about it (check_document) before anything is loaded."""
    manifest = store.get_manifest(cid)
    check_compatible(manifest, engine)
    if document is not None:
        check_document(engine, manifest, document)
    if policy is not None:
        check_trust(store, manifest, policy)
    missing = store.missing_chunks(cid)
    if missing:
        raise NotFound(f"artifact {cid.short()} is incomplete: {len(missing)} blobs missing")
    loaded = load_artifact(engine, store, manifest)
    store.touch(cid)
    suffix = engine.tokenize(prompt) if prompt else []
    result = engine.generate_from_loaded(loaded, suffix, max_new_tokens=max_new_tokens, seed=seed,
                                         temperature=temperature)
    out = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    out.update({"cid": str(cid), "document_tokens": manifest.n_tokens, "suffix_tokens": len(suffix),
                "read_verify_s": round(loaded.load_s, 4)})
    return out


def home_key(home: Path) -> NodeKey:
    from ..config import HomeLayout

    return NodeKey.load_or_create(HomeLayout(Path(home)).ensure().identity_key)
