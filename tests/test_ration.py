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


def make(**kw):
    clock = Clock()
    return UploadRation(RationTuning(**kw), clock=clock, rng=random.Random(0)), clock


def test_first_copies_are_sent_then_later_fetchers_are_pointed_at_the_holders():
    ration, _ = make(copies=2)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") is None
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


def test_a_refused_fetcher_is_served_after_the_patience():
    ration, clock = make(copies=1, patience_s=5.0)
    assert ration.decide(ART, C1, "A") is None
    assert ration.decide(ART, C1, "B") == ("A",)
    clock.now += 4.9
    assert ration.decide(ART, C1, "B") == ("A",)  # patience counts from the FIRST refusal
    clock.now += 0.2
    assert ration.decide(ART, C1, "B") is None
    assert ration.copies_sent(ART, C1) == 2
    # B is now a holder that later fetchers are told about
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
