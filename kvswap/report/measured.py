"""Measured inputs for the cost model, derived from this node's ledger (and store, when it has the manifest).

Why medians: timings on a shared machine are noisy (the same 255-token prefill once took 5.8 s and 19.2 s);
the median of several events is what the paper reports too.

What is measured, and from which rows:
- prefill: "prefill" compute events (seconds, tokens) -> median seconds, median seconds per token;
- load: "load" events -> median seconds to turn stored chunks into a ready cache;
- one reuse step: "generate"/"hosted_generate" events -> median seconds per decoded token;
- reuse ratio = median prefill seconds / median seconds per reuse step, the paper's "prefill vs one
  continuation step over the resident KV" (needs prefill and generate events of the same artifact);
- artifact size: the store's manifest (raw and stored sizes per chunk) when available, else sizes the daemon
  put in a compute event's extra ({"raw_bytes": .., "stored_bytes": ..}), else the distinct chunks seen in
  chunk transfers (raw_bytes; wire bytes as the stored size, framing included);
- bytes on the wire per request: ship = manifest + chunk protocol rows, host = generate protocol rows.
  Rows sharing a `request` id form one request; without one, ship rows group by (artifact, peer,
  direction) and each generate row counts as its own request.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import KvswapError
from ..ledger import ComputeRow, Ledger, TransferRow
from ..protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL, GENERATE_PROTOCOL, MANIFEST_PROTOCOL

SHIP_PROTOCOLS = (MANIFEST_PROTOCOL, CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL)
HOST_PROTOCOLS = (GENERATE_PROTOCOL,)
GENERATE_KINDS = ("generate", "hosted_generate")


@dataclass
class RequestBytes:
    """Bytes on the wire per request for one way of using a cache (ship or host)."""

    requests: int = 0
    total_wire_bytes: int = 0
    median_wire_bytes: float | None = None
    mean_wire_bytes: float | None = None
    egress_out_bytes: int = 0


@dataclass
class Measured:
    """What the ledger says about this node's own costs; None where it has no events."""

    artifact: str | None = None
    artifact_choice: str = ""
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    prefill_events: int = 0
    prefill_tokens: float | None = None
    prefill_s: float | None = None
    prefill_s_per_token: float | None = None
    load_events: int = 0
    load_s: float | None = None
    generate_events: int = 0
    generate_s: float | None = None
    step_s: float | None = None
    reuse_ratio: float | None = None
    raw_bytes: int | None = None
    stored_bytes: int | None = None
    size_source: str | None = None
    size_tokens: int | None = None
    ship: RequestBytes = field(default_factory=RequestBytes)
    host: RequestBytes = field(default_factory=RequestBytes)
    transfer_events: int = 0
    compute_events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _choose_artifact(computes: list[ComputeRow]) -> str | None:
    """The artifact with the most prefill + generate events (the best-measured one)."""
    counts = Counter(c.artifact for c in computes if c.artifact and c.kind in ("prefill", *GENERATE_KINDS))
    if not counts:
        return None
    best = max(counts.values())
    return sorted(a for a, n in counts.items() if n == best)[0]


def request_bytes(rows: list[TransferRow], *, group_by_row: bool) -> RequestBytes:
    """Group rows into requests and summarise their wire bytes (both directions).

    A node that both fetched and served an artifact has requests on both sides; the per-request figures
    describe the requests this node made (more bytes in than out: a consumer's fetch, a requester's hosted
    generation) and fall back to every request when it made none (a pure provider)."""
    groups: dict[Any, list[int]] = defaultdict(lambda: [0, 0])  # key -> [in, out]
    for row in rows:
        if row.request:
            key: Any = ("request", row.request)
        elif group_by_row:
            key = ("row", row.id)
        else:
            key = ("fetch", row.artifact, row.peer, row.direction)
        groups[key][0 if row.direction == "in" else 1] += row.wire_bytes
    made = [g for g in groups.values() if g[0] >= g[1]]
    sizes = sorted(sum(g) for g in (made or list(groups.values())))
    return RequestBytes(
        requests=len(sizes),
        total_wire_bytes=sum(sizes),
        median_wire_bytes=_median([float(s) for s in sizes]),
        mean_wire_bytes=(sum(sizes) / len(sizes)) if sizes else None,
        egress_out_bytes=sum(r.wire_bytes for r in rows if r.direction == "out"),
    )


