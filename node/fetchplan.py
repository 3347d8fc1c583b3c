"""The chunk scheduler of one fetch, as a pure state machine: told what happened, it answers what to do next.

node/fetch.py's trio loop owns every socket, thread and timer and does only what this plan answers; every
fetch-policy rule lives here, so each is tested with a fake clock and no network (tests/test_fetchplan.py),
like node/ration.py on the serving side (the shape of iroh-blobs' downloader: `apply(event) -> actions`).

    plan = FetchPlan(blobs, peers, artifact=cid, me=my_peer_id)
    actions = plan.apply(Tick(), now)             # -> [RequestChunks(...), ..., WaitUntil(t)]
    actions = plan.apply(ChunkReceived(rid, cid, n), now)
    ...                                           # until [Done()] or [Failed(error)]

Events (what happened): `Tick` (time passed), `PeersSeen` (connected peers, or providers a lookup found),
`ChunkReceived` / `ChunkLacked` / `ChunkRationed` (one answer within a request), `PathWait` / `PathOpen` (a
request waits for a relayed connection to its peer to become direct, then may send), `RequestEnded` (the request
finished: cleanly, failed, or refused as a whole), `ChunkStored` / `ChunkCorrupt` (the bytes verified and
written, or not), `LookupDone` (a DHT lookup for one chunk's providers finished), `Aborted` (a local failure
the fetch cannot survive). Actions (what to do): `RequestChunks` (ask this peer for these blobs before this
deadline), `CancelRequest` (stop a late request), `FindProviders` (ask the DHT who holds this chunk), `ListPeers` (report the connected peers),
`ProvideChunk` (tell the DHT we hold it now), `WaitUntil` (nothing more until then, or until an event),
`Done`, `Failed`.

The rules (the numbers are the fields of the `FetchTuning` it is given, node/tuning.py):
- Chunks are asked for in a random order (fetchers that start together want different chunks first), at most
  fetch.parallel_chunks requests in flight, each a batch of up to fetch.batch_chunks chunks, closed once it
  reaches fetch.batch_bytes, and smaller as the queue drains so the last requests still spread over peers.
- The peer asked for a chunk: one a rationing peer named as holder of it, or one that has already delivered
  chunks to this fetch and sends more than it rations, first (while it neither failed nor lagged: a hint
  names a holder nobody has vouched for yet), then one not yet tried for it, one that sends more than it rations, the least busy,
  the one with fewest failures, the one known longest; slow or overdue peers only when no other may be.
- A peer that lacks a chunk is asked again after fetch.lack_retry_s, doubling, at most fetch.max_lack_asks times (it may
  be fetching the same artifact); a refusal of a whole request counts as lacking each chunk in it.
- A peer that rations a chunk is asked again after fetch.ration_retry_s; the holders it names join the fetch. One
  that still rations it fetch.ration_give_up_s after it first did (an honest node serves a fetcher it refused for
  ration.patience_s) counts as lacking it for good: liars that ration everything cannot hold a fetch open.
- A request that fails (stall, reset, garbage, a chunk of the wrong size) or a chunk whose bytes do not match
  its CID costs the peer one failure; at fetch.max_provider_failures it is dropped. Its chunks go back to the queue
  (a corrupt chunk to the front).
- Peers join from the start list, connected peers (every fetch.peer_refresh_s), rationed answers and DHT
  lookups, up to fetch.max_peers, never this node itself. A peer known only from rationed answers is
  asked only for the chunks it was named for, until it is seen connected or as a provider.
- When no live peer will ever be asked for a chunk again, the DHT is asked for that chunk's own providers
  (at most fetch.parallel_chunks lookups at once); if that finds nobody new, the fetch fails with NotFound.
- A rationed answer that names no holder (the peer's upload slots are full and nobody else has the chunk
  yet: node/uploads.py) is `busy` for that chunk: asked again after fetch.busy_retry_s, no give-up.
- Per-peer bytes and request time are measured (`PeerState.throughput`). A request's deadline is
  progress-based: fetch.request_min_timeout_s plus its bytes at fetch.min_rate_bytes_s (and the driver fails
  one that receives nothing for fetch.idle_timeout_s); past it the request fails (one failure). The legacy
  rule (fetch.chunk_timeout_s > 0, `node.swarm = "legacy"`) is fetch.late_factor times its bytes at the peer's
  measured rate, at least fetch.request_min_timeout_s, at most fetch.chunk_timeout_s per chunk.
- A dropped provider is still asked, at most fetch.last_holder_asks times per chunk, for a chunk that no
  live peer will be asked for (the only holder, on a slow link, must not fail the fetch).
- Slow and lying providers lose their share quickly. A request is late once it has run fetch.late_factor times as
  long as the fastest other measured peer would take for its unanswered bytes (at least fetch.late_min_s, unless
  no other chunk waits to be asked for: the end game): if
  another live peer may be asked for its chunks, it is cancelled (`CancelRequest`), its chunks go to the
  front of the queue and the peer is marked slow (no failure: slowness is not a lie). Before that, from
  fetch.late_factor times that expected time on (overdue), the request no longer holds one of the `parallel`
  slots (another request may start, at most 2 x parallel in flight) and its peer gets no new request. A
  ChunkMissing that comes late marks the peer slow too. Slow peers are asked only when no other peer may
  be; a named holder is preferred only while it has neither failed nor lagged.
- A peer that answers `busy` is asked again after fetch.busy_retry_s (no penalty: it is shedding load).
- A request whose peer is connected only through a relay waits for the hole punch (node/nat.py) before any
  byte can flow: from `PathWait` to `PathOpen` it is neither overdue nor late, and its time counts from the
  open. Counted from the request, every first request to a holder behind a NAT was late within ~1 s (4x a
  chunk at the fastest peer's rate), was cancelled, and its holder became a bad hint: fetchers then went back
  to the publisher, which sent another copy (issue 26). The request's deadline still bounds the wait.
- A holder named again for a chunk it lacked is asked again from scratch (its copy may have been on its way).
- A holder a rationing peer named that then fails, is late, or (known only from hints) lacks the chunk for good
  (fetch.max_lack_asks) is a bad hint: it is no longer preferred for that chunk, and after fetch.max_bad_hints the rationing peer's hints,
  earlier ones included, are ignored.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import NotFound

from .tuning import FetchTuning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchBlob:
    """One content-addressed blob a fetch needs: its CID, the tokens [token_start, token_end) it covers and its
    stored size. Deliberately not kvswap.artifact.manifest.ChunkRef: the network layer fetches whatever blobs a
    manifest lists (token blocks and the logits tail alike, which has an empty token range) and stays
    independent of the artifact format (bench/harness/netharness.py fetches a synthetic manifest format)."""

    cid: Cid
    token_start: int
    token_end: int
    stored_size: int


# --- events: what happened ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed (a WaitUntil ran out); nothing else happened."""


