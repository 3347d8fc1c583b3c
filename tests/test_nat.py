"""The reachability and address rules of node/nat.py, without a network (issue 26). The real thing, behind
NAT routers in network namespaces, is tests/test_testnet_nat.py."""

from __future__ import annotations

import pytest
from multiaddr import Multiaddr

from kvswap.node import nat
from kvswap.node.tuning import NatTuning

ME = "12D3KooWSRgrGyAZi8sPZGv7ekhFZc3HCjLXHz4XMsiHS64NzbgE"
RELAY = "12D3KooWNDNK59sox6JkMzonaoDnuVggv4Szp1Z84Pz6uTEGHke6"
OTHER = "12D3KooWJi2pFbXA5REVuYAf5Ajz699gUpiUygfPz3rvFfB2tCaH"


def test_reachability_needs_confirmations_and_a_majority():
    r = nat.Reachability("auto", confirmations=2)
    assert r.status == nat.UNKNOWN
    assert r.record("a", True, 1.0) == nat.UNKNOWN  # one server is not enough
    assert r.record("b", None, 2.0) == nat.UNKNOWN  # a refusal is no verdict
    assert r.record("b", True, 3.0) == nat.PUBLIC and r.changed_at == 3.0
    assert r.record("c", False, 4.0) == nat.PUBLIC  # one dissent does not flip it
    assert r.record("d", False, 5.0) == nat.PUBLIC  # a tie keeps the last answer
    assert r.record("e", False, 6.0) == nat.PRIVATE and r.changed_at == 6.0
    assert r.snapshot() == {"status": "private", "mode": "auto", "dialled_back": 2, "not_dialled_back": 3}


def test_a_server_counts_once_and_old_answers_are_forgotten():
    r = nat.Reachability("auto", confirmations=2, max_servers=3)
    for _ in range(5):
        r.record("liar", True, 0.0)
    assert r.status == nat.UNKNOWN  # one peer saying it five times is one verdict
    for s in ("a", "b", "c"):
        r.record(s, False, 1.0)
    assert set(r.verdicts) == {"a", "b", "c"} and r.status == nat.PRIVATE


def test_reachability_said_in_the_config_wins():
    for mode in ("public", "private"):
        r = nat.Reachability(mode, confirmations=1)
        r.record("a", mode != "public", 0.0)
        assert r.status == mode
    with pytest.raises(ValueError):
        nat.Reachability("sometimes")


def test_relay_service_and_reservations_follow_reachability():
    assert nat.relay_service_on("auto", nat.PUBLIC) and not nat.relay_service_on("auto", nat.UNKNOWN)
    assert not nat.relay_service_on("auto", nat.PRIVATE)
    assert nat.relay_service_on("on", nat.PRIVATE) and not nat.relay_service_on("off", nat.PUBLIC)
    with pytest.raises(ValueError):
        nat.relay_service_on("maybe", nat.PUBLIC)
    assert nat.wants_relays(nat.PRIVATE) and not nat.wants_relays(nat.PUBLIC) and not nat.wants_relays(nat.UNKNOWN)


def test_circuit_address_and_what_a_node_advertises():
    relay_addr = f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}"
    circuit = nat.circuit_addr(relay_addr, RELAY, ME)
    assert circuit == f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
    assert nat.circuit_addr("/ip4/10.77.0.11/tcp/4001", RELAY, ME) == circuit
    lan = Multiaddr("/ip4/10.88.2.2/tcp/4001")
    assert [str(a) for a in nat.advertise([lan], nat.PRIVATE, [circuit])] == [str(lan), circuit]
    assert [str(a) for a in nat.advertise([lan], nat.PUBLIC, [circuit])] == [str(lan)]  # public: direct only
    assert [str(a) for a in nat.advertise([lan], nat.UNKNOWN, [circuit])] == [str(lan)]


def test_claimed_relayed_addresses_are_checked():
    good = f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
    bad = [
        f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{OTHER}",  # someone else's circuit
        f"/ip4/10.77.0.11/tcp/4001/p2p/{ME}/p2p-circuit/p2p/{ME}",  # itself as its relay
        f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{OTHER}/p2p-circuit/p2p/{ME}",  # two hops
        f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}",  # a relay on our own loopback
        f"/ip4/0.0.0.0/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}",
        f"/p2p/{RELAY}/p2p-circuit/p2p/{ME}",  # no address for the relay
        "not a multiaddr",
    ]
    direct, relayed = nat.checked_addrs(ME, [good, *bad, "/ip4/10.88.2.2/tcp/4001"], max_relayed=4)
    assert [str(a) for a in relayed] == [good]
    assert [str(a) for a in direct] == ["/ip4/10.88.2.2/tcp/4001"]
    many = [f"/ip4/10.77.0.{i}/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}" for i in range(1, 30)]
    assert len(nat.checked_addrs(ME, many, max_relayed=4)[1]) == 4  # a peer may claim any number


def test_a_private_peer_is_dialled_directly_only_from_its_lan():
    lan = [Multiaddr("/ip4/10.88.3.2/tcp/4001")]
    relayed = [Multiaddr(f"/ip4/10.77.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}")]
    assert nat.direct_first(lan, relayed, ["10.88.2.2"]) == []  # another LAN: the relay first
    assert nat.direct_first(lan, relayed, ["10.88.3.7"]) == lan  # the same LAN: directly
    assert nat.direct_first(lan, [], ["10.77.0.12"]) == lan  # no relayed addresses: as always


