"""Transfer accounting: what crossed the wire, in which conversation, for the ledger.

Every frame the node sends or receives, on a libp2p stream (node/framed.py) or on the data plane
(node/dataplane.py), becomes one `TransferEvent`; node/net.py hands them to the daemon, which writes them to
its ledger (kvswap/ledger.py). Both transports report through this module, so neither imports the other.

Events of one conversation (one fetch, one hosted generation, one served stream) share a request id, carried
by a context variable: child tasks inherit it, and the data plane sets the id of the libp2p request that
granted it, so the report can measure bytes per request.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from typing import Callable

from kvswap.protocol.cid import Cid

#: The conversation the current trio task belongs to: one fetch, one hosted generation, one served stream.
current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvswap_request", default=None)


def new_request_id() -> str:
    """Set and return a fresh request id for the current task (and the tasks it spawns)."""
    rid = uuid.uuid4().hex[:16]
    current_request.set(rid)
    return rid


@dataclass(frozen=True)
class TransferEvent:
    """One frame (or data-plane transfer) that crossed the wire, for the ledger."""

    peer: str
    protocol: str
    direction: str  # "in" or "out"
    wire_bytes: int  # bytes on the wire for this message (frame prefix + header + payload)
    raw_bytes: int  # payload bytes (a chunk's stored bytes); 0 for control messages
    artifact: Cid | None = None
    chunk: Cid | None = None
    request: str | None = field(default_factory=current_request.get)

    def as_ledger_kwargs(self) -> dict:
        """Keyword arguments for kvswap.ledger.Ledger.transfer (CIDs as strings: the ledger is an edge):
        `ledger.transfer(**event.as_ledger_kwargs())`."""
        return {"peer": self.peer, "protocol": self.protocol, "direction": self.direction,
                "wire_bytes": self.wire_bytes, "raw_bytes": self.raw_bytes,
                "artifact": None if self.artifact is None else str(self.artifact),
                "chunk": None if self.chunk is None else str(self.chunk), "request": self.request}


TransferHook = Callable[[TransferEvent], None]


def no_hook(event: TransferEvent) -> None:
    """The hook of a node nobody keeps a ledger for."""
    return None


__all__ = ["TransferEvent", "TransferHook", "current_request", "new_request_id", "no_hook"]
