"""node/quota.py and node/announcements.py alone: per-peer shares, fair slots, rate gates, counted refusals,
the bounded announcement table (trio for the slots' waiting, fake clocks for the rest)."""

from __future__ import annotations

import logging

import pytest
import trio

from kvswap.protocol.errors import Busy
from kvswap.node.announcements import AnnouncementTable
from kvswap.node.quota import FairSlots, PeerCounter, RateGate, RefusalLog
from kvswap.node.tuning import GossipTuning


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_peer_counter_refuses_a_peer_at_its_share_and_everyone_at_the_total():
    c = PeerCounter(total=5, per_peer=2)
    assert c.acquire("x") and c.acquire("x")
    assert not c.acquire("x")  # x is at its share; others are not
    assert c.acquire("y") and c.acquire("y") and c.acquire("z")
    assert not c.acquire("w")  # the total is reached
    c.release("x")
    assert c.acquire("w") and c.count("x") == 1
    for peer in ("x", "y", "y", "z", "w"):
        c.release(peer)
    assert c.held == {} and c.in_use == 0  # peers holding nothing are forgotten
    with pytest.raises(RuntimeError):
        c.release("x")


def test_fair_slots_take_turns_between_peers_instead_of_first_come():
    """A flooder queues 6 requests before an honest peer asks once; with one slot, the honest request is served
    second, not seventh."""
    order: list[str] = []

    async def main():
        slots = FairSlots(capacity=1, per_peer=1)

        async def ask(peer: str, i: int) -> None:
            async with slots.hold(peer, timeout=10):
                order.append(f"{peer}{i}")
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(ask, "flood", i)
                await trio.sleep(0)
            await trio.sleep(0.001)
            nursery.start_soon(ask, "honest", 0)
        assert slots.in_use == 0 and slots.waiting() == 0

    trio.run(main)
    assert order[:3] == ["flood0", "flood1", "honest0"]  # flood0 held it; one turn each from then on
    assert sorted(order) == sorted([f"flood{i}" for i in range(6)] + ["honest0"])


def test_fair_slots_cap_what_one_peer_holds():
    async def main():
        slots = FairSlots(capacity=4, per_peer=2)
        await slots.acquire("x")
        await slots.acquire("x")
        with pytest.raises(Busy):
            await slots.acquire("x", timeout=0.05)  # slots are free, but x holds its share
        await slots.acquire("y")  # another peer is not held up by x
        assert slots.held == {"x": 2, "y": 1} and slots.refused == 1
        slots.release("x")
        await slots.acquire("x", timeout=0.05)

    trio.run(main)


def test_fair_slots_wait_times_out_with_busy_and_leaves_the_queue():
    async def main():
        slots = FairSlots(capacity=1, per_peer=1)
        await slots.acquire("x")
        with pytest.raises(Busy, match="no serve slot free within"):
            await slots.acquire("y", timeout=0.05)
        assert slots.waiting() == 0
        slots.release("x")
        await slots.acquire("y", timeout=0.05)  # the timed-out waiter did not keep a claim

    trio.run(main)


def test_fair_slots_max_pending_refuses_at_once():
    async def main():
        slots = FairSlots(capacity=1, per_peer=1, max_pending=1)
        await slots.acquire("x")
        with pytest.raises(Busy, match="already has 1"):
            await slots.acquire("x", timeout=10)  # refused at once, not after 10 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slots.acquire, "y", 10)  # another peer waits its turn
            await trio.sleep(0.01)
            assert slots.waiting("y") == 1
            slots.release("x")
        assert slots.held == {"y": 1}

    trio.run(main)


def test_a_waiter_cancelled_before_or_after_its_grant_leaves_nothing_behind():
    async def holder(slots: FairSlots, peer: str) -> None:
        async with slots.hold(peer, timeout=10):
            await trio.sleep_forever()

    async def main():
        slots = FairSlots(capacity=1, per_peer=1)
        await slots.acquire("x")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(holder, slots, "y")
                nursery.start_soon(holder, slots, "z")
                await trio.sleep(0.01)
                slots.release("x")  # grants y's waiter...
                scope.cancel()  # ...and both waiters are cancelled before they run
        assert slots.in_use == 0 and slots.held == {} and slots.waiting() == 0

    trio.run(main)


