"""The announcements a daemon has heard, for `kvswap node status`: bounded and expiring.

Peers announce artifacts on gossipsub (node/net.py); anyone may announce anything, and the CIDs are not
checked until someone fetches them, so this table is a view, not a source of truth: it keeps at most
gossip.max_kept entries, at most gossip.max_kept_per_peer per publisher (a publisher flooding bogus CIDs
only replaces its own), each for gossip.ttl_s. A repeated announcement refreshes its entry. Pure
bookkeeping with an injected clock (tests/test_quota.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .tuning import GossipTuning


class AnnouncementTable:
    """(artifact CID, publisher) -> what was announced, oldest first."""

    def __init__(self, tuning: GossipTuning = GossipTuning(), clock: Callable[[], float] = time.monotonic) -> None:
        max_entries, per_peer, ttl_s = tuning.max_kept, tuning.max_kept_per_peer, tuning.ttl_s
        self.max_entries = max_entries
        self.per_peer = per_peer
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, dict]] = OrderedDict()
        self._per_peer: dict[str, int] = {}

    def add(self, cid: str, publisher: str, entry: dict) -> None:
        """Record that `publisher` announced `cid` (with `entry` to show); its oldest go when it is at its share,
        the table's oldest when the table is full."""
        now = self.clock()
        self._expire(now)
        key = (cid, publisher)
        if key in self._entries:
            self._remove(key)
        if self._per_peer.get(publisher, 0) >= self.per_peer:
            self._remove(next(k for k in self._entries if k[1] == publisher))
        while len(self._entries) >= self.max_entries:
            self._remove(next(iter(self._entries)))
        self._entries[key] = (now, entry)
        self._per_peer[publisher] = self._per_peer.get(publisher, 0) + 1

    def recent(self, n: int) -> list[dict]:
        """The `n` newest entries still current, oldest of them first."""
        self._expire(self.clock())
        return [entry for _, entry in list(self._entries.values())[-n:]]

    def current(self) -> list[dict]:
        """Every entry still current, oldest first."""
        self._expire(self.clock())
        return [entry for _, entry in self._entries.values()]

    def __len__(self) -> int:
        self._expire(self.clock())
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (added, _) = next(iter(self._entries.items()))
            if now - added < self.ttl_s:
                return
            self._remove(key)

    def _remove(self, key: tuple[str, str]) -> None:
        del self._entries[key]
        publisher = key[1]
        left = self._per_peer[publisher] - 1
        if left:
            self._per_peer[publisher] = left
        else:
            del self._per_peer[publisher]


__all__ = ["AnnouncementTable"]
