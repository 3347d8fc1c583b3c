"""node/fetchplan.py: every retry, ration, provider and slow-provider rule of a fetch, alone (fake clock, no network)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import NotFound
from kvswap.node.fetchplan import (
    Aborted,
    CancelRequest,
    ChunkCorrupt,
    ChunkLacked,
    ChunkRationed,
    ChunkReceived,
    ChunkStored,
    Done,
    Failed,
    FetchBlob,
    FetchPlan,
    FindProviders,
    ListPeers,
    LookupDone,
    PathOpen,
    PathWait,
    PeersSeen,
    ProvideChunk,
    RequestChunks,
    RequestEnded,
    Tick,
    WaitUntil,
)
from kvswap.node.tuning import FetchTuning

T = FetchTuning()  # the defaults; a test varies one with plan(tuning={...})

ART = Cid.of(b"artifact")
MiB = 1 << 20


def blobs(n: int, size: int = 100) -> list[FetchBlob]:
    return [FetchBlob(Cid.of(f"chunk {i}".encode()), 16 * i, 16 * (i + 1), size) for i in range(n)]


def plan(n: int = 1, peers=("A",), size: int = 100, parallel: int = 1, **kw) -> FetchPlan:
    tuning = replace(T, parallel_chunks=parallel, **kw.pop("tuning", {}))
    return FetchPlan(blobs(n, size), peers, artifact=ART, tuning=tuning, rng=random.Random(0), **kw)


def requests(actions) -> list[RequestChunks]:
    return [a for a in actions if isinstance(a, RequestChunks)]


def only_request(actions) -> RequestChunks:
    (req,) = requests(actions)
    return req


def wait_of(actions) -> float:
    (wait,) = [a for a in actions if isinstance(a, WaitUntil)]
    return wait.when


class Sim:
    """Feeds a plan events and keeps what a driver would: the requests in flight, the last answer."""

    def __init__(self, p: FetchPlan) -> None:
        self.plan = p
        self.inflight: dict[int, RequestChunks] = {}
        self.out: list = []

    def apply(self, event, now: float) -> list:
        if isinstance(event, RequestEnded):
            self.inflight.pop(event.request, None)
        self.out = self.plan.apply(event, now)
        self.inflight.update((r.request, r) for r in requests(self.out))
        return self.out

    def only(self) -> RequestChunks:
        """The one request in flight."""
        (req,) = self.inflight.values()
        return req

    def miss(self, now: float, rationed: tuple[str, ...] | None = None) -> list:
        """The request in flight answers ChunkMissing (rationed when `rationed` is given) for every chunk."""
        req = self.only()
        for blob in req.blobs:
            ev = ChunkLacked(req.request, blob.cid) if rationed is None else \
                ChunkRationed(req.request, blob.cid, rationed)
            self.apply(ev, now)
        return self.apply(RequestEnded(req.request), now)

    def fail(self, now: float, why: str = "stalled") -> list:
        return self.apply(RequestEnded(self.only().request, failure=why), now)


def test_a_plan_with_nothing_to_fetch_is_done_at_once():
    assert plan(0).apply(Tick(), 0.0) == [Done()]


def test_every_chunk_fetched_once_then_done_and_each_stored_chunk_provided():
    p = plan(3, peers=("A",), parallel=4)
    reqs = requests(p.apply(Tick(), 0.0))
    assert {r.peer for r in reqs} == {"A"}
    assert sorted(b.cid for r in reqs for b in r.blobs) == sorted(b.cid for b in blobs(3))  # each asked once
    provided, out = [], []
    for req in reqs:
        for blob in req.blobs:
            p.apply(ChunkReceived(req.request, blob.cid, blob.stored_size), 0.1)
        assert Done() not in p.apply(RequestEnded(req.request), 0.1)
        for blob in req.blobs:
            out = p.apply(ChunkStored(blob.cid), 0.2)
            provided += [a.cid for a in out if isinstance(a, ProvideChunk)]
    assert out[-1] == Done()
    assert sorted(provided) == sorted(b.cid for b in blobs(3))
    assert (p.chunks_done, p.bytes_done, p.providers()) == (3, 300, {"A": 3})


def test_done_waits_for_requests_still_in_flight():
    p = plan(1, peers=("A",))
    req = only_request(p.apply(Tick(), 0.0))
    p.apply(ChunkReceived(req.request, req.blobs[0].cid, 100), 0.0)
    assert Done() not in p.apply(ChunkStored(req.blobs[0].cid), 0.0)  # the request has not ended yet
    assert p.apply(RequestEnded(req.request), 0.0) == [Done()]


def test_chunks_are_asked_in_a_random_order():
    def first_order(seed: int) -> tuple:
        p = FetchPlan(blobs(8), ["A"], artifact=ART, rng=random.Random(seed))
        return tuple(b.cid for r in requests(p.apply(Tick(), 0.0)) for b in r.blobs)

    orders = {first_order(seed) for seed in range(5)}
    assert len(orders) > 1


def test_requests_in_flight_are_capped_and_spread_over_the_least_busy_peers():
    sim = Sim(plan(40, peers=("A", "B", "C"), parallel=4))
    sim.apply(Tick(), 0.0)
    assert [r.peer for r in sim.inflight.values()] == ["A", "B", "C", "A"]
    assert not requests(sim.apply(Tick(), 0.5))  # every slot is taken
    b_request = next(r for r in sim.inflight.values() if r.peer == "B")
    for blob in b_request.blobs:
        sim.apply(ChunkReceived(b_request.request, blob.cid, blob.stored_size), 0.6)
    # B's slot frees: B (nothing in flight) is the least busy peer now, before C (one) and A (two)
    assert only_request(sim.apply(RequestEnded(b_request.request), 0.6)).peer == "B"
    assert len(sim.inflight) == 4


def test_batches_hold_at_most_fetch_batch_chunks_and_shrink_as_the_queue_drains():
    p = plan(200, peers=("A",), parallel=1)
    assert len(only_request(p.apply(Tick(), 0.0)).blobs) == T.batch_chunks
    small = plan(6, peers=("A",), parallel=4)
    # after the first chunk 5 wait: ceil(5 / (2 x 4)) = 1 chunk per request, so the four slots share them
    assert [len(r.blobs) for r in requests(small.apply(Tick(), 0.0))] == [1, 1, 1, 1]
    mid = plan(9, peers=("A",), parallel=2)
    # 8 waiting after the first: ceil(8 / 4) = 2 per request
    assert [len(r.blobs) for r in requests(mid.apply(Tick(), 0.0))] == [2, 2]


def test_a_batch_closes_once_it_reaches_fetch_batch_bytes():
    p = plan(40, peers=("A",), size=T.batch_bytes // 2, parallel=1)
    assert len(only_request(p.apply(Tick(), 0.0)).blobs) == 2  # 2 x half the cap reaches it: no third
    huge = plan(10, peers=("A",), size=T.batch_bytes + 1, parallel=1)
    assert len(only_request(huge.apply(Tick(), 0.0)).blobs) == 1  # a chunk over the cap goes alone


def test_deadline_is_progress_based_min_time_plus_bytes_at_the_slowest_rate():
    req = only_request(plan(40, peers=("A",), size=MiB, parallel=1).apply(Tick(), 10.0))
    nbytes = sum(b.stored_size for b in req.blobs)
    assert req.deadline == pytest.approx(10.0 + T.request_min_timeout_s + nbytes / T.min_rate_bytes_s)
    # the 6.5 MB chunk a 25 Mbit/s link shared by 30 fetchers took past the old 60 s is given its time
    big = only_request(plan(1, peers=("A",), size=6_500_000).apply(Tick(), 0.0))
    assert big.deadline > 60.0


def test_legacy_deadline_is_chunk_timeout_per_chunk():
    legacy = {"chunk_timeout_s": 60.0}
    req = only_request(plan(40, peers=("A",), parallel=1, tuning=legacy).apply(Tick(), 10.0))
    assert req.deadline == 10.0 + 60.0 * len(req.blobs)


def test_a_dropped_peer_is_asked_again_as_a_chunks_last_holder_a_bounded_number_of_times():
    """A provider dropped for failures (a slow link timing out) that is the only holder of a chunk is asked
    fetch.last_holder_asks more times before the fetch looks the chunk up and fails."""
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    now = 0.0
    for _ in range(T.max_provider_failures):
        assert sim.only().peer == "A"
        sim.fail(now)
        now += 1.0
    assert sim.plan.peers["A"].failures == T.max_provider_failures  # dropped
    for _ in range(T.last_holder_asks):  # ...but the only one: asked again
        assert sim.only().peer == "A"
        out = sim.fail(now)
        now += 1.0
    assert not sim.inflight and any(isinstance(a, FindProviders) for a in out)  # then looked up
    assert not requests(sim.apply(Tick(), now + 100.0))


def test_a_dropped_peer_is_not_asked_while_a_live_peer_may_be():
    sim = Sim(plan(1, peers=("A", "B")))
    sim.apply(Tick(), 0.0)
    sim.plan.peers["A"].failures = T.max_provider_failures
    assert sim.only().peer in ("A", "B")
    assert not sim.plan._may_ask("A", next(iter(sim.plan.blobs)))  # B is alive and may be asked


def test_lacking_peer_is_asked_again_after_lack_retry_doubling_then_given_up_for_that_chunk():
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    cid = sim.only().blobs[0].cid
    now = 0.0
    for ask in range(1, T.max_lack_asks):
        assert not requests(sim.miss(now))
        retry = T.lack_retry_s * 2 ** (ask - 1)
        assert not requests(sim.apply(Tick(), now + retry - 1e-6))  # not before its time
        now += retry
        assert only_request(sim.apply(Tick(), now)).peer == "A"
    # the fetch.max_lack_asks-th miss: A is never asked for it again; nobody else can serve it -> DHT lookup
    out = sim.miss(now)
    assert FindProviders(cid) in out and not requests(out)
    assert not requests(sim.apply(Tick(), now + 1000.0))


def test_a_peer_that_lacks_one_chunk_is_still_asked_for_others():
    sim = Sim(plan(2, peers=("A",), parallel=2))
    sim.apply(Tick(), 0.0)
    assert len(sim.inflight) == 2  # one chunk per request
    first, second = sim.inflight.values()
    sim.apply(ChunkLacked(first.request, first.blobs[0].cid), 0.0)
    sim.apply(RequestEnded(first.request), 0.0)
    sim.apply(ChunkReceived(second.request, second.blobs[0].cid, 100), 0.0)
    sim.apply(RequestEnded(second.request), 0.0)
    assert sim.apply(ChunkStored(second.blobs[0].cid), 0.0)[0] == ProvideChunk(second.blobs[0].cid)
    assert sim.plan.peers["A"].failures == 0


def test_refused_request_counts_as_lacking_every_unanswered_chunk():
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    out = sim.apply(RequestEnded(sim.only().request, refused=True), 0.0)
    assert sim.plan.peers["A"].failures == 0  # lacking is no offence
    assert not requests(out)
    assert wait_of(out) == pytest.approx(T.lack_retry_s)


def test_lacked_chunk_goes_to_another_peer_first():
    sim = Sim(plan(1, peers=("A", "B")))
    sim.apply(Tick(), 0.0)
    assert sim.only().peer == "A"
    assert only_request(sim.miss(0.0)).peer == "B"


def test_named_holders_first_and_a_rationing_peer_again_after_ration_retry():
    sim = Sim(plan(1, peers=("A", "B")))
    sim.apply(Tick(), 0.0)
    assert sim.only().peer == "A"
    out = sim.miss(0.0, rationed=("H",))
    assert "H" in sim.plan.peers  # the named holder joined the fetch
    assert only_request(out).peer == "H"  # named holders first, before the untried B
    assert only_request(sim.miss(0.1)).peer == "B"  # H lacks it (until 0.3), A rations it (until 0.5)
    out = sim.miss(0.2)  # B lacks it until 0.4
    assert not requests(out)
    assert wait_of(out) == pytest.approx(0.1 + T.lack_retry_s)  # the soonest: H
    assert only_request(sim.apply(Tick(), 0.31)).peer == "H"
    sim.miss(0.31)  # H lacks it again: until 0.31 + 2 x fetch.lack_retry_s
    assert not requests(sim.apply(Tick(), 0.39))
    assert only_request(sim.apply(Tick(), 0.41)).peer == "B"
    sim.miss(0.41)  # B lacks it again: until 0.81
    assert not requests(sim.apply(Tick(), T.ration_retry_s - 0.01))
    assert only_request(sim.apply(Tick(), T.ration_retry_s)).peer == "A"  # A's ration retry is due
    assert sim.plan.peers["A"].failures == 0


def test_a_rationed_answer_naming_nobody_is_busy_for_that_chunk_and_never_given_up():
    """The sender's upload slots were full and nobody else has the chunk yet (node/uploads.py): asked again
    after fetch.busy_retry_s, however long that lasts (a crowded publisher is slow, not lying)."""
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    now = 0.0
    for _ in range(3 * int(T.ration_give_up_s / T.busy_retry_s)):
        out = sim.miss(now, rationed=())
        assert wait_of(out) == pytest.approx(now + T.busy_retry_s)
        assert not requests(sim.apply(Tick(), now + T.busy_retry_s - 0.01))
        now += T.busy_retry_s
        assert only_request(sim.apply(Tick(), now)).peer == "A"
    assert now > 2 * T.ration_give_up_s and sim.plan.peers["A"].failures == 0


def test_failed_requests_penalise_and_drop_a_peer_after_max_provider_failures():
    sim = Sim(plan(1, peers=("A", "B"), tuning={"last_holder_asks": 0}))  # (last holders: tested below)
    sim.apply(Tick(), 0.0)
    assert sim.only().peer == "A"
    assert only_request(sim.fail(0.0)).peer == "B"  # the untried one before a retry of the failed one
    assert only_request(sim.fail(1.0)).peer == "A"  # both tried and failed once: the earlier known
    assert (sim.plan.peers["A"].failures, sim.plan.peers["B"].failures) == (1, 1)
    assert only_request(sim.fail(2.0)).peer == "B"
    assert sim.plan.peers["A"].failures == T.max_provider_failures  # A is dropped
    out = sim.fail(3.0)  # B is dropped too: nobody can serve the chunk -> look it up in the DHT
    assert FindProviders(sim.plan.blobs and next(iter(sim.plan.blobs))) in out and not requests(out)
    assert not requests(sim.apply(Tick(), 100.0))  # dropped peers are not asked again, however long


def test_corrupt_chunk_penalises_its_sender_and_goes_to_another_peer():
    sim = Sim(plan(1, peers=("A", "B")))
    sim.apply(Tick(), 0.0)
    req = sim.only()
    bad = req.blobs[0]
    sim.apply(ChunkReceived(req.request, bad.cid, bad.stored_size), 0.0)
    assert not requests(sim.apply(RequestEnded(req.request), 0.0))
    out = sim.apply(ChunkCorrupt(bad.cid, "hash mismatch"), 0.0)
    assert sim.plan.peers["A"].failures == 1
    nxt = only_request(out)
    assert nxt.blobs[0].cid == bad.cid and nxt.peer == "B"


def test_corrupt_chunk_goes_to_the_front_of_the_queue():
    sim = Sim(plan(5, peers=("A", "B"), parallel=1))
    sim.apply(Tick(), 0.0)
    req = sim.only()
    bad = req.blobs[0]
    sim.apply(ChunkReceived(req.request, bad.cid, bad.stored_size), 0.0)
    for blob in req.blobs[1:]:
        sim.apply(ChunkReceived(req.request, blob.cid, blob.stored_size), 0.0)
    nxt = only_request(sim.apply(RequestEnded(req.request), 0.0))
    assert bad.cid not in [b.cid for b in nxt.blobs]
    sim.apply(ChunkCorrupt(bad.cid, "hash mismatch"), 0.0)
    after = only_request(sim.apply(RequestEnded(nxt.request), 0.0))
    assert after.blobs[0].cid == bad.cid


def test_nobody_can_serve_a_chunk_then_dht_lookup_then_not_found():
    sim = Sim(plan(1, peers=("A",), tuning={"last_holder_asks": 0}))
    sim.apply(Tick(), 0.0)
    cid = sim.only().blobs[0].cid
    sim.fail(0.0, "x")
    out = sim.fail(0.0, "y")  # A dropped
    assert FindProviders(cid) in out
    assert FindProviders(cid) not in sim.apply(Tick(), 0.5)  # one lookup per chunk
    (failed,) = sim.apply(LookupDone(cid, ()), 1.0)
    assert isinstance(failed, Failed) and isinstance(failed.error, NotFound)
    assert cid.short() in str(failed.error) and ART.short() in str(failed.error)


def test_a_dht_lookup_that_finds_a_provider_continues_the_fetch():
    sim = Sim(plan(1, peers=("A",), tuning={"last_holder_asks": 0}))
    sim.apply(Tick(), 0.0)
    cid = sim.only().blobs[0].cid
    sim.fail(0.0)
    assert FindProviders(cid) in sim.fail(0.0)
    assert only_request(sim.apply(LookupDone(cid, ("Z",)), 1.0)).peer == "Z"


def test_lookups_in_flight_are_capped():
    sim = Sim(plan(10, peers=("A",), parallel=2))
    sim.apply(Tick(), 0.0)
    finds = []
    while sim.inflight:  # A fails every request: dropped after fetch.max_provider_failures
        request = next(iter(sim.inflight))
        finds += [a for a in sim.apply(RequestEnded(request, failure="x"), 0.0) if isinstance(a, FindProviders)]
    finds += [a for a in sim.apply(Tick(), 0.0) if isinstance(a, FindProviders)]
    assert len(finds) == 2  # fetch.parallel_chunks of this plan, not one per chunk


def test_connected_peers_join_every_refresh_interval():
    sim = Sim(plan(1, peers=("A",)))
    out = sim.apply(Tick(), 0.0)
    assert ListPeers() not in out
    assert wait_of(out) == T.peer_refresh_s
    assert ListPeers() in sim.apply(Tick(), T.peer_refresh_s)
    assert ListPeers() not in sim.apply(Tick(), T.peer_refresh_s + 0.5)
    sim.apply(PeersSeen(("B", "C", "A")), 1.5)
    assert list(sim.plan.peers) == ["A", "B", "C"]


def test_peers_tracked_are_bounded_and_never_include_this_node():
    sim = Sim(plan(1, peers=["me", *(f"P{i}" for i in range(T.max_peers + 10))], me="me"))
    assert "me" not in sim.plan.peers and len(sim.plan.peers) == T.max_peers
    sim.apply(Tick(), 0.0)
    sim.miss(0.0, rationed=("me", "new"))
    assert "me" not in sim.plan.peers and "new" not in sim.plan.peers  # full


def test_abort_fails_the_fetch_with_its_error():
    p = plan(2, peers=("A",))
    p.apply(Tick(), 0.0)
    err = OSError("disk full")
    assert p.apply(Aborted(err), 0.0) == [Failed(err)]
    assert p.apply(Tick(), 1.0) == [Failed(err)]  # it stays failed


def test_answers_for_chunks_not_in_the_request_change_nothing():
    sim = Sim(plan(2, peers=("A",), parallel=1))
    sim.apply(Tick(), 0.0)
    req = sim.only()
    asked = {b.cid for b in req.blobs}
    other = next((b for b in blobs(2) if b.cid not in asked), None)
    if other is not None:
        sim.apply(ChunkReceived(req.request, other.cid, 100), 0.0)
        assert ProvideChunk(other.cid) not in sim.apply(ChunkStored(other.cid), 0.0)
    sim.apply(ChunkLacked(req.request + 99, req.blobs[0].cid), 0.0)  # an unknown request
    assert ProvideChunk(req.blobs[0].cid) not in sim.apply(ChunkStored(req.blobs[0].cid), 0.0)  # not received
    assert sim.plan.chunks_done == 0


def test_throughput_is_measured_per_peer():
    sim = Sim(plan(1, peers=("A",)))
    assert sim.plan.peers["A"].throughput is None
    sim.apply(Tick(), 0.0)
    req = sim.only()
    sim.apply(ChunkReceived(req.request, req.blobs[0].cid, 4 * MiB), 1.0)
    sim.apply(RequestEnded(req.request), 2.0)
    assert sim.plan.peers["A"].throughput == pytest.approx(2 * MiB)


def test_wait_until_is_the_soonest_retry_or_refresh():
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    assert wait_of(sim.miss(0.0)) == pytest.approx(T.lack_retry_s)
    busy = Sim(plan(1, peers=("A",)))
    busy.apply(Tick(), 0.0)
    r = busy.only()
    out = busy.apply(ChunkReceived(r.request, r.blobs[0].cid, 100), 0.0)
    assert wait_of(out) == T.peer_refresh_s < math.inf  # only the peer refresh is due


# --- slow and lying providers (issue 15) ---------------------------------------------------------------------


def _answer_all(sim: Sim, req: RequestChunks, now: float) -> list:
    """`req`'s peer sends every chunk of it, which verifies; the request ends at `now`."""
    for blob in req.blobs:
        sim.apply(ChunkReceived(req.request, blob.cid, blob.stored_size), now)
    out = sim.apply(RequestEnded(req.request), now)
    for blob in req.blobs:
        out = sim.apply(ChunkStored(blob.cid), now)
    return out


