"""node/ration.py: the upload rationing policy, alone (fake clock, no network)."""

import random

from kvswap.protocol.cid import Cid
from kvswap.node.ration import UploadRation
from kvswap.node.tuning import RationTuning
from kvswap.protocol import limits

ART = Cid.of(b"artifact")
C1, C2 = Cid.of(b"chunk 1"), Cid.of(b"chunk 2")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(legacy: bool = False, **kw):
    clock = Clock()
    return UploadRation(RationTuning(**kw), clock=clock, rng=random.Random(0), legacy=legacy), clock


def test_first_copies_are_sent_then_later_fetchers_are_pointed_at_the_holders():
    ration, _ = make(copies=2)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") is None
    for peer in "AB":
        ration.finished(ART, C1, peer, ok=True)
    assert ration.decide(ART, C1, "C") == ("A", "B")
    assert ration.refusals == 1
    assert ration.copies_sent(ART, C1) == 2
    # another chunk of the same artifact has its own count
    assert ration.decide(ART, C2, "C") is None


def test_a_peer_that_already_got_a_chunk_gets_it_again():
    ration, _ = make(copies=1)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "A") is None  # a retry after a failed write
    assert ration.copies_sent(ART, C1) == 1


def test_one_copy_of_each_chunk_before_any_second_however_long_it_is_in_flight():
    """Super-seeding: while the only copy of a chunk is on its way, every other fetcher is pointed at its
    receiver, however long the copy takes (the old rule served them anyway after patience_s of refusals)."""
    ration, clock = make(copies=1, patience_s=5.0)
    assert ration.decide(ART, C1, "A") is None
    for _ in range(10):
        clock.now += 3.0  # 30 s of a slow first copy
        assert ration.decide(ART, C1, "B") == ()  # nobody to name yet (A is still receiving it): come back
        assert ration.would_refuse(ART, C1, "B")
    ration.finished(ART, C1, "A", ok=True)
    assert ration.decide(ART, C1, "B") == ("A",)  # now A has it
    assert ration.copies_sent(ART, C1) == 1


def test_a_further_copy_goes_out_patience_after_the_latest_copy_completed():
    ration, clock = make(copies=1, patience_s=5.0, patience_factor=0.0)  # (the send-time factor: below)
    assert ration.decide(ART, C1, "A") is None
    clock.now += 8.0
    ration.finished(ART, C1, "A", ok=True)  # A has it now: it may re-share it
    clock.now += 4.9
    assert ration.decide(ART, C1, "B") == ("A",)
    clock.now += 0.2
    assert not ration.would_refuse(ART, C1, "B")
    assert ration.decide(ART, C1, "B") is None  # A had 5 s to serve B and did not: B gets its own copy
    assert ration.copies_sent(ART, C1) == 2
    assert ration.decide(ART, C1, "C") == ("A",)  # B's copy in flight: C is told of A only
    ration.finished(ART, C1, "B", ok=True)
    clock.now += 1.0
    assert set(ration.decide(ART, C1, "C")) == {"A", "B"}  # patience counts from B's completion


def test_a_copy_that_failed_to_go_out_no_longer_counts():
    ration, clock = make(copies=1)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") == ()
    ration.finished(ART, C1, "A", ok=False)  # A went away mid-send
    assert ration.copies_sent(ART, C1) == 0
    assert ration.decide(ART, C1, "B") is None  # the next fetcher gets the copy at once
    assert ration.copies_sent(ART, C1) == 1


def test_holders_names_completed_copies_first_without_counting_a_refusal():
    ration, clock = make(copies=2)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") is None
    ration.finished(ART, C1, "B", ok=True)
    assert ration.holders(ART, C1) == ("B",)  # A is still receiving it: not named
    assert ration.refusals == 0
    assert ration.holders(ART, C2) == () and ration.holders(None, C1) == ()


def test_would_refuse_counts_nothing():
    ration, _ = make(copies=1)
    assert not ration.would_refuse(ART, C1, "A")
    assert ration.copies_sent(ART, C1) == 0  # asking did not take the copy
    assert ration.decide(ART, C1, "A") is None
    assert ration.would_refuse(ART, C1, "B") and not ration.would_refuse(ART, C1, "A")  # A's retry is served
    assert ration.refusals == 0


def test_legacy_rule_serves_a_refused_fetcher_patience_after_its_first_refusal():
    """`node.swarm = "legacy"`: the previous rule, kept measurable: patience counts from the fetcher's first
    refusal, and a copy counts as made when it is allowed (finished does nothing)."""
    ration, clock = make(legacy=True, copies=1, patience_s=5.0)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") == ("A",)
    clock.now += 4.9
    assert ration.decide(ART, C1, "B") == ("A",)  # patience counts from the FIRST refusal
    clock.now += 0.2
    assert ration.decide(ART, C1, "B") is None  # although A's copy may still be in flight
    assert ration.copies_sent(ART, C1) == 2
    ration.finished(ART, C1, "A", ok=False)
    assert ration.copies_sent(ART, C1) == 2  # a failed send still counted, as before
    assert set(ration.decide(ART, C1, "C")) == {"A", "B"}


def test_requests_without_an_artifact_and_a_zero_ration_are_never_refused():
    ration, _ = make(copies=1)
    for peer in "ABCDEFG":
        assert ration.decide(None, C1, peer) is None
    off, _ = make(copies=0)
    for peer in "ABCDEFG":
        assert off.decide(ART, C1, peer) is None


