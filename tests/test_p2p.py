"""Real libp2p hosts on 127.0.0.1 (in-process trio): DHT across hosts, gossip, misbehaving peers."""

from __future__ import annotations

import struct

import pytest
import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import FormatError, NotFound, RemoteProtocolError
from kvswap.node.net import TrioNode
from kvswap.node.p2p import P2PConfig, peer_id_of_seed
from kvswap.protocol import limits
from kvswap.protocol.codec import encode
from kvswap.protocol.messages import Announce, GenerateRequest, ManifestRequest
from kvswap.protocol.names import MANIFEST_PROTOCOL, announce_topic, document_key
from bench.harness.netharness import DirArtifacts, make_artifact

pytestmark = pytest.mark.timeout(120)


def seed(i: int) -> bytes:
    return bytes([i]) * 32


async def start_nodes(nursery, tmp_path, n, **kw):
    nodes = []
    for i in range(n):
        store = DirArtifacts(tmp_path / f"n{i}")
        node = TrioNode(P2PConfig(seed=seed(i + 1)), service=store, target=store, **kw)
        await nursery.start(node.run)
        node.store = store
        nodes.append(node)
    return nodes


def test_peer_id_derives_from_the_seed(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            (node,) = await start_nodes(nursery, tmp_path, 1)
            assert node.peer_id == peer_id_of_seed(seed(1))
            assert all(a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith("/p2p/" + node.peer_id)
                       for a in node.addrs)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_dht_provide_and_find_across_three_hosts(tmp_path):
    """a <- b <- c in a line: c finds a's provider records for a CID and for a document key."""

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                a, b, c = await start_nodes(nursery, tmp_path, 3)
                await b.p2p.connect(a.addrs[0])
                await c.p2p.connect(b.addrs[0])
                await trio.sleep(1.5)  # routing tables pick up connected peers
                cid = Cid.of(b"some artifact")
                a.provide_artifact(cid, "ab" * 32, "cd" * 32, [])
                found: list[str] = []
                doc: list[str] = []
                for _ in range(40):
                    found = await c.p2p.find_providers(str(cid))
                    doc = await c.p2p.find_providers(document_key("ab" * 32, "cd" * 32))
                    if a.peer_id in found and a.peer_id in doc:
                        break
                    await trio.sleep(0.25)
                assert a.peer_id in found
                assert a.peer_id in doc
                assert await c.p2p.find_providers(str(Cid.of(b"nobody has this"))) == []
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_gossip_announce_is_received_and_malformed_gossip_dropped(tmp_path):
    model = "ab" * 32

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                a, b = await start_nodes(nursery, tmp_path, 2)
                got: list[tuple[Announce, str]] = []
                await b.subscribe(model, lambda msg, sender: got.append((msg, sender)))
                await a.p2p.connect(b.addrs[0])
                ann = Announce(Cid.of(b"x"), model, "cd" * 32, 128, a.peer_id)
                forged = Announce(Cid.of(b"y"), model, "cd" * 32, 128, b.peer_id)  # claims someone else published
                for _ in range(60):  # until the subscription has propagated and the message arrives
                    await a.p2p.publish(announce_topic(model), b"\x0a\x00\x00\x00\x02garbage")
                    await a.announce(forged)
                    await a.announce(ann)
                    await trio.sleep(0.25)
                    if got:
                        break
                assert got and got[0] == (ann, a.peer_id)
                assert all(msg == ann for msg, _ in got)  # the garbage and the forgery were dropped
                nursery.cancel_scope.cancel()

    trio.run(main)


async def _raw_stream_is_cut_off(node_from, node_to, payload: bytes, close: bool) -> bool:
    """Send `payload` on a manifest stream; True if the server reset/closed without an answer."""
    stream = await node_from.p2p.open_stream(node_to.peer_id, MANIFEST_PROTOCOL)
    if payload:
        await stream.write(payload)
    if close:
        await stream.close_write()
    try:
        with trio.fail_after(10):
            data = await stream.read(1024)
    except trio.TooSlowError:
        return False
    except Exception:  # StreamReset / StreamEOF: cut off
        return True
    return data == b""


def test_garbage_oversized_and_stalling_peers_are_cut_off_others_still_served(tmp_path):
    async def main():
        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                server, bad, good = await start_nodes(nursery, tmp_path, 3)
                server.exchange.idle_timeout = 1.0
                manifest, chunks, doc = make_artifact(2, 4096)
                v = server.store.add(manifest, chunks)
                await bad.p2p.connect(server.addrs[0])
                await good.p2p.connect(server.addrs[0])

                assert await _raw_stream_is_cut_off(bad, server, b"\xee\x00\x00\x00\x01x", close=False)
                oversized = struct.pack(">BI", ManifestRequest.TYPE, limits.MAX_FRAME_BYTES + 1)
                assert await _raw_stream_is_cut_off(bad, server, oversized, close=False)
                assert await _raw_stream_is_cut_off(bad, server, encode(ManifestRequest(v.cid))[:4],
                                                    close=False)  # stalls mid-frame
                assert await _raw_stream_is_cut_off(bad, server, b"", close=True)  # no request at all
                assert server.exchange.rejected_streams >= 4

                # the server keeps serving everybody, including the peer that misbehaved
                for client in (good, bad):
                    reply = await client.exchange.request_manifest(server.peer_id, ManifestRequest(v.cid))
                    assert reply.manifest == manifest
                with pytest.raises(NotFound):
                    await good.exchange.request_manifest(server.peer_id, ManifestRequest(Cid.of(b"none")))
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_hosted_generation_round_trip_and_refusal(tmp_path):
    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                events = []
                host, client = await start_nodes(nursery, tmp_path, 2)
                client.exchange.on_transfer = events.append
                manifest, chunks, _ = make_artifact(1, 1024)
                v = host.store.add(manifest, chunks)
                await client.p2p.connect(host.addrs[0])
                reply = await client.exchange.remote_generate(
                    host.peer_id, GenerateRequest(v.cid, (1, 2, 3), max_new_tokens=5))
                assert reply.tokens == (6, 7, 8, 9, 10)
                assert [e.direction for e in events] == ["out", "in"]
                assert all(e.artifact == v.cid and e.wire_bytes > 0 for e in events)
                with pytest.raises(NotFound):
                    await client.exchange.remote_generate(host.peer_id, GenerateRequest(Cid.of(b"?"), (1,), 1))
                with pytest.raises(RemoteProtocolError):
                    await client.p2p.open_stream(peer_id_of_seed(seed(99)), MANIFEST_PROTOCOL)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_cancelled_write_leaves_the_connection_usable(tmp_path):
    """Every stream to a peer shares one Noise session, and py-libp2p encrypts a frame (spending a nonce) before
    it writes it, with checkpoints between. A cancellation landing there (any timeout of ours that interrupts
    libp2p work, e.g. a late chunk request dialling a bogus holder) used to leave the frame unsent and the peer
    unable to decrypt anything after it: the whole connection died (issue 15's flaky hints test). Here a Yamux
    ping is written on the session in a scope cancelled before the write, as when the cancellation arrives
    while the frame waits for the socket: the connection must carry requests afterwards."""
    from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING, YAMUX_HEADER_FORMAT

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server, client = await start_nodes(nursery, tmp_path, 2)
                manifest, chunks, _ = make_artifact(1, 1024)
                v = server.store.add(manifest, chunks)
                await client.p2p.connect(server.addrs[0])
                (conn,) = client.p2p.host.get_network().get_connections(server.p2p.host.get_id())
                ping = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, 7)
                for _ in range(3):
                    with trio.CancelScope() as scope:
                        scope.cancel()
                        await conn.muxed_conn.secured_conn.write(ping)
                    reply = await client.exchange.request_manifest(server.peer_id, ManifestRequest(v.cid))
                    assert reply.manifest == manifest
                assert client.p2p.host.get_network().get_connections(server.p2p.host.get_id()) == [conn]
                nursery.cancel_scope.cancel()

    trio.run(main)


