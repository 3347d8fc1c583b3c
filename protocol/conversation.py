"""The conversation rules of each kvswap protocol, sans-I/O: which request opens it, which replies may follow.

One request per libp2p stream: the client writes one request frame, the server answers and closes. This
table is the one place that says which frames each side may send on each protocol id; node/ builds its
decoders from it, so a peer that sends a frame its conversation does not allow is cut off at that frame's
5-byte prefix (protocol/codec.py).

| protocol              | request          | replies                                                       |
|-----------------------|------------------|---------------------------------------------------------------|
| /kvswap/manifest/1    | ManifestRequest  | one ManifestResponse or ErrorMessage                          |
| /kvswap/chunks/1      | ChunkRequest     | ChunkData / ChunkMissing per asked CID in order, or one       |
|                       |                  | DataGrant naming exactly the asked CIDs, or an ErrorMessage   |
| /kvswap/generate/1    | GenerateRequest  | one GenerateResponse or ErrorMessage                          |
| /kvswap/pay/1         | Voucher          | one VoucherAck or ErrorMessage                                |
| data plane (TCP)      | (the raw token)  | ChunkData / ChunkMissing per granted CID in order             |
| gossip announce topic | Announce         |                                                               |

The order rule of chunk answers, shared by both transports, is `ChunkAnswers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cid import Cid
from .errors import LocalProtocolError, RemoteProtocolError

from .codec import Decoder
from .messages import (
    Announce,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    DataGrant,
    ErrorMessage,
    GenerateRequest,
    GenerateResponse,
    ManifestRequest,
    ManifestResponse,
    Message,
    Voucher,
    VoucherAck,
)
from .names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL, PAY_PROTOCOL


@dataclass(frozen=True)
class Conversation:
    """What may be said on one protocol: the request that opens it (None on the data plane, which opens with
    its raw grant token) and the frame types the server may answer with."""

    protocol: str
    request: type | None
    replies: frozenset[type]
    single_reply: bool  # exactly one reply frame, then the server closes

    @property
    def request_types(self) -> frozenset[int]:
        return frozenset() if self.request is None else frozenset({self.request.TYPE})

    @property
    def reply_types(self) -> frozenset[int]:
        return frozenset(cls.TYPE for cls in self.replies)

    def request_decoder(self) -> Decoder:
        """The server's decoder: the one request frame, nothing else."""
        return Decoder(allowed=self.request_types)

    def reply_decoder(self, max_body: int | None = None) -> Decoder:
        """The client's decoder: only the frames a server may answer with (none with a body over `max_body`,
        when the client knows how big an honest answer can be)."""
        return Decoder(allowed=self.reply_types, max_body=max_body)


CONVERSATIONS: dict[str, Conversation] = {
    c.protocol: c
    for c in (
        Conversation(MANIFEST_PROTOCOL, ManifestRequest, frozenset({ManifestResponse, ErrorMessage}), True),
        Conversation(CHUNKS_PROTOCOL, ChunkRequest, frozenset({ChunkData, ChunkMissing, DataGrant, ErrorMessage}),
                     False),
        Conversation(GENERATE_PROTOCOL, GenerateRequest, frozenset({GenerateResponse, ErrorMessage}), True),
        Conversation(PAY_PROTOCOL, Voucher, frozenset({VoucherAck, ErrorMessage}), True),
        Conversation(DATAPLANE_PROTOCOL, None, frozenset({ChunkData, ChunkMissing}), False),
    )
}

#: the libp2p protocols a node serves (the data plane is its own TCP listener)
SERVED_PROTOCOLS = (MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, GENERATE_PROTOCOL, PAY_PROTOCOL)

#: frames a gossip announcement topic carries
ANNOUNCE_TYPES = frozenset({Announce.TYPE})


def announce_decoder() -> Decoder:
    """A decoder for one gossip message: an Announce and nothing else."""
    return Decoder(allowed=ANNOUNCE_TYPES)


class ChunkAnswers:
    """The order rule of a chunk answer, sans-I/O. For the CIDs asked [c1 .. cn], in that order, the server
    answers c1 with ChunkData or ChunkMissing, then c2, ..., then cn. Instead, as its first frame, it may send
    a DataGrant naming exactly c1 .. cn (the chunks then come over the data plane, where a ChunkAnswers of the
    granted CIDs without grants checks them), or at any point an ErrorMessage, which ends the answer.

    `accept(msg)` returns the message once it fits the rule, else raises RemoteProtocolError (its text starts
    with `who`, the answering side). Bytes are not verified here (node/fetch.py hashes them).
    """

    def __init__(self, cids: Sequence[Cid], grant_allowed: bool = True, who: str = "the peer") -> None:
        if not cids:
            raise LocalProtocolError("a chunk answer needs at least one CID")
        self.cids = tuple(cids)
        self.who = who
        self._grant_allowed = grant_allowed
        self._next = 0
        self._ended = False

    @property
    def expected(self) -> Cid | None:
        """The CID the next ChunkData / ChunkMissing must be for (None: every CID answered, or ended)."""
        return None if self._ended or self._next >= len(self.cids) else self.cids[self._next]

    @property
    def done(self) -> bool:
        return self.expected is None

    def accept(self, msg: Message) -> Message:
        if self.done:
            raise RemoteProtocolError(f"{self.who} sent {type(msg).__name__} after its answer was complete")
        if isinstance(msg, ErrorMessage):
            self._ended = True
            return msg
        if isinstance(msg, DataGrant):
            if not self._grant_allowed or self._next:
                raise RemoteProtocolError(f"{self.who} sent a data-plane grant that is not its whole answer")
            if msg.cids != self.cids:
                raise RemoteProtocolError(f"{self.who} granted other chunks than asked")
            self._ended = True
            return msg
        if isinstance(msg, (ChunkData, ChunkMissing)):
            if msg.cid != self.cids[self._next]:
                raise RemoteProtocolError(f"{self.who} answered for another chunk")
            self._next += 1
            return msg
        raise RemoteProtocolError(f"{self.who} sent {type(msg).__name__}, no chunk answer")


__all__ = ["ANNOUNCE_TYPES", "CONVERSATIONS", "ChunkAnswers", "Conversation", "SERVED_PROTOCOLS",
           "announce_decoder"]
