"""Hostile peers (issue 15): every attack of the issue's table that the network layer answers, each from one
hand-written peer (bench/harness/hostile.py), while an honest peer is served.

First on in-process nodes (real libp2p hosts on 127.0.0.1 in this process, the synthetic store of
bench/harness/netharness.py): each quota and fallback on its own. Then on two real daemons (`kvswap node start`,
tiny-qwen3, the issue's 26-blob artifact): the honest `kvswap get` succeeds during each flood, and the
attacked daemon's resident memory (psutil) stays within the bound NETWORK.md states. Timings are the
benchmark's (`python -m bench hostile`); these tests assert behaviour only.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest
import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import Busy, RemoteProtocolError
from kvswap.node.dataplane import grant_address
from kvswap.protocol.keys import DocumentKey
from kvswap.node.net import TrioNode
from kvswap.node.p2p import P2PConfig
from kvswap.node.tuning import DEFAULT_TUNING as T
from kvswap.protocol import limits
from kvswap.protocol.codec import encode
from kvswap.protocol.dataplane import DATAPLANE_HELLO
from kvswap.protocol.messages import DataGrant, GenerateRequest, ManifestRequest
from kvswap.protocol.names import MANIFEST_PROTOCOL
from bench.harness import hostile
from bench.harness.netharness import DirArtifacts, chunks_of, make_artifact

pytestmark = pytest.mark.timeout(180)

#: NETWORK.md, "Quotas": the resident memory over idle the limits allow a serving node under any attack
RSS_BOUND_MB = 200


async def start(nursery, root, i: int, store_cls=DirArtifacts, **kw) -> TrioNode:
    store = store_cls(root / f"n{i}")
    node = TrioNode(P2PConfig(seed=bytes([40 + i]) * 32), service=store, target=store, **kw)
    await nursery.start(node.run)
    node.store = store
    return node


async def fetch_all(node: TrioNode, cid: Cid, providers: list[str] | None = None) -> None:
    result = await node.fetcher.fetch(cid, providers=providers)
    assert result.chunks_fetched + result.chunks_present == 26


ARTIFACT_SHAPE = (26, 24 * 1024)  # the shape: 26 blobs of ~24 KB
ARTIFACT = make_artifact(*ARTIFACT_SHAPE)


def test_streams_over_a_peers_share_are_refused_silent_ones_hold_no_slot_and_others_are_served(tmp_path):
    manifest, chunks, _ = ARTIFACT

    async def main():
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1)
                v = server.store.add(manifest, chunks)
                honest = await start(nursery, tmp_path, 2)
                await honest.p2p.connect(server.addrs[0])
                async with hostile.hostile_host() as h:
                    await h.p2p.connect(server.addrs[0])
                    opened, stop = trio.Event(), trio.Event()
                    stats: list = []

                    async def flood():
                        stats.append(await hostile.silent_streams(h, server.peer_id, 40, 60, stop=stop, opened=opened))

                    nursery.start_soon(flood)
                    await opened.wait()
                    assert server.exchange.inbound.count(h.p2p.peer_id) == T.serve.max_streams_per_peer
                    assert server.exchange.refused.total >= 40 - T.serve.max_streams_per_peer
                    assert server.exchange.slots[MANIFEST_PROTOCOL].in_use == 0  # silent streams hold no slot
                    await fetch_all(honest, v.cid, [server.peer_id])  # served while the flood holds its streams
                    stop.set()
                    while not stats:
                        await trio.sleep(0.05)
                    assert stats[0].opened - stats[0].refused <= T.serve.max_streams_per_peer
                nursery.cancel_scope.cancel()

    trio.run(main)


class _SlowManifests(DirArtifacts):
    """Serves manifests after a pause (in its worker thread), so a serve slot stays taken."""

    def manifest(self, key):
        import time

        time.sleep(0.6)
        return super().manifest(key)


def test_a_request_waiting_for_a_slot_is_answered_busy_and_peers_take_turns(tmp_path):
    from kvswap.node.quota import FairSlots

    manifest, chunks, _ = make_artifact(1, 1024)

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1, store_cls=_SlowManifests)
                v = server.store.add(manifest, chunks)
                server.exchange.slots[MANIFEST_PROTOCOL] = FairSlots(capacity=1, per_peer=1)
                server.exchange.serve_wait_timeout = 0.2
                a, b = await start(nursery, tmp_path, 2), await start(nursery, tmp_path, 3)
                for c in (a, b):
                    await c.p2p.connect(server.addrs[0])
                outcomes: dict[str, str] = {}

                async def ask(client, name):
                    try:
                        await client.exchange.request_manifest(server.peer_id, ManifestRequest(v.cid))
                        outcomes[name] = "served"
                    except Busy:
                        outcomes[name] = "busy"

                async with trio.open_nursery() as asks:
                    asks.start_soon(ask, a, "first")
                    await trio.sleep(0.2)
                    asks.start_soon(ask, b, "second")  # waits 0.2 s of the first one's 0.6 s, then gives up
                assert outcomes == {"first": "served", "second": "busy"}
                assert server.exchange.slots[MANIFEST_PROTOCOL].refused == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_bytes_after_the_one_request_cut_the_stream_off(tmp_path):
    manifest, chunks, _ = make_artifact(1, 1024)

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1, store_cls=_SlowManifests)
                v = server.store.add(manifest, chunks)
                async with hostile.hostile_host() as h:
                    await h.p2p.connect(server.addrs[0])
                    stream = await h.p2p.open_stream(server.peer_id, MANIFEST_PROTOCOL)
                    await stream.write(encode(ManifestRequest(v.cid)))
                    await trio.sleep(0.2)  # the server reads the request and starts serving it
                    await stream.write(b"x" * 100_000)  # ... and the peer goes on sending
                    with pytest.raises(Exception):  # reset: no manifest for a peer that broke the conversation
                        with trio.fail_after(10):
                            while True:
                                if not await stream.read(1 << 16):
                                    raise EOFError
                assert server.exchange.rejected_streams == 1
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_oversized_and_nested_requests_are_cut_off(tmp_path):
    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1)
                async with hostile.hostile_host() as h:
                    await h.p2p.connect(server.addrs[0])
                    assert await hostile.oversized_requests(h, server.peer_id, 8, 1 << 20) == 8  # refused at prefix
                    assert await hostile.oversized_requests(h, server.peer_id, 8, 60 * 1024) == 8  # at decoding
                assert server.exchange.rejected_streams == 16
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_data_plane_drops_the_oldest_pending_connections_and_counts_refusals_not_lines(tmp_path, caplog):
    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1)
                manifest, chunks, _ = ARTIFACT
                v = server.store.add(manifest, chunks)
                dp = server.dataplane
                idle = [await trio.open_tcp_stream(dp.host, dp.port) for _ in range(T.dataplane.max_pending + 8)]
                await trio.sleep(0.3)
                dropped = 0
                for sock in idle[:8]:  # the oldest were dropped for the newer ones
                    with trio.move_on_after(1):
                        try:
                            dropped += await sock.receive_some(1) == b""
                        except trio.BrokenResourceError:
                            dropped += 1
                assert dropped == 8
                assert await hostile.dataplane_reconnect_flood(dp.host, dp.port, 8, 1.0) > 50
                fetcher = await start(nursery, tmp_path, 2)  # an honest fetch gets through meanwhile
                await fetcher.p2p.connect(server.addrs[0])
                await fetch_all(fetcher, v.cid, [server.peer_id])
                assert fetcher.exchange.dataplane_fallbacks == 0  # over the data plane itself
                for sock in idle:
                    await sock.aclose()
                assert dp.refusals.total > 50
                nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="kvswap.node.dataplane"):
        trio.run(main)
    assert len([r for r in caplog.records if r.name == "kvswap.node.dataplane"]) <= 3  # counted, not logged


def test_grants_are_bounded_per_peer_and_in_total_and_a_hoarder_loses_its_own(tmp_path):
    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1)
                dp = server.dataplane
                cids = hostile.random_cids(limits.MAX_CHUNKS_PER_REQUEST)
                first = dp.grant("hoarder", cids)
                for _ in range(3 * T.dataplane.max_grants_per_peer):
                    assert dp.grant("hoarder", cids) is not None
                assert dp.outstanding == T.dataplane.max_grants_per_peer
                assert dp.granted_chunks <= T.dataplane.max_granted_chunks
                assert dp.grant("honest", cids[:4]) is not None  # the total is full: the hoarder pays
                assert dp.outstanding == T.dataplane.max_grants_per_peer
                assert dp.grant("x", hostile.random_cids(1)) is not None
                assert dp.grant("x", []) is None
                sock = await trio.open_tcp_stream(dp.host, dp.port)  # the hoarder's first grant is gone
                await sock.send_all(DATAPLANE_HELLO + first.token)
                data = b""
                with trio.move_on_after(5):
                    try:
                        while piece := await sock.receive_some(1 << 16):
                            data += piece
                    except trio.BrokenResourceError:
                        pass
                assert len(data) < 100  # the ack at most: no chunk answers for a dropped token
                nursery.cancel_scope.cancel()

    trio.run(main)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_data_plane_falls_back_to_libp2p_streams_from_the_same_provider(tmp_path):
    manifest, chunks, _ = ARTIFACT

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1)
                v = server.store.add(manifest, chunks)
                server.dataplane.port = _closed_port()  # its grants lead nowhere: every connection is refused
                me = await start(nursery, tmp_path, 2)
                await me.p2p.connect(server.addrs[0])
                await fetch_all(me, v.cid, [server.peer_id])
                # the first requests (in flight together) fell back; then no grant was asked of it any more
                assert 1 <= me.exchange.dataplane_fallbacks <= T.fetch.parallel_chunks
                assert me.exchange._dataplane_backed_off(server.peer_id)
                assert chunks_of(tmp_path / "n2") == {str(Cid.of(c)) for c in chunks}
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_grant_naming_another_service_gets_it_only_the_fixed_hello(tmp_path):
    """The provider names a port of a bystander on its own IP, with a token of its choosing: the bystander sees
    the data-plane hello and nothing else, and the chunks come from elsewhere."""
    manifest, chunks, _ = ARTIFACT

    async def main():
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                honest = await start(nursery, tmp_path, 1)
                v = honest.store.add(manifest, chunks)
                bystander = hostile.Bystander()
                await nursery.start(bystander.run)
                me = await start(nursery, tmp_path, 2)
                async with hostile.hostile_host() as liar:
                    await liar.p2p.connect(honest.addrs[0])
                    hostile.serve_manifest(liar, await hostile.copy_manifest(liar, honest.peer_id, v.cid))
                    hostile.serve_grant_to(liar, "127.0.0.1", bystander.port)
                    await me.p2p.connect(liar.p2p.addrs[0])
                    await me.p2p.connect(honest.addrs[0])
                    await fetch_all(me, v.cid, [liar.p2p.peer_id, honest.peer_id])
                assert bystander.connections >= 1
                assert bytes(bystander.received) == DATAPLANE_HELLO * bystander.connections
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_grant_addresses_must_be_the_peers_own_and_unprivileged():
    grant = DataGrant("127.0.0.1", 6379, b"t" * limits.DATAPLANE_TOKEN_BYTES, (Cid.of(b"c"),))
    assert grant_address(grant, "peer", {"127.0.0.1"}, None) == ("127.0.0.1", 6379)
    with pytest.raises(RemoteProtocolError, match="foreign host"):
        grant_address(grant, "peer", {"10.0.0.1"}, "10.0.0.2")
    with pytest.raises(RemoteProtocolError, match="privileged"):
        grant_address(DataGrant("127.0.0.1", 25, grant.token, grant.cids), "peer", {"127.0.0.1"}, None)
    anywhere = DataGrant("0.0.0.0", 4001, grant.token, grant.cids)
    assert grant_address(anywhere, "peer", set(), "10.1.2.3") == ("10.1.2.3", 4001)


@pytest.mark.parametrize("misbehaviour", ["stall", "late", "hints"])
def test_slow_and_lying_providers_lose_their_share_and_the_fetch_completes(tmp_path, misbehaviour):
    manifest, chunks, _ = ARTIFACT

    async def main():
        with trio.fail_after(60):  # a stalling provider alone would hold a chunk for fetch.chunk_timeout_s
            async with trio.open_nursery() as nursery:
                honest = await start(nursery, tmp_path, 1)
                v = honest.store.add(manifest, chunks)
                me = await start(nursery, tmp_path, 2)
                async with hostile.hostile_host() as h1, hostile.hostile_host() as h2:
                    for h in (h1, h2):
                        await h.p2p.connect(honest.addrs[0])
                        hostile.serve_manifest(h, await hostile.copy_manifest(h, honest.peer_id, v.cid))
                        if misbehaviour == "stall":
                            hostile.serve_stalling(h)
                        elif misbehaviour == "late":
                            hostile.serve_late_missing(h, 55.0)
                        else:
                            hostile.serve_bogus_hints(h, hostile.random_peer_ids(4))
                        await me.p2p.connect(h.p2p.addrs[0])
                    await me.p2p.connect(honest.addrs[0])
                    result = await me.fetcher.fetch(v.cid,
                                                    providers=[h1.p2p.peer_id, h2.p2p.peer_id, honest.peer_id])
                assert result.providers == {honest.peer_id: 26}
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_publishers_gossip_over_its_rate_is_dropped_not_forwarded(tmp_path):
    """py-libp2p's own score gate already drops most of a flood (about 30 messages pass here); the node's
    validator holds each publisher to its rate whatever passes that gate, before any handler or relay. A
    smaller burst than gossip.burst makes the validator's share visible."""
    from kvswap.node.quota import RateGate

    model = "ab" * 32
    burst = 5

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                me = await start(nursery, tmp_path, 1)
                me.p2p.gossip_gate = RateGate(burst, T.gossip.rate_per_s, T.gossip.max_senders)
                heard: list = []
                await me.subscribe(model, lambda msg, sender: heard.append(msg))
                async with hostile.hostile_host() as h:
                    await h.p2p.connect(me.addrs[0])
                    t0 = trio.current_time()
                    assert await hostile.gossip_flood(h, model, 400) == 400
                    await trio.sleep(0.5)
                    elapsed = trio.current_time() - t0
                assert 0 < len(heard) <= burst + elapsed * T.gossip.rate_per_s + 1
                assert me.p2p.gossip_dropped.total > 0  # dropped by the validator: not handled, not relayed
                nursery.cancel_scope.cancel()

    trio.run(main)


