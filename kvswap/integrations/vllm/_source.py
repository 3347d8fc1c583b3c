"""The vLLM connector's only door into kvswap: store, trust policy, manifests, signing and the node.

Everything the connector needs from a kvswap home goes through `KvswapSource`, which opens the home once as
a `kvswap.Home` (store, ledger, key, trust policy, the running node) and adds what the connector needs on top
(matching candidates, loading a prefix, publishing what vLLM prefilled); nothing else in
kvswap/integrations/vllm touches kvswap's internals. No torch here: the scheduler side can use it as well.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ...artifact.manifest import Manifest
from ...control import routes
from ...artifact.pipeline import check_compatible, publish_kv
from ...document import document_hash as _document_hash
from ...artifact.signing import NodeKey, TrustPolicy, verify_envelopes
from ...protocol.cid import Cid
from ...protocol.errors import KvswapError, UsageError
from ...protocol.keys import DocumentKey
from ...kvtensors import KvLayout, KvTensors
from ...home import Home, default_home_path
from .matching import Candidate


def default_home() -> Path:
    """The home every kvswap command uses: $KVSWAP_HOME, else ~/.kvswap."""
    return default_home_path()


def document_hash(text: str) -> str:
    """How a document is named on the network: sha256 hex of its UTF-8 bytes."""
    return _document_hash(text)


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact is bound to, as the transformers engine computes it for the same model folder.

    Duck-types the engine for `check_compatible` (model_id, fingerprint, tokenizer_fingerprint, dtype,
    layout)."""

    model_id: str
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    layout: KvLayout


@dataclass(frozen=True)
class FetchState:
    """Where a node fetch started by `start_fetch` stands: running, done or failed (with why)."""

    state: str
    cid: str | None = None
    error: str | None = None