def _of(sim: Sim, peer: str) -> list[RequestChunks]:
    return [r for r in sim.inflight.values() if r.peer == peer]


def test_legacy_deadline_follows_the_peers_measured_rate_within_its_bounds():
    size = 4 * MiB
    legacy = replace(T, chunk_timeout_s=60.0)
    sim = Sim(plan(40, peers=("A",), size=size, parallel=1, tuning={"chunk_timeout_s": 60.0}))
    sim.apply(Tick(), 0.0)
    first = sim.only()
    assert first.deadline == legacy.chunk_timeout_s * len(first.blobs)  # unmeasured: the ceiling
    _answer_all(sim, first, len(first.blobs) * 1.0)  # 1 chunk (4 MiB) per second: 4 MiB/s
    nxt = sim.only()
    expected = T.late_factor * len(nxt.blobs) * size / (4 * MiB)
    assert nxt.deadline - len(first.blobs) * 1.0 == pytest.approx(
        min(legacy.chunk_timeout_s * len(nxt.blobs), max(T.request_min_timeout_s, expected)))


def _fast_and_stalling(n: int = 40, parallel: int = 2) -> tuple[Sim, RequestChunks]:
    """A and S each get a request at 0; A answers at 0.01 (measured fast); S says nothing."""
    sim = Sim(plan(n, peers=("A", "S"), parallel=parallel))
    sim.apply(Tick(), 0.0)
    (stalled,) = _of(sim, "S")
    _answer_all(sim, _of(sim, "A")[0], 0.01)
    return sim, stalled


