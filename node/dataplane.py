"""A second transport for chunk bytes: plain TCP on the node's listen IP, granted over libp2p.

Why: py-libp2p 0.8.1 moves ~130 MB/s over one stream on loopback (Noise + Yamux in Python, 64 KiB frames),
about a tenth of a plain socket (NETWORK.md, "Data plane"). Chunks are content-addressed, so the transport
does not need to be trusted for integrity: the fetcher verifies every chunk's CID exactly as on the libp2p
path.

How: a ChunkRequest with `dataplane=True` may be answered with a DataGrant (host, port, one-time 256-bit
token, the granted CIDs) inside the authenticated, encrypted libp2p stream. The fetcher connects to
host:port, exchanges the fixed hello and ack (protocol/dataplane.py), sends the token, and reads ChunkData /
ChunkMissing frames for the granted CIDs in order. A token is single-use, bound to the requesting peer's
grant, and expires after dataplane.grant_ttl_s. The fetcher only dials an IP at which it already knows the
granting peer and an unprivileged port, and sends the token only after the ack, so a peer cannot aim it at
another host, nor make it write anything the peer chose to another service on its own host. Bytes are not
encrypted on this path (artifacts are public content).

An optimisation, never a single point of failure: a node grants only within its quotas (grants per peer
and in total, chunks named by grants, transfers per peer; node/tuning.py) and otherwise answers on the
libp2p stream itself; connections that do not present a valid token in time are dropped, the oldest first
when too many wait, and counted rather than logged one by one; a fetcher whose data-plane connection is
refused, reset or not a kvswap data plane raises DataPlaneFailed, and node/exchange.py takes the remaining
chunks over libp2p streams from the same provider.

Framing is protocol/'s: the server writes frames with the codec (`encode_parts`, or `chunk_data_header` and
then the chunk file with sendfile(2)); the fetcher parses them with protocol/dataplane.py's reader, receiving
each piece with recv_into into a buffer of exactly the size the header declared. This module only moves
bytes, keeps grants and accounts for every frame (node/accounting.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence

import trio

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import DataPlaneFailed, LocalProtocolError, RemoteProtocolError, map_exceptions
from kvswap.protocol import limits
from kvswap.protocol.codec import chunk_data_header, encode_parts, payload_size
from kvswap.protocol.dataplane import DATAPLANE_ACK, DATAPLANE_HELLO, DataPlaneReader
from kvswap.protocol.messages import CHUNK_HEADER_BYTES, ChunkData, ChunkMissing, DataGrant
from kvswap.protocol.names import DATAPLANE_PROTOCOL

from .accounting import TransferEvent, TransferHook, current_request
from .quota import PeerCounter, RefusalLog
from .ration import UploadRation
from .uploads import UploadGate
from .tuning import DEFAULT_TUNING, DataPlaneTuning, NodeTuning

log = logging.getLogger(__name__)

#: hosts a server may grant that mean "every interface": the fetcher uses the IP it reached the peer at
_UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


@dataclass
class _Grant:
    """One outstanding grant. The CIDs are kept packed (36 bytes each), never as a tuple of objects: a grant
    naming 1024 chunks holds 36 KB, and all grants together at most dataplane.max_granted_chunks of them."""

    peer: str
    packed: bytes
    artifact: Cid | None
    expires: float
    request: str | None = field(default_factory=current_request.get)  # the libp2p request that granted it

    @property
    def n_cids(self) -> int:
        return len(self.packed) // CHUNK_HEADER_BYTES

    def cids(self) -> list[Cid]:
        step = CHUNK_HEADER_BYTES
        return [Cid.from_bytes(self.packed[i:i + step]) for i in range(0, len(self.packed), step)]


class DataPlane:
    """The serving side: a TCP listener on `host` (port 0 = any) that honours grants, within quotas."""

    def __init__(
        self,
        host: str,
        read_chunk: Callable[[Cid], bytes | None],
        on_transfer: TransferHook,
        limiter: trio.CapacityLimiter,
        chunk_path: Callable[[Cid], Any] | None = None,
        ration: UploadRation | None = None,
        tuning: NodeTuning = DEFAULT_TUNING,
        on_served: Callable[[str], None] | None = None,
        gate: UploadGate | None = None,
    ) -> None:
        self.host = host
        self.tuning = tuning
        self._on_served = on_served  # a peer took every chunk of a grant (it earns a record: node/quota.py)
        self.ration = ration or UploadRation(tuning.ration)
        #: the ration and upload slots every chunk sent goes through (the libp2p sender's, when shared)
        self.gate = gate or UploadGate.of(self.ration, tuning.serve)
        self.port = 0
        self._read_chunk = read_chunk
        self._hook = on_transfer
        self._limiter = limiter
        self._chunk_path = chunk_path
        self._grants: OrderedDict[bytes, _Grant] = OrderedDict()  # token -> grant, oldest (= expiring) first
        self._peer_grants: dict[str, dict[bytes, None]] = {}  # peer -> its tokens, oldest first
        self.granted_chunks = 0  # CIDs named by outstanding grants
        self.transfers = PeerCounter(self.tuning.serve.max_concurrent, self.tuning.dataplane.max_transfers_per_peer)
        self._pending: OrderedDict[int, trio.CancelScope] = OrderedDict()  # connections before a valid token
        self._ids = itertools.count()
        self.hello_timeout = self.tuning.dataplane.hello_timeout_s  # tests lower it
        self.refusals = RefusalLog(log, "data plane refused connections", tuning.serve.refusal_log_interval_s)
        self.grants_dropped = 0  # grants dropped for quota before use (their fetchers fall back to libp2p)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_loop)
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    # --- grants -------------------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self._grants)

    def grant(self, peer: str, cids: Sequence[Cid], artifact: Cid | None = None) -> DataGrant | None:
        """A one-time grant for `peer` to fetch `cids` over the data plane, or None when the grant would not fit
        the quotas even after dropping older grants (the caller then answers on the libp2p stream). A peer at
        its share of grants loses its own oldest one; when all grants together are at a limit, the peer holding
        the most loses its oldest: a hoarder pays for its hoard, everyone else is still granted."""
        now = time.monotonic()
        self._expire(now)
        if not cids or len(cids) > self.tuning.dataplane.max_granted_chunks:
            return None
        mine = self._peer_grants.get(peer, {})
        while len(mine) >= self.tuning.dataplane.max_grants_per_peer:
            self._drop(next(iter(mine)))
        while (len(self._grants) >= self.tuning.dataplane.max_grants
               or self.granted_chunks + len(cids) > self.tuning.dataplane.max_granted_chunks):
            hoarder = max(self._peer_grants, key=lambda p: len(self._peer_grants[p]))
            self._drop(next(iter(self._peer_grants[hoarder])))
        token = secrets.token_bytes(limits.DATAPLANE_TOKEN_BYTES)
        self._grants[token] = _Grant(peer, b"".join(c.to_bytes() for c in cids), artifact,
                                     now + self.tuning.dataplane.grant_ttl_s)
        self._peer_grants.setdefault(peer, {})[token] = None
        self.granted_chunks += len(cids)
        return DataGrant(host=self.host, port=self.port, token=token, cids=tuple(cids))

    def _take(self, token: bytes) -> _Grant | None:
        """The grant of `token`, removed (single use), or None if unknown or expired."""
        self._expire(time.monotonic())
        if token not in self._grants:
            return None
        grant = self._grants[token]
        self._forget(token)
        return grant

    def _drop(self, token: bytes) -> None:
        self._forget(token)
        self.grants_dropped += 1

    def _forget(self, token: bytes) -> None:
        grant = self._grants.pop(token)
        self.granted_chunks -= grant.n_cids
        mine = self._peer_grants[grant.peer]
        del mine[token]
        if not mine:
            del self._peer_grants[grant.peer]

    def _expire(self, now: float) -> None:
        """Forget expired grants (all grants live equally long, so the oldest expire first)."""
        while self._grants:
            token, grant = next(iter(self._grants.items()))
            if grant.expires >= now:
                return
            self._forget(token)

    async def _expire_loop(self) -> None:
        """Return the memory of unused grants once they expire, even when no new grant comes to sweep them."""
        while True:
            await trio.sleep(self.tuning.dataplane.grant_ttl_s / 4)
            self._expire(time.monotonic())

    # --- connections --------------------------------------------------------------------------------------

    async def _serve(self, sock: trio.SocketStream) -> None:
        try:
            grant = await self._admit(sock)
            if grant is None:
                return
            if not self.transfers.acquire(grant.peer):
                self.refusals.note(f"{grant.peer[:16]} is at its share of transfers")
                return
            try:
                _grow_buffers(sock, self.tuning.dataplane.socket_buffer_bytes)
                current_request.set(grant.request)  # ledger rows join the libp2p request that granted them
                self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "in", len(DATAPLANE_HELLO) +
                                         limits.DATAPLANE_TOKEN_BYTES, 0, grant.artifact))
                for cid in grant.cids():
                    await self._answer(sock, cid, grant)
                if self._on_served is not None:
                    self._on_served(grant.peer)
            finally:
                self.transfers.release(grant.peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            self.refusals.note(f"a peer went away: {exc!r}")
        finally:
            await sock.aclose()

    async def _admit(self, sock: trio.SocketStream) -> _Grant | None:
        """The hello, our ack, then a valid token: the connection's grant, or None (dropped, counted). While it
        has not shown a token it is pending; past dataplane.max_pending the oldest pending one is dropped."""
        conn = next(self._ids)
        while len(self._pending) >= self.tuning.dataplane.max_pending:
            _, oldest = self._pending.popitem(last=False)
            oldest.cancel()
        token = b""
        with trio.move_on_after(self.hello_timeout) as scope:
            self._pending[conn] = scope
            try:
                hello = await _receive_exactly(sock, len(DATAPLANE_HELLO))
                if hello != DATAPLANE_HELLO:
                    self.refusals.note("a connection without the kvswap data-plane hello")
                    return None
                await sock.send_all(DATAPLANE_ACK)
                token = await _receive_exactly(sock, limits.DATAPLANE_TOKEN_BYTES)
            finally:
                self._pending.pop(conn, None)
        if scope.cancelled_caught:
            self.refusals.note("a connection sent no hello and token in time, or was dropped for newer ones")
            return None
        grant = self._take(token) if len(token) == limits.DATAPLANE_TOKEN_BYTES else None
        if grant is None:
            self.refusals.note("an unknown, used or expired token")
        return grant

    async def _answer(self, sock: trio.SocketStream, cid: Cid, grant: _Grant) -> None:
        """Send one granted chunk (sendfile when it is a file), or say it is missing or rationed. The ration and
        the upload slot are node/uploads.py's UploadGate, shared with the libp2p sender."""
        path = data = None
        if self._chunk_path is not None:
            path = await trio.to_thread.run_sync(self._chunk_path, cid, limiter=self._limiter)
        if path is None:
            data = await trio.to_thread.run_sync(self._read_chunk, cid, limiter=self._limiter)
            if data is None:
                await self._send_msg(sock, ChunkMissing(cid), grant)
                return
        async with self.gate.turn(grant.artifact, cid, grant.peer, path, data) as turn:  # credit, ration, upload slot
            if turn.answer is not None:
                await self._send_msg(sock, turn.answer, grant)
                return
            if path is not None and await self._send_file(sock, cid, path, grant):
                turn.sent = True
                return
            if data is None:  # the file went away between the lookup and the send
                data = await trio.to_thread.run_sync(self._read_chunk, cid, limiter=self._limiter)
            await self._send_msg(sock, ChunkData(cid, data) if data is not None else ChunkMissing(cid), grant)
            turn.sent = data is not None

    async def _send_file(self, sock: trio.SocketStream, cid: Cid, path: Any, grant: _Grant) -> bool:
        """Send a stored chunk with sendfile(2) (no copy through Python); False if the file is gone or too big
        for a frame. The send fails once the fetcher has taken no byte for serve.stream_idle_timeout_s (a slow
        link is fine while it moves; under the legacy rule the whole chunk has fetch.chunk_timeout_s)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            size = os.fstat(fd).st_size
            try:
                header = chunk_data_header(cid, size)
            except LocalProtocolError:  # larger than any frame may be: let read_chunk's path refuse it
                return False
            with self._stall_guard() as progress:
                await sock.send_all(header)
                progress()
                raw = sock.socket
                offset = 0
                while offset < size:
                    try:
                        sent = os.sendfile(raw.fileno(), fd, offset, size - offset)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(raw)
                        continue
                    if sent == 0:
                        raise trio.BrokenResourceError("peer closed during sendfile")
                    offset += sent
                    progress()
                await trio.lowlevel.checkpoint()
        finally:
            os.close(fd)
        self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "out", len(header) + size, size, grant.artifact, cid))
        return True

    async def _send_msg(self, sock: trio.SocketStream, msg: ChunkData | ChunkMissing, grant: _Grant) -> None:
        """One ChunkData / ChunkMissing frame, header and payload written separately (no join of megabytes)."""
        parts = encode_parts(msg)
        with self._stall_guard() as progress:
            if len(parts) == 3:
                await sock.send_all(parts[0] + parts[1])
                progress()
                await _send_progressing(sock, parts[2], progress, self.tuning.serve.stream_read_bytes)
            else:
                await sock.send_all(b"".join(parts))
        self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "out", sum(map(len, parts)), payload_size(msg),
                                 grant.artifact, msg.cid))

    @contextlib.contextmanager
    def _stall_guard(self) -> Iterator[Callable[[], None]]:
        """A send that raises trio.TooSlowError once the peer has taken nothing for serve.stream_idle_timeout_s;
        call the yielded function on each progress. Under the legacy rule (fetch.chunk_timeout_s > 0) the whole
        send is bounded by that instead, as before."""
        legacy = self.tuning.fetch.chunk_timeout_s
        idle_s = legacy if legacy > 0 else self.tuning.serve.stream_idle_timeout_s
        with trio.CancelScope(deadline=trio.current_time() + idle_s) as scope:
            def progress() -> None:
                if not legacy:
                    scope.deadline = trio.current_time() + idle_s
            yield progress
        if scope.cancelled_caught:
            raise trio.TooSlowError(f"the peer took no byte for {idle_s:g} s")


async def _send_progressing(sock: trio.SocketStream, data: bytes | bytearray | memoryview,
                            progress: Callable[[], None], piece_bytes: int) -> None:
    """send_all in pieces of `piece_bytes`, noting progress after each (a slow reader is not a stalled one)."""
    view = memoryview(data)
    for start in range(0, len(view), piece_bytes):
        await sock.send_all(view[start:start + piece_bytes])
        progress()


async def _receive_exactly(sock: trio.SocketStream, n: int) -> bytes:
    """n bytes from a connection, or fewer if it closes first (the caller bounds the time)."""
    data = b""
    while len(data) < n:
        piece = await sock.receive_some(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _grow_buffers(sock: trio.SocketStream, nbytes: int) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.socket.setsockopt(socket.SOL_SOCKET, opt, nbytes)
        except OSError:  # capped or refused by the kernel: the default works, only slower
            pass


async def _recv_exact(sock: trio.SocketStream, n: int, peer: str, idle_s: float) -> bytearray:
    """Exactly n bytes, received straight into one buffer (no intermediate copies: this path is the fast one).
    DataPlaneFailed if the connection fails or closes first. A peer that sends nothing for `idle_s` is given up
    (its link may be cut: no FIN or RST ever comes), so the fetcher hands its chunks to another holder instead
    of waiting out `chunk_timeout_s` per chunk."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        with map_exceptions({OSError: DataPlaneFailed}, f"data plane of {peer[:16]} failed"):
            with trio.CancelScope(deadline=trio.current_time() + idle_s) as idle:
                while got < n:
                    k = await sock.socket.recv_into(view[got:])
                    if k == 0:
                        raise DataPlaneFailed(f"data plane of {peer[:16]} closed mid-frame")
                    got += k
                    idle.deadline = trio.current_time() + idle_s
    finally:
        view.release()
    if idle.cancelled_caught:
        raise RemoteProtocolError(f"data plane of {peer[:16]} sent nothing for {idle_s:g} s")
    return buf


