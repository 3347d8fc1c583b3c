"""Bytes on the wire per reader, from the ledger's transfer rows.

The cost model charges egress per reader, so the report measures bytes per reader, not per ledger request:
a provider gives every stream it serves its own request id (node/exchange.py), so one peer's fetch arrives
there as one manifest stream plus one stream per chunk batch, each with its own id.

What one reader is (docs/report.md repeats this):
- ship, this node the reader: one fetch. node/fetch.py gives every row of one fetch (the manifest exchange,
  every chunk request, the data-plane transfers it was granted) one request id.
- ship, this node the provider: one (peer, artifact) pair: every stream that peer opened for that artifact,
  manifest and chunk batches together. A peer that fetches the same artifact twice counts once (a provider
  cannot tell a second fetch from a resumed one).
- host, either side: one hosted generation: the requester's one stream (node/exchange.py `remote_generate`)
  and the provider's one served stream each carry one request id.

Which side a request is on: the side that opens a conversation sends first, so a request whose first row
(lowest ledger id) is "out" was made by this node, one whose first row is "in" was served by it. Rows
without a request id (ledgers written before ids existed) group by (peer, artifact) and count as one reader;
their side is the byte majority (more in than out: this node read).

A request belongs to an artifact when any of its rows names it: a fetch by document hash logs its manifest
exchange before it knows the CID, and a provider logs a request frame before it parses it.

Pure functions over TransferRow lists, no I/O.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from ..ledger import TransferRow
from ..protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL

SHIP_PROTOCOLS = (MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL)
HOST_PROTOCOLS = (GENERATE_PROTOCOL,)
WAYS = {"ship": SHIP_PROTOCOLS, "host": HOST_PROTOCOLS}
#: the two sides of a reader's conversation, seen from this node
READ, SERVED = "this node read", "served by this node"

#: what one reader is, per way and side (printed with the figures)
DEFINITIONS = {
    ("ship", READ): "one fetch by this node (one request id: manifest, chunk requests, data plane)",
    ("ship", SERVED): "one (peer, artifact) pair this node served (all its manifest and chunk streams)",
    ("host", READ): "one hosted generation this node asked for (one request id)",
    ("host", SERVED): "one hosted generation this node served (one request id)",
}


@dataclass(frozen=True)
class Request:
    """The rows of one conversation, with the side this node was on."""

    key: tuple
    way: str  # "ship" | "host"
    side: str  # READ | SERVED
    peer: str
    artifact: str | None
    in_bytes: int
    out_bytes: int
    first_id: int
    rows: int

    @property
    def wire_bytes(self) -> int:
        return self.in_bytes + self.out_bytes


@dataclass
class ReaderBytes:
    """Bytes on the wire per reader, one way (ship or host), one side; both directions summed per reader."""

    way: str
    side: str
    definition: str
    readers: int = 0
    requests: int = 0  # request ids (conversations) behind those readers
    median_wire_bytes: float | None = None
    mean_wire_bytes: float | None = None
    min_wire_bytes: int | None = None
    max_wire_bytes: int | None = None
    total_wire_bytes: int = 0
    egress_out_bytes: int = 0  # what this node sent to those readers (or, as the reader, to its providers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _way(protocol: str) -> str | None:
    for way, protocols in WAYS.items():
        if protocol in protocols:
            return way
    return None


def group_requests(rows: Iterable[TransferRow]) -> list[Request]:
    """Ship and host rows grouped into conversations, each with its side, peer and artifact."""
    groups: dict[tuple, list[TransferRow]] = defaultdict(list)
    for row in rows:
        way = _way(row.protocol)
        if way is None:
            continue
        key = (way, "request", row.request) if row.request else (way, "legacy", row.peer, row.artifact)
        groups[key].append(row)
    out = []
    for key, members in groups.items():
        members.sort(key=lambda r: r.id)
        in_b = sum(r.wire_bytes for r in members if r.direction == "in")
        out_b = sum(r.wire_bytes for r in members if r.direction == "out")
        if key[1] == "request":
            side = READ if members[0].direction == "out" else SERVED
        else:
            side = READ if in_b >= out_b else SERVED
        artifact = next((r.artifact for r in members if r.artifact), None)
        out.append(Request(key, key[0], side, members[0].peer, artifact, in_b, out_b, members[0].id, len(members)))
    out.sort(key=lambda r: r.first_id)
    return out


def per_reader(requests: Iterable[Request], way: str, side: str) -> ReaderBytes:
    """Group one way's, one side's requests into readers (module docstring) and summarise their bytes."""
    readers: dict[tuple, list[Request]] = defaultdict(list)
    for req in requests:
        if req.way != way or req.side != side:
            continue
        if way == "ship" and side == SERVED:
            reader = ("peer", req.peer, req.artifact)
        elif req.key[1] == "legacy":
            reader = ("peer", req.peer, req.artifact)
        else:
            reader = req.key
        readers[reader].append(req)
    result = ReaderBytes(way=way, side=side, definition=DEFINITIONS[(way, side)])
    if not readers:
        return result
    sizes = sorted(sum(r.wire_bytes for r in reqs) for reqs in readers.values())
    result.readers = len(sizes)
    result.requests = sum(len(reqs) for reqs in readers.values())
    result.median_wire_bytes = float(statistics.median(sizes))
    result.mean_wire_bytes = sum(sizes) / len(sizes)
    result.min_wire_bytes, result.max_wire_bytes = sizes[0], sizes[-1]
    result.total_wire_bytes = sum(sizes)
    result.egress_out_bytes = sum(r.out_bytes for reqs in readers.values() for r in reqs)
    return result


def of_artifact(requests: Iterable[Request], artifact: str | None) -> list[Request]:
    """The requests of one artifact (any row names it); all of them when `artifact` is None."""
    return [r for r in requests if artifact is None or r.artifact == artifact]