class KvswapSource:
    """One kvswap home, seen by the connector: what is stored, trusted and loadable, and a way to add to it.

    Thread-safe: the Store keeps one SQLite connection per thread; the candidate cache has a lock."""

    def __init__(self, home: Path | str | None = None, accept_any: bool = False):
        self.h = Home(Path(home).expanduser() if home else default_home())
        self.home = self.h.path
        self.accept_any = accept_any
        self.h.layout.ensure()
        self.store = self.h.store
        self._lock = threading.Lock()
        self._seen: dict[str, Candidate | None] = {}  # cid -> candidate, or None when it does not qualify
        self._verdicts: dict[tuple[str, int, TrustPolicy], bool] = {}  # -> signatures accepted

    def close(self) -> None:
        self.h.close()

    def record_load(self, cid: str, n_tokens: int, seconds: float, model: ModelIdentity) -> None:
        """A verified load into vLLM, in the home's ledger beside the node's own events (`kvswap report`)."""
        self.h.ledger.compute(kind="load", seconds=seconds, tokens=n_tokens, model=model.model_id, dtype=model.dtype,
                             device="cpu", artifact=cid, extra={"engine": "vllm"})

    # --- trust ----------------------------------------------------------------------------------------
    def policy(self) -> TrustPolicy:
        """Re-read every time (as the daemon does): `kvswap trust add` takes effect without a restart."""
        return self.h.policy(self.accept_any)

    def check_trusted(self, cid: str) -> None:
        """UntrustedSigner / IntegrityError unless the artifact's envelopes satisfy the trust policy now."""
        c = Cid.parse(cid)
        verify_envelopes(self.store.get_envelopes(c), c, self.policy())

    # --- what can be matched ----------------------------------------------------------------------------
    def candidates(self, model: ModelIdentity) -> list[Candidate]:
        """Complete artifacts for this model (fingerprints, dtype, layout) whose signatures the policy
        accepts. Manifests are decoded (and re-hashed against their CID) once per artifact."""
        policy = self.policy()
        out = []
        for row in self.store.list_artifacts():
            if not row["complete"] or row["model_fingerprint"] != model.fingerprint or row["dtype"] != model.dtype:
                continue
            cid = row["cid"]
            with self._lock:
                known = cid in self._seen
                cand = self._seen.get(cid)
            if not known:
                cand = self._candidate(Cid.parse(cid), model)
                with self._lock:
                    self._seen[cid] = cand
            if cand is not None and self._trusted(cid, row["signatures"], policy):
                out.append(cand)
        return out

    def _trusted(self, cid: str, n_envelopes: int, policy: TrustPolicy) -> bool:
        """Signatures checked once per (artifact, its envelope count, policy): the scheduler asks on every
        waiting request, and a new attestation or trust-list change is a new key."""
        key = (cid, n_envelopes, policy)
        with self._lock:
            if key in self._verdicts:
                return self._verdicts[key]
        try:
            verify_envelopes(self.store.get_envelopes(Cid.parse(cid)), Cid.parse(cid), policy)
            ok = True
        except KvswapError:
            ok = False  # untrusted (or tampered) artifacts are never matched
        with self._lock:
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            self._verdicts[key] = ok
        return ok

    def _candidate(self, cid: Cid, model: ModelIdentity) -> Candidate | None:
        try:
            manifest = self.store.get_manifest(cid)
            check_compatible(manifest, model)
        except KvswapError:
            return None
        return Candidate(str(cid), manifest.block_tokens, tuple(manifest.token_ids),
                         tuple(c.prefix_key for c in manifest.chunks), manifest.document_hash)

    def find_document(self, model: ModelIdentity, doc_hash: str) -> str | None:
        """A complete local artifact of this document for this model, if any."""
        found = self.store.find_by_document(model.fingerprint, doc_hash, complete_only=True)
        return str(found[0]) if found else None

    def has_complete(self, cid: str) -> bool:
        c = Cid.parse(cid)
        return self.store.has_artifact(c) and self.store.is_complete(c)

    # --- loading --------------------------------------------------------------------------------------
    def load_kv(self, cid: str, n_tokens: int, model: ModelIdentity) -> KvTensors:
        """The first `n_tokens` of an artifact's KV, after the manifest matched its CID, the model and the
        trust policy, through kvswap's one load path (kvswap/ops/loading.py: every chunk verified, or one copy
        from the home's host-memory tier)."""
        from ...ops.loading import load_kvtensors

        c = Cid.parse(cid)
        manifest = self.store.get_manifest(c)
        check_compatible(manifest, model)
        self.check_trusted(cid)
        kv = load_kvtensors(self.store, manifest, n_tokens, keep_raw=self.h.config["store.keep_raw"], tier=self.h.tier)
        self.store.touch(c)
        return kv

    # --- publishing -----------------------------------------------------------------------------------
    def node_key(self) -> NodeKey:
        return self.h.key

    def publish(self, kv: KvTensors, model: ModelIdentity, doc_hash: str, block_tokens: int,
                codec: str = "auto") -> Manifest:
        """Chunk, compress, sign with this home's key and store `kv` as an artifact (no tail: vLLM does not
        hand its logits to connectors). Returns the manifest; the same KV gives the same CID."""
        manifest, chunks = publish_kv(kv, model_id=model.model_id, model_fingerprint=model.fingerprint,
                                      tokenizer_fingerprint=model.tokenizer_fingerprint, document_hash=doc_hash,
                                      codec=codec, block_tokens=block_tokens)
        self.store.put_artifact(manifest, [self.node_key().sign_manifest(manifest.cid)], chunks)
        return manifest

    # --- the node ---------------------------------------------------------------------------------------
    def _client(self):
        return self.h.node()

    def start_fetch(self, *, cid: str | None = None, doc_hash: str | None = None) -> str | None:
        """Ask the home's node to find and fetch an artifact (DHT lookup + multi-peer fetch, every chunk
        verified into the store). Returns the node's job id, or None when no node runs in this home."""
        client = self._client()
        if client is None:
            return None
        if not cid and not doc_hash:
            raise UsageError("a fetch needs an artifact CID or a document hash")
        key = Cid.parse(cid) if cid else DocumentKey(doc_hash)
        return client.call(routes.GET, routes.GetBody(key=key)).id

    def fetch_state(self, job_id: str) -> FetchState:
        client = self._client()
        if client is None:
            return FetchState("failed", error="the node stopped")
        try:
            job = client.call(routes.JOB, job_id=job_id)
        except KvswapError as exc:
            return FetchState("failed", error=str(exc))
        if job.state == "done":
            return FetchState("done", cid=(job.result or {}).get("cid"))
        if job.state in ("failed", "cancelled"):
            return FetchState("failed", error=(job.error or {}).get("message", "fetch failed"))
        return FetchState("running")