@dataclass(frozen=True)
class PeersSeen:
    """Peers that may hold chunks: the connected peers (after ListPeers)."""

    peers: tuple[str, ...]


@dataclass(frozen=True)
class ChunkReceived:
    """Request `request` delivered `cid`'s bytes, of the size the manifest says; they are being verified."""

    request: int
    cid: Cid
    nbytes: int


@dataclass(frozen=True)
class ChunkLacked:
    """The peer of `request` does not hold `cid`."""

    request: int
    cid: Cid


@dataclass(frozen=True)
class ChunkRationed:
    """The peer of `request` holds `cid` but has sent its copies; `holders` got it from it."""

    request: int
    cid: Cid
    holders: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestEnded:
    """Request `request` is over. `failure`: why it failed (the peer is penalised); `refused`: the peer refused
    it as a whole (NotFound: it lacks every chunk it did not answer); `busy`: the peer refused it for now (it
    is at capacity, or we are over our share there)."""

    request: int
    failure: str | None = None
    refused: bool = False
    busy: bool = False


@dataclass(frozen=True)
class PathWait:
    """Request `request` waits for its peer's relayed connection to become direct (nothing can flow yet)."""

    request: int


@dataclass(frozen=True)
class PathOpen:
    """Request `request` has its path to the peer and sends from now on."""

    request: int


@dataclass(frozen=True)
class ChunkStored:
    """`cid`'s bytes matched their CID and are in the store."""

    cid: Cid


