"""Per-peer shares of what a node gives away: open streams, serve slots, generations, announcements, log lines.

A node serves peers it does not know. Without shares, the first peer to ask for many things gets them all
(first come, first served), and everyone else waits behind it: 100 silent streams held every manifest slot
for 45 s, three long hosted generations queued an 8-token one for 10 s. Each resource therefore has a limit
per peer and in total (`ServeTuning`, node/tuning.py), and a peer over its own share is the one refused:

- `PeerCounter`: how many of something each peer holds (open streams, data-plane transfers); a peer at its
  share, or everyone at the total, is refused at once.
- `StreamAdmission`: inbound streams per peer, per IP address, per subnet and in total, with slots reserved
  for peers with a good record (`PeerRecords`): many identities from one address share one address's share.
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
import ipaddress
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Hashable, Iterable

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


def network_of(ip: str | None) -> tuple[str, str]:
    """(ip, subnet) of a peer's address: the /24 of an IPv4 address, the /64 of an IPv6 one (libp2p's resource
    manager scopes the same way); ("?", "?") when the transport does not say."""
    if not ip:
        return "?", "?"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip, ip
    prefix = 24 if addr.version == 4 else 64
    return str(addr), str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class StreamAdmission:
    """Who may open one more inbound stream: per peer, per IP address, per subnet and in total, with a share of
    the total reserved for peers with a good record (libp2p's resource manager scopes, plus an allowlist).

    A peer identity costs nothing to make, so per-identity shares alone fall to a crowd: 18 fresh identities
    from one address, 16 silent streams each, held every one of 256 slots. Here:
    - every peer holds at most `per_peer` streams;
    - peers without a record (`vouched` says who has one) hold at most `per_ip` streams per IP address and
      `per_subnet` per /24 (IPv4) or /64 (IPv6), and at most `total - reserved` altogether;
    - peers with a record (this node fetched from them or served them to the end, trusted publishers,
      configured peers) may also use the `reserved` slots, so a crowd of strangers cannot take every slot.
    Pure bookkeeping; `vouched(peer)` is asked at each admission (a record can be earned meanwhile)."""

    def __init__(self, total: int, per_peer: int, per_ip: int, per_subnet: int, reserved: int,
                 vouched: Callable[[str], bool] = lambda peer: False) -> None:
        if not 0 <= reserved < total:
            raise ValueError("reserved slots must leave some for newcomers")
        self.total, self.per_peer, self.per_ip, self.per_subnet, self.reserved = total, per_peer, per_ip, per_subnet, reserved
        self.vouched = vouched
        self.peers = PeerCounter(total, per_peer)
        self._strangers = 0  # streams held by peers without a record
        self._by_ip: dict[str, int] = {}
        self._by_subnet: dict[str, int] = {}
        self._held: dict[int, tuple[str, str, str, bool]] = {}  # ticket -> (peer, ip, subnet, stranger)
        self._tickets = itertools.count(1)

    def acquire(self, peer: str, ip: str | None) -> int | None:
        """A ticket to give back with `release`, or None (refused: say why with `why_refused`)."""
        known = self.vouched(peer)
        addr, subnet = network_of(ip)
        if not known and (self._strangers >= self.total - self.reserved or self._by_ip.get(addr, 0) >= self.per_ip
                          or self._by_subnet.get(subnet, 0) >= self.per_subnet):
            return None
        if not self.peers.acquire(peer):
            return None
        ticket = next(self._tickets)
        self._held[ticket] = (peer, addr, subnet, not known)
        if not known:
            self._strangers += 1
            self._by_ip[addr] = self._by_ip.get(addr, 0) + 1
            self._by_subnet[subnet] = self._by_subnet.get(subnet, 0) + 1
        return ticket

    def release(self, ticket: int) -> None:
        peer, addr, subnet, stranger = self._held.pop(ticket)
        self.peers.release(peer)
        if stranger:
            self._strangers -= 1
            _give_back(self._by_ip, addr)
            _give_back(self._by_subnet, subnet)

    def why_refused(self, peer: str, ip: str | None) -> str:
        addr, subnet = network_of(ip)
        if self.peers.count(peer) >= self.per_peer:
            return f"{self.peers.count(peer)} streams open"
        if self.peers.in_use >= self.total:
            return "the node's streams are all in use"
        if self._by_ip.get(addr, 0) >= self.per_ip:
            return f"{self._by_ip[addr]} streams from {addr} by peers without a record"
        if self._by_subnet.get(subnet, 0) >= self.per_subnet:
            return f"{self._by_subnet[subnet]} streams from {subnet} by peers without a record"
        return "the slots left for peers without a record are in use"

    @property
    def in_use(self) -> int:
        return self.peers.in_use

    def count(self, peer: str) -> int:
        return self.peers.count(peer)


class PeerRecords:
    """Peers with a good record with this node: the ones a crowd of fresh identities cannot displace
    (`StreamAdmission`'s reserved slots). A peer earns a record by delivering chunks that verified to one of
    our fetches, or by completing a request we served; trusted publishers and configured peers (bootstrap)
    hold one for good. A peer whose stream is cut for misbehaving (garbage, a stall, an oversized frame) loses
    an earned record. At most `max_peers` earned records are kept (the least recently earned go first)."""

    def __init__(self, max_peers: int) -> None:
        self.max_peers = max_peers
        self._earned: OrderedDict[str, None] = OrderedDict()
        self._standing: frozenset[str] = frozenset()

    def set_standing(self, peers: "Iterable[str]") -> None:
        """The peers that always have a record (trusted publishers, configured peers): replaces the set."""
        self._standing = frozenset(peers)

    def earn(self, peer: str) -> None:
        self._earned.pop(peer, None)
        self._earned[peer] = None
        while len(self._earned) > self.max_peers:
            self._earned.popitem(last=False)

    def forfeit(self, peer: str) -> None:
        self._earned.pop(peer, None)

    def __contains__(self, peer: object) -> bool:
        return peer in self._standing or peer in self._earned

    def __len__(self) -> int:
        return len(self._earned) + len(self._standing)


__all__ = ["FairSlots", "PeerCounter", "PeerRecords", "RateGate", "RefusalLog", "StreamAdmission", "network_of"]
