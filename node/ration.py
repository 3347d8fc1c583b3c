"""Upload rationing: how a node keeps a swarm of simultaneous fetchers from all downloading from it.

When eight consumers ask one publisher for the same artifact at the same moment, a server that answers
everyone sends the artifact eight times. BitTorrent's answer is super-seeding: the seed hands out each piece
about once and lets the downloaders trade. kvswap does the same by counting, per artifact and chunk, which
peers this node has sent the chunk to:

- the first ration.copies fetchers of a chunk get it;
- a later fetcher gets `ChunkMissing(rationed=True, holders=...)` naming some of those peers, asks them,
  and by the time they are asked they usually have it (they are fetching at the same time);
- a fetcher refused for ration.patience_s is served anyway, so a chunk is delayed, never withheld (the
  holders may have gone away or be slow);
- a peer that already got a chunk from us gets it again (a retry after a failed write);
- after ration.idle_reset_s without sending any chunk of an artifact, its counts are forgotten.

Chunk requests that name no artifact are never rationed. Pure bookkeeping: no I/O, the clock is injected,
so the policy is tested alone (tests/test_ration.py) and shared by the libp2p and data-plane senders.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from kvswap.protocol.cid import Cid
from kvswap.protocol import limits
from kvswap.protocol.messages import ChunkMissing

from .tuning import RationTuning


@dataclass
class _ArtifactCopies:
    last_sent: float
    sent_to: dict[Cid, list[str]] = field(default_factory=dict)  # chunk -> peers, in the order they got it
    refused_since: dict[tuple[Cid, str], float] = field(default_factory=dict)  # (chunk, peer) -> first refusal


class UploadRation:
    """Decides, chunk by chunk, whether to send now or to point the fetcher at peers that already have it."""

    def __init__(self, tuning: RationTuning = RationTuning(), clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.tuning = tuning
        self.copies = tuning.copies
        self.patience_s = tuning.patience_s
        self.idle_reset_s = tuning.idle_reset_s
        self.clock = clock
        self.rng = rng or random.Random()
        self._artifacts: OrderedDict[Cid, _ArtifactCopies] = OrderedDict()
        self.refusals = 0  # answers "rationed" given so far (for logs and tests)

    def decide(self, artifact: Cid | None, cid: Cid, peer: str) -> tuple[str, ...] | None:
        """None: send the chunk to `peer` now (and count the copy). Otherwise the holders to name instead."""
        if artifact is None or self.copies <= 0:
            return None
        now = self.clock()
        state = self._state(artifact, now)
        holders = state.sent_to.setdefault(cid, [])
        if peer in holders or len(holders) < self.copies:
            return self._send(state, cid, peer, now)
        first = state.refused_since.setdefault((cid, peer), now)
        if now - first >= self.patience_s:
            return self._send(state, cid, peer, now)
        self.refusals += 1
        named = holders if len(holders) <= limits.MAX_HOLDER_HINTS else self.rng.sample(holders, limits.MAX_HOLDER_HINTS)
        return tuple(named)

    def refusal(self, artifact: Cid | None, cid: Cid, peer: str) -> ChunkMissing | None:
        """What both senders (libp2p stream, data plane) ask before sending a chunk they hold: None to send
        it, or the rationed ChunkMissing naming holders to answer instead."""
        holders = self.decide(artifact, cid, peer)
        return None if holders is None else ChunkMissing(cid, rationed=True, holders=holders)

    def copies_sent(self, artifact: Cid, cid: Cid) -> int:
        state = self._artifacts.get(artifact)
        return len(state.sent_to.get(cid, ())) if state else 0

    def _send(self, state: _ArtifactCopies, cid: Cid, peer: str, now: float) -> None:
        holders = state.sent_to[cid]
        if peer not in holders:
            holders.append(peer)
        state.refused_since.pop((cid, peer), None)
        state.last_sent = now
        return None

    def _state(self, artifact: Cid, now: float) -> _ArtifactCopies:
        for name in [a for a, s in self._artifacts.items() if now - s.last_sent > self.idle_reset_s]:
            del self._artifacts[name]
        state = self._artifacts.get(artifact)
        if state is None:
            state = self._artifacts[artifact] = _ArtifactCopies(last_sent=now)
            while len(self._artifacts) > self.tuning.max_artifacts:
                self._artifacts.popitem(last=False)
        self._artifacts.move_to_end(artifact)
        return state