class _SlowGeneration(DirArtifacts):
    def generate(self, request):
        import time

        time.sleep(0.4)
        return super().generate(request)


def test_one_hosted_generation_per_peer_and_peers_take_turns(tmp_path):
    manifest, chunks, _ = make_artifact(1, 1024)

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server = await start(nursery, tmp_path, 1, store_cls=_SlowGeneration)
                v = server.store.add(manifest, chunks)
                honest = await start(nursery, tmp_path, 2)
                await honest.p2p.connect(server.addrs[0])
                async with hostile.hostile_host() as h:
                    await h.p2p.connect(server.addrs[0])
                    outcomes: list[str] = []

                    async def flood():
                        outcomes.extend(await hostile.long_generations(h, server.peer_id, v.cid, 3, 100))

                    nursery.start_soon(flood)
                    await trio.sleep(0.2)  # the flooder's first generation runs, its others are refused
                    reply = await honest.exchange.remote_generate(server.peer_id, GenerateRequest(v.cid, (1,), 4))
                    assert len(reply.tokens) == 4
                    while len(outcomes) < 3:
                        await trio.sleep(0.05)
                assert sorted(outcomes) == ["Busy", "Busy", "ok"]
                nursery.cancel_scope.cancel()

    trio.run(main)


# --- real daemons ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Daemon A holds the issue's artifact (1,553 tiny-qwen3 tokens: 25 chunks + the logits tail); daemon B
    bootstraps to A and trusts it. B's `get` is the honest user; A is attacked."""
    from bench.hostile import document_text
    from bench.harness.nodes import NodeProc, cli, cli_json

    root = tmp_path_factory.mktemp("hostile")
    nodes = []
    try:
        a = NodeProc(root / "a")
        nodes.append(a)
        b = NodeProc(root / "b", bootstrap=[a.addr])
        nodes.append(b)
        a.wait_model()
        b.wait_model()
        doc = root / "doc.txt"
        doc.write_text(document_text())
        cid = cli_json(a.home, "publish", str(doc))["cid"]
        cli(b.home, "trust", "add", cli_json(a.home, "id")["public_key"])

        def honest_get() -> dict:
            got = cli_json(b.home, "get", cid, "--no-progress")
            cli(b.home, "rm", cid)
            return got

        assert honest_get()["chunks"] == 26  # warm-up: connections, caches, the first audit
        yield {"a": a, "b": b, "cid": cid, "get": honest_get,
               "idle_rss": hostile.RssSampler(a.proc.pid).rss(), "fingerprint": cli_json(a.home, "node", "status")[
                   "model_fingerprint"]}
    finally:
        for node in nodes:
            node.stop()


