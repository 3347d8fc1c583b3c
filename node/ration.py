"""Upload rationing: how a node keeps a swarm of simultaneous fetchers from all downloading from it.

When eight consumers ask one publisher for the same artifact at the same moment, a server that answers
everyone sends the artifact eight times. BitTorrent's answer for an initial seed is super-seeding (BEP 16):
the seed hands out each piece to one peer at a time and lets the downloaders trade, about 1.05 copies in
all. kvswap does the same by counting, per artifact and chunk, the copies this node has made (sent, or being
sent) and when each one completed:

- the first ration.copies fetchers of a chunk get it (one, by default: a copy per chunk before any second);
- a later fetcher gets `ChunkMissing(rationed=True, holders=...)` naming the peers whose copy completed, and
  asks them; while every copy is still in flight it names nobody, which the fetcher takes as "come back
  soon" (a peer still receiving the chunk lacks it: sent there, a fetcher counted it lacking, then a bad hint);
- a further copy goes out only once ration.patience_s (or ration.patience_factor times that copy's own send
  time, if longer) have passed since the chunk's latest copy *completed* (its holders have had that long to
  re-share it), never while the copies are still in flight, and ration.private_holder_extra_s more when every
  holder is behind a NAT (reached through a relay, then a hole punch, first: issue 26): counted from
  the refusal, as before, the patience of refused fetchers ran out while a slow first copy was still on its
  way (4.6-8.5 s for the first 6.5 MB chunk at 100 Mbit/s), and they were all served anyway (1.73 copies);
- a copy whose send failed (the peer went away, stalled) no longer counts: the next fetcher gets it; nor
  does one held by a peer no longer connected to us (a holder that left cannot re-share it);
- a peer that already got a chunk from us gets it again (a retry after a failed write);
- only a seed rations: a node that is itself fetching the artifact (it stored a chunk of it in the last
  ration.idle_reset_s) serves whoever gets an upload slot, like any BitTorrent peer;
- after ration.idle_reset_s without sending any chunk of an artifact, its counts are forgotten.

`legacy=True` keeps the previous rule (patience counted from each fetcher's first refusal, in-flight copies
counted as complete), so the old behaviour stays measurable beside the new (`node.swarm = "legacy"`).

Chunk requests that name no artifact are never rationed. Pure bookkeeping: no I/O, the clock is injected,
so the policy is tested alone (tests/test_ration.py) and shared by the libp2p and data-plane senders, which
call `refusal` before a send and `finished` after it.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from kvswap.protocol import limits
from kvswap.protocol.cid import Cid
from kvswap.protocol.messages import ChunkMissing

from .tuning import RationTuning

log = logging.getLogger(__name__)


@dataclass
class _Copy:
    """One copy of one chunk to one peer: in flight until `done_at` is set."""

    peer: str
    started: float
    done_at: float | None = None


@dataclass
class _ArtifactCopies:
    last_sent: float
    copies: dict[Cid, list[_Copy]] = field(default_factory=dict)  # chunk -> its copies, in the order they began
    refused_since: dict[tuple[Cid, str], float] = field(default_factory=dict)  # (chunk, peer) -> first refusal


class UploadRation:
    """Decides, chunk by chunk, whether to send now or to point the fetcher at peers that have it."""

    def __init__(self, tuning: RationTuning = RationTuning(), clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, legacy: bool = False,
                 present: Callable[[str], bool] | None = None,
                 private: Callable[[str], bool] | None = None) -> None:
        self.tuning = tuning
        self.copies = tuning.copies
        self.patience_s = tuning.patience_s
        self.idle_reset_s = tuning.idle_reset_s
        self.legacy = legacy
        #: whether a peer is still connected to us (node/net.py: the libp2p host's connections); None: assume so
        self.present = present
        #: whether a peer is behind a NAT (it advertises relayed addresses: node/p2p.py); None: nobody is
        self.private = private
        self.clock = clock
        self.rng = rng or random.Random()
        self._artifacts: OrderedDict[Cid, _ArtifactCopies] = OrderedDict()
        self._received: OrderedDict[Cid, float] = OrderedDict()  # artifact -> when we last stored a chunk of it
        self.refusals = 0  # answers "rationed" given so far (for logs and tests)

    def note_received(self, artifact: Cid) -> None:
        """This node stored a chunk of `artifact` from a peer: it is one of a swarm's fetchers, not its seed."""
        self._received[artifact] = self.clock()
        self._received.move_to_end(artifact)
        while len(self._received) > self.tuning.max_artifacts:
            self._received.popitem(last=False)

    def _rations(self, artifact: Cid | None) -> bool:
        """Whether chunks of `artifact` are rationed here: only by a seed. A node that received chunks of it
        in the last ration.idle_reset_s is fetching it in the same swarm: it serves whoever it gives a slot,
        like any BitTorrent peer, since a fetcher pointed from holder to holder (each rationing its own one
        copy) gave up on chunks and failed (issue 24's first testnet runs). The legacy rule rations everywhere."""
        if artifact is None or self.copies <= 0:
            return False
        if self.legacy:
            return True
        got = self._received.get(artifact)
        return got is None or self.clock() - got > self.idle_reset_s

    def decide(self, artifact: Cid | None, cid: Cid, peer: str) -> tuple[str, ...] | None:
        """None: send the chunk to `peer` now (a copy in flight is counted until `finished`). Otherwise the
        holders to name instead."""
        if not self._rations(artifact):
            return None
        now = self.clock()
        state = self._state(artifact, now)
        copies = state.copies.setdefault(cid, [])
        self._forget_gone(copies)
        mine = next((c for c in copies if c.peer == peer), None)
        if mine is not None:  # a retry: it asked again, so its copy did not land
            if not self.legacy:
                mine.started, mine.done_at = now, None
            return self._send(state, cid, peer, now, counted=True)
        if len(copies) < self.copies:
            return self._send(state, cid, peer, now)
        if self._patience_over(state, cid, peer, copies, now):
            log.info("chunk %s: copy %d to %s, patience over (latest copy completed %.1f s ago)", cid.short(),
                     len(copies) + 1, peer[:16], now - max((c.done_at or now for c in copies), default=now))
            return self._send(state, cid, peer, now)
        self.refusals += 1
        return self._named(copies)

    def _named(self, copies: list[_Copy]) -> tuple[str, ...]:
        """The holders a refusal names: those whose copy completed (a peer still receiving the chunk lacks it,
        and a fetcher sent there would count it as lacking, then as a bad hint); none while every copy is in
        flight, which the fetcher takes as "come back soon" (node/fetchplan.py). At most MAX_HOLDER_HINTS,
        drawn at random when more hold it, so fetchers spread over the holders."""
        done = [c.peer for c in copies if c.done_at is not None]
        if len(done) > limits.MAX_HOLDER_HINTS:
            done = self.rng.sample(done, limits.MAX_HOLDER_HINTS)
        return tuple(done)

    def _patience_over(self, state: _ArtifactCopies, cid: Cid, peer: str, copies: list[_Copy], now: float) -> bool:
        """Whether one more copy may go out: patience_s after the latest copy completed (none while every
        copy is in flight), or, in legacy mode, patience_s after this peer was first refused."""
        if self.legacy:
            first = state.refused_since.setdefault((cid, peer), now)
            return now - first >= self.patience_s
        return self._reshare_time_over(copies, now)

    def _reshare_time_over(self, copies: list[_Copy], now: float) -> bool:
        """Every copy completed, and its holders have had the patience since the latest one did: patience_s,
        or patience_factor times as long as that copy took to send if longer (on a slow or crowded link a
        holder needs longer to pass a chunk on; 5 s alone let a second copy out in one run in three)."""
        done = [c for c in copies if c.done_at is not None]
        if not done or len(done) < len(copies):
            return False
        latest = max(done, key=lambda c: c.done_at)
        wait = min(self.tuning.patience_max_s,
                   max(self.patience_s, self.tuning.patience_factor * (latest.done_at - latest.started)))
        if now - latest.done_at < wait:
            return False
        if self.private is not None and all(self.private(c.peer) for c in done):  # asked only past the usual wait
            wait += self.tuning.private_holder_extra_s
        return now - latest.done_at >= wait

    def refusal(self, artifact: Cid | None, cid: Cid, peer: str) -> ChunkMissing | None:
        """What both senders (libp2p stream, data plane) ask before sending a chunk they hold: None to send
        it (then call `finished`), or the rationed ChunkMissing naming holders to answer instead."""
        holders = self.decide(artifact, cid, peer)
        return None if holders is None else ChunkMissing(cid, rationed=True, holders=holders)

    def would_refuse(self, artifact: Cid | None, cid: Cid, peer: str) -> bool:
        """`refusal` without counting anything: a sender asks this before it waits for an upload slot."""
        if not self._rations(artifact):
            return False
        state = self._artifacts.get(artifact)
        copies = state.copies.get(cid, []) if state is not None else []
        self._forget_gone(copies)
        if any(c.peer == peer for c in copies) or len(copies) < self.copies:
            return False
        if self.legacy:
            first = state.refused_since.get((cid, peer))
            return first is None or self.clock() - first < self.patience_s
        return not self._reshare_time_over(copies, self.clock())

    def finished(self, artifact: Cid | None, cid: Cid, peer: str, ok: bool) -> None:
        """A send `decide` allowed has ended: the copy completed (`ok`) or failed (it no longer counts)."""
        state = self._artifacts.get(artifact) if artifact is not None and not self.legacy else None
        if state is None:
            return
        copies = state.copies.get(cid, [])
        for c in copies:
            if c.peer == peer:
                if ok:
                    c.done_at = self.clock()
                else:
                    log.info("chunk %s: the copy to %s failed: it no longer counts", cid.short(), peer[:16])
                    copies.remove(c)
                break
        state.last_sent = self.clock()

    def holders(self, artifact: Cid | None, cid: Cid) -> tuple[str, ...]:
        """The peers that got `cid` from us (completed copies, as a refusal names them), without counting a
        refusal: what a sender names when no upload slot came in time."""
        state = self._artifacts.get(artifact) if artifact is not None else None
        copies = state.copies.get(cid, []) if state is not None else []
        self._forget_gone(copies)
        return self._named(copies)

    def _forget_gone(self, copies: list[_Copy]) -> None:
        """Copies held by peers no longer connected to us no longer count: a holder that left cannot re-share,
        and naming it would only send fetchers to a dead address until the patience ran out (issue 24: a
        fetch waited out the patience while its only named holders were gone)."""
        if self.present is not None and not self.legacy:
            kept = [c for c in copies if self.present(c.peer)]
            if len(kept) < len(copies):
                log.info("%d holder(s) of a chunk left: their copies no longer count", len(copies) - len(kept))
                copies[:] = kept

    def copies_sent(self, artifact: Cid, cid: Cid) -> int:
        state = self._artifacts.get(artifact)
        return len(state.copies.get(cid, ())) if state else 0

    def _send(self, state: _ArtifactCopies, cid: Cid, peer: str, now: float, counted: bool = False) -> None:
        if not counted:
            state.copies[cid].append(_Copy(peer, now))
            if self.legacy:  # the previous rule counted a copy as made when it was allowed
                state.copies[cid][-1].done_at = now
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
