"""A second transport for chunk bytes: plain TCP on the node's listen IP, granted over libp2p.

Why: py-libp2p 0.8.1 moves ~130 MB/s over one stream on loopback (Noise + Yamux in Python, 64 KiB frames),
about a tenth of a plain socket (NETWORK.md, "Data plane"). Chunks are content-addressed, so the transport
does not need to be trusted for integrity: the fetcher verifies every chunk's CID exactly as on the libp2p
path.

How: a ChunkRequest with `dataplane=True` may be answered with a DataGrant (host, port, one-time 256-bit
token, the granted CIDs) inside the authenticated, encrypted libp2p stream. The fetcher connects to
host:port, sends the token, and reads ChunkData / ChunkMissing frames for the granted CIDs in order. A token
is single-use, bound to the requesting peer's grant, and expires after DATAPLANE_GRANT_TTL_S. The fetcher only
connects to an IP at which it already knows the granting peer, so a peer cannot aim it at another host. Bytes
are not encrypted on this path (artifacts are public content).

Framing is protocol/'s: the server writes frames with the codec (`encode_parts`, or `chunk_data_header` and
then the chunk file with sendfile(2)); the fetcher parses them with protocol/dataplane.py's reader, receiving
each piece with recv_into into a buffer of exactly the size the header declared. This module only moves
bytes, keeps grants and accounts for every frame (node/accounting.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import LocalProtocolError, RemoteProtocolError, map_exceptions
from kvswap.protocol import limits
from kvswap.protocol.codec import chunk_data_header, encode_parts, payload_size
from kvswap.protocol.dataplane import DataPlaneReader
from kvswap.protocol.messages import ChunkData, ChunkMissing, DataGrant
from kvswap.protocol.names import DATAPLANE_PROTOCOL

from .accounting import TransferEvent, TransferHook, current_request
from .ration import UploadRation

log = logging.getLogger(__name__)

#: hosts a server may grant that mean "every interface": the fetcher uses the IP it reached the peer at
_UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


@dataclass
class _Grant:
    peer: str
    cids: tuple[Cid, ...]
    artifact: Cid | None
    expires: float
    request: str | None = field(default_factory=current_request.get)  # the libp2p request that granted it


class DataPlane:
    """The serving side: a TCP listener on `host` (port 0 = any) that honours grants."""

    def __init__(
        self,
        host: str,
        read_chunk: Callable[[Cid], bytes | None],
        on_transfer: TransferHook,
        limiter: trio.CapacityLimiter,
        chunk_path: Callable[[Cid], Any] | None = None,
        ration: UploadRation | None = None,
    ) -> None:
        self.host = host
        self.ration = ration or UploadRation()
        self.port = 0
        self._read_chunk = read_chunk
        self._hook = on_transfer
        self._limiter = limiter
        self._grants: dict[bytes, _Grant] = {}
        self._chunk_path = chunk_path
        self._connections = 0  # open data-plane connections; more than MAX_CONCURRENT_SERVES are refused

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def grant(self, peer: str, cids: Sequence[Cid], artifact: Cid | None = None) -> DataGrant:
        now = time.monotonic()
        for token in [t for t, g in self._grants.items() if g.expires < now]:
            del self._grants[token]
        if len(self._grants) >= limits.MAX_DATAPLANE_GRANTS:
            raise RemoteProtocolError("too many outstanding data-plane grants")
        token = secrets.token_bytes(limits.DATAPLANE_TOKEN_BYTES)
        self._grants[token] = _Grant(peer, tuple(cids), artifact, now + limits.DATAPLANE_GRANT_TTL_S)
        return DataGrant(host=self.host, port=self.port, token=token, cids=tuple(cids))

    async def _serve(self, sock: trio.SocketStream) -> None:
        _grow_buffers(sock)
        if self._connections >= limits.MAX_CONCURRENT_SERVES:
            log.info("data plane: too many connections, refusing one")
            await sock.aclose()
            return
        self._connections += 1
        try:
            token = await _receive_token(sock)
            grant = self._grants.pop(token, None)
            if grant is None or grant.expires < time.monotonic():
                log.info("data plane: unknown or expired token, closing")
                return
            current_request.set(grant.request)  # ledger rows join the libp2p request that granted them
            self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "in", len(token), 0, grant.artifact))
            for cid in grant.cids:
                await self._answer(sock, cid, grant)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            log.info("data plane: peer went away: %r", exc)
        finally:
            self._connections -= 1
            await sock.aclose()

    async def _answer(self, sock: trio.SocketStream, cid: Cid, grant: _Grant) -> None:
        """Send one granted chunk (sendfile when it is a file), or say it is missing or rationed."""
        path = data = None
        if self._chunk_path is not None:
            path = await trio.to_thread.run_sync(self._chunk_path, cid, limiter=self._limiter)
        if path is None:
            data = await trio.to_thread.run_sync(self._read_chunk, cid, limiter=self._limiter)
            if data is None:
                await self._send_msg(sock, ChunkMissing(cid), grant)
                return
        refusal = self.ration.refusal(grant.artifact, cid, grant.peer)
        if refusal is not None:
            await self._send_msg(sock, refusal, grant)
            return
        if path is not None and await self._send_file(sock, cid, path, grant):
            return
        if data is None:  # the file went away between the lookup and the send
            data = await trio.to_thread.run_sync(self._read_chunk, cid, limiter=self._limiter)
        await self._send_msg(sock, ChunkData(cid, data) if data is not None else ChunkMissing(cid), grant)

    async def _send_file(self, sock: trio.SocketStream, cid: Cid, path: Any, grant: _Grant) -> bool:
        """Send a stored chunk with sendfile(2) (no copy through Python); False if the file is gone or too big
        for a frame."""
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
            with trio.fail_after(limits.CHUNK_TIMEOUT_S):
                await sock.send_all(header)
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
                await trio.lowlevel.checkpoint()
        finally:
            os.close(fd)
        self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "out", len(header) + size, size, grant.artifact, cid))
        return True

    async def _send_msg(self, sock: trio.SocketStream, msg: ChunkData | ChunkMissing, grant: _Grant) -> None:
        """One ChunkData / ChunkMissing frame, header and payload written separately (no join of megabytes)."""
        parts = encode_parts(msg)
        with trio.fail_after(limits.CHUNK_TIMEOUT_S):
            if len(parts) == 3:
                await sock.send_all(parts[0] + parts[1])
                await sock.send_all(parts[2])
            else:
                await sock.send_all(b"".join(parts))
        self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "out", sum(map(len, parts)), payload_size(msg),
                                 grant.artifact, msg.cid))


async def _receive_token(sock: trio.SocketStream) -> bytes:
    """The grant token a fetcher opens with (DATAPLANE_TOKEN_BYTES raw bytes), or fewer if it stalls or quits."""
    token = b""
    with trio.move_on_after(limits.STREAM_IDLE_TIMEOUT_S):
        while len(token) < limits.DATAPLANE_TOKEN_BYTES:
            data = await sock.receive_some(limits.DATAPLANE_TOKEN_BYTES - len(token))
            if not data:
                break
            token += data
    return token


def _grow_buffers(sock: trio.SocketStream) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.socket.setsockopt(socket.SOL_SOCKET, opt, limits.DATAPLANE_SOCKET_BUFFER_BYTES)
        except OSError:  # capped or refused by the kernel: the default works, only slower
            pass


async def _recv_exact(sock: trio.SocketStream, n: int, peer: str,
                      idle_s: float = limits.STREAM_IDLE_TIMEOUT_S) -> bytearray:
    """Exactly n bytes, received straight into one buffer (no intermediate copies: this path is the fast one).
    A peer that sends nothing for `idle_s` is given up (its link may be cut: no FIN or RST ever comes), so
    the fetcher hands its chunks to another holder instead of waiting out CHUNK_TIMEOUT_S per chunk."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        with map_exceptions({OSError: RemoteProtocolError}, f"data plane of {peer[:16]} failed"):
            with trio.CancelScope(deadline=trio.current_time() + idle_s) as idle:
                while got < n:
                    k = await sock.socket.recv_into(view[got:])
                    if k == 0:
                        raise RemoteProtocolError(f"data plane of {peer[:16]} closed mid-frame")
                    got += k
                    idle.deadline = trio.current_time() + idle_s
    finally:
        view.release()
    if idle.cancelled_caught:
        raise RemoteProtocolError(f"data plane of {peer[:16]} sent nothing for {idle_s:g} s")
    return buf