@dataclass(frozen=True)
class ChunkCorrupt:
    """`cid`'s bytes did not match their CID: the peer that sent them lied."""

    cid: Cid
    why: str


@dataclass(frozen=True)
class LookupDone:
    """The DHT lookup for `cid`'s providers finished, finding `peers`."""

    cid: Cid
    peers: tuple[str, ...]


@dataclass(frozen=True)
class Aborted:
    """A failure the fetch cannot survive (the local store failed, a peer's refusal we cannot retry around)."""

    error: Exception


Event = Tick | PeersSeen | ChunkReceived | ChunkLacked | ChunkRationed | PathWait | PathOpen | RequestEnded \
    | ChunkStored | ChunkCorrupt | LookupDone | Aborted


# --- actions: what to do next ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestChunks:
    """Ask `peer` for `blobs` in one request; give up on it at `deadline` (RequestEnded with a failure)."""

    request: int
    peer: str
    blobs: tuple[FetchBlob, ...]
    deadline: float


@dataclass(frozen=True)
class CancelRequest:
    """Stop request `request` now: it is late and its chunks were given to other peers (no RequestEnded is
    expected; one that still comes is ignored)."""

    request: int


@dataclass(frozen=True)
class FindProviders:
    """Ask the DHT for the providers of `cid` (answer with LookupDone)."""

    cid: Cid


@dataclass(frozen=True)
class ListPeers:
    """Answer with PeersSeen(the peers connected now)."""


@dataclass(frozen=True)
class ProvideChunk:
    """Tell the DHT this node holds `cid` now: other fetchers of the artifact may take it from us."""

    cid: Cid


@dataclass(frozen=True)
class WaitUntil:
    """Nothing more to do before `when` (math.inf: before the next event)."""

    when: float


@dataclass(frozen=True)
class Done:
    """Every chunk is stored and no request is in flight."""


@dataclass(frozen=True)
class Failed:
    """The fetch cannot complete: raise `error`."""

    error: Exception


Action = RequestChunks | CancelRequest | FindProviders | ListPeers | ProvideChunk | WaitUntil | Done | Failed


# --- state -------------------------------------------------------------------------------------------------


@dataclass
class PeerState:
    """What one fetch knows about one peer."""

    rank: int  # order in which the peer became known (earlier is preferred on ties)
    failures: int = 0
    busy: int = 0  # requests in flight
    served: int = 0  # chunks stored from it
    bytes_received: int = 0
    request_seconds: float = 0.0  # summed duration of its finished requests
    slow: int = 0  # requests of it that were late (cancelled for a faster peer, or a late ChunkMissing)
    rationed: int = 0  # chunks it rationed (named holders instead of sending)
    hinted_only: bool = False  # known only as a holder some peer named: asked only for the chunks it was named for
    bad_hints: int = 0  # holders it named that did not have the chunk, failed or were late

    @property
    def throughput(self) -> float | None:
        """Bytes per second over its finished requests (None before any, or before any byte): for deadlines
        and lateness by measured rate."""
        if self.request_seconds <= 0 or self.bytes_received <= 0:
            return None
        return self.bytes_received / self.request_seconds


@dataclass
class _Request:
    peer: str
    cids: tuple[Cid, ...]
    started: float  # when it was asked, or when its path opened after a wait (`PathOpen`)
    waiting: bool = False  # for its path (`PathWait`): neither overdue nor late meanwhile


@dataclass
class _Pacing:
    """Per (peer, chunk): when it may be asked next, how often it said it lacks the chunk, and when it first
    rationed it."""

    not_before: dict[tuple[str, Cid], float] = field(default_factory=dict)
    lack_asks: dict[tuple[str, Cid], int] = field(default_factory=dict)
    rationed_since: dict[tuple[str, Cid], float] = field(default_factory=dict)
    last_asks: dict[tuple[str, Cid], int] = field(default_factory=dict)  # asks of a dropped peer as last holder