def _flood(name: str, a, cid: str, fingerprint: str):
    """The attack body (tests.hostile.AttackThread) of one flood of the issue's table, from one peer."""

    async def body(ready, stop):
        async with hostile.hostile_host() as h:
            await h.p2p.connect(a.addr)
            if name == "silent streams":
                s = await hostile.silent_streams(h, a.peer_id, 100, 120, stop=stop, opened=ready)
                assert s.opened - s.refused <= T.serve.max_streams_per_peer  # the rest were reset
            elif name == "data-plane sockets":
                host, port = await hostile.dataplane_address(h, a.peer_id)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hostile.dataplane_idle_sockets, host, port, 32, 120, stop)
                    ready.set()
                    while not stop.is_set():
                        await hostile.dataplane_reconnect_flood(host, port, 20, 0.5)
            elif name == "grant hoard":
                await hostile.hoard_grants(h, a.peer_id, hostile.random_cids(limits.MAX_CHUNKS_PER_REQUEST), 200)
                ready.set()
                while not stop.is_set():
                    await hostile.hoard_grants(h, a.peer_id, hostile.random_cids(limits.MAX_CHUNKS_PER_REQUEST), 32)
            elif name == "oversized requests":
                ready.set()
                while not stop.is_set():
                    await hostile.oversized_requests(h, a.peer_id, 32, 1 << 20)
                    await hostile.oversized_requests(h, a.peer_id, 32, 60 * 1024)
            elif name == "many identities":
                await hostile.crowd_of_identities(a.addr, a.peer_id, 18, 16, stop, ready)
            elif name == "fresh-key gossip":
                ready.set()
                await hostile.gossip_fresh_keys(h, fingerprint, 3000)
            else:  # gossip
                ready.set()
                await hostile.gossip_flood(h, fingerprint, 3000)
        return {}

    return body


