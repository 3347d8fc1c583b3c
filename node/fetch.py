"""Fetch an artifact from the network into the local store (trio): resolve -> manifest -> chunks -> provide.

1. Resolve: providers of the artifact CID (or of the document key) from the DHT, then directly connected
   peers as a fallback (py-libp2p's find_providers stops at the first local record it holds).
2. Manifest: ask providers in turn; the target (artifact layer) verifies it: CID of the bytes, signature and
   trust policy; the caller's expected model fingerprint / dtype are checked here (ModelMismatch).
3. Chunks: the chunks covering the first `n_tokens` tokens (all by default), minus those already in the store
   (so an interrupted fetch resumes), are fetched FETCH_PARALLEL_CHUNKS at a time, spread over the providers.
   Every chunk is verified against its CID on arrival (in a worker thread) and written through the target.
   A provider that times out, resets, or serves bytes that do not match is penalised; after
   MAX_PROVIDER_FAILURES it is dropped, and its chunk is taken from another provider. A provider lacking a
   chunk is not penalised; if no provider has a chunk, the DHT is asked for that chunk's own providers.
4. After completion the node provides the artifact, its document key and its chunks (a prefix-only fetch
   provides just the chunks it holds), so popular artifacts spread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import IntegrityError, KvswapError, ModelMismatch, NotFound, RemoteProtocolError
from kvswap.protocol import limits
from kvswap.protocol.messages import ManifestRequest

from .exchange import new_request_id
from .p2p import document_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a verified manifest: its CID, token range [start, end) and stored size."""

    cid: Cid
    token_start: int
    token_end: int
    stored_size: int


@dataclass(frozen=True)
class VerifiedManifest:
    """What the artifact layer returns for manifest bytes that passed CID, signature and trust checks."""

    cid: Cid
    manifest: bytes
    envelopes: tuple[bytes, ...]
    model_fingerprint: str
    document_hash: str
    dtype: str
    n_tokens: int
    chunks: tuple[ChunkRef, ...]
    parsed: Any = None  # the artifact layer's own Manifest object, passed back to put_manifest


class FetchTarget(Protocol):
    """The local store + artifact layer, as the fetcher needs them. Called from worker threads.

    Order of calls in a fetch: verify_manifest, put_manifest (register the artifact, incomplete), then
    has_chunk / put_chunk per chunk. A target whose put_chunk hashes the bytes itself sets
    `verifies_chunks = True` so the fetcher does not hash every chunk twice.
    """

    def verify_manifest(self, manifest: bytes, envelopes: Sequence[bytes]) -> VerifiedManifest:
        """Parse + validate, check signatures against the trust policy. Raise IntegrityError / FormatError."""

    def put_manifest(self, verified: VerifiedManifest) -> None:
        """Register the artifact before its chunks arrive."""

    def has_chunk(self, cid: Cid) -> bool: ...

    def put_chunk(self, cid: Cid, data: bytes) -> None:
        """Store chunk bytes (atomically: temp file, then rename)."""


@dataclass
class FetchProgress:
    """Reported after every chunk: bytes fetched so far, MB/s, providers in use, chunks done / total."""

    bytes_done: int
    bytes_total: int
    rate_mb_s: float
    peers: list[str]
    chunks_done: int
    chunks_total: int


@dataclass(frozen=True)
class FetchResult:
    cid: Cid
    model_fingerprint: str
    document_hash: str
    n_tokens: int
    chunks_fetched: int
    chunks_present: int
    bytes_fetched: int
    seconds: float
    providers: dict[str, int] = field(default_factory=dict)  # peer -> chunks served

    @property
    def rate_mb_s(self) -> float:
        return self.bytes_fetched / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class FetchKey:
    """What to fetch: an artifact CID, or the artifact of (model fingerprint, document hash)."""

    cid: Cid | None = None
    model_fingerprint: str | None = None
    document_hash: str | None = None

    @property
    def dht_key(self) -> str:
        if self.cid is not None:
            return str(self.cid)
        return document_key(self.model_fingerprint, self.document_hash)

    def request(self) -> ManifestRequest:
        return ManifestRequest(self.cid, self.model_fingerprint, self.document_hash)

    def __str__(self) -> str:
        return self.cid.short() if self.cid else f"document {self.document_hash[:12]} for {self.model_fingerprint[:12]}"