class FetchPlan:
    """The scheduler of one fetch's chunks. Pure: no I/O, no clock of its own (every call is told `now`)."""

    def __init__(self, blobs: Sequence[FetchBlob], peers: Iterable[str], *, artifact: Cid, me: str | None = None,
                 tuning: FetchTuning = FetchTuning(), rng: random.Random | None = None, start: float = 0.0) -> None:
        self.artifact = artifact
        self.me = me
        self.tuning = tuning
        self.parallel = max(1, tuning.parallel_chunks)
        self.blobs: dict[Cid, FetchBlob] = {b.cid: b for b in blobs}  # a CID listed twice is fetched once
        order = list(self.blobs)
        (rng or random.Random()).shuffle(order)
        self.peers: dict[str, PeerState] = {}
        self._pending: deque[Cid] = deque(order)  # waiting to be asked for, in this order
        self._owner: dict[Cid, int] = {}  # chunk -> the request it is asked in
        self._writing: dict[Cid, str] = {}  # chunk -> the peer whose bytes are being verified and written
        self._stored: set[Cid] = set()
        self._tried: dict[Cid, set[str]] = {cid: set() for cid in order}
        self._named: dict[Cid, list[str]] = {}  # chunk -> holders a rationing peer named
        self._hinted_by: dict[tuple[Cid, str], str] = {}  # (chunk, named holder) -> the peer that named it
        self._overdue_peers: set[str] = set()  # peers with an overdue request (as of the last decision)
        self._pacing = _Pacing()
        self._requests: dict[int, _Request] = {}
        self._request_ids = iter(range(1, 1 << 62))
        self._lookups: dict[Cid, bool] = {}  # chunk -> its DHT lookup finished (False while it runs)
        self._next_refresh = start + self.tuning.peer_refresh_s
        self._error: Exception | None = None
        self._last_failure: str | None = None
        self.bytes_done = 0
        #: peer -> its price per MB (kvswap/payments/terms.py), as learnt: cheaper providers are asked first
        self.prices: dict[str, int] = {}
        for peer in peers:
            self._add_peer(peer)

    # --- what the driver reads ------------------------------------------------------------------------

    @property
    def chunks_total(self) -> int:
        return len(self.blobs)

    @property
    def chunks_done(self) -> int:
        return len(self._stored)

    @property
    def bytes_total(self) -> int:
        return sum(b.stored_size for b in self.blobs.values())

    def providers(self) -> dict[str, int]:
        """Peer -> chunks stored from it, for the peers that served any."""
        return {p: s.served for p, s in self.peers.items() if s.served}

    # --- the state machine ----------------------------------------------------------------------------

    def apply(self, event: Event, now: float) -> list[Action]:
        """Record what happened at time `now`; return what to do next (ending in WaitUntil, Done or Failed)."""
        actions: list[Action] = []
        if isinstance(event, ChunkReceived):
            self._received(event)
        elif isinstance(event, ChunkLacked):
            if self._owner.get(event.cid) == event.request:
                self._late_answer(event.request, now)
                holder = self._requests[event.request].peer
                if self._lacked(holder, event.cid, now) and self.peers[holder].hinted_only:
                    # a bad hint: a holder known only from hints that lacks the chunk for good. A peer seen
                    # connected or as a provider is a member of the swarm that may still be receiving it
                    self._bad_hint(event.cid, holder)
        elif isinstance(event, ChunkRationed):
            if self._owner.get(event.cid) == event.request:
                self._late_answer(event.request, now)
                self._rationed(self._requests[event.request].peer, event.cid, event.holders, now)
        elif isinstance(event, (PathWait, PathOpen)):
            request = self._requests.get(event.request)
            if request is not None:  # not cancelled meanwhile
                request.waiting = isinstance(event, PathWait)
                if not request.waiting:
                    request.started = now
        elif isinstance(event, RequestEnded):
            self._request_ended(event, now)
        elif isinstance(event, ChunkStored):
            if self._stored_chunk(event.cid):
                actions.append(ProvideChunk(event.cid))
        elif isinstance(event, ChunkCorrupt):
            peer = self._writing.pop(event.cid, None)
            if peer is not None:
                self._penalise(peer, event.why)
                self._pending.appendleft(event.cid)  # first in line: someone honest should send it soon
        elif isinstance(event, (PeersSeen, LookupDone)):
            if isinstance(event, LookupDone):
                self._lookups[event.cid] = True
            for peer in event.peers:
                self._add_peer(peer)
        elif isinstance(event, Aborted):
            self._error = self._error or event.error
        return actions + self._decide(now)

    def _decide(self, now: float) -> list[Action]:
        if self._error is not None:
            return [Failed(self._error)]
        if len(self._stored) == len(self.blobs) and not self._requests:
            return [Done()]
        actions: list[Action] = list(self._cancel_late(now))
        if now >= self._next_refresh:
            actions.append(ListPeers())
            self._next_refresh = now + self.tuning.peer_refresh_s
        stuck = False
        overdue = [rid for rid in self._requests if self._is_overdue(rid, now)]
        self._overdue_peers = {self._requests[rid].peer for rid in overdue}
        while len(self._requests) - len(overdue) < self.parallel and len(self._requests) < 2 * self.parallel:
            request = self._take_batch(now)
            if request is None:
                stuck = bool(self._pending)
                break
            actions.append(request)
        if stuck:  # a request slot is free, chunks wait, and no peer may be asked for any of them now
            running = sum(1 for finished in self._lookups.values() if not finished)
            for cid in self._pending:
                if self._next_chance(cid) < math.inf:
                    continue
                if self._lookups.get(cid):
                    last = f" (last failure: {self._last_failure})" if self._last_failure else ""
                    return [Failed(NotFound(f"no provider could serve chunk {cid.short()} of "
                                            f"{self.artifact.short()}{last}"))]
                if cid not in self._lookups and running < self.parallel:
                    self._lookups[cid] = False
                    running += 1
                    actions.append(FindProviders(cid))
        soonest = min((t for t in map(self._next_chance, self._pending) if now < t < math.inf), default=math.inf)
        times = [t for rid in self._requests for t in (self._late_at(rid), self._overdue_at(rid))
                 if t is not None and now < t]
        actions.append(WaitUntil(min(soonest, min(times, default=math.inf), self._next_refresh)))
        return actions

    # --- slow providers -------------------------------------------------------------------------------

    def _unanswered(self, rid: int) -> list[Cid]:
        return [cid for cid in self._requests[rid].cids if self._owner.get(cid) == rid]

    def _best_rate(self, but: str) -> float | None:
        """The fastest measured rate among the live, not slow peers other than `but` (bytes per second)."""
        rates = [s.throughput for p, s in self.peers.items()
                 if p != but and s.throughput is not None and s.slow == 0 and self._alive(p)]
        return max(rates, default=None)

    def _overdue_at(self, rid: int) -> float | None:
        """When request `rid` has run fetch.late_factor times as long as the fastest other measured peer would take
        for its unanswered bytes (None: no peer to compare with, or it waits for its path). An overdue request
        no longer holds one of the `parallel` request slots, and its peer gets no new request while it is overdue."""
        request = self._requests[rid]
        rate = self._best_rate(request.peer)
        if rate is None or request.waiting:
            return None
        left = sum(self.blobs[cid].stored_size for cid in self._unanswered(rid))
        return request.started + self.tuning.late_factor * left / rate

    def _is_overdue(self, rid: int, now: float) -> bool:
        at = self._overdue_at(rid)
        return at is not None and now >= at

    def _late_at(self, rid: int) -> float | None:
        """When request `rid` becomes late: overdue, and at least fetch.late_min_s after it started, or as soon as
        it is overdue once no chunk waits to be asked for (the end game: its chunks are all the fetch still
        needs, so waiting out the margin would only add to the fetch's time). None: no peer to compare with.
        A late request is cancelled when another peer may be asked for its chunks."""
        at = self._overdue_at(rid)
        if at is None or not self._pending:
            return at
        return max(at, self._requests[rid].started + self.tuning.late_min_s)

    def _late_answer(self, rid: int, now: float) -> None:
        """A ChunkMissing (lacked or rationed) that arrives after its request was late marks the peer slow."""
        late_at = self._late_at(rid)
        if late_at is not None and now > late_at:
            peer = self._requests[rid].peer
            self.peers[peer].slow += 1
            log.info("provider %s answered ChunkMissing late (%.2f s)", peer[:16], now - self._requests[rid].started)

    def _cancel_late(self, now: float) -> list[Action]:
        """Cancel the late requests whose chunks another live peer may be asked for now; their chunks go to
        the front of the queue and the peer is marked slow."""
        actions: list[Action] = []
        for rid in list(self._requests):
            late_at = self._late_at(rid)
            if late_at is None or now < late_at:
                continue
            request = self._requests[rid]
            left = self._unanswered(rid)
            if not any(self._askable(p, cid, now) for cid in left for p in self.peers if p != request.peer):
                continue  # nobody else to ask: let it run to its deadline
            del self._requests[rid]
            state = self.peers[request.peer]
            state.busy -= 1
            state.request_seconds += max(0.0, now - request.started)
            state.slow += 1
            log.info("provider %s late (%.2f s for %d chunks): its chunks go to faster peers", request.peer[:16],
                     now - request.started, len(left))
            for cid in reversed(left):
                del self._owner[cid]
                self._bad_hint(cid, request.peer)
                self._pending.appendleft(cid)
            actions.append(CancelRequest(rid))
        return actions

    def _bad_hint(self, cid: Cid, holder: str) -> None:
        """`holder` did not deliver `cid` (lacked, failed, late): if a rationing peer named it for `cid`, that
        was a bad hint; the holder is no longer preferred for the chunk."""
        named_by = self._hinted_by.pop((cid, holder), None)
        if named_by is None:
            return
        named = self._named.get(cid, [])
        if holder in named:
            named.remove(holder)
        self.peers[named_by].bad_hints += 1
        if self.peers[named_by].bad_hints == self.tuning.max_bad_hints:
            log.info("provider %s named holders that did not deliver %d times: its hints are ignored",
                     named_by[:16], self.tuning.max_bad_hints)
            for (chunk, holder), by in list(self._hinted_by.items()):  # the hints it gave before, too
                if by == named_by:
                    del self._hinted_by[(chunk, holder)]
                    if holder in self._named.get(chunk, ()):
                        self._named[chunk].remove(holder)

    # --- peers ----------------------------------------------------------------------------------------

    def _add_peer(self, peer: str, hinted: bool = False) -> bool:
        """Track a new peer (at most fetch.max_peers, never ourselves); False if it was not added. A peer
        known only from holder hints (`hinted`) stays so until it is seen as a provider or connected peer."""
        if peer in self.peers:
            if not hinted:
                self.peers[peer].hinted_only = False
            return False
        if peer == self.me or len(self.peers) >= self.tuning.max_peers:
            return False
        self.peers[peer] = PeerState(rank=len(self.peers), hinted_only=hinted)
        return True

    def _alive(self, peer: str) -> bool:
        return self.peers[peer].failures < self.tuning.max_provider_failures

    def _may_ask(self, peer: str, cid: Cid) -> bool:
        """Whether `peer` may ever be asked for `cid`: alive, and, if known only from hints, named for it (a
        holder someone named for one chunk is no reason to ask it for every chunk). A dropped peer may still
        be asked, fetch.last_holder_asks times, for a chunk no live peer will be asked for: failing on a slow
        link is no reason to fail a fetch it alone can finish."""
        state = self.peers[peer]
        if state.hinted_only and peer not in self._named.get(cid, ()):
            return False
        if self._alive(peer):
            return True
        return self._last_holder(peer, cid)

    def _last_holder(self, peer: str, cid: Cid) -> bool:
        if self._pacing.last_asks.get((peer, cid), 0) >= self.tuning.last_holder_asks:
            return False
        if self._pacing.not_before.get((peer, cid), 0.0) == math.inf:
            return False  # it lacks the chunk for good
        return not any(self._alive(p) and self._pacing.not_before.get((p, cid), 0.0) < math.inf
                       and (not self.peers[p].hinted_only or p in self._named.get(cid, ()))
                       for p in self.peers if p != peer)

    def _askable(self, peer: str, cid: Cid, now: float) -> bool:
        return self._may_ask(peer, cid) and self._pacing.not_before.get((peer, cid), 0.0) <= now

    def _pick(self, cid: Cid, now: float) -> str | None:
        """The peer to ask for `cid` now, or None if no live peer may be asked for it right now."""
        options = [p for p in self.peers if self._askable(p, cid, now)]
        if not options:
            return None
        named, tried = self._named.get(cid, ()), self._tried[cid]

        def preference(p: str) -> tuple:
            state = self.peers[p]
            lagging = state.slow > 0 or p in self._overdue_peers
            trusted_hint = p in named and not state.failures and not lagging  # a named holder that delivers
            rationing = state.rationed > state.served  # it mostly points elsewhere: ask it after the others
            # a peer that has delivered chunks to this fetch ranks with a named holder: a hint names a holder
            # nobody has vouched for yet, and hints from a liar must not steer chunks away from a proven source
            proven = state.served > 0 and not rationing and not state.failures and not lagging
            return (lagging, self.prices.get(p, 0), not (trusted_hint or proven), p in tried, rationing, state.busy,
                    state.failures, state.rank)

        return min(options, key=preference)

    def _next_chance(self, cid: Cid) -> float:
        """When some live peer may next be asked for `cid` (inf: every live peer lacks it for good)."""
        return min((self._pacing.not_before.get((p, cid), 0.0) for p in self.peers if self._may_ask(p, cid)),
                   default=math.inf)

    def _penalise(self, peer: str, why: str) -> None:
        self.peers[peer].failures += 1
        self._last_failure = f"{peer[:16]}: {why}"  # named in the error if the fetch fails for want of peers
        log.info("provider %s penalised (%d): %s", peer[:16], self.peers[peer].failures, why)

    def _lacked(self, peer: str, cid: Cid, now: float) -> bool:
        """`peer` lacks `cid`: ask again later (doubling), or never after fetch.max_lack_asks (then True)."""
        key = (peer, cid)
        asks = self._pacing.lack_asks.get(key, 0) + 1
        self._pacing.lack_asks[key] = asks
        wait = self.tuning.lack_retry_s * 2 ** (asks - 1)
        self._pacing.not_before[key] = math.inf if asks >= self.tuning.max_lack_asks else now + wait
        return asks >= self.tuning.max_lack_asks

    def _rationed(self, peer: str, cid: Cid, holders: Sequence[str], now: float) -> None:
        """`peer` rationed `cid`: ask it again after fetch.ration_retry_s, or never once it has rationed the chunk for
        fetch.ration_give_up_s (an honest node would have served it by then); follow the holders it names."""
        self.peers[peer].rationed += 1
        if not holders:  # it has no upload slot free and nobody else has the chunk yet: busy, for this chunk
            self._pacing.not_before[(peer, cid)] = now + self.tuning.busy_retry_s
            return
        since = self._pacing.rationed_since.setdefault((peer, cid), now)
        if now - since >= self.tuning.ration_give_up_s:
            self._pacing.not_before[(peer, cid)] = math.inf
            log.info("provider %s still rations chunk %s after %.1f s: taken as lacking it", peer[:16], cid.short(),
                     now - since)
        else:
            self._pacing.not_before[(peer, cid)] = now + self.tuning.ration_retry_s
        if self.peers[peer].bad_hints >= self.tuning.max_bad_hints:
            return  # its hints led nowhere before: ask it again after its retry, not whom it names
        named = self._named.setdefault(cid, [])
        for holder in holders:
            if holder in self.peers and self._pacing.lack_asks.pop((holder, cid), 0):
                # named again: news. It lacked the chunk when asked, but the sender's copy to it completes on
                # the sender's side seconds before the holder has stored it (socket buffers, a slow link):
                # taken as lacking for good after fetch.max_lack_asks, a swarm on 25 Mbit/s links lost every
                # holder of some chunks and failed
                self._pacing.not_before[(holder, cid)] = now
            if holder not in named and (self._add_peer(holder, hinted=True) or holder in self.peers):
                named.append(holder)
                self._hinted_by.setdefault((cid, holder), peer)

    # --- chunks and requests --------------------------------------------------------------------------

    def _take_batch(self, now: float) -> RequestChunks | None:
        """The first waiting chunk some peer may be asked for now, plus more waiting chunks for that peer.
        Batches amortise a request (and a data-plane connection) over several chunks, and shrink as the queue
        drains so the last requests still spread over every request slot."""
        for i, first in enumerate(self._pending):
            peer = self._pick(first, now)
            if peer is not None:
                break
        else:
            return None
        del self._pending[i]
        batch_max = max(1, min(self.tuning.batch_chunks, -(-len(self._pending) // (2 * self.parallel))))
        batch, size = [first], self.blobs[first].stored_size
        for cid in list(self._pending):
            if len(batch) >= batch_max or size >= self.tuning.batch_bytes:
                break
            if self._askable(peer, cid, now):
                self._pending.remove(cid)
                batch.append(cid)
                size += self.blobs[cid].stored_size
        rid = next(self._request_ids)
        dropped = not self._alive(peer)  # asked as a chunk's last holder (fetch.last_holder_asks)
        for cid in batch:
            self._tried[cid].add(peer)
            self._owner[cid] = rid
            if dropped:
                self._pacing.last_asks[(peer, cid)] = self._pacing.last_asks.get((peer, cid), 0) + 1
        self.peers[peer].busy += 1
        self._requests[rid] = _Request(peer, tuple(batch), now)
        return RequestChunks(rid, peer, tuple(self.blobs[c] for c in batch), deadline=now + self._timeout(peer, size,
                                                                                                     len(batch)))

    def _timeout(self, peer: str, nbytes: int, nchunks: int) -> float:
        """Seconds a request of `nbytes` in `nchunks` chunks may take before it fails: fetch.request_min_timeout_s
        plus its bytes at fetch.min_rate_bytes_s. Progress, not a fixed time per chunk: a slow link that keeps
        moving is waited for (the driver also fails a request that receives nothing for fetch.idle_timeout_s),
        and a faster peer takes the chunks of a slow one through lateness, without a failure. The legacy rule
        (fetch.chunk_timeout_s > 0): fetch.late_factor times its expected time at the peer's measured rate, at
        least fetch.request_min_timeout_s, at most fetch.chunk_timeout_s per chunk (all of that before the peer
        is measured)."""
        if self.tuning.chunk_timeout_s <= 0:
            return self.tuning.request_min_timeout_s + nbytes / self.tuning.min_rate_bytes_s
        ceiling = self.tuning.chunk_timeout_s * nchunks
        rate = self.peers[peer].throughput
        if rate is None:
            return ceiling
        return min(ceiling, max(self.tuning.request_min_timeout_s, self.tuning.late_factor * nbytes / rate))

    def _received(self, event: ChunkReceived) -> None:
        if self._owner.get(event.cid) != event.request:
            return  # not asked in this request (the driver checks answers against the request)
        peer = self._requests[event.request].peer
        del self._owner[event.cid]
        self._writing[event.cid] = peer
        self.peers[peer].bytes_received += event.nbytes

    def _request_ended(self, event: RequestEnded, now: float) -> None:
        request = self._requests.pop(event.request, None)
        if request is None:
            return
        state = self.peers[request.peer]
        state.busy -= 1
        state.request_seconds += max(0.0, now - request.started)
        if event.failure is not None:
            self._penalise(request.peer, event.failure)
        back = [cid for cid in request.cids if self._owner.get(cid) == event.request]  # neither received nor stored
        for cid in back:
            del self._owner[cid]
            if event.refused:
                self._lacked(request.peer, cid, now)
            elif event.busy:
                self._pacing.not_before[(request.peer, cid)] = now + self.tuning.busy_retry_s
            if event.failure is not None:
                self._bad_hint(cid, request.peer)
        self._pending.extend(back)  # behind the others: this peer said no, someone else may say yes

    def _stored_chunk(self, cid: Cid) -> bool:
        peer = self._writing.pop(cid, None)
        if peer is None:
            return False
        self._stored.add(cid)
        self.peers[peer].served += 1
        self.bytes_done += self.blobs[cid].stored_size
        return True


__all__ = [
    "Aborted", "Action", "CancelRequest", "ChunkCorrupt", "ChunkLacked", "ChunkRationed", "ChunkReceived", "ChunkStored", "Done",
    "Event", "Failed", "FetchBlob", "FetchPlan", "FindProviders", "ListPeers", "LookupDone", "PeerState",
    "PeersSeen", "ProvideChunk", "RequestChunks", "RequestEnded", "Tick", "WaitUntil",
]
