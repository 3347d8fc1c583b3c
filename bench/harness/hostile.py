"""Hand-written hostile peers for tests/test_hostile.py and bench/hostile.py: the attacks of issue 15.

Each attacker is a real libp2p host (kvswap's own P2PHost, with a throwaway identity) that speaks the
documented protocols with frames it builds itself, or a raw TCP socket to a node's data plane. Every attack
is bounded: it stops after a count or a duration and closes what it opened.

    async with hostile_host() as h:                  # on trio
        await h.p2p.connect(target_addr)
        stats = await silent_streams(h, target_peer, 100, hold_s=5)

Hostile providers (`serve_stalling`, `serve_late_missing`, `serve_bogus_hints`, `serve_grant_to`) replace a
host's chunk handler: connect such a host to a fetcher and it is one of the fetcher's candidate providers.
`AttackThread` runs an attack on its own trio loop beside synchronous code (a test driving the CLI);
`RssSampler` measures a process's peak resident memory from a thread while an attack runs.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from kvswap.protocol.cid import Cid
from kvswap.node.exchange import Exchange
from kvswap.node.framed import FramedStream
from kvswap.node.p2p import PEER_FAILURES, P2PConfig, P2PHost
from kvswap.protocol.codec import encode
from kvswap.protocol.conversation import CONVERSATIONS
from kvswap.protocol.dataplane import DATAPLANE_HELLO
from kvswap.protocol.messages import (
    Announce,
    ChunkMissing,
    ChunkRequest,
    DataGrant,
    GenerateRequest,
    ManifestRequest,
    ManifestResponse,
)
from kvswap.protocol.names import CHUNKS_PROTOCOL, MANIFEST_PROTOCOL, announce_topic


def random_cids(n: int) -> list[Cid]:
    return [Cid.of(os.urandom(16)) for _ in range(n)]


def random_peer_ids(n: int) -> list[str]:
    from kvswap.node.p2p import peer_id_of_seed

    return [peer_id_of_seed(os.urandom(32)) for _ in range(n)]


@dataclass
class Hostile:
    """A running hostile libp2p host: `p2p` (P2PHost) and `exchange` (kvswap's client side, serving nothing)."""

    p2p: P2PHost
    exchange: Exchange
    nursery: trio.Nursery


@contextlib.asynccontextmanager
async def hostile_host() -> AsyncIterator[Hostile]:
    async with trio.open_nursery() as nursery:
        p2p = P2PHost(P2PConfig(seed=os.urandom(32)))
        exchange = Exchange(p2p, service=None)
        await nursery.start(p2p.run)
        p2p.gossipsub.spam_protection_enabled = False  # py-libp2p limits what it sends itself; an attacker does not
        try:
            yield Hostile(p2p, exchange, nursery)
        finally:
            nursery.cancel_scope.cancel()


async def _quiet_reset(stream: Any) -> None:
    with contextlib.suppress(*PEER_FAILURES):
        await stream.reset()


# --- floods from a peer ------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    opened: int = 0  # streams whose protocol negotiation succeeded
    refused: int = 0  # of those, the ones the target reset or closed before we did
    failed_open: int = 0  # streams the target refused during negotiation


async def _hold(hold_s: float, stop: trio.Event | None) -> None:
    """Wait `hold_s`, or until `stop` is set if one is given (at most `hold_s` still)."""
    with trio.move_on_after(hold_s):
        await (stop.wait() if stop is not None else trio.sleep_forever())


async def silent_streams(h: Hostile, target: str, n: int, hold_s: float, protocol: str = MANIFEST_PROTOCOL,
                         stop: trio.Event | None = None, opened: trio.Event | None = None) -> StreamStats:
    """Open `n` streams on `protocol` and say nothing for `hold_s` or until `stop` (the slowloris of the
    issue's first row); `opened` is set once all were tried."""
    stats = StreamStats()
    streams: list[Any] = []
    with trio.move_on_after(hold_s + 30):
        for _ in range(n):
            try:
                streams.append(await h.p2p.open_stream(target, protocol))
                stats.opened += 1
            except Exception:  # the target refused the stream (a reset during negotiation): count it
                stats.failed_open += 1
        if opened is not None:
            opened.set()
        await _hold(hold_s, stop)

        async def probe(stream: Any) -> None:
            with trio.move_on_after(0.5):
                try:
                    await stream.read(1)
                except Exception:  # reset or closed by the target
                    stats.refused += 1

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(probe, stream)
    for stream in streams:
        await _quiet_reset(stream)
    return stats


async def oversized_requests(h: Hostile, target: str, n: int, body_bytes: int) -> int:
    """`n` parallel ChunkRequest frames of `body_bytes` of empty msgpack arrays (0x90 each); the count the
    target cut off (reset or closed without an answer)."""
    cut = 0
    frame = struct.pack(">BI", ChunkRequest.TYPE, body_bytes) + b"\x90" * body_bytes

    async def one() -> None:
        nonlocal cut
        with trio.move_on_after(30):
            try:
                stream = await h.p2p.open_stream(target, CHUNKS_PROTOCOL)
                await stream.write(frame)
                data = await stream.read(1024)
            except Exception:  # cut off mid-write or mid-read
                cut += 1
                return
            if not data:
                cut += 1
            await _quiet_reset(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return cut


async def hoard_grants(h: Hostile, target: str, cids: list[Cid], n: int, parallel: int = 8) -> int:
    """Ask `target` for `n` data-plane grants of `cids` and never use them; the count granted."""
    granted = 0
    todo = iter(range(n))

    async def worker() -> None:
        nonlocal granted
        for _ in todo:
            framed = await h.exchange._open(target, CHUNKS_PROTOCOL)
            try:
                async with framed:
                    await framed.send(ChunkRequest(tuple(cids), dataplane=True))
                    reply = await framed.recv()
            except Exception:  # refused or reset: count only grants
                continue
            if isinstance(reply, DataGrant):
                granted += 1

    with trio.move_on_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
    return granted


async def dataplane_address(h: Hostile, target: str) -> tuple[str, int]:
    """Where `target`'s data plane listens: any grant says (one for a random CID, never used)."""
    framed = await h.exchange._open(target, CHUNKS_PROTOCOL)
    async with framed:
        await framed.send(ChunkRequest(tuple(random_cids(1)), dataplane=True))
        grant = await framed.recv()
    if not isinstance(grant, DataGrant):
        raise RuntimeError(f"{target[:16]} granted no data plane: {grant!r:.200}")
    return grant.host, grant.port


async def dataplane_idle_sockets(host: str, port: int, n: int, hold_s: float, stop: trio.Event | None = None,
                                 opened: trio.Event | None = None) -> int:
    """`n` TCP connections to a data plane that send nothing, held `hold_s` (or until `stop`); how many the
    node dropped meanwhile."""
    socks = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            socks.append(await trio.open_tcp_stream(host, port))
    if opened is not None:
        opened.set()
    await _hold(hold_s, stop)
    dropped = 0
    for sock in socks:
        with trio.move_on_after(0.2):
            try:
                if await sock.receive_some(1) == b"":
                    dropped += 1
            except trio.BrokenResourceError:
                dropped += 1
        await sock.aclose()
    return dropped


async def dataplane_reconnect_flood(host: str, port: int, workers: int, duration_s: float) -> int:
    """`workers` loops that connect, send a hello and a random token, and reconnect, for `duration_s`; the
    number of connections made."""
    made = 0

    async def loop() -> None:
        nonlocal made
        while True:
            try:
                sock = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.01)
                continue
            made += 1
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sock.send_all(DATAPLANE_HELLO + os.urandom(32))
                with trio.move_on_after(1):
                    while await sock.receive_some(4096):
                        pass
            await sock.aclose()

    with trio.move_on_after(duration_s):
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(loop)
    return made


async def gossip_flood(h: Hostile, model_fingerprint: str, n: int, wait_mesh_s: float = 10.0) -> int:
    """Publish `n` announcements of random CIDs on the model's topic as fast as the host can; how many were
    published. Waits (bounded) until some peer is known on the topic first."""
    topic = announce_topic(model_fingerprint)
    await h.p2p.subscribe(topic, lambda data, sender: None)
    with trio.move_on_after(wait_mesh_s):
        while not h.p2p.topic_peers(topic):
            await trio.sleep(0.1)
    sent = 0
    for cid in random_cids(n):
        await h.p2p.publish(topic, encode(Announce(cid, model_fingerprint, "ee" * 32, 64, h.p2p.peer_id)))
        sent += 1
        if sent % 200 == 0:
            await trio.sleep(0)
    return sent


async def gossip_fresh_keys(h: Hostile, model_fingerprint: str, n: int, wait_mesh_s: float = 10.0) -> int:
    """Publish `n` announcements, each signed by a fresh throwaway key and naming it as the publisher (a
    per-publisher rate alone lets every one through); how many were pushed. The same peer delivers them all."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    topic = announce_topic(model_fingerprint)
    await h.p2p.subscribe(topic, lambda data, sender: None)
    with trio.move_on_after(wait_mesh_s):
        while not h.p2p.topic_peers(topic):
            await trio.sleep(0.1)
    pushed = 0
    for i, cid in enumerate(random_cids(n)):
        keys = create_new_key_pair(os.urandom(32))
        origin = ID.from_pubkey(keys.public_key)
        data = encode(Announce(cid, model_fingerprint, "ee" * 32, 64, origin.to_base58()))
        msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=origin.to_bytes(), seqno=i.to_bytes(8, "big"))
        msg.signature = keys.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        msg.key = keys.public_key.serialize()
        await h.p2p.pubsub.push_msg(h.p2p.pubsub.my_id, msg)
        pushed += 1
        if pushed % 100 == 0:
            await trio.sleep(0)
    return pushed


async def crowd_of_identities(target_addr: str, target: str, identities: int, streams_each: int,
                              stop: trio.Event, ready: trio.Event | None = None) -> StreamStats:
    """`identities` throwaway peer identities, all from this machine's one address, each holding
    `streams_each` silent streams to `target` and reopening them as they are cut, until `stop` (the flood
    that per-identity shares alone cannot hold)."""
    stats = StreamStats()

    async def one(index: int) -> None:
        async with hostile_host() as h:
            await h.p2p.connect(target_addr)
            held: list[Any] = []
            while not stop.is_set():
                while len(held) < streams_each and not stop.is_set():
                    try:
                        held.append(await h.p2p.open_stream(target, MANIFEST_PROTOCOL))
                        stats.opened += 1
                    except Exception:  # refused during negotiation (reset): try again shortly
                        stats.failed_open += 1
                        await trio.sleep(0.2)
                if ready is not None and index == identities - 1:
                    ready.set()
                with trio.move_on_after(0.5):
                    await stop.wait()
                alive = []
                for stream in held:  # a stream the target cut reads EOF or fails at once
                    with trio.move_on_after(0.01) as probe:
                        try:
                            await stream.read(1)
                        except Exception:  # reset by the target
                            stats.refused += 1
                            continue
                    if probe.cancelled_caught:
                        alive.append(stream)
                    else:
                        stats.refused += 1
                held = alive
            for stream in held:
                await _quiet_reset(stream)

    async with trio.open_nursery() as nursery:
        for i in range(identities):
            nursery.start_soon(one, i)
    return stats


async def long_generations(h: Hostile, target: str, cid: Cid, n: int, max_new_tokens: int) -> list[str]:
    """`n` concurrent hosted generations of `max_new_tokens`; what each ended with ("ok" or the error type)."""
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await h.exchange.remote_generate(target, GenerateRequest(cid, (1, 2, 3), max_new_tokens, seed=1))
            outcomes.append("ok")
        except Exception as exc:  # Busy for the ones over the share
            outcomes.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
            await trio.sleep(0.05)  # in order: the first one runs, the others queue behind it
    return outcomes


async def freeload(h: Hostile, target: str, artifact: Cid, chunks: list[Cid], max_s: float = 60.0) -> dict:
    """A consumer that accepts a priced provider's terms and never pays: it asks for `chunks` one request at a
    time, under the terms from the provider's manifest answer, and signs no voucher. Stops at the first
    answer without bytes (the provider held back), or when every chunk came, or after `max_s`. Returns the
    bytes it got for nothing and how it ended."""
    from kvswap.payments.terms import decode_terms

    reply = await h.exchange.request_manifest(target, ManifestRequest(artifact))
    terms = decode_terms(reply.terms)
    got = {"bytes": 0, "chunks": 0, "ended": "all chunks", "credit_bytes": terms.credit_bytes}

    async def on_chunk(cid: Cid, answer: Any) -> None:
        if isinstance(answer, ChunkMissing):
            got["ended"] = "held back" if answer.rationed else "missing"
        else:
            got["bytes"] += len(answer)
            got["chunks"] += 1

    with trio.move_on_after(max_s) as scope:
        for cid in chunks:
            try:
                await h.exchange.request_chunks(target, [cid], on_chunk, artifact=artifact, terms=terms.digest)
            except Exception as exc:  # a refusal is how it ends, whatever its type
                got["ended"] = type(exc).__name__
            if got["ended"] != "all chunks":
                break
    if scope.cancelled_caught:
        got["ended"] = "timeout"
    return got


# --- hostile providers --------------------------------------------------------------------------------------


async def copy_manifest(h: Hostile, provider: str, cid: Cid) -> ManifestResponse:
    """The real manifest of `cid` from an honest provider, to serve as if we held the artifact."""
    return await h.exchange.request_manifest(provider, ManifestRequest(cid))


def serve_manifest(h: Hostile, reply: ManifestResponse) -> None:
    """Answer every manifest request with `reply` (the hostile provider claims the artifact)."""

    async def handler(stream: Any) -> None:
        framed = FramedStream(stream, "x", MANIFEST_PROTOCOL, lambda e: None,
                              CONVERSATIONS[MANIFEST_PROTOCOL].request_decoder())
        with contextlib.suppress(Exception):
            async with framed:
                await framed.recv()
                await framed.send(reply)

    h.p2p.set_stream_handler(MANIFEST_PROTOCOL, handler)


def _chunk_handler(answer) -> Any:
    async def handler(stream: Any) -> None:
        framed = FramedStream(stream, "x", CHUNKS_PROTOCOL, lambda e: None,
                              CONVERSATIONS[CHUNKS_PROTOCOL].request_decoder(), idle_timeout=600)
        with contextlib.suppress(Exception):
            async with framed:
                request = await framed.recv()
                await answer(framed, request)

    return handler


def serve_stalling(h: Hostile) -> None:
    """Chunk requests are read and never answered (the provider that stalls)."""

    async def answer(framed: FramedStream, request: ChunkRequest) -> None:
        await trio.sleep_forever()

    h.p2p.set_stream_handler(CHUNKS_PROTOCOL, _chunk_handler(answer))


def serve_late_missing(h: Hostile, delay_s: float) -> None:
    """Every chunk is answered ChunkMissing, after `delay_s` (the provider that answers late)."""

    async def answer(framed: FramedStream, request: ChunkRequest) -> None:
        await trio.sleep(delay_s)
        for cid in request.cids:
            await framed.send(ChunkMissing(cid))

    h.p2p.set_stream_handler(CHUNKS_PROTOCOL, _chunk_handler(answer))


def serve_bogus_hints(h: Hostile, holders: list[str]) -> None:
    """Every chunk is "rationed", naming `holders` that do not exist (or do not have it)."""

    async def answer(framed: FramedStream, request: ChunkRequest) -> None:
        for cid in request.cids:
            await framed.send(ChunkMissing(cid, rationed=True, holders=tuple(holders[:4])))

    h.p2p.set_stream_handler(CHUNKS_PROTOCOL, _chunk_handler(answer))


def serve_grant_to(h: Hostile, host: str, port: int) -> None:
    """Every data-plane chunk request is granted on `host:port` (another service on our address) with a token
    of the attacker's choosing; requests without the data plane are answered "lacks it"."""

    async def answer(framed: FramedStream, request: ChunkRequest) -> None:
        if request.dataplane:
            await framed.send(DataGrant(host, port, b"FLUSHALL\r\nQUIT\r\n" * 2, request.cids))
        else:
            for cid in request.cids:
                await framed.send(ChunkMissing(cid))

    h.p2p.set_stream_handler(CHUNKS_PROTOCOL, _chunk_handler(answer))


@dataclass
class Bystander:
    """A TCP service that records every byte it is sent (the service a hostile grant aims at)."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, sock: trio.SocketStream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            with trio.move_on_after(30):
                while data := await sock.receive_some(4096):
                    self.received += data
        await sock.aclose()


class AttackThread:
    """An attack on its own trio loop in a thread. `body(ready, stop)` is an async function that sets the trio
    event `ready` once it is under way and ends when `stop` is set (or by itself); its return value is the
    attack's stats."""

    def __init__(self, body: Callable[[Any, Any], Awaitable[dict]]) -> None:
        self.body = body
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.result: dict = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:

        async def main() -> None:
            ready, stop = trio.Event(), trio.Event()

            async def relay() -> None:
                await ready.wait()
                self.ready.set()

            async def watch_stop() -> None:
                while not self._stop.is_set():
                    await trio.sleep(0.05)
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay)
                nursery.start_soon(watch_stop)
                self.result = await self.body(ready, stop) or {}
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self.ready.set()

    def start(self, timeout: float = 120) -> "AttackThread":
        self._thread.start()
        self.ready.wait(timeout)
        if self.error is not None:
            raise RuntimeError(f"attack failed to start: {self.error!r}")
        return self

    def wait(self, timeout: float = 120) -> dict:
        """Let the attack run to its own end (bounded), then report as `stop` does."""
        self._thread.join(timeout)
        return self.stop(timeout=5)

    def stop(self, timeout: float = 120) -> dict:
        self._stop.set()
        self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"attack failed: {self.error!r}") from self.error
        return self.result