def test_relay_limits_are_bounded():
    t = NatTuning()
    from kvswap.node import libp2p_compat

    limits = libp2p_compat.relay_limits(t)
    assert (limits.max_reservations, limits.max_circuit_conns) == (t.relay_max_reservations,
                                                                   t.relay_circuits_per_reservation)
    assert 0 < limits.data == t.relay_circuit_bytes and 0 < limits.duration == t.relay_circuit_duration_s
    # what a full relay may buffer: each circuit relays one read at a time in each direction
    assert t.relay_max_circuits * 2 * 64 * 1024 < 16 * 1024 * 1024
    assert t.relay_max_reservations_per_ip < t.relay_max_reservations


def test_a_node_waits_to_provide_only_while_it_may_be_private():
    assert nat.maybe_private(nat.UNKNOWN, ["10.88.2.2"], [])  # nobody has told it how it looks yet
    assert nat.maybe_private(nat.UNKNOWN, ["10.88.2.2"], ["10.77.0.13"])  # seen at another address: a NAT
    assert not nat.maybe_private(nat.UNKNOWN, ["10.88.2.2"], ["10.88.2.2"])  # seen where it listens
    assert not nat.maybe_private(nat.UNKNOWN, ["127.0.0.1"], [])  # loopback only: no NAT in between
    assert not nat.maybe_private(nat.PRIVATE, ["10.88.2.2"], ["10.77.0.13"])  # AutoNAT has answered


def test_an_autonat_server_dials_one_peer_back_only_so_often():
    """nat.autonat_dialbacks_per_peer per window for one peer, nat.autonat_dialbacks_total for all; a refusal
    is counted, the window slides, and what is remembered stays within the total whatever the peers."""
    t = NatTuning()
    limit = nat.DialBackLimit(t.autonat_dialbacks_per_peer, t.autonat_dialback_window_s, t.autonat_dialbacks_total)
    got = [limit.allow("a", 0.0 + i) for i in range(t.autonat_dialbacks_per_peer + 3)]
    assert got == [True] * t.autonat_dialbacks_per_peer + [False] * 3 and limit.refused == 3
    assert limit.allow("b", 10.0)  # another peer has its own share
    assert not limit.allow("a", t.autonat_dialback_window_s - 0.5)  # the first grant (at 0) is still in the window
    assert limit.allow("a", t.autonat_dialback_window_s + 0.5)  # ...and now it is not
    # many identities together get no more than the total, and memory stays at the total
    flood = nat.DialBackLimit(2, 60.0, 10)
    granted = sum(flood.allow(f"id{i}", 100.0) for i in range(1000))
    assert granted == 10 and flood.tracked() == 10 and len(flood._granted) == 10
    assert flood.allow("late", 161.0) and flood.tracked() == 1  # all of the flood's grants have expired


def test_a_chunk_transfer_waits_for_an_upgrade_longer_only_while_a_hole_punch_may_still_come():
    t = NatTuning()
    kw = dict(wait_s=t.upgrade_wait_s, wait_max_s=t.upgrade_wait_max_s, max_attempts=t.hole_punch_attempts)
    assert t.upgrade_wait_s < t.upgrade_wait_max_s < t.hole_punch_give_up_s
    assert not nat.upgrade_wait_over(0.0, 0, False, **kw)
    assert not nat.upgrade_wait_over(t.upgrade_wait_s - 0.1, t.hole_punch_attempts, False, **kw)  # the short wait
    assert nat.upgrade_wait_over(t.upgrade_wait_s, t.hole_punch_attempts, False, **kw)  # every punch failed: done
    assert not nat.upgrade_wait_over(t.upgrade_wait_s, t.hole_punch_attempts, True, **kw)  # the last one runs
    assert not nat.upgrade_wait_over(t.upgrade_wait_s + 5, 1, False, **kw)  # attempts left: one may still come
    assert nat.upgrade_wait_over(t.upgrade_wait_max_s, 1, True, **kw)  # but not past the longest wait


def test_one_side_of_a_relayed_connection_starts_the_hole_punch_and_the_other_only_if_it_does_not_come():
    t = NatTuning()
    kw = dict(answer_wait_s=t.hole_punch_answer_wait_s, retry_s=t.hole_punch_retry_s, max_attempts=t.hole_punch_attempts)
    a, b = sorted([ME, OTHER])
    assert nat.starts_punch(a, b) and not nat.starts_punch(b, a)  # exactly one of any two
    assert nat.punch_due(a, b, 0.0, 0, 0.0, **kw)  # at once
    assert not nat.punch_due(b, a, 0.0, 0, 0.0, **kw)  # waits for a's exchange...
    assert not nat.punch_due(b, a, t.hole_punch_answer_wait_s - 0.1, 0, 0.0, **kw)
    assert nat.punch_due(b, a, t.hole_punch_answer_wait_s, 0, 0.0, **kw)  # ...which never came
    assert not nat.punch_due(a, b, 5.0, 1, t.hole_punch_retry_s - 0.1, **kw)  # a failed one: a pause
    assert nat.punch_due(a, b, 5.0, 1, t.hole_punch_retry_s, **kw)  # then again
    assert not nat.punch_due(a, b, 60.0, t.hole_punch_attempts, 60.0, **kw)  # not forever