class _FailingArtifacts(DirArtifacts):
    """Serves manifests, but finding or reading any chunk fails: with a kvswap error, or with a bug."""

    def __init__(self, root, bug: bool) -> None:
        super().__init__(root)
        self.bug = bug

    def read_chunk(self, cid):
        if self.bug:
            raise ValueError("an unexpected failure inside the server")
        raise FormatError("the stored chunk does not parse")

    chunk_path = read_chunk  # the first thing a chunk request asks


def test_serving_failures_are_answered_with_their_wire_code_and_the_node_serves_on(tmp_path):
    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                server, client = await start_nodes(nursery, tmp_path, 2, use_dataplane=False)
                manifest, chunks, _ = make_artifact(1, 1024)
                v = server.store.add(manifest, chunks)
                await client.p2p.connect(server.addrs[0])
                cid = Cid.of(chunks[0])

                async def on_chunk(cid, answer):
                    raise AssertionError("no chunk may arrive")

                server.exchange.service = _FailingArtifacts(tmp_path / "n0", bug=False)
                with pytest.raises(RemoteProtocolError, match="the stored chunk does not parse"):  # bad_request
                    await client.exchange.request_chunks(server.peer_id, [cid], on_chunk)
                server.exchange.service = _FailingArtifacts(tmp_path / "n0", bug=True)
                with pytest.raises(RemoteProtocolError, match="the server failed") as info:  # internal: no details
                    await client.exchange.request_chunks(server.peer_id, [cid], on_chunk)
                assert "unexpected" not in str(info.value)
                assert server.exchange.rejected_streams == 0  # refusals, not misbehaving peers
                reply = await client.exchange.request_manifest(server.peer_id, ManifestRequest(v.cid))
                assert reply.manifest == manifest  # the node serves on
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_network_start_failures_are_clear(tmp_path):
    import asyncio

    from kvswap.protocol.errors import KvswapError, LocalProtocolError
    from kvswap.node.net import Network

    async def main():
        bad = Network()
        with pytest.raises(KvswapError):
            await bad.start(seed=seed(5), listen_addrs=["/not/a/multiaddr"])
        assert not bad.running
        with pytest.raises(LocalProtocolError):
            bad.peer_id
        await bad.stop()  # stopping a failed network is harmless

        net = Network()
        await net.start(seed=seed(6))
        try:
            with pytest.raises(LocalProtocolError):
                await net.start(seed=seed(6))
            with pytest.raises(KvswapError):
                await net.fetch("bafkrei-not-a-cid")
            assert await net.peers() == []
        finally:
            await net.stop()
            await net.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_stopped_host_closes_its_connections_so_peers_stop_asking_it(tmp_path):
    """A host stopped inside a longer-lived process (a test, a benchmark, an embedding application) closes
    its connections: its peers see it leave at once instead of sending requests nobody answers."""

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                (a,) = await start_nodes(nursery, tmp_path, 1)
                async with trio.open_nursery() as inner:
                    store = DirArtifacts(tmp_path / "leaver")
                    b = TrioNode(P2PConfig(seed=seed(9)), service=store, target=store)
                    await inner.start(b.run)
                    await b.p2p.connect(a.addrs[0])
                    assert b.peer_id in a.p2p.connected_peers()
                    inner.cancel_scope.cancel()  # B stops; the process (and A) go on
                with trio.move_on_after(5):
                    while b.peer_id in a.p2p.connected_peers():
                        await trio.sleep(0.05)
                assert b.peer_id not in a.p2p.connected_peers()
                nursery.cancel_scope.cancel()

    trio.run(main)