async def fetch_granted(
    grant: DataGrant,
    peer: str,
    on_chunk: Callable[[Cid, bytes | bytearray | ChunkMissing], Awaitable[None]],
    on_transfer: TransferHook,
    artifact: Cid | None,
    known_ips: set[str],
    reached_ip: str | None = None,
) -> None:
    """The fetching side: connect, present the token, hand each granted chunk (unverified) to on_chunk.

    The grant's host must be one at which we know `peer` (`known_ips`, or `reached_ip`, the IP its libp2p
    stream came from); a server listening on every interface grants an unspecified host, and then the IP we
    reached it at is dialled. Each frame is parsed by protocol/dataplane.py's reader and received with
    recv_into into one exact-size buffer per piece: at hundreds of MB/s every extra copy shows.
    """
    allowed = known_ips | ({reached_ip} if reached_ip else set())
    host = reached_ip if grant.host in _UNSPECIFIED and reached_ip else grant.host
    if host not in allowed:
        raise RemoteProtocolError(f"peer {peer[:16]} granted a data plane on a foreign host {grant.host}")
    try:
        with trio.fail_after(limits.DIAL_TIMEOUT_S):
            sock = await trio.open_tcp_stream(host, grant.port)
    except (OSError, trio.TooSlowError) as exc:
        raise RemoteProtocolError(f"cannot reach the data plane of {peer[:16]}: {exc!r}") from exc
    _grow_buffers(sock)
    reader = DataPlaneReader(grant.cids, who=f"data plane of {peer[:16]}")
    try:
        with map_exceptions({(trio.BrokenResourceError, OSError): RemoteProtocolError},
                            f"data plane of {peer[:16]} closed"):
            await sock.send_all(grant.token)
        on_transfer(TransferEvent(peer, DATAPLANE_PROTOCOL, "out", len(grant.token), 0, artifact))
        while reader.need() is not None:
            frame = None
            with trio.move_on_after(limits.CHUNK_TIMEOUT_S) as scope:
                while frame is None:
                    frame = reader.feed(await _recv_exact(sock, reader.need(), peer))
            if scope.cancelled_caught:
                raise RemoteProtocolError(f"data plane of {peer[:16]} stalled")
            msg = frame.message
            on_transfer(TransferEvent(peer, DATAPLANE_PROTOCOL, "in", frame.wire_bytes, payload_size(msg), artifact,
                                      msg.cid))
            await on_chunk(msg.cid, msg.payload if isinstance(msg, ChunkData) else msg)
    finally:
        await sock.aclose()


__all__ = ["DataPlane", "fetch_granted"]