class _Providers:
    """Provider bookkeeping for one fetch: failures, who lacks what, load."""

    def __init__(self, peers: list[str]) -> None:
        self.order: list[str] = list(dict.fromkeys(peers))
        self.failures: dict[str, int] = {p: 0 for p in self.order}
        self.lacks: dict[str, set[Cid]] = {p: set() for p in self.order}
        self.busy: dict[str, int] = {p: 0 for p in self.order}
        self.served: dict[str, int] = {p: 0 for p in self.order}

    def add(self, peer: str) -> None:
        if peer not in self.failures:
            self.order.append(peer)
            self.failures[peer] = 0
            self.lacks[peer] = set()
            self.busy[peer] = 0
            self.served[peer] = 0

    def alive(self) -> list[str]:
        return [p for p in self.order if self.failures[p] < limits.MAX_PROVIDER_FAILURES]

    def pick(self, cid: Cid, tried: set[str]) -> str | None:
        options = [p for p in self.alive() if cid not in self.lacks[p] and p not in tried]
        if not options:
            options = [p for p in self.alive() if cid not in self.lacks[p]]
        if not options:
            return None
        return min(options, key=lambda p: (self.busy[p], self.failures[p], self.order.index(p)))

    def penalise(self, peer: str, why: str) -> None:
        self.failures[peer] += 1
        log.info("provider %s penalised (%d): %s", peer[:16], self.failures[peer], why)