def test_counts_are_forgotten_after_the_artifact_goes_idle():
    ration, clock = make(copies=1, idle_reset_s=60.0)
    assert ration.decide(ART, C1, "A") is None
    clock.now += 61
    assert ration.decide(ART, C1, "B") is None  # a new wave of fetchers: the count restarted
    assert ration.copies_sent(ART, C1) == 1


def test_holders_named_are_bounded():
    ration, _ = make(copies=8)
    holders = [f"P{i}" for i in range(8)]
    for peer in holders:
        assert ration.decide(ART, C1, peer) is None
        ration.finished(ART, C1, peer, ok=True)
    named = ration.decide(ART, C1, "late")
    assert len(named) == limits.MAX_HOLDER_HINTS < len(holders)
    assert set(named) <= set(holders) and len(set(named)) == len(named)


def test_tracked_artifacts_are_bounded():
    ration, _ = make(copies=1)
    for i in range(RationTuning().max_artifacts + 10):
        ration.decide(Cid.of(f"artifact-{i}".encode()), C1, "A")
    assert len(ration._artifacts) == RationTuning().max_artifacts
    # the oldest were forgotten: a new fetcher of artifact-0 is served as if it were the first
    assert ration.decide(Cid.of(b"artifact-0"), C1, "B") is None


def test_copies_held_by_peers_no_longer_connected_no_longer_count():
    """A holder that left cannot re-share: its copy is forgotten and the next fetcher is served at once."""
    connected = {"A", "B"}
    ration = UploadRation(RationTuning(copies=1, patience_s=60.0), clock=Clock(), present=connected.__contains__)
    assert ration.decide(ART, C1, "A") is None
    ration.finished(ART, C1, "A", ok=True)
    assert ration.decide(ART, C1, "B") == ("A",)
    connected.discard("A")  # A's connection closed
    assert ration.holders(ART, C1) == ()
    assert not ration.would_refuse(ART, C1, "B")
    assert ration.decide(ART, C1, "B") is None and ration.copies_sent(ART, C1) == 1


def test_a_slow_copy_earns_its_holders_a_longer_patience_up_to_a_bound():
    """The patience after a copy completed is patience_factor times its send time when that is longer than
    patience_s, at most patience_max_s: an 8 s copy gives its holder 16 s to pass the chunk on, a 30 s one
    only patience_max_s (fetchers give a rationing peer up after fetch.ration_give_up_s)."""
    ration, clock = make(copies=1, patience_s=5.0, patience_factor=2.0, patience_max_s=20.0)
    assert ration.decide(ART, C1, "A") is None
    clock.now += 8.0
    ration.finished(ART, C1, "A", ok=True)
    clock.now += 15.9
    assert ration.decide(ART, C1, "B") == ("A",)
    clock.now += 0.2
    assert ration.decide(ART, C1, "B") is None
    assert ration.decide(ART, C2, "A") is None
    clock.now += 30.0
    ration.finished(ART, C2, "A", ok=True)
    clock.now += 19.9
    assert ration.decide(ART, C2, "B") == ("A",)
    clock.now += 0.2
    assert ration.decide(ART, C2, "B") is None


def test_holders_behind_nats_get_longer_to_re_share_and_the_fetchers_patience_still_outlasts_it():
    """Issue 26: a fetcher reaches a holder behind a NAT through its relay and waits for the hole punch before the
    chunk can flow, so when every holder is private the patience is ration.private_holder_extra_s longer; one
    public holder is enough for the usual patience. The longest patience stays below fetch.ration_give_up_s,
    after which fetchers take a rationing peer for a liar."""
    from kvswap.node.tuning import FetchTuning

    t = RationTuning()
    assert t.patience_max_s + t.private_holder_extra_s < FetchTuning().ration_give_up_s
    behind_nat = {"A", "B"}
    clock = Clock()
    ration = UploadRation(RationTuning(copies=1, patience_s=5.0, patience_factor=0.0), clock=clock,
                          rng=random.Random(0), private=lambda peer: peer in behind_nat)
    assert ration.decide(ART, C1, "A") is None
    ration.finished(ART, C1, "A", ok=True)
    clock.now += 5.0 + t.private_holder_extra_s - 0.1
    assert ration.decide(ART, C1, "C") == ("A",)  # A is behind a NAT: C is still pointed at it
    clock.now += 0.2
    assert ration.decide(ART, C1, "C") is None  # ...until the longer patience ran out
    assert ration.decide(ART, C2, "P") is None  # a public holder
    ration.finished(ART, C2, "P", ok=True)
    clock.now += 5.1
    assert ration.decide(ART, C2, "C") is None  # the usual patience


def test_only_a_seed_rations_a_node_fetching_the_artifact_serves_freely():
    """A node that stored chunks of an artifact lately is one of its swarm's fetchers: it does not ration it
    (pointing fetchers from holder to holder made them give chunks up); once it has not received any for
    ration.idle_reset_s it is a seed of it, and rations again. The legacy rule rations everywhere."""
    ration, clock = make(copies=1, idle_reset_s=60.0)
    ration.note_received(ART)
    for peer in "ABC":
        assert ration.decide(ART, C1, peer) is None and not ration.would_refuse(ART, C1, peer)
    clock.now += 61.0
    assert ration.decide(ART, C1, "D") is None
    assert ration.decide(ART, C1, "E") == ()  # a seed again: D's copy is in flight
    legacy, _ = make(legacy=True, copies=1)
    legacy.note_received(ART)
    assert legacy.decide(ART, C1, "A") is None and legacy.decide(ART, C1, "B") == ("A",)