def grant_address(grant: DataGrant, peer: str, known_ips: set[str], reached_ip: str | None,
                  min_port: int = DataPlaneTuning.min_port) -> tuple[str, int]:
    """The (host, port) a fetcher may dial for `grant`, or RemoteProtocolError: the host must be an IP at which
    we know `peer` (`known_ips`, or `reached_ip`, the IP its libp2p connection came from; a server listening
    on every interface grants an unspecified host, and then `reached_ip` is dialled), and the port an
    unprivileged one (>= `min_port`). A grant outside these is a lie the peer is penalised for."""
    allowed = known_ips | ({reached_ip} if reached_ip else set())
    host = reached_ip if grant.host in _UNSPECIFIED and reached_ip else grant.host
    if host not in allowed:
        raise RemoteProtocolError(f"peer {peer[:16]} granted a data plane on a foreign host {grant.host}")
    if grant.port < min_port:
        raise RemoteProtocolError(f"peer {peer[:16]} granted a data plane on privileged port {grant.port}")
    return host, grant.port


async def fetch_granted(
    grant: DataGrant,
    peer: str,
    on_chunk: Callable[[Cid, bytes | bytearray | ChunkMissing], Awaitable[None]],
    on_transfer: TransferHook,
    artifact: Cid | None,
    known_ips: set[str],
    reached_ip: str | None = None,
    max_body: int | None = None,
    tuning: NodeTuning = DEFAULT_TUNING,
) -> None:
    """The fetching side: connect, hello and ack, present the token, hand each granted chunk (unverified) to
    on_chunk, in the granted order. `max_body`: the largest frame body to accept (the fetcher knows how big
    the chunks it asked for are; a bigger frame is refused at its prefix, before it is buffered).

    The address must pass `grant_address`. Nothing the peer chose is sent before the server's ack matched
    DATAPLANE_ACK (protocol/dataplane.py). A connection that cannot be made, is refused, reset, stalls or is
    not a kvswap data plane raises DataPlaneFailed (the caller takes the rest over libp2p); a frame that
    breaks the rules raises RemoteProtocolError. Each frame is parsed by protocol/dataplane.py's reader and
    received with recv_into into one exact-size buffer per piece: at hundreds of MB/s every extra copy shows.
    """
    host, port = grant_address(grant, peer, known_ips, reached_ip, tuning.dataplane.min_port)
    try:
        with trio.fail_after(tuning.serve.dial_timeout_s):
            sock = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise DataPlaneFailed(f"cannot reach the data plane of {peer[:16]}: {exc!r}") from exc
    reader = DataPlaneReader(grant.cids, who=f"data plane of {peer[:16]}", max_body=max_body)
    try:
        await _handshake(sock, peer, tuning.dataplane.hello_timeout_s)
        _grow_buffers(sock, tuning.dataplane.socket_buffer_bytes)
        with map_exceptions({(trio.BrokenResourceError, OSError): DataPlaneFailed},
                            f"data plane of {peer[:16]} closed"):
            await sock.send_all(grant.token)
        on_transfer(TransferEvent(peer, DATAPLANE_PROTOCOL, "out", len(DATAPLANE_HELLO) + len(grant.token), 0,
                                  artifact))
        # progress, not size: a frame may take as long as its bytes keep coming (each receive within
        # fetch.idle_timeout_s); the request's deadline (node/fetchplan.py) bounds the whole. The legacy rule
        # (fetch.chunk_timeout_s > 0) also bounds each frame, as before.
        per_frame = tuning.fetch.chunk_timeout_s if tuning.fetch.chunk_timeout_s > 0 else math.inf
        idle_s = tuning.serve.stream_idle_timeout_s if tuning.fetch.chunk_timeout_s > 0 else tuning.fetch.idle_timeout_s
        while reader.need() is not None:
            frame = None
            with trio.move_on_after(per_frame) as scope:
                while frame is None:
                    frame = reader.feed(await _recv_exact(sock, reader.need(), peer, idle_s))
            if scope.cancelled_caught:
                raise DataPlaneFailed(f"data plane of {peer[:16]} stalled")
            msg = frame.message
            on_transfer(TransferEvent(peer, DATAPLANE_PROTOCOL, "in", frame.wire_bytes, payload_size(msg), artifact,
                                      msg.cid))
            await on_chunk(msg.cid, msg.payload if isinstance(msg, ChunkData) else msg)
    finally:
        await sock.aclose()


async def _handshake(sock: trio.SocketStream, peer: str, timeout_s: float) -> None:
    """Send the fixed hello and check the answer is exactly the data plane's ack (DataPlaneFailed if not)."""
    answer = b""
    with trio.move_on_after(timeout_s):
        with map_exceptions({(trio.BrokenResourceError, OSError): DataPlaneFailed},
                            f"data plane of {peer[:16]} closed"):
            await sock.send_all(DATAPLANE_HELLO)
            while len(answer) < len(DATAPLANE_ACK) and DATAPLANE_ACK.startswith(answer):
                piece = await sock.receive_some(len(DATAPLANE_ACK) - len(answer))
                if not piece:
                    break
                answer += piece
    if answer != DATAPLANE_ACK:
        raise DataPlaneFailed(f"{peer[:16]}'s grant does not lead to a kvswap data plane (no ack to the hello)")


__all__ = ["DataPlane", "DataPlaneFailed", "fetch_granted", "grant_address"]