def test_rate_gate_bursts_then_refills_per_key_and_forgets_the_least_recent():
    clock = Clock()
    gate = RateGate(burst=3, rate_per_s=1.0, max_keys=2, clock=clock)
    assert [gate.allow("a") for _ in range(4)] == [True, True, True, False]
    assert gate.allow("b")  # another key has its own burst
    clock.now = 1.0
    assert gate.allow("a") and not gate.allow("a")  # one token back per second
    gate.allow("c")  # a third key: "b", the least recently seen, is forgotten
    assert len(gate) == 2 and gate.denied == 2


def test_refusal_log_counts_a_flood_in_one_line_per_interval(caplog):
    clock = Clock()
    log = RefusalLog(logging.getLogger("test.refusals"), "refused", interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        assert log.note("first")
        for i in range(999):
            assert not log.note(f"n{i}")
        clock.now = 10.0
        assert log.note("later")
    assert log.total == 1001
    assert [r.getMessage() for r in caplog.records] == ["refused: first", "refused: later (999 more since the last line)"]


def test_announcement_table_is_bounded_per_publisher_and_in_total_and_expires():
    clock = Clock()
    table = AnnouncementTable(GossipTuning(max_kept=5, max_kept_per_peer=2, ttl_s=100), clock=clock)
    for i in range(10):  # a publisher flooding bogus CIDs keeps only its newest 2
        table.add(f"cid{i}", "flooder", {"cid": f"cid{i}"})
    assert [e["cid"] for e in table.recent(10)] == ["cid8", "cid9"]
    for p in range(4):
        table.add(f"x{p}", f"peer{p}", {"cid": f"x{p}"})
    assert len(table) == 5  # the oldest went when the table was full
    assert [e["cid"] for e in table.recent(3)] == ["x1", "x2", "x3"]
    table.add("x3", "peer3", {"cid": "x3", "again": True})  # a repeat refreshes, it does not duplicate
    assert len(table) == 5 and table.recent(1)[0].get("again")
    clock.now = 150.0
    assert len(table) == 0 and table.recent(5) == []  # expired


def test_stream_admission_holds_a_crowd_of_identities_to_its_address_and_keeps_slots_for_known_peers():
    from kvswap.node.quota import PeerRecords, StreamAdmission, network_of

    records = PeerRecords(max_peers=8)
    adm = StreamAdmission(total=20, per_peer=4, per_ip=6, per_subnet=10, reserved=5, vouched=records.__contains__)
    crowd = [f"stranger{i}" for i in range(10)]
    held = [t for peer in crowd for t in [adm.acquire(peer, "10.0.0.9") for _ in range(4)] if t is not None]
    assert len(held) == 6  # one address's share, however many identities it shows
    assert adm.acquire("newcomer", "10.0.0.77") is not None  # another address in the subnet still gets in
    assert "by peers without a record" in adm.why_refused("stranger9", "10.0.0.9")
    for i in range(4):  # the subnet's share
        adm.acquire(f"n{i}", f"10.0.0.{100 + i}")
    assert adm.acquire("late", "10.0.0.200") is None and "10.0.0.0/24" in adm.why_refused("late", "10.0.0.200")
    records.earn("friend")  # fetched from, or served to the end: a record
    assert all(adm.acquire("friend", "10.0.0.9") is not None for _ in range(4))  # not counted to the address
    assert adm.acquire("friend", "10.0.0.9") is None  # still its own per-peer share
    for t in held:
        adm.release(t)
    assert adm.acquire("stranger0", "10.0.0.9") is not None
    assert network_of("2001:db8::1")[1] == "2001:db8::/64" and network_of(None) == ("?", "?")


def test_strangers_never_take_the_reserved_slots():
    from kvswap.node.quota import PeerRecords, StreamAdmission

    records = PeerRecords(max_peers=8)
    adm = StreamAdmission(total=8, per_peer=8, per_ip=100, per_subnet=100, reserved=3, vouched=records.__contains__)
    strangers = [adm.acquire(f"s{i}", f"192.0.2.{i}") for i in range(8)]
    assert sum(t is not None for t in strangers) == 5  # total - reserved
    records.set_standing(["trusted publisher"])
    assert [adm.acquire("trusted publisher", "198.51.100.1") is not None for _ in range(4)] == [True] * 3 + [False]
    records.earn("helper")
    records.forfeit("helper")  # a stream of its was cut for misbehaving: the record goes
    assert "helper" not in records and "trusted publisher" in records
    for i in range(20):
        records.earn(f"p{i}")
    assert len(records) == 8 + 1  # earned records are bounded (the oldest go), standing ones stay
