"""Upload slots: a node sends a few chunks at once at full speed, and the other requesters wait their turn.

At the start of a swarm a publisher without slots served ~30 transfers at once: each ran at a thirtieth of its
uplink, the first 6.5 MB chunk completed only after 4.6-8.5 s, nobody had anything to re-share meanwhile, and
on 25 Mbit/s links transfers outlasted the fetchers' timeouts. BitTorrent uploads to a few peers at a time
(4 unchoked, one of them optimistic). kvswap does the same, one slot per chunk being sent:

- at most serve.upload_slots chunks are sent at once, at most serve.upload_slots_per_artifact of one artifact;
  a chunk waits for a slot up to serve.upload_wait_s (the sender then answers "rationed, try these holders"
  where others hold the chunk, or `busy`);
- a slot freed goes to a waiting peer that re-shares first (tit-for-tat: the bytes this node verified from
  it), then to the peer that got the fewest chunks from us lately (fair rotation), then the longest waiting;
- serve.optimistic_slots of them go to a waiting peer drawn at random, whatever it gave (BitTorrent's
  optimistic unchoke: a newcomer with nothing to give yet still gets a turn).

`UploadQueue` is the pure rule (clock and randomness injected; tests/test_uploads.py); `UploadSlots` is its
trio wrapper. `UploadGate` is what both senders (libp2p streams, the data plane) go through for each chunk:
the ration (node/ration.py) and a slot, in one place. `Reciprocity` counts what peers gave us.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.messages import ChunkMissing

from .ration import UploadRation
from .tuning import ServeTuning


class Reciprocity:
    """Bytes this node verified from each peer (bounded: the least recently credited is forgotten first)."""

    def __init__(self, max_peers: int = ServeTuning.max_recorded_peers) -> None:
        self.max_peers = max_peers
        self._given: OrderedDict[str, int] = OrderedDict()

    def credit(self, peer: str, nbytes: int) -> None:
        self._given[peer] = self._given.get(peer, 0) + int(nbytes)
        self._given.move_to_end(peer)
        while len(self._given) > self.max_peers:
            self._given.popitem(last=False)

    def given(self, peer: str) -> int:
        return self._given.get(peer, 0)


@dataclass
class _Wait:
    peer: str
    artifact: Cid | None
    seq: int
    granted: bool = False
    optimistic: bool = False


class UploadQueue:
    """Who sends now. `ask` returns a ticket, granted at once or queued; `release` frees a granted ticket's slot
    and returns the tickets granted in its place; `leave` drops a queued one."""

    def __init__(self, slots: int, per_artifact: int, optimistic: int = 1,
                 reshares: Callable[[str], int] = lambda peer: 0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, memory_s: float = 60.0) -> None:
        self.slots = max(1, slots)
        self.per_artifact = max(1, per_artifact)
        self.optimistic = max(0, min(optimistic, self.slots - 1))
        self.reshares = reshares
        self.rng = rng or random.Random()
        self.clock = clock
        self.memory_s = memory_s  # how long a chunk sent to a peer counts against it in the rotation
        self._seq = itertools.count()
        self.active: dict[int, _Wait] = {}
        self.waiting: dict[int, _Wait] = {}  # insertion order = arrival order
        self._sent: dict[str, list[float]] = {}  # peer -> when it was granted slots (within memory_s)

    def ask(self, peer: str, artifact: Cid | None) -> tuple[int, list[int]]:
        """(ticket, the tickets granted now, this one among them or not). A ticket not granted is queued until
        `release` grants it or it `leave`s."""
        wait = _Wait(peer, artifact, next(self._seq))
        if not self.waiting and self._fits(wait):
            self._grant(wait, optimistic=False)
            return wait.seq, [wait.seq]
        self.waiting[wait.seq] = wait
        return wait.seq, self._schedule()

    def release(self, ticket: int) -> list[int]:
        self.active.pop(ticket, None)
        return self._schedule()

    def leave(self, ticket: int) -> list[int]:
        self.waiting.pop(ticket, None)
        return self._schedule()

    def granted(self, ticket: int) -> bool:
        return ticket in self.active

    def _fits(self, wait: _Wait) -> bool:
        if len(self.active) >= self.slots:
            return False
        if wait.artifact is None:
            return True
        return sum(1 for a in self.active.values() if a.artifact == wait.artifact) < self.per_artifact

    def _grant(self, wait: _Wait, optimistic: bool) -> None:
        wait.granted, wait.optimistic = True, optimistic
        self.active[wait.seq] = wait
        now = self.clock()
        times = [t for t in self._sent.get(wait.peer, ()) if now - t < self.memory_s] + [now]
        self._sent[wait.peer] = times
        if len(self._sent) > 4 * (len(self.active) + len(self.waiting)) + 64:  # forget peers gone quiet
            self._sent = {p: ts for p, ts in self._sent.items() if ts and now - ts[-1] < self.memory_s}

    def _recent(self, peer: str) -> int:
        now = self.clock()
        return sum(1 for t in self._sent.get(peer, ()) if now - t < self.memory_s)

    def _schedule(self) -> list[int]:
        """Grant free slots to waiters: the optimistic ones to a random fitting waiter, the rest by preference."""
        granted: list[int] = []
        while self.waiting and len(self.active) < self.slots:
            fitting = [w for w in self.waiting.values() if self._fits(w)]
            if not fitting:
                break
            optimistic_held = sum(1 for a in self.active.values() if a.optimistic)
            if optimistic_held < self.optimistic and len(fitting) > 1:
                pick, optimistic = self.rng.choice(fitting), True
            else:
                pick, optimistic = min(fitting, key=lambda w: (-self.reshares(w.peer), self._recent(w.peer), w.seq)), False
            del self.waiting[pick.seq]
            self._grant(pick, optimistic)
            granted.append(pick.seq)
        return granted


class UploadSlots:
    """UploadQueue on trio: `async with slots.hold(peer, artifact, wait_s) as got:` (got False: no slot in time)."""

    def __init__(self, tuning: ServeTuning = ServeTuning(), reshares: Callable[[str], int] = lambda peer: 0,
                 rng: random.Random | None = None) -> None:
        self.queue = UploadQueue(tuning.upload_slots, tuning.upload_slots_per_artifact, tuning.optimistic_slots,
                                 reshares, rng)
        self.wait_s = tuning.upload_wait_s
        self._events: dict[int, trio.Event] = {}
        self.timed_out = 0  # waits that got no slot in time (for status and tests)

    @property
    def in_use(self) -> int:
        return len(self.queue.active)

    @property
    def waiting(self) -> int:
        return len(self.queue.waiting)

    def _wake(self, tickets: list[int]) -> None:
        for t in tickets:
            event = self._events.pop(t, None)
            if event is not None:
                event.set()

    @contextlib.asynccontextmanager
    async def hold(self, peer: str, artifact: Cid | None, wait_s: float | None = None) -> AsyncIterator[bool]:
        ticket, now_granted = self.queue.ask(peer, artifact)
        self._wake([t for t in now_granted if t != ticket])
        granted = ticket in now_granted
        if not granted:
            event = self._events[ticket] = trio.Event()
            try:
                with trio.move_on_after(self.wait_s if wait_s is None else wait_s):
                    await event.wait()
            except BaseException:
                self._events.pop(ticket, None)
                self._wake(self.queue.release(ticket) if self.queue.granted(ticket) else self.queue.leave(ticket))
                raise
            self._events.pop(ticket, None)
            granted = self.queue.granted(ticket)
            if not granted:
                self.timed_out += 1
                self._wake(self.queue.leave(ticket))
                yield False
                return
        try:
            yield True
        finally:
            self._wake(self.queue.release(ticket))


@dataclass
class Turn:
    """One chunk's turn at a sender: `answer` None means send it now (then set `sent` once it is written);
    otherwise answer `answer` instead (rationed: try these holders, or, naming none, come back soon)."""

    answer: ChunkMissing | None = None
    sent: bool = False


def stored_size(path: Any) -> int:
    """A stored chunk's size from its file, what a priced provider's till counts (0 when the file went away:
    the sender then falls back to reading the chunk, or reports it missing)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class UploadGate:
    """The rule both senders follow for each chunk they hold, so it lives in one place:

    1. the ration without counting (`would_refuse`): a chunk it would refuse is answered at once, without
       waiting for a slot;
    2. an upload slot, serve.upload_wait_s at most; none in time: a rationed answer naming the chunk's holders,
       or naming nobody (nobody else has it yet: the fetcher asks again soon, as after `busy`);
    3. the ration again (`refusal`), which counts the copy, and after the send `finished`: a copy that failed
       to go out no longer counts.

    Before all three, a priced provider's till (node/payments.py): a chunk whose consumer's vouchers lag more
    than the credit window is answered "come back" (a rationed answer naming nobody) after pay.voucher_wait_s.

    `slots` None: no upload slots (serve.upload_slots = 0, or `node.swarm = "legacy"`): the ration alone."""

    def __init__(self, ration: UploadRation, slots: UploadSlots | None = None, till: Any = None) -> None:
        self.ration = ration
        self.slots = slots
        #: a priced provider's till (node/payments.py): a chunk goes only within the consumer's credit window
        self.till = till

    @classmethod
    def of(cls, ration: UploadRation, tuning: ServeTuning,
           reshares: Callable[[str], int] = lambda peer: 0, till: Any = None) -> "UploadGate":
        """The gate a node's tuning asks for: upload slots unless serve.upload_slots is 0."""
        return cls(ration, UploadSlots(tuning, reshares) if tuning.upload_slots > 0 else None, till)

    @contextlib.asynccontextmanager
    async def turn(self, artifact: Cid | None, cid: Cid, peer: str, path: Any = None,
                   data: bytes | bytearray | None = None) -> AsyncIterator[Turn]:
        """One chunk's turn. The chunk is its file `path` or its bytes `data`: a priced provider's till counts
        its stored size (read from the file only then, so a free node pays no stat per chunk)."""
        till = self.till
        if till is None or not till.prices_bytes:
            async with self._turn(artifact, cid, peer) as turn:
                yield turn
            return
        size = len(data) if data is not None else await trio.to_thread.run_sync(stored_size, path)
        if not await till.admit_chunk(peer, size):  # its vouchers lag: nothing more until they come
            yield Turn(ChunkMissing(cid, rationed=True))
            return
        sent = False
        try:
            async with self._turn(artifact, cid, peer) as turn:
                yield turn
                sent = turn.answer is None and turn.sent
        finally:
            await till.chunk_done(peer, artifact, size, sent)

    @contextlib.asynccontextmanager
    async def _turn(self, artifact: Cid | None, cid: Cid, peer: str) -> AsyncIterator[Turn]:
        ration = self.ration
        if self.slots is None or ration.would_refuse(artifact, cid, peer):
            async with self._counted(artifact, cid, peer) as turn:
                yield turn
            return
        async with self.slots.hold(peer, artifact) as got:
            if not got:
                yield Turn(ChunkMissing(cid, rationed=True, holders=ration.holders(artifact, cid)))
                return
            async with self._counted(artifact, cid, peer) as turn:
                yield turn

    @contextlib.asynccontextmanager
    async def _counted(self, artifact: Cid | None, cid: Cid, peer: str) -> AsyncIterator[Turn]:
        turn = Turn(self.ration.refusal(artifact, cid, peer))
        try:
            yield turn
        finally:
            if turn.answer is None:
                self.ration.finished(artifact, cid, peer, ok=turn.sent)


__all__ = ["Reciprocity", "Turn", "UploadGate", "UploadQueue", "UploadSlots", "stored_size"]
