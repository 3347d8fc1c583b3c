"""Per-peer shares of what a node gives away: open streams, serve slots, generations, announcements, log lines.

A node serves peers it does not know. Without shares, the first peer to ask for many things gets them all
(first come, first served), and everyone else waits behind it: 100 silent streams held every manifest slot
for 45 s, three long hosted generations queued an 8-token one for 10 s. Each resource therefore has a limit
per peer and in total (`ServeTuning`, node/tuning.py), and a peer over its own share is the one refused:

- `PeerCounter`: how many of something each peer holds (open streams, data-plane transfers); a peer at its
  share, or everyone at the total, is refused at once.
- `FairSlots` (trio): N slots for work in progress (serving a request, a generation). A peer holds at most
  `per_peer`; when a slot frees up, the waiting peers take turns (round robin), so a peer with 100 requests
  queued gets one slot per turn like a peer with one. A waiter gives up after its timeout with `Busy`.
- `RateGate`: a token bucket per key (announcements per publisher), bounded in the keys it remembers.
- `RefusalLog`: one log line per kind of refusal per interval, with the count, so a flood of bad
  connections costs counters, not a log line each.

Pure bookkeeping except FairSlots' waiting (trio events); clocks are injected, so each is tested alone
(tests/test_quota.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Hashable

import trio

from kvswap.protocol.errors import Busy

from .tuning import ServeTuning


def _give_back(held: dict[str, int], peer: str) -> None:
    """One fewer held by `peer`; a peer holding nothing is forgotten (the table never outgrows what is held)."""
    left = held.get(peer, 0) - 1
    if left < 0:
        raise RuntimeError(f"released more than {peer[:16]} held")
    if left:
        held[peer] = left
    else:
        del held[peer]


class PeerCounter:
    """Counts what each peer holds; `acquire(peer)` is False when the peer is at `per_peer` or all are at
    `total`. Peers holding nothing are forgotten (the table never outgrows what is held)."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.held: dict[str, int] = {}
        self.in_use = 0

    def acquire(self, peer: str) -> bool:
        if self.in_use >= self.total or self.held.get(peer, 0) >= self.per_peer:
            return False
        self.held[peer] = self.held.get(peer, 0) + 1
        self.in_use += 1
        return True

    def release(self, peer: str) -> None:
        _give_back(self.held, peer)
        self.in_use -= 1

    def count(self, peer: str) -> int:
        return self.held.get(peer, 0)


@dataclass(eq=False)
class _Waiter:
    event: trio.Event
    granted: bool = False


class FairSlots:
    """`capacity` slots of work in progress shared fairly among peers (trio).

        async with slots.hold(peer, timeout=tuning.serve.wait_timeout_s):   # Busy if no slot in time
            ... serve ...

    A peer holds at most `per_peer` slots; `max_pending` (if set) bounds what one peer may hold and wait
    for together, beyond which it is refused at once. A free slot goes to a newcomer only when nobody
    eligible waits; otherwise waiting peers take turns in round-robin order, each getting its oldest waiter
    served, so one peer's long queue never delays another peer by more than one turn.
    """

    def __init__(self, capacity: int, per_peer: int, max_pending: int | None = None) -> None:
        self.capacity = capacity
        self.per_peer = per_peer
        self.max_pending = max_pending
        self.in_use = 0
        self.held: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # round-robin order of waiting peers
        self.refused = 0  # waits that timed out or were over max_pending (for status and tests)

    def waiting(self, peer: str | None = None) -> int:
        if peer is not None:
            return len(self._waiting.get(peer, ()))
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def hold(self, peer: str, timeout: float = math.inf) -> AsyncIterator[None]:
        await self.acquire(peer, timeout)
        try:
            yield
        finally:
            self.release(peer)

    async def acquire(self, peer: str, timeout: float = math.inf) -> None:
        if self.max_pending is not None and self.held.get(peer, 0) + self.waiting(peer) >= self.max_pending:
            self.refused += 1
            raise Busy(f"this peer already has {self.max_pending} requests of this kind running or waiting")
        if peer not in self._waiting and self._eligible(peer) and not self._anyone_eligible_waiting():
            self._grant(peer)
            await trio.lowlevel.checkpoint()
            return
        waiter = _Waiter(trio.Event())
        self._waiting.setdefault(peer, deque()).append(waiter)
        try:
            with trio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:  # cancelled from outside: a slot granted meanwhile goes back, or the queue is left
            if waiter.granted:
                self.release(peer)
            else:
                self._leave(peer, waiter)
            raise
        if not waiter.granted:
            self._leave(peer, waiter)
            self.refused += 1
            raise Busy(f"no serve slot free within {timeout:g} s")

    def _leave(self, peer: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(peer)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiting[peer]

    def release(self, peer: str) -> None:
        _give_back(self.held, peer)
        self.in_use -= 1
        self._dispatch()

    def _eligible(self, peer: str) -> bool:
        return self.in_use < self.capacity and self.held.get(peer, 0) < self.per_peer

    def _anyone_eligible_waiting(self) -> bool:
        return any(self.held.get(p, 0) < self.per_peer for p in self._waiting)

    def _grant(self, peer: str) -> None:
        self.held[peer] = self.held.get(peer, 0) + 1
        self.in_use += 1

    def _dispatch(self) -> None:
        """Hand free slots to waiting peers in round-robin order (a served peer goes to the back)."""
        while self.in_use < self.capacity:
            peer = next((p for p in self._waiting if self.held.get(p, 0) < self.per_peer), None)
            if peer is None:
                return
            queue = self._waiting[peer]
            waiter = queue.popleft()
            if queue:
                self._waiting.move_to_end(peer)
            else:
                del self._waiting[peer]
            waiter.granted = True
            self._grant(peer)
            waiter.event.set()


class RateGate:
    """A token bucket per key: `allow(key)` spends one token, False when the key has none left. Each key
    starts with `burst` tokens and gains `rate_per_s` per second up to `burst`. At most `max_keys` keys are
    remembered (the least recently seen is forgotten: it starts again with a full burst)."""

    def __init__(self, burst: float, rate_per_s: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.rate = rate_per_s
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)
        self.denied = 0

    def allow(self, key: Hashable) -> bool:
        now = self.clock()
        tokens, since = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - since) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.denied += 1
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class RefusalLog:
    """Log refusals of one kind at most once per `interval_s`, counting the rest: `note(text)` logs the first
    refusal, then one line per interval saying how many more there were (and the latest's text)."""

    def __init__(self, logger: logging.Logger, what: str, interval_s: float = ServeTuning.refusal_log_interval_s,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.INFO) -> None:
        self.logger = logger
        self.what = what
        self.interval_s = interval_s
        self.clock = clock
        self.level = level
        self.total = 0
        self._unlogged = 0
        self._last = -math.inf

    def note(self, text: str) -> bool:
        """Count one refusal; True if it was logged now."""
        self.total += 1
        now = self.clock()
        if now - self._last < self.interval_s:
            self._unlogged += 1
            return False
        extra = f" ({self._unlogged} more since the last line)" if self._unlogged else ""
        self.logger.log(self.level, "%s: %s%s", self.what, text, extra)
        self._unlogged = 0
        self._last = now
        return True


__all__ = ["FairSlots", "PeerCounter", "RateGate", "RefusalLog"]
