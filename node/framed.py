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
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF

from kvswap.cid import Cid
from kvswap.errors import RemoteProtocolError, map_exceptions
from kvswap.protocol import limits
from kvswap.protocol.codec import Decoder, encode_parts, payload_size
from kvswap.protocol.messages import ChunkData, ChunkMissing, Message

from .accounting import TransferEvent, TransferHook
from .p2p import PEER_FAILURES

#: frames up to this size are written in one call; larger ones part by part (no join of megabytes)
_JOIN_BELOW_BYTES = 64 * 1024


class FramedStream:
    """`await recv()` / `await send(msg)` on one libp2p stream, with idle timeouts and accounting."""

    def __init__(self, stream: Any, peer: str, protocol: str, hook: TransferHook, decoder: Decoder,
                 idle_timeout: float = limits.STREAM_IDLE_TIMEOUT_S) -> None:
        self.stream = stream
        self.peer = peer
        self.protocol = protocol
        self.hook = hook
        self.decoder = decoder
        self.idle_timeout = idle_timeout
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
                return await self.stream.read(limits.STREAM_READ_BYTES)
            except StreamEOF:
                return b""

    async def send(self, msg: Message, artifact: Cid | None = None) -> int:
        parts = encode_parts(msg)
        wire = sum(len(p) for p in parts)
        with trio.move_on_after(self.idle_timeout) as scope:
            with map_exceptions({PEER_FAILURES: RemoteProtocolError}, f"peer {self.peer[:16]} closed the stream"):
                if wire < _JOIN_BELOW_BYTES:
                    await self.stream.write(b"".join(parts))
                else:
                    for part in parts:
                        await self.stream.write(part)
        if scope.cancelled_caught:
            raise RemoteProtocolError(f"peer {self.peer[:16]} stopped reading for {self.idle_timeout:g} s")
        self.hook(TransferEvent(self.peer, self.protocol, "out", wire, payload_size(msg), artifact or self.artifact,
                                _chunk_of(msg)))
        return wire

    async def close(self) -> None:
        with contextlib.suppress(*PEER_FAILURES):  # already reset or closed by the peer
            await self.stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(*PEER_FAILURES):  # already gone
            await self.stream.reset()


def _chunk_of(msg: Message) -> Cid | None:
    return msg.cid if isinstance(msg, (ChunkData, ChunkMissing)) else None


__all__ = ["FramedStream"]