def test_an_overdue_request_frees_its_slot_and_its_peer_gets_no_new_work():
    sim, stalled = _fast_and_stalling()
    assert len(sim.inflight) == 2  # A's next request and S's stalled one
    out = sim.apply(Tick(), 0.05)  # overdue (4 x what A would take), not yet late (fetch.late_min_s)
    assert not [a for a in out if isinstance(a, CancelRequest)]
    new = requests(out)
    assert new and all(r.peer == "A" for r in new)  # S's slot went to A; S got nothing new
    assert stalled.request in sim.inflight and len(sim.inflight) == 3


def test_a_late_request_is_cancelled_its_peer_marked_slow_and_its_chunks_asked_of_a_faster_peer_first():
    sim, stalled = _fast_and_stalling()
    sim.apply(Tick(), 0.05)
    out = sim.apply(Tick(), T.late_min_s)
    assert CancelRequest(stalled.request) in out
    assert sim.plan.peers["S"].slow == 1 and sim.plan.peers["S"].failures == 0  # slowness is no lie
    sim.inflight.pop(stalled.request)
    taken = {b.cid for r in requests(out) for b in r.blobs}
    assert {b.cid for b in stalled.blobs} <= taken | set(sim.plan._pending)
    assert all(r.peer == "A" for r in requests(out))
    assert sim.apply(RequestEnded(stalled.request, failure="cancelled"), 0.3) and sim.plan.peers["S"].failures == 0
    for req in list(sim.inflight.values()):  # from now on A serves, S is asked nothing
        _answer_all(sim, req, 0.3)
        assert all(r.peer == "A" for r in sim.inflight.values())