def _sizes_from_transfers(rows: list[TransferRow]) -> tuple[int, int, int | None] | None:
    """(raw, stored) summed over the distinct chunks of an artifact seen on the chunk protocol."""
    raw: dict[str, int] = {}
    wire: dict[str, int] = {}
    for row in rows:
        if row.protocol not in (CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL) or not row.chunk or row.raw_bytes is None:
            continue
        raw[row.chunk] = row.raw_bytes
        wire[row.chunk] = min(wire.get(row.chunk, row.wire_bytes), row.wire_bytes)
    if not raw:
        return None
    return sum(raw.values()), sum(wire.values()), None


def _sizes_from_extra(computes: list[ComputeRow]) -> tuple[int, int, int | None] | None:
    """(raw, stored, tokens) from the newest compute event whose extra carries raw_bytes."""
    for row in reversed(computes):
        raw = row.extra.get("raw_bytes")
        if isinstance(raw, int) and raw > 0:
            stored = row.extra.get("stored_bytes")
            return raw, stored if isinstance(stored, int) and stored > 0 else raw, row.tokens or None
    return None


def sizes_from_store(home: Path | None, artifact: str | None) -> tuple[int, int, int | None] | None:
    """(raw, stored, tokens) from the local store's manifest, or None when the store cannot tell.

    The store is optional here: the report must work on a node that has only a ledger."""
    if home is None or artifact is None or not (Path(home) / "store" / "index.sqlite").is_file():
        return None  # no store here: do not create one just to look
    try:
        from ..cid import Cid
        from ..store import Store
    except ImportError:
        return None
    try:
        with Store.for_home(Path(home)) as store:
            cid = Cid.parse(artifact)
            if not store.has_artifact(cid):
                return None
            manifest = store.get_manifest(cid)
        # KV chunks only, raw and stored alike: the tail (last-position logits) is a per-artifact constant
        # that does not scale with tokens, and comparing chunks with chunks keeps the codec ratio honest
        chunks = manifest.chunks
        return sum(c.raw_size for c in chunks), sum(c.stored_size for c in chunks), int(manifest.n_tokens)
    except (KvswapError, OSError, sqlite3.Error):  # a store failure just means "size unknown here"; the report says so
        return None


def measure(ledger: Ledger, *, artifact: str | None = None, home: Path | None = None,
            store_sizes: Callable[[Path | None, str | None], tuple[int, int, int | None] | None] = sizes_from_store
            ) -> Measured:
    """Derive the report's measured inputs; `artifact` restricts everything to one artifact CID."""
    all_computes = ledger.computes(artifact=artifact)
    all_transfers = ledger.transfers(artifact=artifact)
    out = Measured(transfer_events=len(all_transfers), compute_events=len(all_computes))

    chosen = artifact or _choose_artifact(all_computes)
    out.artifact = chosen
    out.artifact_choice = "given" if artifact else ("most measured" if chosen else "all events")
    computes = [c for c in all_computes if c.artifact == chosen] if chosen else all_computes

    prefills = [c for c in computes if c.kind == "prefill"]
    loads = [c for c in computes if c.kind == "load"]
    gens = [c for c in computes if c.kind in GENERATE_KINDS and c.tokens > 0]
    out.prefill_events, out.load_events, out.generate_events = len(prefills), len(loads), len(gens)
    out.prefill_s = _median([c.seconds for c in prefills])
    out.prefill_tokens = _median([float(c.tokens) for c in prefills])
    out.prefill_s_per_token = _median([c.seconds / c.tokens for c in prefills if c.tokens > 0])
    out.load_s = _median([c.seconds for c in loads])
    out.generate_s = _median([c.seconds for c in gens])
    out.step_s = _median([c.seconds / c.tokens for c in gens])
    if out.prefill_s and out.step_s:
        out.reuse_ratio = out.prefill_s / out.step_s
    if out.prefill_tokens is None:
        out.prefill_tokens = _median([float(c.tokens) for c in loads if c.tokens > 0])
    described = prefills or loads or gens
    if described:
        last = described[-1]
        out.model, out.dtype, out.device = last.model or None, last.dtype or None, last.device or None

    chunk_rows = [t for t in all_transfers if t.artifact == chosen] if chosen else []
    for source, sizes in (
        ("store manifest", lambda: store_sizes(home, chosen)),
        ("ledger compute extra", lambda: _sizes_from_extra(computes)),
        ("chunk transfers", lambda: _sizes_from_transfers(chunk_rows)),
    ):
        found = sizes()
        if found:
            out.raw_bytes, out.stored_bytes, out.size_tokens = found
            out.size_source = source
            break

    out.ship = request_bytes([t for t in all_transfers if t.protocol in SHIP_PROTOCOLS], group_by_row=False)
    out.host = request_bytes([t for t in all_transfers if t.protocol in HOST_PROTOCOLS], group_by_row=True)
    return out