class Fetcher:
    """Runs fetches for one node (trio side). `exchange` is node/exchange.py's Exchange."""

    def __init__(self, p2p: Any, exchange: Any, target: FetchTarget, limiter: trio.CapacityLimiter,
                 use_dataplane: bool = True, parallel: int = limits.FETCH_PARALLEL_CHUNKS) -> None:
        self.p2p = p2p
        self.parallel = parallel
        self.exchange = exchange
        self.target = target
        self.limiter = limiter
        self.use_dataplane = use_dataplane
        self._target_verifies = bool(getattr(target, "verifies_chunks", False))

    async def _thread(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def resolve(self, key: FetchKey) -> list[str]:
        """Candidate providers: DHT providers first, then connected peers."""
        found = await self.p2p.find_providers(key.dht_key)
        me = self.p2p.peer_id
        return [p for p in dict.fromkeys(found + self.p2p.connected_peers()) if p != me]

    async def fetch_manifest(self, key: FetchKey, providers: list[str],
                             expect_model: str | None = None, expect_dtype: str | None = None
                             ) -> tuple[VerifiedManifest, list[str]]:
        """The first manifest a provider serves that verifies; returns it and the providers that had it."""
        errors: list[str] = []
        rejections: list[KvswapError] = []  # manifests that arrived but failed verification
        for peer in providers:
            try:
                reply = await self.exchange.request_manifest(peer, key.request())
                verified = await self._thread(self.target.verify_manifest, reply.manifest, reply.envelopes)
            except NotFound:
                continue
            except RemoteProtocolError as exc:  # the peer misbehaved or went away: try the next one
                errors.append(f"{peer[:16]}: {exc}")
                continue
            except KvswapError as exc:  # a bad, untrusted or unverifiable manifest: try the next provider
                errors.append(f"{peer[:16]}: {exc}")
                rejections.append(exc)
                continue
            if verified.cid != Cid.of(reply.manifest):
                errors.append(f"{peer[:16]}: manifest CID does not match its bytes")
                continue
            if key.cid is not None and verified.cid != key.cid:
                errors.append(f"{peer[:16]}: served another artifact")
                continue
            if key.cid is None and (verified.model_fingerprint, verified.document_hash) != (
                key.model_fingerprint, key.document_hash
            ):
                errors.append(f"{peer[:16]}: served an artifact of another document or model")
                continue
            if expect_model is not None and verified.model_fingerprint != expect_model:
                raise ModelMismatch(
                    f"artifact {verified.cid.short()} is for model {verified.model_fingerprint[:16]}, "
                    f"this node runs {expect_model[:16]}"
                )
            if expect_dtype is not None and verified.dtype != expect_dtype:
                raise ModelMismatch(f"artifact {verified.cid.short()} is {verified.dtype}, expected {expect_dtype}")
            rest = providers[providers.index(peer):]
            return verified, rest
        detail = f" ({'; '.join(errors[:3])})" if errors else ""
        if rejections:  # e.g. every provider served a manifest signed only by untrusted keys
            raise type(rejections[0])(f"no acceptable manifest for {key}: {rejections[0]}")
        raise NotFound(f"no provider served a valid manifest for {key}{detail}")

    async def fetch(
        self,
        key: FetchKey,
        *,
        n_tokens: int | None = None,
        progress: Callable[[FetchProgress], None] | None = None,
        expect_model: str | None = None,
        expect_dtype: str | None = None,
        providers: list[str] | None = None,
    ) -> FetchResult:
        started = time.monotonic()
        new_request_id()  # every ledger row of this fetch shares one request id
        candidates = providers if providers is not None else await self.resolve(key)
        if not candidates:
            raise NotFound(f"no provider found for {key}")
        verified, holders = await self.fetch_manifest(key, candidates, expect_model, expect_dtype)
        await self._thread(self.target.put_manifest, verified)
        wanted = list({c.cid: c for c in verified.chunks
                       if n_tokens is None or c.token_start < n_tokens}.values())  # a CID may repeat
        present = [c for c in wanted if await self._thread(self.target.has_chunk, c.cid)]
        todo = [c for c in wanted if c not in present]
        pool = _Providers(holders + [p for p in candidates if p not in holders])
        total_bytes = sum(c.stored_size for c in todo)
        state = {"bytes": 0, "chunks": 0}
        artifact = str(verified.cid)

        def report() -> None:
            if progress is None:
                return
            elapsed = max(time.monotonic() - started, 1e-6)
            progress(FetchProgress(state["bytes"], total_bytes, state["bytes"] / 1e6 / elapsed,
                                   [p for p, n in pool.served.items() if n], state["chunks"], len(todo)))

        pending: deque[ChunkRef] = deque(todo)
        remaining: set[Cid] = {c.cid for c in todo}  # not yet stored
        # who is responsible for each chunk not yet stored: a batch number while requested, WRITER while its
        # bytes are verified and written, absent while it waits in `pending` (so it is never queued twice)
        owner: dict[Cid, int] = {}
        batch_ids = iter(range(1, 1 << 62))
        tried: dict[Cid, set[str]] = {c.cid: set() for c in todo}
        looked_up: set[Cid] = set()
        failed: list[BaseException] = []
        # received chunks are verified and written behind the workers' backs, so a worker asks for more as
        # soon as its bytes are in; this bounds the chunks held in memory meanwhile
        write_slots = trio.Semaphore(2 * self.parallel)

        def take_batch() -> tuple[str | None, list[ChunkRef]]:
            # batches amortise a request (and a data-plane connection) over several chunks, and shrink as the
            # queue drains so the last requests still spread over every worker
            batch_max = max(1, min(limits.FETCH_BATCH_CHUNKS, -(-len(pending) // (2 * self.parallel))))
            first = pending.popleft()
            peer = pool.pick(first.cid, tried[first.cid])
            if peer is None:
                return None, [first]
            batch, size = [first], first.stored_size
            while pending and len(batch) < batch_max and size < limits.FETCH_BATCH_BYTES:
                if pending[0].cid in pool.lacks[peer]:
                    break
                nxt = pending.popleft()
                batch.append(nxt)
                size += nxt.stored_size
            return peer, batch

        async def store_one(peer: str, ref: ChunkRef, data: bytes) -> None:
            try:
                await self._thread(_verify_and_put, self.target, ref.cid, data, self._target_verifies)
            except IntegrityError as exc:  # the provider lied: another one will serve this chunk
                pool.penalise(peer, str(exc))
                owner.pop(ref.cid, None)
                pending.appendleft(ref)
                return
            except KvswapError as exc:  # our own store failed: the fetch cannot go on
                failed.append(exc)
                writers.cancel_scope.cancel()
                return
            finally:
                write_slots.release()
            remaining.discard(ref.cid)
            owner.pop(ref.cid, None)
            pool.served[peer] += 1
            state["bytes"] += ref.stored_size
            state["chunks"] += 1
            report()

        def on_received(peer: str, ref: ChunkRef, data: bytes) -> None:
            owner[ref.cid] = _WRITER
            writers.start_soon(store_one, peer, ref, data)

        async def worker() -> None:
            while remaining:
                if not pending:
                    await trio.sleep(0.005)  # others are in flight and may hand chunks back
                    continue
                peer, batch = take_batch()
                if peer is None:
                    ref = batch[0]
                    if ref.cid in looked_up:
                        raise NotFound(f"no provider could serve chunk {ref.cid.short()} of {verified.cid.short()}")
                    looked_up.add(ref.cid)
                    for extra in await self.p2p.find_providers(str(ref.cid)):
                        pool.add(extra)
                    pending.appendleft(ref)
                    continue
                batch_id = next(batch_ids)
                for ref in batch:
                    tried[ref.cid].add(peer)
                    owner[ref.cid] = batch_id
                pool.busy[peer] += 1
                try:
                    await self._get_batch(peer, batch, artifact, pool, write_slots, on_received)
                except (RemoteProtocolError, IntegrityError, trio.TooSlowError) as exc:
                    pool.penalise(peer, str(exc) or type(exc).__name__)
                except NotFound:
                    for ref in batch:
                        pool.lacks[peer].add(ref.cid)
                finally:
                    pool.busy[peer] -= 1
                back = [ref for ref in batch if owner.get(ref.cid) == batch_id]  # neither received nor stored
                for ref in back:
                    del owner[ref.cid]
                pending.extendleft(reversed(back))

        async def guarded_worker() -> None:
            try:
                await worker()
            except KvswapError as exc:
                failed.append(exc)
                writers.cancel_scope.cancel()

        async with trio.open_nursery() as writers:
            for _ in range(min(self.parallel, max(len(todo), 1))):
                writers.start_soon(guarded_worker)
        if failed:
            raise failed[0]
        complete = n_tokens is None or n_tokens >= verified.n_tokens
        keys = [str(c.cid) for c in wanted]
        if complete:
            keys = [artifact, document_key(verified.model_fingerprint, verified.document_hash)] + keys
        self.p2p.provide_soon(keys)
        return FetchResult(
            cid=verified.cid,
            model_fingerprint=verified.model_fingerprint,
            document_hash=verified.document_hash,
            n_tokens=verified.n_tokens,
            chunks_fetched=len(todo),
            chunks_present=len(present),
            bytes_fetched=state["bytes"],
            seconds=time.monotonic() - started,
            providers={p: n for p, n in pool.served.items() if n},
        )

    async def _get_batch(self, peer: str, batch: list[ChunkRef], artifact: str, pool: _Providers,
                         write_slots: trio.Semaphore, on_received: Callable[[str, ChunkRef, bytes], None]) -> None:
        """Fetch `batch` from `peer` in one request; hand each chunk of the right size to `on_received`
        (verification and writing happen there, behind this request). A chunk the peer lacks is recorded in
        `pool.lacks`; a chunk of the wrong size raises IntegrityError."""
        by_cid = {ref.cid: ref for ref in batch}

        async def on_chunk(cid: Cid, data: bytes | None) -> None:
            ref = by_cid[cid]
            if data is None:
                pool.lacks[peer].add(cid)
                return
            if len(data) != ref.stored_size:
                raise IntegrityError(f"chunk {cid.short()} from {peer[:16]} has {len(data)} bytes, "
                                     f"the manifest says {ref.stored_size}")
            await write_slots.acquire()
            on_received(peer, ref, data)

        with trio.fail_after(limits.CHUNK_TIMEOUT_S * len(batch)):
            await self.exchange.request_chunks(peer, [ref.cid for ref in batch], on_chunk, artifact=artifact,
                                               dataplane=self.use_dataplane)


_WRITER = 0  # owner mark: the chunk's bytes are in, being verified and written


def _verify_and_put(target: FetchTarget, cid: Cid, data: bytes, target_verifies: bool) -> None:
    if not target_verifies:
        cid.verify(data)
    target.put_chunk(cid, data)