def test_a_request_waiting_for_its_path_is_not_late_and_its_lateness_counts_from_the_open():
    """Behind NAT (issue 26): S is connected only through a relay and the request waits for the hole punch. Counted
    from the request it would be late after fetch.late_min_s, cancelled, and S a bad hint; it is not while it
    waits, and from the open on it is measured like any other."""
    sim = Sim(plan(40, peers=("A", "S"), parallel=2))
    sim.apply(Tick(), 0.0)
    (waiting,) = _of(sim, "S")
    sim.apply(PathWait(waiting.request), 0.0)
    _answer_all(sim, _of(sim, "A")[0], 0.01)
    for now in (0.05, T.late_min_s, 5.0, 15.0):  # a hole punch under load took 4-39 s
        out = sim.apply(Tick(), now)
        assert CancelRequest(waiting.request) not in out and waiting.request in sim.inflight
        assert sim.plan.peers["S"].slow == 0
        for req in requests(out):
            _answer_all(sim, req, now)
    sim.apply(PathOpen(waiting.request), 15.0)
    assert CancelRequest(waiting.request) not in sim.apply(Tick(), 15.05)  # overdue from the open, not yet late
    assert CancelRequest(waiting.request) in sim.apply(Tick(), 15.0 + T.late_min_s)  # ...now it is
    assert sim.plan.peers["S"].slow == 1 and sim.plan.peers["S"].failures == 0


