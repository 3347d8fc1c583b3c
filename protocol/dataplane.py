"""The data plane's framing, sans-I/O: the opening handshake, then what a fetcher reads after its grant token.

A data-plane connection opens with a fixed handshake before any byte a peer chose crosses it:

    fetcher -> server   DATAPLANE_HELLO   (fixed bytes: nothing the granting peer picked)
    server  -> fetcher  DATAPLANE_ACK     (fixed, and different from the hello: an echo service fails it)
    fetcher -> server   the grant token   (DATAPLANE_TOKEN_BYTES, only once the ack matched)
    server  -> fetcher  the granted chunks, framed as below

A grant names a host and port the fetcher dials; if a hostile peer names some other service on its own
address (a database, a mail server), that service sees only the hello, never answers with the ack, and so
never receives the token or anything else the peer could have chosen.

The data plane (node/dataplane.py) moves chunk bytes over plain TCP at hundreds of MB/s, where every copy
shows, so its reader does not buffer a stream like `codec.Decoder`. It says exactly how many bytes it needs
next (`need()`); the transport receives exactly that many straight into a fresh buffer (recv_into) and
hands the buffer over (`feed()`), so a chunk's payload lands in one buffer of its exact size and is passed
on uncopied. Parsing and checking are the codec's and the chunk answer rule's (protocol/codec.py,
protocol/conversation.py), the same as on a libp2p stream:

    prefix (5 bytes)  -> type ChunkData or ChunkMissing only, length within the type's limit
    ChunkData:   CID header (36 bytes) -> must be the next granted CID, checked before the payload is read
                 payload (length - 36 bytes)
    ChunkMissing: body (length bytes) -> msgpack, for the next granted CID

    reader = DataPlaneReader(grant.cids, who="data plane of peer X")
    while (n := reader.need()) is not None:
        frame = reader.feed(await receive_exactly(n))    # a Frame once one is complete, else None
"""

from __future__ import annotations

from typing import Sequence

from .cid import Cid
from .errors import FormatError, LocalProtocolError, RemoteProtocolError

from .codec import PREFIX_BYTES, Frame, parse_prefix
from .conversation import CONVERSATIONS, ChunkAnswers
from .messages import CHUNK_HEADER_BYTES, ChunkData, ChunkMissing
from .names import DATAPLANE_PROTOCOL

_ALLOWED = CONVERSATIONS[DATAPLANE_PROTOCOL].reply_types

#: What a fetcher sends first on a data-plane connection. Starts with a NUL byte, so no line-based text
#: protocol (HTTP, SMTP, Redis inline commands) reads a command from it.
DATAPLANE_HELLO = b"\x00kvswap-dataplane/1 hello\n"
#: What a kvswap data plane answers to the hello, exactly; anything else and the fetcher sends nothing more.
DATAPLANE_ACK = b"\x00kvswap-dataplane/1 ready\n"


class DataPlaneReader:
    """Parses the frames answering one data-plane grant, in the order granted; never reads by itself."""

    def __init__(self, cids: Sequence[Cid], who: str = "the data plane", max_body: int | None = None) -> None:
        self._answers = ChunkAnswers(cids, grant_allowed=False, who=who)
        self.who = who
        self._max_body = max_body  # a fetcher that knows the chunks' sizes refuses bigger frames at the prefix
        self._stage = "prefix"
        self._need: int | None = PREFIX_BYTES
        self._length = 0
        self._cid: Cid | None = None
        self._poisoned: RemoteProtocolError | None = None

    def need(self) -> int | None:
        """Bytes the next `feed` takes, exactly; None once every granted CID is answered."""
        return None if self._answers.done else self._need

    def feed(self, data: bytes | bytearray) -> Frame | None:
        """Take exactly `need()` bytes; return the frame they complete (its payload is `data` itself for a
        ChunkData), or None if the frame needs more. RemoteProtocolError on anything the rules refuse; after
        one the reader stays failed."""
        if self._poisoned is not None:
            raise RemoteProtocolError(f"data-plane reader already failed: {self._poisoned}")
        if self.need() is None or len(data) != self._need:
            raise LocalProtocolError(f"fed {len(data)} bytes, the reader needs {self.need()}")
        try:
            return self._step(data)
        except RemoteProtocolError as exc:
            self._poisoned = exc
            raise

    def _step(self, data: bytes | bytearray) -> Frame | None:
        if self._stage == "prefix":
            mtype, self._length = parse_prefix(data, _ALLOWED, self._max_body)
            if mtype == ChunkMissing.TYPE:
                self._stage, self._need = "missing", self._length
                return self._missing(b"") if self._length == 0 else None
            if self._length < CHUNK_HEADER_BYTES:
                raise RemoteProtocolError(f"{self.who} sent a ChunkData frame shorter than its header")
            self._stage, self._need = "header", CHUNK_HEADER_BYTES
            return None
        if self._stage == "header":
            try:
                self._cid = Cid.from_bytes(bytes(data))
            except FormatError as exc:
                raise RemoteProtocolError(f"{self.who} sent a malformed ChunkData header: {exc}") from exc
            if self._cid != self._answers.expected:  # refused before its payload is read
                raise RemoteProtocolError(f"{self.who} sent another chunk than granted")
            payload = self._length - CHUNK_HEADER_BYTES
            if payload == 0:
                return self._chunk(bytearray())
            self._stage, self._need = "payload", payload
            return None
        if self._stage == "payload":
            return self._chunk(data)
        return self._missing(data)

    def _chunk(self, payload: bytes | bytearray) -> Frame:
        msg = self._answers.accept(ChunkData(self._cid, payload))
        return self._frame_done(Frame(msg, PREFIX_BYTES + self._length))

    def _missing(self, body: bytes | bytearray) -> Frame:
        msg = self._answers.accept(ChunkMissing.from_body(body))
        return self._frame_done(Frame(msg, PREFIX_BYTES + self._length))

    def _frame_done(self, frame: Frame) -> Frame:
        self._stage, self._need, self._cid = "prefix", PREFIX_BYTES, None
        return frame


__all__ = ["DATAPLANE_ACK", "DATAPLANE_HELLO", "DataPlaneReader"]
