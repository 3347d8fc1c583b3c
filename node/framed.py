"""A libp2p stream seen as kvswap messages (trio): bytes move between the stream and protocol/'s codec.

`FramedStream` reads what the stream delivers into a `Decoder` built from the conversation's table
(protocol/conversation.py) and writes encoded frames, each read and write under an idle timeout. Every
frame in and out is reported as a TransferEvent (node/accounting.py) with its exact wire size. Whatever the
libp2p stream raises when the peer goes away is translated here, once, into RemoteProtocolError (the
node/p2p.py boundary); a clean end of stream is `recv() -> None`.

Use it as an async context manager: leaving normally closes the stream, leaving by an exception (ours or
the peer's, a timeout, a cancellation) resets it, so a half-finished conversation never looks complete.
"""

from __future__ import annotations

import contextlib
from typing import Any, Awaitable, Callable

import trio
from libp2p.network.stream.exceptions import StreamEOF

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import LocalProtocolError, RemoteProtocolError, map_exceptions
from kvswap.protocol.codec import Decoder, chunk_data_header, encode_parts, payload_size
from kvswap.protocol.messages import ChunkData, ChunkMissing, Message

from .accounting import TransferEvent, TransferHook
from .p2p import PEER_FAILURES
from .tuning import ServeTuning

#: frames up to this size are written in one call; larger ones part by part (no join of megabytes)
_JOIN_BELOW_BYTES = 64 * 1024


class FramedStream:
    """`await recv()` / `await send(msg)` on one libp2p stream, with idle timeouts and accounting."""

    def __init__(self, stream: Any, peer: str, protocol: str, hook: TransferHook, decoder: Decoder,
                 idle_timeout: float = ServeTuning.stream_idle_timeout_s,
                 read_bytes: int = ServeTuning.stream_read_bytes, piece_bytes: int = ServeTuning.stream_read_bytes
                 ) -> None:
        self.stream = stream
        self.peer = peer
        self.protocol = protocol
        self.hook = hook
        self.decoder = decoder
        self.idle_timeout = idle_timeout
        self.read_bytes = read_bytes  # asked per read: a server expecting one small request asks for little
        self.piece_bytes = piece_bytes  # a served chunk is read from its file and written in pieces of this
        self._pending: list = []
        self._eof = False
        self.artifact: Cid | None = None  # attributed to every event of this stream when known

    async def __aenter__(self) -> "FramedStream":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()

    async def recv(self) -> Message | None:
        """The next message, or None at a clean end of stream. RemoteProtocolError on garbage or stall."""
        while not self._pending:
            if self._eof:
                self.decoder.eof()
                return None
            with trio.move_on_after(self.idle_timeout) as scope:
                data = await self._read()
            if scope.cancelled_caught:
                raise RemoteProtocolError(f"peer {self.peer[:16]} stalled for {self.idle_timeout:g} s")
            if not data:
                self._eof = True
                continue
            for frame in self.decoder.feed_frames(data):
                # a frame is reported once it is whole, with its exact frame size
                self.hook(TransferEvent(self.peer, self.protocol, "in", frame.wire_bytes,
                                        payload_size(frame.message), self.artifact, _chunk_of(frame.message)))
                self._pending.append(frame.message)
        return self._pending.pop(0)

    async def _read(self) -> bytes:
        with map_exceptions({PEER_FAILURES: RemoteProtocolError}, f"stream from {self.peer[:16]} failed"):
            try:
                return await self.stream.read(self.read_bytes)
            except StreamEOF:
                return b""

    @property
    def has_unread(self) -> bool:
        """Whether the peer sent bytes beyond the messages returned so far (a whole or partial frame)."""
        return bool(self._pending) or self.decoder.buffered > 0

    async def watch_quiet(self) -> str | None:
        """Wait until the peer closes its side (None: fine, it waits for our answer) or breaks the conversation:
        the reason when it sends anything more, or resets the stream. A server runs this beside its answer,
        so a peer cannot park megabytes in the muxer's buffers behind a request, and an abandoned request
        stops costing a slot."""
        try:
            data = await self._read()
        except RemoteProtocolError:
            return f"peer {self.peer[:16]} went away"
        return f"peer {self.peer[:16]} sent more after its request" if data else None

    async def send(self, msg: Message, artifact: Cid | None = None) -> int:
        parts = encode_parts(msg)
        wire = sum(len(p) for p in parts)
        if wire < _JOIN_BELOW_BYTES:
            await self._write(b"".join(parts))
        else:
            for part in parts:
                await self._write(part)
        self.hook(TransferEvent(self.peer, self.protocol, "out", wire, payload_size(msg), artifact or self.artifact,
                                _chunk_of(msg)))
        return wire

    async def send_chunk(self, cid: Cid, size: int, read_piece: Callable[[int, int], Awaitable[bytes]]) -> int:
        """One ChunkData frame of `size` payload bytes that `await read_piece(offset, n)` supplies piece by piece
        (a stored chunk read from its file): a served chunk is never whole in memory, only one piece of at most
        `piece_bytes`. `read_piece` must return exactly n bytes (raise if it cannot: the stream is then
        reset, since a half-sent frame cannot be taken back)."""
        header = chunk_data_header(cid, size)
        await self._write(header)
        offset = 0
        while offset < size:
            n = min(self.piece_bytes, size - offset)
            piece = await read_piece(offset, n)
            if len(piece) != n:
                raise LocalProtocolError(f"chunk {cid.short()} changed while it was being sent")
            await self._write(piece)
            offset += n
        wire = len(header) + size
        self.hook(TransferEvent(self.peer, self.protocol, "out", wire, size, self.artifact, cid))
        return wire

    async def _write(self, data: bytes) -> None:
        with trio.move_on_after(self.idle_timeout) as scope:
            with map_exceptions({PEER_FAILURES: RemoteProtocolError}, f"peer {self.peer[:16]} closed the stream"):
                await self.stream.write(data)
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"peer {self.peer[:16]} stopped reading for {self.idle_timeout:g} s")

    async def close(self) -> None:
        with contextlib.suppress(*PEER_FAILURES):  # already reset or closed by the peer
            await self.stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(*PEER_FAILURES):  # already gone
            await self.stream.reset()


def _chunk_of(msg: Message) -> Cid | None:
    return msg.cid if isinstance(msg, (ChunkData, ChunkMissing)) else None


__all__ = ["FramedStream"]