def test_in_the_end_game_an_overdue_request_is_cancelled_at_once():
    sim, stalled = _fast_and_stalling(n=2)  # one chunk each: after A's, only S's chunk is left
    assert not sim.plan._pending
    out = sim.apply(Tick(), 0.05)  # overdue, below fetch.late_min_s
    assert CancelRequest(stalled.request) in out
    assert only_request(out).peer == "A" and only_request(out).blobs == stalled.blobs


def test_no_cancel_without_another_peer_to_ask():
    sim = Sim(plan(4, peers=("S",), parallel=1))
    sim.apply(Tick(), 0.0)
    assert not [a for a in sim.apply(Tick(), 100.0) if isinstance(a, CancelRequest)]  # nobody measured, nobody else


def test_a_late_chunk_missing_marks_the_peer_slow():
    sim, stalled = _fast_and_stalling(parallel=2)
    sim.apply(ChunkLacked(stalled.request, stalled.blobs[0].cid), 55.0)  # answered, but 55 s on
    assert sim.plan.peers["S"].slow >= 1  # for the late answer (and the request is cancelled as late too)
    quick = Sim(plan(2, peers=("A", "S"), parallel=2))
    quick.apply(Tick(), 0.0)
    req = _of(quick, "S")[0]
    quick.apply(ChunkLacked(req.request, req.blobs[0].cid), 0.001)  # at once: no offence
    assert quick.plan.peers["S"].slow == 0


