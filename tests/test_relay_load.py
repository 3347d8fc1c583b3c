"""A relay under load (issue 26): many reservations, circuits and bytes against one kvswap relay, which must stay
within its named limits (NatTuning) and its memory bound, while an honest relayed peer keeps working.

bench/relay_load.py runs the load: the relay is a real kvswap host (node/p2p.py P2PHost, `node.relay = on`) in its
own process on 127.0.0.1, so its RSS is its own; the other peers are real py-libp2p hosts speaking circuit relay v2
with py-libp2p's own client, the hostile ones from other loopback addresses, many identities each. Small limits
here, so the load exceeds every one of them within seconds; `python -m bench relay_load` runs the defaults.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed
    sys.path.insert(0, str(REPO))

from bench import relay_load  # noqa: E402
from kvswap.node.tuning import NatTuning  # noqa: E402

#: the relay's limits here (small, so that the test exceeds them quickly)
LIMITS = {"relay_max_reservations": 6, "relay_max_reservations_per_ip": 2, "relay_max_circuits": 4,
          "relay_max_circuits_per_ip": 1, "relay_circuits_per_reservation": 2, "relay_circuit_bytes": 512 * 1024}
#: hostile addresses and identities per address: 12 asking for 5 free slots, at most 2 per address
IPS, PER_IP = 3, 4
#: the relay's RSS may grow by at most this much under the whole load
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
#: times the circuits are opened and flooded: what the relay holds must not grow from one round to the next
ROUNDS = 2
#: glibc heap in use (live allocations) may grow by at most this much from the first round to the last
HEAP_GROWTH_LIMIT = 4 * 1024 * 1024


def test_a_relay_under_load_stays_within_its_limits_and_memory_and_honest_peers_keep_working():
    t = dataclasses.replace(NatTuning(), **LIMITS)
    r = relay_load.run(LIMITS, ips=IPS, per_ip=PER_IP, circuits_each=3, flood_bytes=4 * t.relay_circuit_bytes,
                       rounds=ROUNDS)
    print("relay under load:", r)
    # reservations: never more than the relay's total, nor more than an address's share
    assert r["honest_reserved"] and r["reservations_asked"] == IPS * PER_IP
    assert 1 <= r["reservations_granted"] <= t.relay_max_reservations - 1
    assert max(r["granted_per_ip"].values()) <= t.relay_max_reservations_per_ip
    assert r["peak_reservations"] <= t.relay_max_reservations
    assert r["refused"] >= IPS * (PER_IP - t.relay_max_reservations_per_ip)  # kvswap's per-IP bound refused them
    assert r["honest_renewed"]  # the honest slot survives the flood
    # circuits: more asked than a reservation admits and than the relay carries; it carried no more
    assert r["circuits_tried"] > t.relay_max_circuits
    assert 1 <= r["circuits_opened"] <= t.relay_max_circuits
    assert r["circuits_per_target_max"] <= t.relay_circuits_per_reservation
    assert r["circuits_per_ip_max"] <= t.relay_max_circuits_per_ip
    # ...so three hostile addresses hold three of the four circuits, and an honest dialler gets the fourth
    assert r["honest_during"]
    assert r["peak_circuits"] <= t.relay_max_circuits
    # bytes: each circuit pushed 4x its budget and delivered no more than the budget, Noise and Yamux included;
    # the cut circuits left the relay's books (py-libp2p 0.8.1 kept some for good: node/libp2p_compat.py)
    assert r["delivered_per_circuit_max"] <= t.relay_circuit_bytes
    assert r["circuits_left"] == 0, r
    # the honest relayed peer is still reached through the relay, and answers
    assert r["honest_dialled"] and r["honest_echo"]
    assert r["rss_growth"] <= RSS_GROWTH_LIMIT, r
    # memory bound: once a round's circuits are gone, the relay holds nothing of them (0.8.1's Yamux kept the
    # unread bytes of every stream the relay reset, and every hop stream, node/libp2p_compat.py), and what it
    # holds does not grow with the bytes relayed
    rounds = r["rounds"]
    assert len(rounds) == ROUNDS and all(rd["relayed"] > 0 for rd in rounds), rounds
    assert all(rd["probe"]["yamux_buffered"] == 0 for rd in rounds), [rd["probe"] for rd in rounds]
    assert rounds[-1]["probe"]["yamux_streams"] <= rounds[0]["probe"]["yamux_streams"], [rd["probe"] for rd in rounds]
    assert rounds[-1]["probe"]["heap_in_use"] - rounds[0]["probe"]["heap_in_use"] <= HEAP_GROWTH_LIMIT, rounds