# --- memory of the attacked process ---------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident memory every `every_s` in a thread: `with RssSampler(pid) as s: ...`,
    then `s.peak` (bytes)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = self.rss()
            except Exception:  # the process is gone
                return
            self.peak = max(self.peak, self.last)
            time.sleep(self.every_s)

    def __enter__(self) -> "RssSampler":
        self.peak = self.last = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.last = self.rss()
            self.peak = max(self.peak, self.last)


def gone_holders_beside_a_staller(root: Path, tuning: Any, chunks: int = 26, chunk_bytes: int = 24 * 1024,
                                  seed: int = 0, timeout_s: float = 150.0) -> dict:
    """Issue 24's scenario, on real libp2p nodes on 127.0.0.1 in this process: a publisher (rationing under
    `tuning`) serves two takers in turn, which leave with its copies; a third node fetches with a provider
    beside the publisher that reads chunk requests and never answers (serve_stalling). Returns quiet_s (the
    first taker's fetch), stalled_s (the third node's) and from_publisher (chunks it got from the publisher)."""
    from bench.harness.netharness import DirArtifacts, make_artifact
    from kvswap.node.net import TrioNode
    from kvswap.node.p2p import P2PConfig

    manifest, blobs, _ = make_artifact(chunks, chunk_bytes)
    times: dict[str, float] = {}

    async def start(nursery, name: str, i: int) -> TrioNode:
        store = DirArtifacts(root / name)
        node = TrioNode(P2PConfig(seed=bytes([(seed * 8 + i) % 251 + 1]) * 32, tuning=tuning), service=store,
                        target=store)
        await nursery.start(node.run)
        node.store = store
        return node

    async def main() -> None:
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                pub = await start(nursery, "pub", 1)
                v = pub.store.add(manifest, blobs)
                async with trio.open_nursery() as takers:
                    for i in (2, 3):
                        taker = await start(takers, f"taker{i}", i)
                        await taker.p2p.connect(pub.addrs[0])
                        t0 = trio.current_time()
                        await taker.fetcher.fetch(v.cid, providers=[pub.peer_id])
                        times.setdefault("quiet_s", trio.current_time() - t0)
                    takers.cancel_scope.cancel()  # they leave with the copies
                me = await start(nursery, "me", 4)
                async with hostile_host() as staller:
                    await staller.p2p.connect(pub.addrs[0])
                    serve_manifest(staller, await copy_manifest(staller, pub.peer_id, v.cid))
                    serve_stalling(staller)
                    await me.p2p.connect(staller.p2p.addrs[0])
                    await me.p2p.connect(pub.addrs[0])
                    t0 = trio.current_time()
                    result = await me.fetcher.fetch(v.cid, providers=[staller.p2p.peer_id, pub.peer_id])
                    times["stalled_s"] = trio.current_time() - t0
                    times["from_publisher"] = result.providers.get(pub.peer_id, 0)
                nursery.cancel_scope.cancel()

    trio.run(main)
    return times

