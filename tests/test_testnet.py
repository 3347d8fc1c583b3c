"""The namespace testnet (bench/harness/netns.py): real daemons in their own network namespaces behind rate-limited
links. The rules and pure helpers are tested everywhere; the network tests need root, `ip netns` and `tc`
(CI runs as root) and skip with the reason otherwise.

Network tests share one 3-node testnet (starting daemons is the slow part): node0 is the bootstrap peer and
holds a seeded synthetic artifact, node1 publishes a real document and becomes a second holder of the
synthetic one, node2 fetches. Every loop is bounded; the testnet is torn down by its context manager even
when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvswap.protocol.errors import UsageError
from bench.harness import netns as tn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed; its artifact seeder is shared with the benchmarks
    sys.path.insert(0, str(REPO))

#: seconds any one fetch in these tests may take before the test fails
FETCH_LIMIT_S = 150


# --- rules and helpers (no network) ---------------------------------------------------------------------------
def test_rates_parse_in_tc_units():
    assert tn.parse_rate("100mbit") == 100_000_000
    assert tn.parse_rate("1gbit") == 1_000_000_000
    assert tn.parse_rate("1.5Mbit") == 1_500_000
    assert tn.parse_rate(None) is None and tn.parse_rate("unlimited") is None
    assert tn.Link.of("100mbit/1gbit") == tn.Link(100_000_000, 1_000_000_000)
    assert tn.Link.of("20mbit") == tn.Link(20_000_000, 20_000_000)
    assert tn.format_rate(100_000_000) == "100mbit"
    for bad in ("fast", "100MBps", "-1mbit", "10bit"):
        with pytest.raises(UsageError):
            tn.parse_rate(bad)


def test_node_addresses_and_bootstrap_rule():
    assert tn.host_ip("10.77.0.0/24", 0) == "10.77.0.11"
    assert tn.host_ip("10.77.0.0/24", 3) == "10.77.0.14"
    with pytest.raises(UsageError):
        tn.host_ip("10.77.0.0/28", 5)  # 16 addresses: no room for host 16
    first = tn.node_options(0, subnet="10.77.0.0/24", bootstrap_peer="PEER")
    assert first == tn.NodeOptions("/ip4/10.77.0.11/tcp/4001", "127.0.0.1:8080", (), False)
    other = tn.node_options(2, subnet="10.77.0.0/24", bootstrap_peer="PEER")
    assert other.listen == "/ip4/10.77.0.13/tcp/4001"
    assert other.bootstrap == ("/ip4/10.77.0.11/tcp/4001/p2p/PEER",) and other.accept_any


def test_wildcard_listen_is_advertised_as_interface_addresses():
    from multiaddr import Multiaddr

    from kvswap.node.p2p import advertised

    def interfaces(port):
        return [Multiaddr(f"/ip4/{ip}/tcp/{port}") for ip in ("10.77.0.12", "192.168.5.2", "127.0.0.1")]

    got = [str(a) for a in advertised([Multiaddr("/ip4/0.0.0.0/tcp/4001")], interfaces)]
    assert got == ["/ip4/10.77.0.12/tcp/4001", "/ip4/192.168.5.2/tcp/4001"]  # no 0.0.0.0, no loopback
    only_lo = [str(a) for a in advertised([Multiaddr("/ip4/0.0.0.0/tcp/9")],
                                          lambda port: [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")])]
    assert only_lo == ["/ip4/127.0.0.1/tcp/9"]  # a machine with nothing else still gets an address
    explicit = [Multiaddr("/ip4/127.0.0.1/tcp/5"), Multiaddr("/ip4/10.0.0.1/tcp/6")]
    assert advertised(explicit, interfaces) == explicit  # what the user asked to listen on is kept


def test_ration_copies_option_rejects_negative(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvswap", "node", "start", "--home", str(tmp_path),
                           "--ration-copies", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --ration-copies")
    assert not (tmp_path / "node.json").exists()


# --- the network ------------------------------------------------------------------------------------------------
needs_testnet = pytest.mark.skipif(tn.unavailable() is not None, reason=f"no testnet here: {tn.unavailable()}")


@needs_testnet
def test_links_are_shaped_both_ways_and_leftovers_are_removed(tmp_path):
    """A sender's uplink and a receiver's downlink each cap a TCP transfer (a lower bound on time is what a
    shaper guarantees on any machine); a run whose owner died is removed by `down` with its namespaces."""
    n = 1_000_000
    for links, label in ((["8mbit/1gbit", "1gbit"], "uplink"), (["1gbit", "1gbit/8mbit"], "downlink")):
        with tn.Testnet(links, root=tmp_path) as net:
            got, seconds = tn.measure_tcp(net.hosts[0], net.hosts[1], n, timeout=30)
            assert got == n
            # 8 Mbit/s on the wire (headers included) is at most 1 MB/s of payload, minus one tbf bucket
            assert seconds >= (n - tn.MIN_BURST_BYTES) * 8 / 8_000_000 * 0.95, label

    dead = subprocess.Popen(["true"])
    dead.wait()
    net = tn.Testnet(2, root=tmp_path, owner_pid=dead.pid)
    net.create()  # and never destroyed: its owner "died"
    assert len([ns for ns in tn.netns_names() if ns.startswith(f"{tn.NS_PREFIX}{net.run}-")]) == 3
    assert [s["run"] for s in tn.runs(tmp_path)] == [net.run] and tn.is_stale(tn.runs(tmp_path)[0])
    live = tn.Testnet(1, root=tmp_path / "other")  # a live run of this process: `down` must leave it alone
    with live:
        removed = tn.down()
        assert {net.switch, *(h.netns for h in net.hosts)} <= set(removed)
        assert not any(ns.startswith(f"{tn.NS_PREFIX}{live.run}-") for ns in removed)
        assert live.switch in tn.netns_names()
    assert not any(ns.startswith(f"{tn.NS_PREFIX}{net.run}-") for ns in tn.netns_names())
    assert not net.dir.exists()


@needs_testnet
def test_a_node_joins_a_bootstrap_peer_that_starts_after_it(tmp_path):
    """Every node of a testnet (or a compose file) starts at once: a node whose bootstrap peer is not up yet
    keeps dialling it instead of staying alone."""
    with tn.Testnet(2, root=tmp_path) as net:
        boot, late = net.hosts
        net.start([1], wait_model=False)  # node0's identity is fixed; node0 itself is not running yet
        log = late.home / "node.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "bootstrap" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        assert "bootstrap" in log.read_text(), "the first dial should have failed and been logged"
        net.start([0], wait_model=False)
        deadline = time.monotonic() + 60
        peers: list = []
        while time.monotonic() < deadline and boot.peer_id not in peers:
            peers = [p["peer_id"] for p in late.kvswap("peers")]
            time.sleep(0.5)
        assert peers == [boot.peer_id]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    from bench.swarm import seed_home

    root = tmp_path_factory.mktemp("testnet")
    tn.down(root=root)  # leftovers of a killed earlier run (none in a fresh tmp dir, but cheap)
    with tn.Testnet(["1gbit"] * 3, root=root) as net:
        # 128 tokens of the Qwen3-4B layout, raw, 16-token chunks: 8 chunks of 2.36 MB
        net.seeded = seed_home(net.hosts[0].home, 128, codec="raw", block_tokens=16)
        net.start()
        yield net


def _received(host: tn.Host, **filters) -> dict[str, dict]:
    """Bytes `host` received, by sending peer and protocol, from its own ledger (readable while it runs)."""
    from kvswap.ledger import Ledger

    out: dict[str, dict] = {}
    with Ledger.for_home(host.home) as ledger:
        for row in ledger.totals(by=("peer", "protocol"), direction="in", **filters):
            out.setdefault(row["peer"], {})[row["protocol"]] = row
    return out


@needs_testnet
def test_get_by_document_hash_through_a_third_host(net, tmp_path, doc_text):
    """node1 publishes; node2, which knows only node0, finds it by the document's hash and fetches it from
    node1 over the data plane. Every address anyone advertises or learnt is a namespace address."""
    boot, pub, reader = net.hosts  # reader was started knowing only boot (its one bootstrap address)
    doc = tmp_path / "doc.txt"
    doc.write_text(doc_text)
    published = pub.kvswap("publish", str(doc))
    got = reader.kvswap("get", "--doc-hash", published["document_hash"], "--no-progress", timeout=FETCH_LIMIT_S)
    assert got["cid"] == published["cid"] and got["complete"]
    assert set(got["providers"]) == {pub.peer_id}
    assert reader.kvswap("verify", published["cid"], "--accept-any")["ok"]

    by_peer = {h.peer_id: h for h in net.hosts}
    for h in net.hosts:
        status = h.kvswap("node", "status")
        assert status["addrs"] == [h.multiaddr]
        for peer in h.kvswap("peers"):
            assert peer["addrs"] == [by_peer[peer["peer_id"]].multiaddr], (h.name, peer)
    # the data plane listens on the node's namespace address, and the grant was dialled there
    assert pub.kvswap("node", "status")["dataplane"].split(":")[0] == pub.ip
    listening = pub.exec("ss", "-Hltn").stdout.split("\n")
    local = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()}
    assert local == {pub.ip, "127.0.0.1"}, listening  # libp2p + data plane on eth0, the control API on lo
    got_by_dataplane = _received(reader, artifact=published["cid"])[pub.peer_id]["/kvswap/chunks/1+tcp"]
    assert got_by_dataplane["raw_bytes"] == got["bytes"] > 0  # every chunk byte came through the grant


@needs_testnet
def test_fetch_survives_a_holder_whose_link_is_cut(net):
    """node1 fetches the seeded artifact from node0; then, with both holders' uplinks slowed, node2 fetches
    it, and once one holder has served it a chunk that holder's link goes down: node2 completes from the
    other. (node0 is a seed that super-seeds: it points node2 at node1, whose copies completed, so the holder
    that serves first is usually node1; then node0 serves the rest once node1's patience is over.)"""
    boot, holder, reader = net.hosts
    cid = net.seeded["cid"]
    assert holder.kvswap("get", cid, "--no-progress", timeout=FETCH_LIMIT_S)["complete"]
    for h in (boot, holder):
        h.set_rate("16mbit/1gbit")  # ~2 MB/s each: the 18.9 MB fetch takes several seconds

    def chunk_bytes_from(peer: str) -> int:
        return _received(reader, artifact=cid).get(peer, {}).get("/kvswap/chunks/1+tcp", {}).get("raw_bytes", 0)

    proc = reader.spawn("get", cid, "--no-progress")
    try:
        deadline = time.monotonic() + 60
        first = None
        while time.monotonic() < deadline and proc.poll() is None and first is None:
            first = next((h for h in (boot, holder) if chunk_bytes_from(h.peer_id)), None)
            time.sleep(0.05)
        assert proc.poll() is None, "the fetch ended before the link could be cut"
        assert first is not None, "no holder served a chunk"
        other = holder if first is boot else boot
        first.set_link(False)  # mid-fetch: no FIN, no RST, just silence
        other_before_cut = chunk_bytes_from(other.peer_id)
        out, err = proc.communicate(timeout=FETCH_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    got = json.loads(out)
    assert got["complete"] and got["cid"] == cid and got["bytes"] == net.seeded["stored_size"]
    assert reader.kvswap("verify", cid, "--accept-any")["ok"]
    # the rest came from the other holder (bytes the cut one had already put on the wire may still land)
    assert chunk_bytes_from(other.peer_id) > other_before_cut