def test_a_busy_peer_is_asked_again_after_busy_retry_without_penalty():
    sim = Sim(plan(1, peers=("A",)))
    sim.apply(Tick(), 0.0)
    out = sim.apply(RequestEnded(sim.only().request, busy=True), 0.0)
    assert not requests(out) and wait_of(out) == pytest.approx(T.busy_retry_s)
    assert sim.plan.peers["A"].failures == 0
    assert only_request(sim.apply(Tick(), T.busy_retry_s)).peer == "A"


def _rationing_round(sim: Sim, holders: dict[int, tuple[str, ...]], now: float) -> list:
    """Every request in flight (one chunk each) is rationed, the i-th naming holders[i]; the last answer."""
    out: list = []
    for i, req in enumerate(sorted(sim.inflight.values(), key=lambda r: r.request)):
        sim.apply(ChunkRationed(req.request, req.blobs[0].cid, holders.get(i, ())), now)
        out = sim.apply(RequestEnded(req.request), now)
    return out


def test_holders_that_do_not_deliver_discredit_the_peer_that_named_them():
    sim = Sim(plan(3, peers=("R",), parallel=3))
    sim.apply(Tick(), 0.0)
    assert [len(r.blobs) for r in sim.inflight.values()] == [1, 1, 1]
    _rationing_round(sim, {0: ("H1",), 1: ("H2",), 2: ("H3",)}, 0.0)
    assert sorted(r.peer for r in sim.inflight.values()) == ["H1", "H2", "H3"]  # each for the chunk it holds
    for holder in ("H1", "H2"):  # two of them fail: two bad hints
        (req,) = _of(sim, holder)
        sim.apply(RequestEnded(req.request, failure="no such peer"), 0.1)
    assert sim.plan.peers["R"].bad_hints == T.max_bad_hints
    assert all(not sim.plan._named.get(b.cid) for b in blobs(3))  # its earlier hint (H3) is dropped too
    (h3,) = _of(sim, "H3")
    sim.apply(RequestEnded(h3.request, failure="no such peer"), 0.2)
    assert sim.plan.peers["R"].bad_hints == T.max_bad_hints  # no hint of R's is followed any more
    out = sim.apply(Tick(), T.ration_retry_s)
    assert {r.peer for r in requests(out)} == {"R"}  # back to R itself, after its ration retry
    _rationing_round(sim, {0: ("H9",)}, 0.6)
    assert "H9" not in sim.plan.peers  # what it names now is not followed


