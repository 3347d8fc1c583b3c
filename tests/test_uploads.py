"""node/uploads.py: upload slots (who sends now) and the gate both senders go through, alone (no network)."""

from __future__ import annotations

import random

import trio
import trio.testing

from kvswap.node.ration import UploadRation
from kvswap.node.tuning import RationTuning, ServeTuning
from kvswap.node.uploads import Reciprocity, UploadGate, UploadQueue, UploadSlots
from kvswap.protocol.cid import Cid

ART, OTHER = Cid.of(b"artifact"), Cid.of(b"other artifact")
C1, C2 = Cid.of(b"chunk 1"), Cid.of(b"chunk 2")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def queue(slots=2, per_artifact=2, optimistic=0, reshares=lambda p: 0, seed=0) -> UploadQueue:
    return UploadQueue(slots, per_artifact, optimistic, reshares, random.Random(seed), Clock())


def test_at_most_the_slots_are_granted_and_a_release_grants_the_next():
    q = queue(slots=2)
    a, granted = q.ask("A", ART)
    b, _ = q.ask("B", ART)
    c, granted_c = q.ask("C", ART)
    assert q.granted(a) and q.granted(b) and not q.granted(c) and granted_c == []
    assert q.release(a) == [c] and q.granted(c)


def test_one_artifact_takes_at_most_its_share_and_another_artifact_goes_past_it():
    q = queue(slots=3, per_artifact=2)
    q.ask("A", ART)
    q.ask("B", ART)
    third, _ = q.ask("C", ART)
    other, granted = q.ask("D", OTHER)
    assert not q.granted(third) and q.granted(other) and granted == [other]


def test_a_freed_slot_goes_to_the_peer_that_reshares_most_then_the_one_served_least_lately():
    given = {"R": 10_000_000}
    q = queue(slots=1, reshares=lambda p: given.get(p, 0))
    first, _ = q.ask("A", ART)
    x, _ = q.ask("X", ART)  # arrived first, gave nothing
    r, _ = q.ask("R", ART)  # gave us 10 MB of verified chunks
    assert q.release(first) == [r]  # tit-for-tat before arrival order
    assert q.release(r) == [x]
    # rotation: among peers that gave nothing, the one granted fewest slots lately goes first
    q2 = queue(slots=1)
    for _ in range(3):
        q2.release(q2.ask("A", ART)[0])  # A was sent three chunks just now
    z, _ = q2.ask("Z", ART)
    q2.ask("A", ART)
    b, _ = q2.ask("B", ART)
    assert q2.release(z) == [b]  # B first although A asked first


def test_the_optimistic_slot_goes_to_a_random_waiter_whatever_it_gave():
    """With one slot reserved as optimistic, a newcomer that gave nothing still gets turns while a peer that
    re-shares a lot keeps asking."""
    winners = set()
    for seed in range(20):
        q = queue(slots=2, optimistic=1, reshares=lambda p: 1_000 if p == "R" else 0, seed=seed)
        a, _ = q.ask("A", ART)
        b, _ = q.ask("B", ART)
        for peer in ("R", "N1", "N2", "N3"):
            q.ask(peer, ART)
        (got,) = q.release(a)  # the optimistic slot is free: drawn among all waiters
        winners.add(q.active[got].peer)
    assert len(winners) > 1 and winners - {"R"}  # not always the re-sharer


def test_a_waiter_that_leaves_is_never_granted():
    q = queue(slots=1)
    a, _ = q.ask("A", ART)
    b, _ = q.ask("B", ART)
    assert q.leave(b) == [] and q.release(a) == [] and not q.granted(b)


def test_reciprocity_counts_verified_bytes_per_peer_and_is_bounded():
    r = Reciprocity(max_peers=3)
    for i, peer in enumerate("ABCD"):
        r.credit(peer, 100 * (i + 1))
    r.credit("B", 1)
    assert r.given("A") == 0  # forgotten: the least recently credited
    assert (r.given("B"), r.given("D")) == (201, 400)


def _slots(n: int, wait_s: float) -> UploadSlots:
    tuning = ServeTuning(upload_slots=n, upload_slots_per_artifact=n, optimistic_slots=0, upload_wait_s=wait_s)
    return UploadSlots(tuning)


def test_slots_hold_waits_its_turn_and_times_out_when_none_frees():
    async def main() -> list:
        slots = _slots(1, wait_s=0.2)
        events = []

        async def holder(peer: str, hold_s: float) -> None:
            async with slots.hold(peer, ART) as got:
                events.append((peer, got, round(trio.current_time() - t0, 1)))
                if got:
                    await trio.sleep(hold_s)

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "A", 0.1)
            await trio.sleep(0.01)
            nursery.start_soon(holder, "B", 0.5)  # gets A's slot at 0.1
            await trio.sleep(0.01)
            nursery.start_soon(holder, "C", 0.0)  # B holds it past C's 0.2 s wait: no slot
        assert slots.in_use == 0 and slots.waiting == 0 and slots.timed_out == 1
        return events

    events = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert events == [("A", True, 0.0), ("B", True, 0.1), ("C", False, 0.2)]


def test_the_gate_sends_one_copy_per_chunk_and_points_a_waiter_without_a_slot_at_the_holder():
    async def main() -> list:
        ration = UploadRation(RationTuning(copies=1, patience_s=5.0), clock=trio.current_time)
        gate = UploadGate(ration, _slots(1, wait_s=0.2))
        answers = []

        async def send(peer: str, cid: Cid, hold_s: float, ok: bool = True) -> None:
            async with gate.turn(ART, cid, peer) as turn:
                if turn.answer is None:
                    await trio.sleep(hold_s)
                    turn.sent = ok
                answers.append((peer, cid, None if turn.answer is None else turn.answer.holders))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "A", C1, 1.0)  # the copy of C1, 1 s on the wire
            await trio.sleep(0.01)
            nursery.start_soon(send, "B", C1, 0.0)  # would be refused: answered at once, no slot taken
            nursery.start_soon(send, "C", C2, 0.0)  # C2's first copy: waits for the one slot, in vain
        assert ration.copies_sent(ART, C1) == 1 and ration.copies_sent(ART, C2) == 0
        async with trio.open_nursery() as nursery:  # a failed send frees the copy
            nursery.start_soon(send, "D", C2, 0.0, False)
        assert ration.copies_sent(ART, C2) == 0
        return answers

    answers = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert ("B", C1, ()) in answers  # A's copy is in flight: nobody to name yet, come back
    assert ("C", C2, ()) in answers  # no slot in time and nobody holds C2: "come back" (busy for that chunk)
    assert ("A", C1, None) in answers and ("D", C2, None) in answers
