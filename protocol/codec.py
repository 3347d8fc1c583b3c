"""Length-prefixed frames, sans-I/O: `encode(msg) -> bytes` and a `Decoder` you feed bytes.

Frame layout (all integers big-endian):

    +--------+----------------+------------------------+
    | type:1 | body length:4  | body (length bytes)    |
    +--------+----------------+------------------------+

The type byte selects the message class (protocol/messages.py). The decoder rejects an unknown type or a
length above that type's limit as soon as the 5-byte prefix is in, before buffering any of the body, so an
oversized frame costs the receiver nothing. A malformed body raises RemoteProtocolError; after any error the
decoder is poisoned (a stream that sent garbage is never trusted again).
"""

from __future__ import annotations

import struct

from kvswap.errors import LocalProtocolError, RemoteProtocolError

from .messages import MAX_BODY_BYTES, MESSAGE_TYPES, ChunkData, Message

_PREFIX = struct.Struct(">BI")
PREFIX_BYTES = _PREFIX.size


class _NeedData:
    """Sentinel: the buffer holds no complete frame yet."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def encode(msg: Message) -> bytes:
    """One frame holding `msg`."""
    return b"".join(encode_parts(msg))


def encode_parts(msg: Message) -> list[bytes]:
    """The frame as a list of byte strings (prefix, header, payload) so big payloads are not concatenated."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", -1)) is not cls:
        raise LocalProtocolError(f"not a kvswap message: {cls.__name__}")
    parts = list(msg.body_parts()) if isinstance(msg, ChunkData) else [msg.to_body()]
    length = sum(len(p) for p in parts)
    if length > MAX_BODY_BYTES[cls.TYPE]:
        raise LocalProtocolError(f"{cls.__name__} of {length} bytes exceeds its frame limit")
    return [_PREFIX.pack(cls.TYPE, length), *parts]


def frame_size(msg: Message) -> int:
    """Bytes `encode(msg)` produces, without building it."""
    return sum(len(p) for p in encode_parts(msg))


class Decoder:
    """Turns a byte stream into messages. Feed it what the transport delivers; it never reads by itself.

    `feed(data)` buffers and returns every complete message now available (an empty list means NEED_DATA);
    `next_message()` returns one message or NEED_DATA. `max_body` optionally lowers the per-type limits
    (a server that only expects requests gives a small bound). `bytes_in` counts all bytes fed (wire bytes).
    """

    def __init__(self, allowed: set[int] | None = None, max_body: int | None = None) -> None:
        self._buf = bytearray()
        self._allowed = allowed
        self._max_body = max_body
        self._poisoned: RemoteProtocolError | None = None
        self._want: tuple[int, int] | None = None  # (type, length) of the frame being buffered
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self._check_poisoned()
        self._buf += data
        self.bytes_in += len(data)
        out: list[Message] = []
        while True:
            msg = self.next_message()
            if msg is NEED_DATA:
                return out
            out.append(msg)

    def next_message(self) -> Message | _NeedData:
        self._check_poisoned()
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._poisoned = exc
            raise

    def eof(self) -> None:
        """The peer closed its side: anything still buffered is a truncated frame."""
        self._check_poisoned()
        if self._buf:
            self._poisoned = RemoteProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes buffered)")
            raise self._poisoned

    def _check_poisoned(self) -> None:
        if self._poisoned is not None:
            raise RemoteProtocolError(f"decoder already failed: {self._poisoned}")

    def _next(self) -> Message | _NeedData:
        if self._want is None:
            if len(self._buf) < PREFIX_BYTES:
                return NEED_DATA
            mtype, length = _PREFIX.unpack_from(self._buf)
            cls = MESSAGE_TYPES.get(mtype)
            if cls is None or (self._allowed is not None and mtype not in self._allowed):
                raise RemoteProtocolError(f"unexpected frame type {mtype}")
            limit = MAX_BODY_BYTES[mtype]
            if self._max_body is not None:
                limit = min(limit, self._max_body)
            if length > limit:
                raise RemoteProtocolError(f"{cls.__name__} frame of {length} bytes exceeds the limit of {limit}")
            self._want = (mtype, length)
        mtype, length = self._want
        end = PREFIX_BYTES + length
        if len(self._buf) < end:
            return NEED_DATA
        body = memoryview(self._buf)[PREFIX_BYTES:end]
        try:
            msg = MESSAGE_TYPES[mtype].from_body(body)
        finally:
            body.release()
        del self._buf[:end]
        self._want = None
        return msg