def test_a_holder_known_only_from_hints_is_asked_only_for_the_chunks_it_was_named_for():
    sim = Sim(plan(3, peers=("A",), parallel=3))
    sim.apply(Tick(), 0.0)
    first = min(sim.inflight.values(), key=lambda r: r.request).blobs[0]
    out = _rationing_round(sim, {0: ("H",)}, 0.0)
    assert [(r.peer, r.blobs) for r in sim.inflight.values()] == [("H", (first,))]  # H, for its chunk only
    sim.miss(0.01)  # H lacks it (for now: asked again after fetch.lack_retry_s)
    assert not requests(sim.apply(Tick(), 0.1))  # no other chunk goes to H; A rations them until 0.5
    out = sim.apply(PeersSeen(("H",)), 0.15)  # H turns out to be a connected peer: an ordinary one now
    assert requests(out) and all(r.peer == "H" and first not in r.blobs for r in requests(out))


def test_a_peer_that_has_delivered_ranks_with_a_named_holder_so_a_liars_hint_does_not_steer_a_chunk_away():
    """A rationing peer names a holder nobody has vouched for; a peer that has already delivered chunks to this
    fetch is asked for the chunk first (issue 15: three providers naming bogus holders held chunks away from
    the honest one for the length of a failed dial each)."""
    sim = Sim(plan(3, peers=("L", "A"), parallel=1))
    sim.apply(Tick(), 0.0)
    first = sim.only()
    assert first.peer == "L"
    rationed = first.blobs[0].cid
    sim.apply(ChunkRationed(first.request, rationed, ("X",)), 0.0)
    sim.apply(RequestEnded(first.request), 0.0)
    while sim.inflight:
        req = sim.only()
        if rationed in {b.cid for b in req.blobs}:
            break
        assert req.peer == "A"
        _answer_all(sim, req, 0.0)
    assert req.peer == "A"  # not X, named by L for this chunk: A has delivered, X is a stranger


def test_a_peer_that_only_rations_is_asked_after_one_that_sends():
    sim = Sim(plan(20, peers=("R", "B"), parallel=1))
    sim.apply(Tick(), 0.0)
    req = sim.only()
    assert req.peer == "R"
    for blob in req.blobs:
        sim.apply(ChunkRationed(req.request, blob.cid, ()), 0.0)
    out = sim.apply(RequestEnded(req.request), 0.0)
    assert only_request(out).peer == "B"
    _answer_all(sim, sim.only(), 0.1)
    assert sim.only().peer == "B"  # R is idle and known first, but it only rations


