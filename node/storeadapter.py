"""The real store and artifact layer behind the network layer's two contracts.

`StoreArtifacts(store, policy, generate=None)` is both the `Service` node/exchange.py serves from and the
`FetchTarget` node/fetch.py fetches into:
- serving: manifests (canonical bytes + one encoded envelope per signature) of registered artifacts, chunk
  bytes (`read_chunk` re-hashes; `chunk_path` lets the data plane use sendfile), hosted generation through
  the daemon's `generate(GenerateRequest) -> GenerateResponse` callable;
- fetching: decode_manifest (validation, CID of the bytes) + verify_envelopes (signatures, trust policy),
  put_manifest before the chunks, put_chunk (which hashes: `verifies_chunks = True`).
Methods run in worker threads; kvswap.store.Store is thread-safe (a connection per thread).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from kvswap.artifact.attestation import decode_attestations, encode_attestations
from kvswap.artifact.manifest import Manifest, decode_manifest
from kvswap.artifact.signing import TrustPolicy, decode_envelopes, encode_envelopes, verify_envelopes
from kvswap.protocol.cid import Cid
from kvswap.protocol.keys import ArtifactKey
from kvswap.protocol.errors import IntegrityError, LimitExceeded, NotFound
from kvswap.protocol.messages import GenerateRequest, GenerateResponse
from kvswap.store import Store

from .fetch import VerifiedManifest
from .fetchplan import FetchBlob


def verified_from_manifest(manifest: Manifest, envelopes: Sequence[bytes] = ()) -> VerifiedManifest:
    """The fetcher's view of a decoded manifest: every blob to fetch, the tail (last logits) last."""
    refs = [FetchBlob(c.cid, c.t0, c.t1, c.stored_size) for c in manifest.chunks]
    if manifest.tail is not None:  # needed by a full fetch only: its token range starts at the end
        refs.append(FetchBlob(manifest.tail.cid, manifest.n_tokens, manifest.n_tokens, manifest.tail.stored_size))
    return VerifiedManifest(
        cid=manifest.cid,
        manifest=manifest.canonical_bytes,
        envelopes=tuple(envelopes),
        model_fingerprint=manifest.model_fingerprint,
        model_id=manifest.model_id,
        document_hash=manifest.document_hash,
        dtype=manifest.dtype,
        n_tokens=manifest.n_tokens,
        blobs=tuple(refs),
        parsed=manifest,
    )


class StoreArtifacts:
    """Service + FetchTarget over a kvswap.store.Store and a TrustPolicy."""

    verifies_chunks = True  # Store.put_chunk hashes every chunk before it becomes visible

    def __init__(self, store: Store, policy: TrustPolicy,
                 generate: Callable[[GenerateRequest], GenerateResponse] | None = None,
                 budget_bytes: int | None = None, generate_capacity: int = 1) -> None:
        self.store = store
        self.policy = policy
        self._generate = generate
        #: hosted generations `generate` runs at once (node/hosting/: 1 for the engine, vLLM's batch for vllm)
        self.generate_capacity = generate_capacity
        self.budget_bytes = budget_bytes  # the home's store.budget: no fetch starts on an artifact larger

    # --- Service ------------------------------------------------------------------------------------------
    def attestations(self, cid: Cid) -> bytes:
        """The stored audit attestations of `cid` as one attestation list (empty bytes when there are none)."""
        found = self.store.get_attestations(cid)
        return encode_attestations(found) if found else b""

    def _served(self, cid: Cid) -> tuple[bytes, list[bytes]]:
        envelopes = self.store.get_envelopes(cid)
        return self.store.get_manifest_bytes(cid), [encode_envelopes([e]) for e in envelopes]

    def manifest(self, key: ArtifactKey) -> tuple[bytes, list[bytes]] | None:
        if isinstance(key, Cid):
            return self._served(key) if self.store.has_artifact(key) else None
        found = self.store.find_by_document(key.model_fingerprint, key.document_hash, complete_only=key.any_model)
        return self._served(found[0]) if found else None

    def read_chunk(self, cid: Cid) -> bytes | None:
        try:
            return self.store.read_chunk(cid)
        except NotFound:
            return None

    def chunk_path(self, cid: Cid) -> Path | None:
        try:
            return self.store.chunk_path(cid)
        except NotFound:
            return None

    def holdings(self) -> list[tuple[Cid, str, str, list[Cid], bool]]:
        """(cid, model fingerprint, document hash, chunk CIDs held, complete) per stored artifact, for the
        node's re-provide loop."""
        out = []
        for row in self.store.list_artifacts():
            cid = Cid.parse(row["cid"])
            try:
                manifest = self.store.get_manifest(cid)
            except NotFound:  # removed meanwhile
                continue
            held = [b.cid for b in manifest.blobs() if self.store.has_chunk(b.cid)]
            out.append((cid, row["model_fingerprint"], row["document_hash"], held, bool(row["complete"])))
        return out

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        if self._generate is None:
            raise NotFound("this node does not host generation")
        return self._generate(request)

    # --- FetchTarget --------------------------------------------------------------------------------------
    def verify_manifest(self, manifest: bytes, envelopes: Sequence[bytes], attestations: bytes = b"",
                        accept_any: bool = False) -> VerifiedManifest:
        parsed = decode_manifest(manifest)
        decoded = [e for blob in envelopes for e in decode_envelopes(blob)]
        audits = decode_attestations(attestations) if attestations else []
        policy = replace(self.policy, accept_any=True) if accept_any else self.policy  # for this fetch only
        verify_envelopes(decoded, parsed.cid, policy, audits, parsed.model_fingerprint)
        return replace(verified_from_manifest(parsed, envelopes), attestations=attestations)

    def put_manifest(self, verified: VerifiedManifest) -> None:
        envelopes = [e for blob in verified.envelopes for e in decode_envelopes(blob)]
        self.store.put_manifest(verified.parsed, envelopes)
        if verified.attestations:  # verified above; the ones by auditors we trust win a full table
            self.store.add_attestations(verified.parsed.cid, decode_attestations(verified.attestations),
                                        prefer=set(self.policy.auditors))

    def has_chunk(self, cid: Cid) -> bool:
        return self.store.has_chunk(cid)

    def check_room(self, cid: Cid, nbytes: int) -> None:
        """LimitExceeded when `nbytes` (what an artifact declares) exceed the store's budget or the disk's free
        space: refused before any chunk is asked for."""
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise LimitExceeded(f"artifact {cid.short()} declares {nbytes:,} bytes, over this store's budget of "
                                f"{self.budget_bytes:,} (store.budget)")
        free = shutil.disk_usage(self.store.root).free
        if nbytes > free:
            raise LimitExceeded(f"artifact {cid.short()} declares {nbytes:,} bytes, more than the "
                                f"{free:,} free on the store's disk")

    #: optional `on_chunk(verified: bool)` for every chunk offered to the store (the daemon's metrics)
    on_chunk: Callable[[bool], None] | None = None

    def put_chunk(self, cid: Cid, data: bytes) -> None:
        try:
            self.store.put_chunk(cid, data)  # hashes against the CID before anything becomes visible
        except IntegrityError:
            if self.on_chunk is not None:
                self.on_chunk(False)
            raise
        if self.on_chunk is not None:
            self.on_chunk(True)