@pytest.mark.parametrize("name", ["silent streams", "data-plane sockets", "grant hoard", "oversized requests",
                                  "gossip", "many identities"])
def test_an_honest_get_succeeds_during_each_flood_and_memory_stays_bounded(pair, name):
    a = pair["a"]
    with hostile.RssSampler(a.proc.pid) as rss:
        attack = hostile.AttackThread(_flood(name, a, pair["cid"], pair["fingerprint"])).start()
        try:
            got = pair["get"]()
        finally:
            attack.stop()
    assert got["complete"] and got["chunks"] == 26
    assert (rss.peak - pair["idle_rss"]) / 1e6 <= RSS_BOUND_MB, f"RSS {rss.peak / 1e6:.0f} MB"
    if name in ("gossip", "fresh-key gossip"):
        from bench.harness.nodes import cli_json

        shown = cli_json(a.home, "node", "status")["announcements"]
        if name == "gossip":  # one publisher: at most its share is kept
            assert len([x for x in shown if x["cid"] != pair["cid"]]) <= T.gossip.max_kept_per_peer


def test_fresh_keys_do_not_multiply_one_peers_gossip_rate(pair):
    """3,000 announcements, each signed by a fresh key, all delivered by one peer: the per-publisher rate lets
    every one through, the rate of the peer that delivers them holds them (once 3,165 of 5,000 were accepted
    in 9 s), and node.log gains at most a few counted lines, not one per announcement."""
    from bench.harness.nodes import cli_json

    a = pair["a"]
    log_before = (a.home / "node.log").stat().st_size
    kept_before = cli_json(a.home, "node", "status")["announcements_kept"]
    pushed: list[int] = []
    t0 = time.monotonic()

    async def body(ready, stop):
        async with hostile.hostile_host() as h:
            await h.p2p.connect(a.addr)
            ready.set()
            pushed.append(await hostile.gossip_fresh_keys(h, pair["fingerprint"], 3000))
            await trio.sleep(2)  # let the last ones arrive
        return {}

    attack = hostile.AttackThread(body).start()
    attack.wait(timeout=240)
    took = time.monotonic() - t0
    accepted = cli_json(a.home, "node", "status")["announcements_kept"] - kept_before  # a fresh key: an entry each
    allowed = T.gossip.forwarder_burst + took * T.gossip.forwarder_rate_per_s
    assert pushed == [3000] and accepted <= allowed, (accepted, allowed, took)
    assert (a.home / "node.log").stat().st_size - log_before < 20_000


