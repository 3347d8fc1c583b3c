"""A second transport for chunk bytes: plain TCP on the node's listen IP, granted over libp2p.

Why: py-libp2p 0.8.1 moves ~130 MB/s over one stream on loopback (Noise + Yamux in Python, 64 KiB frames),
about a tenth of a plain socket (DESIGN.md facts). Chunks are content-addressed, so the transport does not
need to be trusted for integrity: the fetcher verifies every chunk's CID exactly as on the libp2p path.

How: a ChunkRequest with `dataplane=True` may be answered with a DataGrant (host, port, one-time 256-bit
token, the granted CIDs) inside the authenticated, encrypted libp2p stream. The fetcher connects to
host:port, sends the token, and reads ChunkData / ChunkMissing frames (the same codec and limits) for the
granted CIDs in order. A token is single-use, bound to the requesting peer's grant, and expires after
DATAPLANE_GRANT_TTL_S. The fetcher only connects to an IP at which it already knows the granting peer, so a
peer cannot aim it at another host. Bytes are not encrypted on this path (artifacts are public content).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import trio

from kvswap.cid import Cid
from kvswap.errors import RemoteProtocolError
from kvswap.protocol import limits
from kvswap.protocol.codec import encode_parts
from kvswap.protocol.messages import CHUNKS_PROTOCOL, ChunkData, ChunkMissing, DataGrant

log = logging.getLogger(__name__)

#: protocol name used in ledger rows for bytes that crossed the data plane
DATAPLANE_PROTOCOL = CHUNKS_PROTOCOL + "+tcp"
#: bytes per socket read on the data plane
_READ_BYTES = 4 << 20
#: most grants outstanding at once (each is a few hundred bytes; stops a peer from hoarding memory)
_MAX_GRANTS = 4096


class _SocketAsStream:
    """A trio SocketStream with the read/write/close/reset surface FramedStream expects."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock

    async def read(self, n: int) -> bytes:
        return await self.sock.receive_some(min(n, _READ_BYTES) if n else _READ_BYTES)

    async def write(self, data: bytes) -> None:
        await self.sock.send_all(data)

    async def close(self) -> None:
        await self.sock.aclose()

    async def reset(self) -> None:
        await self.sock.aclose()


@dataclass
class _Grant:
    peer: str
    cids: tuple[Cid, ...]
    artifact: str | None
    expires: float


class DataPlane:
    """The serving side: a TCP listener on `host` (port 0 = any) that honours grants."""

    def __init__(
        self,
        host: str,
        read_chunk: Callable[[Cid], bytes | None],
        on_transfer: Callable[[Any], None],
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.host = host
        self.port = 0
        self._read_chunk = read_chunk
        self._hook = on_transfer
        self._limiter = limiter
        self._grants: dict[bytes, _Grant] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def grant(self, peer: str, cids: Sequence[Cid], artifact: str | None = None) -> DataGrant:
        now = time.monotonic()
        for token in [t for t, g in self._grants.items() if g.expires < now]:
            del self._grants[token]
        if len(self._grants) >= _MAX_GRANTS:
            raise RemoteProtocolError("too many outstanding data-plane grants")
        token = secrets.token_bytes(limits.DATAPLANE_TOKEN_BYTES)
        self._grants[token] = _Grant(peer, tuple(cids), artifact, now + limits.DATAPLANE_GRANT_TTL_S)
        return DataGrant(host=self.host, port=self.port, token=token, cids=tuple(cids))

    async def _serve(self, sock: trio.SocketStream) -> None:
        from .exchange import TransferEvent

        try:
            token = b""
            with trio.move_on_after(limits.STREAM_IDLE_TIMEOUT_S):
                while len(token) < limits.DATAPLANE_TOKEN_BYTES:
                    data = await sock.receive_some(limits.DATAPLANE_TOKEN_BYTES - len(token))
                    if not data:
                        break
                    token += data
            grant = self._grants.pop(token, None)
            if grant is None or grant.expires < time.monotonic():
                log.info("data plane: unknown or expired token, closing")
                return
            self._hook(TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "in", len(token), 0, grant.artifact))
            for cid in grant.cids:
                data = await trio.to_thread.run_sync(self._read_chunk, cid, limiter=self._limiter)
                msg = ChunkData(cid, data) if data is not None else ChunkMissing(cid)
                parts = encode_parts(msg)
                with trio.fail_after(limits.CHUNK_TIMEOUT_S):
                    if len(parts) == 3:
                        await sock.send_all(parts[0] + parts[1])
                        await sock.send_all(parts[2])
                    else:
                        await sock.send_all(b"".join(parts))
                raw = len(data) if data is not None else 0
                self._hook(
                    TransferEvent(grant.peer, DATAPLANE_PROTOCOL, "out", sum(map(len, parts)), raw,
                                  grant.artifact, str(cid))
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
            log.info("data plane: peer went away: %r", exc)
        finally:
            await sock.aclose()


async def fetch_granted(
    grant: DataGrant,
    peer: str,
    on_chunk: Callable[[Cid, bytes | None], Awaitable[None]],
    on_transfer: Callable[[Any], None],
    artifact: str | None,
    allowed_hosts: set[str] | None = None,
) -> None:
    """The fetching side: connect, present the token, hand each granted chunk (unverified) to on_chunk."""
    from .exchange import FramedStream, TransferEvent

    if allowed_hosts is not None and grant.host not in allowed_hosts:
        raise RemoteProtocolError(f"peer {peer[:16]} granted a data plane on a foreign host {grant.host}")
    try:
        with trio.fail_after(limits.DIAL_TIMEOUT_S):
            sock = await trio.open_tcp_stream(grant.host, grant.port)
    except (OSError, trio.TooSlowError) as exc:
        raise RemoteProtocolError(f"cannot reach the data plane of {peer[:16]}: {exc!r}") from exc
    framed = FramedStream(
        _SocketAsStream(sock), peer, DATAPLANE_PROTOCOL, on_transfer,
        allowed={ChunkData.TYPE, ChunkMissing.TYPE}, idle_timeout=limits.CHUNK_TIMEOUT_S,
    )
    framed.artifact = artifact
    try:
        try:
            await sock.send_all(grant.token)
        except (trio.BrokenResourceError, OSError) as exc:
            raise RemoteProtocolError(f"data plane of {peer[:16]} closed: {exc!r}") from exc
        on_transfer(TransferEvent(peer, DATAPLANE_PROTOCOL, "out", len(grant.token), 0, artifact))
        for expected in grant.cids:
            msg = await framed.recv()
            if msg is None:
                raise RemoteProtocolError(f"data plane of {peer[:16]} closed mid-answer")
            if msg.cid != expected:
                raise RemoteProtocolError(f"data plane of {peer[:16]} sent another chunk")
            await on_chunk(expected, msg.payload if isinstance(msg, ChunkData) else None)
    finally:
        await sock.aclose()
