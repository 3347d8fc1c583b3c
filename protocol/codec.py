"""Length-prefixed frames, sans-I/O: every frame kvswap sends or receives is built and parsed here.

Frame layout (all integers big-endian):

    +--------+----------------+------------------------+
    | type:1 | body length:4  | body (length bytes)    |
    +--------+----------------+------------------------+

The type byte selects the message class (protocol/messages.py). A prefix is rejected (`parse_prefix`) for an
unknown type, a type the conversation does not allow (protocol/conversation.py), or a length above that
type's limit, as soon as its 5 bytes are in and before any of the body is buffered, so an oversized frame
costs the receiver nothing. A malformed body raises RemoteProtocolError.

Two ways in, one parser: `Decoder` buffers whatever a libp2p stream delivers and yields whole messages (after
any error it stays poisoned: a stream that sent garbage is never trusted again); the data plane's reader
(protocol/dataplane.py) reads exact sizes into its own buffers and uses the same `parse_prefix`. Two ways
out: `encode_parts` (prefix, header and payload apart, so megabytes are never joined) and
`chunk_data_header` (prefix + CID header of a chunk whose payload the sender writes itself, by sendfile).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Collection

from .cid import Cid
from .errors import LocalProtocolError, RemoteProtocolError

from .messages import CHUNK_HEADER_BYTES, MAX_BODY_BYTES, MESSAGE_TYPES, ChunkData, Message

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


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its message and the bytes it took on the wire (prefix included), for the ledger."""

    message: Message
    wire_bytes: int


# --- prefixes ----------------------------------------------------------------------------------------------


def parse_prefix(prefix: bytes | bytearray | memoryview, allowed: Collection[int] | None = None,
                 max_body: int | None = None) -> tuple[int, int]:
    """(type, body length) of the frame whose 5-byte prefix `prefix` starts with, after checking the type is
    known and `allowed` and the length within the type's limit (and `max_body`). RemoteProtocolError if not."""
    if len(prefix) < PREFIX_BYTES:
        raise LocalProtocolError(f"a frame prefix is {PREFIX_BYTES} bytes, got {len(prefix)}")
    mtype, length = _PREFIX.unpack_from(prefix)
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None or (allowed is not None and mtype not in allowed):
        raise RemoteProtocolError(f"unexpected frame type {mtype}")
    limit = MAX_BODY_BYTES[mtype] if max_body is None else min(MAX_BODY_BYTES[mtype], max_body)
    if length > limit:
        raise RemoteProtocolError(f"{cls.__name__} frame of {length} bytes exceeds the limit of {limit}")
    return mtype, length


def encode_prefix(mtype: int, length: int) -> bytes:
    """The 5-byte prefix of a frame of type `mtype` with a body of `length` bytes (within its limit)."""
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise LocalProtocolError(f"not a kvswap frame type: {mtype}")
    if not 0 <= length <= MAX_BODY_BYTES[mtype]:
        raise LocalProtocolError(f"{cls.__name__} of {length} bytes exceeds its frame limit")
    return _PREFIX.pack(mtype, length)


def chunk_data_header(cid: Cid, payload_size: int) -> bytes:
    """Prefix and CID header of a ChunkData frame whose `payload_size` payload bytes the sender writes itself
    (the data plane sends stored chunk files with sendfile). LocalProtocolError if the frame would be too big."""
    return encode_prefix(ChunkData.TYPE, CHUNK_HEADER_BYTES + payload_size) + cid.to_bytes()


# --- whole messages ----------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One frame holding `msg`."""
    return b"".join(encode_parts(msg))


def encode_parts(msg: Message) -> list[bytes]:
    """The frame as a list of byte strings (prefix, header, payload) so big payloads are not concatenated."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", -1)) is not cls:
        raise LocalProtocolError(f"not a kvswap message: {cls.__name__}")
    parts = list(msg.body_parts()) if isinstance(msg, ChunkData) else [msg.to_body()]
    return [encode_prefix(cls.TYPE, sum(len(p) for p in parts)), *parts]


def frame_size(msg: Message) -> int:
    """Bytes `encode(msg)` produces."""
    return sum(len(p) for p in encode_parts(msg))


def payload_size(msg: Message) -> int:
    """Chunk payload bytes a message carries (the ledger's raw bytes): a ChunkData's stored bytes, else 0."""
    return len(msg.payload) if isinstance(msg, ChunkData) else 0


class Decoder:
    """Turns a byte stream into messages. Feed it what the transport delivers; it never reads by itself.

    `feed(data)` buffers and returns every complete message now available (an empty list means NEED_DATA);
    `feed_frames(data)` the same as Frames (message + wire size); `next_frame()` / `next_message()` one, or
    NEED_DATA. `allowed` is the set of frame types the conversation allows (protocol/conversation.py);
    `max_body` optionally lowers the per-type limits. `bytes_in` counts all bytes fed (wire bytes).
    """

    def __init__(self, allowed: Collection[int] | None = None, max_body: int | None = None) -> None:
        self._buf = bytearray()
        self._allowed = None if allowed is None else frozenset(allowed)
        self._max_body = max_body
        self._poisoned: RemoteProtocolError | None = None
        self._want: tuple[int, int] | None = None  # (type, length) of the frame being buffered
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        return [frame.message for frame in self.feed_frames(data)]

    def feed_frames(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._check_poisoned()
        self._buf += data
        self.bytes_in += len(data)
        out: list[Frame] = []
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return out
            out.append(frame)

    def next_message(self) -> Message | _NeedData:
        frame = self.next_frame()
        return frame if frame is NEED_DATA else frame.message

    def next_frame(self) -> Frame | _NeedData:
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

    def _next(self) -> Frame | _NeedData:
        if self._want is None:
            if len(self._buf) < PREFIX_BYTES:
                return NEED_DATA
            self._want = parse_prefix(self._buf, self._allowed, self._max_body)
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
        return Frame(msg, end)