def test_peers_that_ration_past_an_honest_nodes_patience_count_as_lacking_so_the_fetch_ends():
    """Issue 15's flaky hints test: two liars answer every chunk "rationed" naming holders that do not exist,
    and the honest provider is gone (its connection died). An honest node serves a fetcher it refused for
    ration.patience_s; a peer still rationing a chunk fetch.ration_give_up_s after it first did counts as lacking it,
    so the fetch looks the chunks up and fails with NotFound instead of asking the liars every fetch.ration_retry_s
    for ever (it spun until the test's 60 s timeout)."""
    sim = Sim(plan(4, peers=("L1", "L2", "H"), parallel=2))
    bogus = {"L1": ("X1", "X2", "X3", "X4"), "L2": ("X5", "X6", "X7", "X8")}
    asked: dict[str, int] = {}
    out, lookups, now = sim.apply(Tick(), 0.0), [], 0.0
    while now < 120 and not any(isinstance(a, (Done, Failed)) for a in out):
        lookups += [a.cid for a in out if isinstance(a, FindProviders)]
        out = []
        for req in sorted(sim.inflight.values(), key=lambda r: r.request):
            asked[req.peer] = asked.get(req.peer, 0) + 1
            if req.peer in bogus:
                for blob in req.blobs:
                    sim.apply(ChunkRationed(req.request, blob.cid, bogus[req.peer]), now)
                out += sim.apply(RequestEnded(req.request), now)
            else:  # H's connection is dead, the named holders do not exist
                out += sim.apply(RequestEnded(req.request, failure="cannot open a stream"), now)
        for cid in lookups:  # the DHT knows nobody else
            out += sim.apply(LookupDone(cid, ()), now)
        lookups = []
        now += 0.1
        out += sim.apply(Tick(), now)
    failed = [a for a in out if isinstance(a, Failed)]
    assert failed, f"still asking at {now:.1f} s: {asked}"
    assert isinstance(failed[0].error, NotFound)
    assert now < T.ration_give_up_s + 2  # not 120: the liars are given up chunk by chunk
    assert asked["L1"] + asked["L2"] <= 2 * 4 * (T.ration_give_up_s / T.ration_retry_s + 2)
    assert asked["H"] <= T.max_provider_failures + 4 * T.last_holder_asks  # then as each chunk's last holder


def test_a_holder_named_again_for_a_chunk_it_lacked_is_asked_again_from_scratch():
    """The seed names H once its copy to H has left the seed; H may still be receiving it and says it lacks
    it, fetch.max_lack_asks times. Named again by the seed, H is asked again (on 25 Mbit/s links every holder
    of some chunks was given up this way and the swarm failed)."""
    sim = Sim(plan(1, peers=("S",)))
    sim.apply(Tick(), 0.0)
    cid = sim.only().blobs[0].cid
    sim.miss(0.0, rationed=("H",))
    now = 0.0
    for _ in range(T.max_lack_asks):  # H lacks it every time it is asked
        while not [r for r in sim.inflight.values() if r.peer == "H"]:
            now += 0.05
            sim.apply(Tick(), now)
            if sim.inflight and sim.only().peer == "S":
                sim.miss(now, rationed=())  # S: still rationing, nobody to name
        sim.miss(now)
    assert sim.plan._pacing.not_before[("H", cid)] == math.inf  # lacking for good
    while not sim.inflight or sim.only().peer != "S":
        now += 0.05
        sim.apply(Tick(), now)
    sim.miss(now, rationed=("H",))  # S names H again
    assert sim.plan._pacing.not_before[("H", cid)] == now
    assert sim.only().peer == "H"


def test_a_cheaper_provider_is_asked_first_and_a_dear_one_still_serves_what_only_it_has():
    p = plan(2, peers=("dear", "cheap"), parallel=2)
    p.prices.update({"dear": 7000, "cheap": 0})
    first = requests(p.apply(Tick(), 0.0))
    assert {r.peer for r in first} == {"cheap"}  # both chunks go to the free one first
    # the cheap one lacks one of them: that chunk goes to the dear provider, the only other holder
    lacked = first[0].blobs[0].cid
    p.apply(ChunkLacked(first[0].request, lacked), 0.1)
    after = requests(p.apply(RequestEnded(first[0].request, None, False, False), 0.2))
    assert any(r.peer == "dear" and lacked in [b.cid for b in r.blobs] for r in after)
