"""Fetch an artifact from the network into the local store (trio): resolve -> manifest -> chunks -> provide.

1. Resolve: providers of the artifact CID (or of the document key) from the DHT, then directly connected
   peers as a fallback (py-libp2p's find_providers stops at the first local record it holds).
2. Manifest: ask providers in turn; the target (artifact layer) verifies it: CID of the bytes, signature and
   trust policy; the caller's expected model fingerprint / dtype are checked here (ModelMismatch).
3. Chunks: the blobs covering the first `n_tokens` tokens (all by default), minus those already in the store
   (so an interrupted fetch resumes). Which chunk to ask of which peer and when, what to do when a peer lacks,
   rations, fails or lies, and when to give up, is node/fetchplan.py's pure state machine; `_ChunkRun` here
   only carries out its answers: it opens the requests, hands received bytes to worker threads that verify
   them against their CID and write them through the target, provides each stored chunk on the DHT at once
   (other fetchers may take it from us while we fetch the rest), runs DHT lookups and lists connected peers,
   and reports back what happened.
4. After completion the node provides the artifact and its document key (a prefix-only fetch provides just
   the chunks it holds), so popular artifacts spread.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import (
    Busy,
    IntegrityError,
    KvswapError,
    LimitExceeded,
    ModelMismatch,
    NotFound,
    OverBudget,
    PaymentRequired,
    RemoteProtocolError,
)
from kvswap.payments.rules import Purse, amount_for
from kvswap.protocol.messages import ChunkMissing, ManifestRequest
from kvswap.protocol.keys import ArtifactKey, DocumentKey, describe, dht_key
from kvswap.protocol.names import any_model_key, artifact_keys, cid_key

from .accounting import new_request_id
from .payments import Payer
from .quota import PeerRecords
from .uploads import Reciprocity
from .tuning import FetchTuning, ServeTuning
from .fetchplan import (
    Aborted,
    CancelRequest,
    ChunkCorrupt,
    ChunkLacked,
    ChunkRationed,
    ChunkReceived,
    ChunkStored,
    Done,
    Event,
    Failed,
    FetchBlob,
    FetchPlan,
    FindProviders,
    ListPeers,
    LookupDone,
    PathOpen,
    PathWait,
    PeersSeen,
    ProvideChunk,
    RequestChunks,
    RequestEnded,
    Tick,
    WaitUntil,
)

log = logging.getLogger(__name__)


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
    blobs: tuple[FetchBlob, ...]  # every blob to fetch: the token-block chunks, then the tail (if any)
    parsed: Any = None  # the artifact layer's own Manifest object, passed back to put_manifest
    attestations: bytes = b""  # the provider's audit attestation list, kept with the manifest
    model_id: str = ""  # the model's name as its publisher gave it (for messages; the fingerprint binds)


class FetchTarget(Protocol):
    """The local store + artifact layer, as the fetcher needs them. Called from worker threads.

    Order of calls in a fetch: verify_manifest, put_manifest (register the artifact, incomplete), then
    has_chunk / put_chunk per chunk. A target whose put_chunk hashes the bytes itself sets
    `verifies_chunks = True` so the fetcher does not hash every chunk twice.
    """

    def verify_manifest(self, manifest: bytes, envelopes: Sequence[bytes], attestations: bytes = b"",
                        accept_any: bool = False) -> VerifiedManifest:
        """Parse + validate, check signatures (and audit attestations) against the trust policy (with any valid
        signer accepted for this fetch when `accept_any`). Raise IntegrityError / FormatError."""

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
    paid: int = 0  # units signed for in vouchers to priced providers (kvswap/payments/)
    settle_s: float = 0.0  # seconds after the last chunk until its last vouchers were acked (not in `seconds`)

    @property
    def rate_mb_s(self) -> float:
        return self.bytes_fetched / 1e6 / self.seconds if self.seconds > 0 else 0.0


class Fetcher:
    """Runs fetches for one node (trio side). `exchange` is node/exchange.py's Exchange."""

    def __init__(self, p2p: Any, exchange: Any, target: FetchTarget, limiter: trio.CapacityLimiter,
                 use_dataplane: bool = True, tuning: FetchTuning = FetchTuning(),
                 records: PeerRecords | None = None, reciprocity: Reciprocity | None = None,
                 ration: Any = None, payer: Payer | None = None) -> None:
        self.p2p = p2p
        #: the providers' terms as learnt, and this node's vouchers (node/payments.py); None: it pays nobody
        self.payer = payer
        self.tuning = tuning
        self.records = records if records is not None else PeerRecords(ServeTuning.max_recorded_peers)
        #: bytes verified from each peer (node/uploads.py): peers that give get upload slots here first
        self.reciprocity = reciprocity if reciprocity is not None else Reciprocity()
        self.ration = ration  # this node's UploadRation (node/ration.py): told which artifacts it fetches
        self.exchange = exchange
        self.target = target
        self.limiter = limiter
        self.use_dataplane = use_dataplane
        self._target_verifies = bool(getattr(target, "verifies_chunks", False))
        self.rng = random.Random()  # the order chunks are asked for (node/fetchplan.py shuffles with it)

    async def _thread(self, fn: Callable, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def resolve(self, key: ArtifactKey) -> list[str]:
        """Candidate providers: DHT providers first, then connected peers."""
        return await self._providers_then_peers(dht_key(key))

    async def _providers_then_peers(self, dht_key: str) -> list[str]:
        found = await self.p2p.find_providers(dht_key)
        me = self.p2p.peer_id
        return [p for p in dict.fromkeys(found + self.p2p.connected_peers()) if p != me]

    async def other_models(self, document_hash: str, own_fingerprint: str) -> list[tuple[str, VerifiedManifest]]:
        """(peer, its manifest) for complete artifacts of this document that peers hold for models other than
        `own_fingerprint`: what the user is told when the document was not found for this node's model.

        Asks up to fetch.max_other_model_asks providers of the document's any-model key (then connected peers) for
        the document's manifest for any model; each answer must verify (CID and valid signatures; an
        untrusted signer is accepted, since nothing is fetched or stored) and name this document. Bounded by
        fetch.other_model_lookup_s; peers that refuse or fail are skipped."""
        found: list[tuple[str, VerifiedManifest]] = []
        request = ManifestRequest(DocumentKey(document_hash))

        async def ask(peer: str) -> None:
            try:
                reply = await self.exchange.request_manifest(peer, request)
                verified = await self._thread(self.target.verify_manifest, reply.manifest, reply.envelopes,
                                              b"", True)
            except KvswapError as exc:  # lacks it, predates the any-model request, or served garbage
                log.debug("no other model from %s: %s", peer[:16], exc)
                return
            if verified.document_hash == document_hash and verified.model_fingerprint != own_fingerprint:
                found.append((peer, verified))

        with trio.move_on_after(self.tuning.other_model_lookup_s):
            peers = await self._providers_then_peers(any_model_key(document_hash))
            async with trio.open_nursery() as nursery:
                for peer in peers[:self.tuning.max_other_model_asks]:
                    nursery.start_soon(ask, peer)
        return found

    async def fetch_manifest(self, key: ArtifactKey, providers: list[str],
                             expect_model: str | None = None, expect_dtype: str | None = None,
                             accept_any: bool = False) -> tuple[VerifiedManifest, list[str]]:
        """The first manifest a provider serves that verifies; returns it and the providers that may hold the
        artifact (the one that served it first).

        Providers are asked in order, but one that has not answered within fetch.manifest_hedge_s does not hold up
        the next: it is asked too, and the first valid answer wins (a stalling provider delays a fetch by
        that, not by its stall). Providers that answered `busy` are asked again after fetch.busy_retry_s, a few
        times, when nobody else served the manifest."""
        errors: list[str] = []
        rejections: list[KvswapError] = []  # manifests that arrived but failed verification
        lacking: set[str] = set()
        round_of = list(providers)
        for attempt in range(3):
            busy: list[str] = []
            found = await self._ask_manifests(key, round_of, expect_model, expect_dtype, errors, rejections,
                                              lacking, busy, accept_any)
            if found is not None:
                verified, peer = found
                rest = [p for p in providers if p != peer and p not in lacking]
                return verified, [peer] + rest
            if not busy:
                break
            round_of = busy
            await trio.sleep(self.tuning.busy_retry_s * (attempt + 1))
        detail = f" ({'; '.join(errors[:3])})" if errors else ""
        if rejections:  # e.g. every provider served a manifest signed only by untrusted keys
            raise type(rejections[0])(f"no acceptable manifest for {describe(key)}: {rejections[0]}")
        raise NotFound(f"no provider served a valid manifest for {describe(key)}{detail}")

    async def _ask_manifests(self, key: ArtifactKey, providers: list[str], expect_model: str | None,
                             expect_dtype: str | None, errors: list[str], rejections: list[KvswapError],
                             lacking: set[str], busy: list[str],
                             accept_any: bool = False) -> tuple[VerifiedManifest, str] | None:
        """One hedged round over `providers`: the first (verified manifest, peer), or None. Refusals and
        failures are recorded in the lists given."""
        found: list[tuple[VerifiedManifest, str]] = []
        mismatch: list[ModelMismatch] = []

        async def ask(peer: str, done: trio.Event, stop: trio.CancelScope) -> None:
            try:
                reply = await self.exchange.request_manifest(peer, ManifestRequest(key))
                verified = await self._thread(self.target.verify_manifest, reply.manifest, reply.envelopes,
                                              reply.attestations, accept_any)
                problem = _manifest_problem(key, reply.manifest, verified, expect_model, expect_dtype)
                if problem is None:
                    if self.payer is not None:  # its prices come with its manifest (IntegrityError if forged)
                        self.payer.learn(peer, reply.terms)
                    found.append((verified, peer))
                    stop.cancel()
                else:
                    errors.append(f"{peer[:16]}: {problem}")
            except ModelMismatch as exc:  # a valid manifest, but not for this node: no other provider helps
                mismatch.append(exc)
                stop.cancel()
            except NotFound:
                lacking.add(peer)
            except Busy as exc:  # shedding load: maybe later
                errors.append(f"{peer[:16]}: {exc}")
                busy.append(peer)
            except RemoteProtocolError as exc:  # the peer misbehaved or went away: the others may answer
                errors.append(f"{peer[:16]}: {exc}")
            except KvswapError as exc:  # a bad, untrusted or unverifiable manifest: the others may answer
                errors.append(f"{peer[:16]}: {exc}")
                rejections.append(exc)
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            for peer in providers:
                done = trio.Event()
                nursery.start_soon(ask, peer, done, nursery.cancel_scope)
                with trio.move_on_after(self.tuning.manifest_hedge_s):
                    await done.wait()
        if mismatch:
            raise mismatch[0]
        return found[0] if found else None

    async def _learn_prices(self, cid: Cid, peers: list[str]) -> None:
        """Ask `peers` (at most fetch.max_providers, at once, for fetch.price_lookup_s in all) for the manifest of
        `cid`, for the terms its answer carries; one that fails or is silent is taken to be free until it says
        otherwise (it answers `payment`)."""

        async def ask(peer: str) -> None:
            try:
                await self.payer.ask_terms(self.exchange, peer, cid)
            except KvswapError as exc:  # lacks it, or forged its terms: nothing learnt
                log.debug("no price from %s: %s", peer[:16], exc)

        with trio.move_on_after(self.tuning.price_lookup_s):
            async with trio.open_nursery() as nursery:
                for peer in list(dict.fromkeys(peers))[:self.tuning.max_providers]:
                    nursery.start_soon(ask, peer)

    async def _check_size(self, verified: VerifiedManifest, nbytes: int) -> None:
        """LimitExceeded when an artifact declares more stored bytes than a fetch takes on (fetch.max_artifact_bytes)
        or than the target has room for (its optional `check_room(nbytes)`: the store's budget, the disk)."""
        if nbytes > self.tuning.max_artifact_bytes:
            raise LimitExceeded(f"artifact {verified.cid.short()} declares {nbytes:,} bytes, over the "
                                f"{self.tuning.max_artifact_bytes:,} a fetch takes on (fetch.max_artifact_bytes)")
        check = getattr(self.target, "check_room", None)
        if check is not None:
            await self._thread(check, verified.cid, nbytes)

    async def fetch(
        self,
        key: ArtifactKey,
        *,
        n_tokens: int | None = None,
        progress: Callable[[FetchProgress], None] | None = None,
        expect_model: str | None = None,
        expect_dtype: str | None = None,
        providers: list[str] | None = None,
        accept_any: bool = False,
        purse: Purse | None = None,
    ) -> FetchResult:
        """`purse`: what this fetch may pay priced providers (kvswap/payments/rules.py); None pays nobody."""
        started = time.monotonic()
        new_request_id()  # every ledger row of this fetch shares one request id
        candidates = providers if providers is not None else await self.resolve(key)
        if not candidates:
            raise NotFound(f"no provider found for {describe(key)}")
        verified, holders = await self.fetch_manifest(key, candidates, expect_model, expect_dtype, accept_any)
        if self.payer is not None and purse is not None and purse.budget > 0:  # a buyer: who charges what?
            await self._learn_prices(verified.cid, [p for p in holders + candidates if p not in self.payer.terms])
        wanted = list({b.cid: b for b in verified.blobs
                       if n_tokens is None or b.token_start < n_tokens}.values())  # a CID may repeat
        await self._check_size(verified, sum(b.stored_size for b in wanted))  # before anything is stored or asked
        await self._thread(self.target.put_manifest, verified)
        present = [b for b in wanted if await self._thread(self.target.has_chunk, b.cid)]
        todo = [b for b in wanted if b not in present]
        plan = FetchPlan(todo, holders + [p for p in candidates if p not in holders], artifact=verified.cid,
                         me=self.p2p.peer_id, tuning=self.tuning, rng=self.rng, start=trio.current_time())

        def report() -> None:
            if progress is not None:
                elapsed = max(time.monotonic() - started, 1e-6)
                progress(FetchProgress(plan.bytes_done, plan.bytes_total, plan.bytes_done / 1e6 / elapsed,
                                       list(plan.providers()), plan.chunks_done, plan.chunks_total))

        if self.payer is not None:
            plan.prices.update({p: t.price_per_mb for p, t in self.payer.terms.items() if t is not None})
        run = _ChunkRun(self, plan, verified.cid, report, purse)
        settle_s = 0.0
        try:
            await run.run()
        except KvswapError as exc:
            if run.purse.refusals and not isinstance(exc, OverBudget):  # say why no priced provider was asked
                raise OverBudget(f"{run.purse.refusals[0]}; no other provider served the rest ({exc})") from None
            raise
        finally:
            seconds = time.monotonic() - started  # the fetch: until its last chunk verified and stored
            if run.paid and self.payer is not None:  # the last vouchers reach their providers before we return
                await self.payer.flush(verified.cid)
                settle_s = time.monotonic() - started - seconds
        complete = n_tokens is None or n_tokens >= verified.n_tokens
        # the fetched chunks were provided as they were stored; now the ones we had, and the whole if complete
        self.p2p.provide_soon(artifact_keys(verified.cid, verified.model_fingerprint, verified.document_hash,
                                            [b.cid for b in present], complete))
        return FetchResult(
            cid=verified.cid,
            model_fingerprint=verified.model_fingerprint,
            document_hash=verified.document_hash,
            n_tokens=verified.n_tokens,
            chunks_fetched=len(todo),
            chunks_present=len(present),
            bytes_fetched=plan.bytes_done,
            seconds=seconds,
            providers=plan.providers(),
            paid=run.purse.spent,
            settle_s=settle_s,
        )


class _ChunkRun:
    """Carries out one FetchPlan's answers on trio. Every plan call happens in `run`'s loop, one event at a
    time; the tasks it starts (requests, verify-and-write, DHT lookups) only report what happened, through a
    channel."""

    def __init__(self, fetcher: Fetcher, plan: FetchPlan, artifact: Cid, report: Callable[[], None],
                 purse: Purse | None = None) -> None:
        self.fetcher = fetcher
        self.purse = purse if purse is not None else Purse(unit="")  # no purse: a budget of 0
        self.paid = 0  # vouchers signed in this fetch
        self.plan = plan
        self.artifact = artifact
        self.report = report
        self.events, self._inbox = trio.open_memory_channel[Event](math.inf)
        # received chunks are verified and written behind the requests' backs, so a request reads on as soon
        # as a chunk's bytes are in; this bounds the chunks held in memory meanwhile
        self.write_slots = trio.Semaphore(2 * plan.parallel)
        self._scopes: dict[int, trio.CancelScope] = {}  # request id -> the scope its task runs in

    async def run(self) -> None:
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            actions = self.plan.apply(Tick(), trio.current_time())
            while True:
                wake, finished = math.inf, False
                for action in actions:
                    if isinstance(action, RequestChunks):
                        self._scopes[action.request] = trio.CancelScope()
                        nursery.start_soon(self._request, action, nursery)
                    elif isinstance(action, CancelRequest):
                        scope = self._scopes.get(action.request)
                        if scope is not None:
                            scope.cancel()
                    elif isinstance(action, FindProviders):
                        nursery.start_soon(self._lookup, action.cid)
                    elif isinstance(action, ListPeers):
                        self.events.send_nowait(PeersSeen(tuple(self.fetcher.p2p.connected_peers())))
                    elif isinstance(action, ProvideChunk):
                        self.fetcher.p2p.provide_soon([cid_key(action.cid)])
                        self.report()
                    elif isinstance(action, WaitUntil):
                        wake = action.when
                    elif isinstance(action, Done):
                        finished = True
                    elif isinstance(action, Failed):
                        error, finished = action.error, True
                if finished:
                    break
                event: Event = Tick()
                with trio.move_on_at(wake):
                    event = await self._inbox.receive()
                actions = self.plan.apply(event, trio.current_time())
            nursery.cancel_scope.cancel()  # lookups still running; on failure, requests and writes too
        if error is not None:
            raise error

    async def _request(self, req: RequestChunks, writers: trio.Nursery) -> None:
        """One request to one peer; every answer and the request's end go back to the plan. A priced peer is
        asked only within the purse (its cost reserved first), and its chunks are paid for as they verify; one
        that answers `payment` has its terms read from a manifest answer, then is asked once more."""
        blobs = {b.cid: b for b in req.blobs}
        failure, refused = None, False
        bill = _Bill(None, None)

        async def on_chunk(cid: Cid, answer: bytes | bytearray | ChunkMissing) -> None:
            if isinstance(answer, ChunkMissing):
                self.events.send_nowait(ChunkRationed(req.request, cid, answer.holders) if answer.rationed
                                        else ChunkLacked(req.request, cid))
                return
            blob = blobs[cid]
            if len(answer) != blob.stored_size:
                raise IntegrityError(f"chunk {cid.short()} from {req.peer[:16]} has {len(answer)} bytes, "
                                     f"the manifest says {blob.stored_size}")
            await self.write_slots.acquire()
            self.events.send_nowait(ChunkReceived(req.request, cid, len(answer)))
            writers.start_soon(self._store, blob, answer, req.peer, bill)

        busy = False
        try:
            with self._scopes[req.request], trio.move_on_at(req.deadline) as scope:  # the plan may cancel it
                await self._path(req)
                for attempt in range(2):
                    if not self._open_bill(req, bill):
                        refused = True
                        break
                    try:
                        await self.fetcher.exchange.request_chunks(
                            req.peer, [b.cid for b in req.blobs], on_chunk, artifact=self.artifact,
                            dataplane=self.fetcher.use_dataplane, max_chunk_bytes=max(b.stored_size for b in req.blobs),
                            terms=bill.terms.digest if bill.terms is not None else None)
                        break
                    except PaymentRequired:
                        if attempt == 0:
                            learnt = await self._learn_terms(req.peer, bill.terms)
                            if learnt:
                                continue  # it is priced, or its terms changed: ask again under them
                            if learnt is None:  # it would not say its terms: as if it lacked these chunks
                                refused = True
                                break
                        busy = True  # our vouchers lag behind its credit window: ask again later
                        break
            if scope.cancelled_caught:
                failure = f"no complete answer by its deadline ({len(req.blobs)} chunks)"
        except (RemoteProtocolError, IntegrityError) as exc:  # the peer misbehaved or went away
            failure = str(exc) or type(exc).__name__
        except NotFound:  # the peer refused the whole request: it lacks these chunks
            refused = True
        except Busy:  # the peer sheds load: ask it again later, or someone else
            busy = True
        except KvswapError as exc:  # a refusal we cannot retry around (e.g. a limit): the fetch fails
            self.events.send_nowait(Aborted(exc))
        finally:
            self._scopes.pop(req.request, None)
            self.purse.release(bill.reservation)  # what no verified chunk used
        self.events.send_nowait(RequestEnded(req.request, failure, refused, busy))

    async def _path(self, req: RequestChunks) -> None:
        """Behind NAT: wait for a relayed connection to the peer to be hole-punched (`P2PHost.direct_path`,
        RelayOnly when it stays relayed and node.relay_data is off), telling the plan, which does not count
        the wait against the request (node/fetchplan.py)."""
        if not self.fetcher.p2p.path_pending(req.peer):
            return
        self.events.send_nowait(PathWait(req.request))
        try:
            await self.fetcher.p2p.direct_path(req.peer)
        finally:
            self.events.send_nowait(PathOpen(req.request))

    def _open_bill(self, req: RequestChunks, bill: "_Bill") -> bool:
        """Price this request by its peer's terms (free when it has none) and reserve its cost in the purse;
        False, the refusal noted, when the terms exceed the caps or the cost the budget left."""
        payer = self.fetcher.payer
        self.purse.release(bill.reservation)
        bill.terms, bill.reservation = (payer.priced(req.peer) if payer is not None else None), None
        terms = bill.terms
        if terms is None or terms.price_per_mb == 0:
            bill.terms = None
            return True
        why = self.purse.refusal(terms, req.peer[:16])
        if why is None:
            cost = amount_for(terms, sum(b.stored_size for b in req.blobs), 0) + 1  # +1: the floor's remainder
            bill.reservation = self.purse.reserve(cost)
            if bill.reservation is not None:
                return True
            why = (f"provider {req.peer[:16]}: {cost} {terms.unit} more would pass this fetch's budget of "
                   f"{self.purse.budget} (--budget)")
        if why not in self.purse.refusals:
            log.info("not asking %s: %s", req.peer[:16], why)
            self.purse.refusals.append(why)
        return False

    async def _learn_terms(self, peer: str, had) -> bool | None:
        """Read `peer`'s terms from its manifest answer after it refused us with `payment`: True when they
        differ from the terms the request was made under, False when they do not, None when it gave none."""
        payer = self.fetcher.payer
        if payer is None:
            self.purse.refusals.append(f"provider {peer[:16]} is priced and this node pays nobody")
            return None
        try:
            terms = await payer.ask_terms(self.fetcher.exchange, peer, self.artifact)
        except KvswapError as exc:
            log.info("no terms from %s: %s", peer[:16], exc)
            return None
        if terms is None:  # it asked for payment and then says it is free: nothing to ask again under
            return None
        self.plan.prices[peer] = terms.price_per_mb
        return had is None or terms.digest != had.digest

    async def _store(self, blob: FetchBlob, data: bytes | bytearray, peer: str, bill: "_Bill | None" = None) -> None:
        """Verify a received chunk against its CID and write it through the target, in a worker thread. A peer
        whose chunk verified earns a record with this node (node/quota.py PeerRecords). A priced peer's chunk is
        paid for as soon as it verified, before the write: the voucher does not wait for the disk, so the
        provider's credit window is not spent on bytes waiting to be stored."""
        priced = bill is not None and bill.terms is not None
        try:
            if priced:
                await self.fetcher._thread(blob.cid.verify, data)
                await self._pay(peer, bill, len(data))  # exactly what verified
            await self.fetcher._thread(_verify_and_put, self.fetcher.target, blob.cid, data,
                                       self.fetcher._target_verifies or priced)
        except IntegrityError as exc:  # the provider lied: another one will serve this chunk
            self.events.send_nowait(ChunkCorrupt(blob.cid, str(exc)))
        except KvswapError as exc:  # our own store failed: the fetch cannot go on
            self.events.send_nowait(Aborted(exc))
        else:
            self.fetcher.records.earn(peer)
            self.fetcher.reciprocity.credit(peer, len(data))
            if self.fetcher.ration is not None:  # a fetcher of this artifact is no seed of it (node/ration.py)
                self.fetcher.ration.note_received(self.artifact)
            self.events.send_nowait(ChunkStored(blob.cid))
        finally:
            self.write_slots.release()

    async def _pay(self, peer: str, bill: "_Bill", nbytes: int) -> None:
        payer = self.fetcher.payer
        try:
            voucher = await self.fetcher._thread(payer.sign, peer, self.artifact, bill.terms, self.purse, nbytes, 0,
                                                 bill.reservation)
        except OverBudget as exc:  # cannot happen within the reservation; said, never signed
            log.warning("not paying %s: %s", peer[:16], exc)
            return
        self.paid += 1
        payer.post(peer, voucher)

    async def _lookup(self, cid: Cid) -> None:
        """Ask the DHT who provides one chunk (for a chunk no known peer can serve)."""
        peers = await self.fetcher.p2p.find_providers(cid_key(cid))
        self.events.send_nowait(LookupDone(cid, tuple(peers)))


@dataclass
class _Bill:
    """One request's price: the peer's terms (None: free) and its reservation in the purse."""

    terms: Any
    reservation: Any


def _manifest_problem(key: ArtifactKey, manifest: bytes, verified: VerifiedManifest, expect_model: str | None,
                      expect_dtype: str | None) -> str | None:
    """Why a verified manifest is not the one asked for (None if it is); ModelMismatch when it is the right
    artifact for another model or dtype than the caller expects."""
    if verified.cid != Cid.of(manifest):
        return "manifest CID does not match its bytes"
    if isinstance(key, Cid):
        if verified.cid != key:
            return "served another artifact"
    elif (verified.model_fingerprint, verified.document_hash) != (key.model_fingerprint, key.document_hash):
        return "served an artifact of another document or model"
    if expect_model is not None and verified.model_fingerprint != expect_model:
        raise ModelMismatch(
            f"artifact {verified.cid.short()} is for model {verified.model_fingerprint[:16]}, "
            f"this node runs {expect_model[:16]}"
        )
    if expect_dtype is not None and verified.dtype != expect_dtype:
        raise ModelMismatch(f"artifact {verified.cid.short()} is {verified.dtype}, expected {expect_dtype}")
    return None


def _verify_and_put(target: FetchTarget, cid: Cid, data: bytes | bytearray, target_verifies: bool) -> None:
    if not target_verifies:
        cid.verify(data)
    target.put_chunk(cid, data)
