"""Fetch an artifact from the network into the local store (trio): resolve -> manifest -> chunks -> provide.

1. Resolve: providers of the artifact CID (or of the document key) from the DHT, then directly connected
   peers as a fallback (py-libp2p's find_providers stops at the first local record it holds).
2. Manifest: ask providers in turn; the target (artifact layer) verifies it: CID of the bytes, signature and
   trust policy; the caller's expected model fingerprint / dtype are checked here (ModelMismatch).
3. Chunks: the chunks covering the first `n_tokens` tokens (all by default), minus those already in the store
   (so an interrupted fetch resumes), in a random order (so fetchers that start together want different
   chunks first), FETCH_PARALLEL_CHUNKS requests at a time, spread over the peers. Every chunk is verified
   against its CID on arrival (in a worker thread), written through the target, and provided on the DHT at
   once, so other fetchers can take it from us while we fetch the rest.
   - A peer that lacks a chunk is asked again after LACK_RETRY_S, doubling, at most MAX_LACK_ASKS times: it
     may be fetching the same artifact.
   - A peer that rations a chunk (node/ration.py: it has sent its share of copies) names peers it sent it to;
     they are asked first, and the rationing peer again after RATION_RETRY_S (it serves after its patience).
   - A peer that times out, resets, or serves bytes that do not match is penalised; after
     MAX_PROVIDER_FAILURES it is dropped, and its chunks are taken from other peers.
   - Connected peers are added to the fetch every FETCH_PEER_REFRESH_S. When no live peer can ever serve a
     chunk, the DHT is asked for that chunk's own providers; if that finds nobody either, the fetch fails.
4. After completion the node provides the artifact and its document key (a prefix-only fetch provides just
   the chunks it holds), so popular artifacts spread.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import IntegrityError, KvswapError, ModelMismatch, NotFound, RemoteProtocolError
from kvswap.protocol import limits
from kvswap.protocol.messages import ChunkMissing, ManifestRequest

from .accounting import new_request_id
from kvswap.protocol.names import artifact_keys, cid_key, document_key

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
            return cid_key(self.cid)
        return document_key(self.model_fingerprint, self.document_hash)

    def request(self) -> ManifestRequest:
        return ManifestRequest(self.cid, self.model_fingerprint, self.document_hash)

    def __str__(self) -> str:
        return self.cid.short() if self.cid else f"document {self.document_hash[:12]} for {self.model_fingerprint[:12]}"


class _Providers:
    """Peer bookkeeping for one fetch: failures, requests in flight, chunks served, and when each peer may be
    asked for each chunk again (it lacked it, or rationed it)."""

    def __init__(self, peers: list[str], me: str | None = None) -> None:
        self.me = me
        self.order: list[str] = []
        self.failures: dict[str, int] = {}
        self.busy: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.lack_asks: dict[tuple[str, Cid], int] = {}
        self.not_before: dict[tuple[str, Cid], float] = {}  # (peer, chunk) -> earliest next ask
        self.named: dict[Cid, list[str]] = {}  # chunk -> peers a rationing provider said it sent the chunk to
        for peer in peers:
            self.add(peer)

    def add(self, peer: str) -> bool:
        """Track a new peer (at most MAX_PEERS_PER_FETCH, never ourselves); False if it was not added."""
        if peer in self.failures or peer == self.me or len(self.order) >= limits.MAX_PEERS_PER_FETCH:
            return False
        self.order.append(peer)
        self.failures[peer] = 0
        self.busy[peer] = 0
        self.served[peer] = 0
        return True

    def alive(self) -> list[str]:
        return [p for p in self.order if self.failures[p] < limits.MAX_PROVIDER_FAILURES]

    def askable(self, peer: str, cid: Cid, now: float) -> bool:
        return self.failures[peer] < limits.MAX_PROVIDER_FAILURES and self.not_before.get((peer, cid), 0.0) <= now

    def pick(self, cid: Cid, tried: set[str], now: float) -> str | None:
        """The peer to ask for `cid` now: one named as a holder first, then untried, least busy, fewest
        failures, earliest known. None if no live peer may be asked for it right now."""
        options = [p for p in self.alive() if self.not_before.get((p, cid), 0.0) <= now]
        if not options:
            return None
        named = self.named.get(cid, ())
        return min(options, key=lambda p: (p not in named, p in tried, self.busy[p], self.failures[p],
                                           self.order.index(p)))

    def next_chance(self, cid: Cid) -> float:
        """When some live peer may next be asked for `cid` (inf: every live peer lacks it for good)."""
        return min((self.not_before.get((p, cid), 0.0) for p in self.alive()), default=math.inf)

    def lacked(self, peer: str, cid: Cid, now: float) -> None:
        asks = self.lack_asks.get((peer, cid), 0) + 1
        self.lack_asks[(peer, cid)] = asks
        wait = limits.LACK_RETRY_S * 2 ** (asks - 1)
        self.not_before[(peer, cid)] = math.inf if asks >= limits.MAX_LACK_ASKS else now + wait

    def rationed(self, peer: str, cid: Cid, holders: Sequence[str], now: float) -> None:
        self.not_before[(peer, cid)] = now + limits.RATION_RETRY_S
        named = self.named.setdefault(cid, [])
        for holder in holders:
            if holder not in named and (self.add(holder) or holder in self.failures):
                named.append(holder)

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
        self.rng = random.Random()  # the order chunks are fetched in

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
        self.rng.shuffle(todo)  # fetchers that start together should not all want the same chunk first
        me = self.p2p.peer_id
        pool = _Providers(holders + [p for p in candidates if p not in holders], me=me)
        total_bytes = sum(c.stored_size for c in todo)
        state = {"bytes": 0, "chunks": 0}
        artifact = verified.cid

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
        looked_up: dict[Cid, bool] = {}  # chunk -> its DHT lookup finished (False while it runs)
        failed: list[BaseException] = []
        # received chunks are verified and written behind the workers' backs, so a worker asks for more as
        # soon as its bytes are in; this bounds the chunks held in memory meanwhile
        write_slots = trio.Semaphore(2 * self.parallel)

        def take_batch(now: float) -> tuple[str, list[ChunkRef]] | None:
            """The first pending chunk some peer may be asked for now, plus more pending chunks for that peer.
            Batches amortise a request (and a data-plane connection) over several chunks, and shrink as the
            queue drains so the last requests still spread over every worker."""
            for i, first in enumerate(pending):
                peer = pool.pick(first.cid, tried[first.cid], now)
                if peer is not None:
                    break
            else:
                return None
            del pending[i]
            batch_max = max(1, min(limits.FETCH_BATCH_CHUNKS, -(-len(pending) // (2 * self.parallel))))
            batch, size = [first], first.stored_size
            for ref in list(pending):
                if len(batch) >= batch_max or size >= limits.FETCH_BATCH_BYTES:
                    break
                if pool.askable(peer, ref.cid, now):
                    pending.remove(ref)
                    batch.append(ref)
                    size += ref.stored_size
            return peer, batch

        async def wait_for_a_peer(now: float) -> None:
            """No pending chunk can be asked of anyone now: look chunks that nobody will ever serve up in the
            DHT (NotFound if that was done already), else sleep until the soonest peer may be asked again."""
            chances = [(pool.next_chance(ref.cid), ref) for ref in pending]
            for when, ref in chances:
                if when < math.inf:
                    continue
                if looked_up.get(ref.cid):
                    raise NotFound(f"no provider could serve chunk {ref.cid.short()} of {verified.cid.short()}")
                if ref.cid not in looked_up:
                    looked_up[ref.cid] = False
                    for extra in await self.p2p.find_providers(cid_key(ref.cid)):
                        pool.add(extra)
                    looked_up[ref.cid] = True
                    return
            soonest = min((when for when, _ in chances if when < math.inf), default=now + _IDLE_POLL_S)
            await trio.sleep(min(max(soonest - now, _IDLE_POLL_S), limits.RATION_RETRY_S))

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
            self.p2p.provide_soon([cid_key(ref.cid)])  # others fetching this artifact may take it from us now
            report()

        def on_received(peer: str, ref: ChunkRef, data: bytes) -> None:
            owner[ref.cid] = _WRITER
            writers.start_soon(store_one, peer, ref, data)

        async def worker() -> None:
            while remaining:
                if not pending:
                    await trio.sleep(_IDLE_POLL_S)  # others are in flight and may hand chunks back
                    continue
                now = time.monotonic()
                taken = take_batch(now)
                if taken is None:
                    await wait_for_a_peer(now)
                    continue
                peer, batch = taken
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
                        if owner.get(ref.cid) == batch_id:
                            pool.lacked(peer, ref.cid, time.monotonic())
                finally:
                    pool.busy[peer] -= 1
                back = [ref for ref in batch if owner.get(ref.cid) == batch_id]  # neither received nor stored
                for ref in back:
                    del owner[ref.cid]
                pending.extend(back)  # behind the others: this peer said no, someone else may say yes

        async def guarded_worker() -> None:
            try:
                await worker()
            except KvswapError as exc:
                failed.append(exc)
                writers.cancel_scope.cancel()

        async def watch_peers() -> None:
            while True:  # peers we connect to while fetching (e.g. other fetchers) may hold chunks
                await trio.sleep(limits.FETCH_PEER_REFRESH_S)
                for peer in self.p2p.connected_peers():
                    pool.add(peer)

        async with trio.open_nursery() as outer:
            outer.start_soon(watch_peers)
            async with trio.open_nursery() as writers:
                for _ in range(min(self.parallel, max(len(todo), 1))):
                    writers.start_soon(guarded_worker)
            outer.cancel_scope.cancel()
        if failed:
            raise failed[0]
        complete = n_tokens is None or n_tokens >= verified.n_tokens
        # the fetched chunks were provided as they were stored; now the ones we had, and the whole if complete
        self.p2p.provide_soon(artifact_keys(verified.cid, verified.model_fingerprint, verified.document_hash,
                                            [c.cid for c in present], complete))
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

    async def _get_batch(self, peer: str, batch: list[ChunkRef], artifact: Cid, pool: _Providers,
                         write_slots: trio.Semaphore, on_received: Callable[[str, ChunkRef, bytes], None]) -> None:
        """Fetch `batch` from `peer` in one request; hand each chunk of the right size to `on_received`
        (verification and writing happen there, behind this request). A chunk the peer lacks or rations is
        recorded in `pool`; a chunk of the wrong size raises IntegrityError."""
        by_cid = {ref.cid: ref for ref in batch}

        async def on_chunk(cid: Cid, answer: bytes | bytearray | ChunkMissing) -> None:
            ref = by_cid[cid]
            if isinstance(answer, ChunkMissing):
                if answer.rationed:
                    pool.rationed(peer, cid, answer.holders, time.monotonic())
                else:
                    pool.lacked(peer, cid, time.monotonic())
                return
            if len(answer) != ref.stored_size:
                raise IntegrityError(f"chunk {cid.short()} from {peer[:16]} has {len(answer)} bytes, "
                                     f"the manifest says {ref.stored_size}")
            await write_slots.acquire()
            on_received(peer, ref, answer)

        with trio.fail_after(limits.CHUNK_TIMEOUT_S * len(batch)):
            await self.exchange.request_chunks(peer, [ref.cid for ref in batch], on_chunk, artifact=artifact,
                                               dataplane=self.use_dataplane)


_WRITER = 0  # owner mark: the chunk's bytes are in, being verified and written
#: seconds a worker sleeps when every pending chunk is in flight or waiting for a peer
_IDLE_POLL_S = 0.005


def _verify_and_put(target: FetchTarget, cid: Cid, data: bytes, target_verifies: bool) -> None:
    if not target_verifies:
        cid.verify(data)
    target.put_chunk(cid, data)