def _raw_api_request(api: str, head: bytes, body_parts: list[bytes], pause_s: float, timeout_s: float) -> bytes:
    """Send a control-API request by hand (headers, then the body parts with `pause_s` between them) and
    read the answer until the server closes or `timeout_s` passes."""
    import socket
    import time as _time
    from urllib.parse import urlparse

    url = urlparse(api)
    with socket.create_connection((url.hostname, url.port), timeout=timeout_s) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
            _time.sleep(pause_s)
        answer = b""
        deadline = _time.monotonic() + timeout_s
        while _time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except socket.timeout:
                break
            if not piece:
                break
            answer += piece
            if b"\r\n\r\n" in answer and b'"error"' in answer:
                break
    return answer


def test_control_api_bodies_are_read_within_bounds_and_a_stalled_one_is_refused(pair):
    """A body that declares 10^12 bytes is refused at once (413), one that stops half way after the idle
    timeout (400), a 65 MiB one as over the limit; the daemon logs no traceback and keeps its memory."""
    import json as _json

    from kvswap.control.limits import API_BODY_IDLE_TIMEOUT_S, MAX_API_BODY_BYTES
    from kvswap.control.runfiles import api_token

    a = pair["a"]
    api = _json.loads((a.home / "node.json").read_text())["api"]
    token = api_token(a.home)

    def head(length: int) -> bytes:
        return (f"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()

    with hostile.RssSampler(a.proc.pid) as rss:
        huge = _raw_api_request(api, head(10**12), [], 0, 10)
        assert huge.startswith(b"HTTP/1.1 413") and b"MAX_API_BODY_BYTES" in huge, huge[:300]
        stalled = _raw_api_request(api, head(1000), [b'{"text": "a'], 0, API_BODY_IDLE_TIMEOUT_S + 10)
        assert stalled.startswith(b"HTTP/1.1 400") and b"stopped arriving" in stalled, stalled[:300]
        big = MAX_API_BODY_BYTES + (1 << 20)
        over = _raw_api_request(api, head(big), [b" " * (1 << 20)] * 4, 0.01, 20)
        assert over.startswith(b"HTTP/1.1 413"), over[:300]
    assert (rss.peak - pair["idle_rss"]) / 1e6 <= RSS_BOUND_MB, f"RSS {rss.peak / 1e6:.0f} MB"
    assert "Traceback" not in (a.home / "node.log").read_text()


def _manifest_declaring(n_bytes: int, document_hash: str):
    """A valid manifest (Qwen3-4B layout, fake chunk CIDs) whose chunks add up to about `n_bytes` stored bytes."""
    import hashlib

    from kvswap.artifact import chunking
    from kvswap.artifact.manifest import ChunkRef, Manifest
    from kvswap.kvtensors import KvLayout
    from kvswap.protocol.cid import Cid

    layout = KvLayout(36, 8, 128, "bf16")
    block = 64
    n_tokens = n_bytes // layout.bytes_per_token // block * block
    ids = [(7 * i) % 150_000 for i in range(n_tokens)]
    keys = chunking.prefix_keys(ids, block)
    chunks = tuple(ChunkRef(Cid.of(hashlib.sha256(b"%d" % i).digest()), "raw", block * layout.bytes_per_token,
                            block * layout.bytes_per_token, t0=t0, t1=t1, prefix_key=key)
                   for i, ((t0, t1), key) in enumerate(zip(chunking.block_ranges(n_tokens, block), keys)))
    return Manifest(model_id="huge", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32, layout=layout,
                    block_tokens=block, token_ids=tuple(ids), token_hash=chunking.token_hash(ids),
                    document_hash=document_hash, chunks=chunks)


def test_an_artifact_declaring_more_than_the_store_budget_is_refused_before_any_chunk(pair):
    """A trusted publisher announces an artifact of 25 GiB (the store budget is 20 GiB): the consumer's get
    fails at once with one line, and nothing of it is stored."""
    import time as _time

    from bench.harness.nodes import cli, error_lines
    from kvswap.home import Home

    a, b = pair["a"], pair["b"]
    manifest = _manifest_declaring(25 << 30, "ef" * 32)
    with Home(a.home) as home:  # A registers it (as a publisher that crafts it would); no chunk is needed
        home.store.put_manifest(manifest, [home.key.sign_manifest(manifest.cid)])
    t0 = _time.monotonic()
    got = cli(b.home, "get", str(manifest.cid), "--no-progress", check=False, timeout=120)
    took = _time.monotonic() - t0
    assert got.returncode != 0 and len(error_lines(got)) == 1, got.stderr[-2000:]
    assert "store's budget" in error_lines(got)[0] and took < 30, (took, error_lines(got))
    with Home(b.home) as home:
        assert not home.store.has_artifact(manifest.cid)
    with Home(a.home) as home:
        home.store.remove(manifest.cid, force=True)


def test_a_rationing_publisher_whose_holders_left_does_not_hand_the_fetch_to_a_staller(tmp_path):
    """Issue 24: two fetchers take the publisher's one copy of every chunk and leave; a third fetcher, with a
    stalling provider beside the publisher, was answered "rationed, ask them" for the chunks whose holders
    were gone, so the publisher was never measured as fast and the staller's requests ran to the 60 s
    timeout (60.4 s against 0.4 s quiet). Now copies held by peers no longer connected no longer count
    (bench ration_stall measures both rules)."""
    from dataclasses import replace

    from kvswap.node.tuning import DEFAULT_TUNING

    tuning = replace(DEFAULT_TUNING, ration=replace(DEFAULT_TUNING.ration, copies=1))
    times = hostile.gone_holders_beside_a_staller(tmp_path, tuning, *ARTIFACT_SHAPE, timeout_s=60)
    assert times["from_publisher"] == ARTIFACT_SHAPE[0]
    # the holders left, so their copies no longer count and the publisher serves at once: not held for its
    # patience, nor for a stalled request's deadline (before: 60.4 s)
    assert times["stalled_s"] < min(T.ration.patience_s, T.fetch.request_min_timeout_s), times
