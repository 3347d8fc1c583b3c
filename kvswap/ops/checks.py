"""Checks over a stored artifact before anything uses it: trust (signatures and audits against the policy),
token binding (the artifact is about the document the caller holds) and a full re-verification."""

from __future__ import annotations

from ..artifact.manifest import Manifest
from ..artifact.pipeline import verified_blob
from ..artifact.signing import TrustPolicy, verify_envelopes
from ..document import Document
from ..protocol.cid import Cid
from ..protocol.errors import IntegrityError, NotFound
from ..store import Store


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


def check_complete(store: Store, cid: Cid) -> None:
    missing = store.missing_chunks(cid)
    if missing:
        raise NotFound(f"artifact {cid.short()} is incomplete here: {len(missing)} blobs missing "
                       f"(`kvswap get {cid}`)")


def verify_artifact(store: Store, cid: Cid, policy: TrustPolicy) -> dict:
    """Re-check everything about a stored artifact: manifest vs CID, every blob's CID and decoding, every
    signature, and the trust policy. Raises on the first failure; returns a summary when all pass."""
    manifest = store.get_manifest(cid)
    check_complete(store, cid)
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


__all__ = ["check_complete", "check_document", "check_trust", "verify_artifact"]
