"""Measured inputs for the cost model, derived from this node's ledger (and store, when it has the manifest).

Why medians with their spread: timings on a shared machine are noisy (the same 255-token prefill once took
5.8 s and 19.2 s); the median of several events is what the paper reports too, and the spread (min, max,
quartiles, a warning naming the outlier: stats.py) says how far to trust it.

What is measured, and from which rows:
- prefill: "prefill" compute events (seconds, tokens) -> median seconds, median seconds per token;
- load: "load" events -> median seconds to turn stored chunks into a ready cache;
- one reuse step: "generate"/"hosted_generate" events -> median seconds per decoded token;
- reuse ratio = median prefill seconds / median seconds per reuse step, the paper's "prefill vs one
  continuation step over the resident KV" (needs prefill and generate events of the same artifact), from a
  pair of one provenance (`_reuse_ratio`): the time basis prices the same pair;
- calibration events (extra {"calibration": true}, written by `kvswap report --calibrate`, calibration.py)
  stand in for prefill or reuse-step timings only when the ledger has none of real work; the report says so;
- artifact size: the store's manifest (raw and stored sizes per chunk) when available, else sizes the daemon
  put in a compute event's extra ({"raw_bytes": .., "stored_bytes": ..}), else the distinct chunks seen in
  chunk transfers (raw_bytes; wire bytes as the stored size, framing included);
- bytes on the wire per reader, ship (manifest + chunk protocols) and host (generate protocol), on each side
  (this node the reader, this node the provider): readers.py defines a reader.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..protocol.errors import KvswapError
from ..ledger import ComputeRow, Ledger, TransferRow
from ..protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL
from .readers import READ, SERVED, ReaderBytes, group_requests, of_artifact, per_reader
from .stats import Sample, Timing, summarize

GENERATE_KINDS = ("generate", "hosted_generate")
#: the key a calibration event carries in its extra (calibration.py writes it)
CALIBRATION_KEY = "calibration"
#: where a timing came from; a reuse ratio may pair a real timing with a calibration (MIXED)
FROM_LEDGER, FROM_CALIBRATION, MIXED = "ledger", "calibration", "mixed"


def is_calibration(row: ComputeRow) -> bool:
    return bool(row.extra.get(CALIBRATION_KEY))


def _reader_bytes(way: str, side: str) -> Callable[[], ReaderBytes]:
    return lambda: per_reader([], way, side)


@dataclass
class Measured:
    """What the ledger says about this node's own costs; None where it has no events."""

    artifact: str | None = None
    artifact_choice: str = ""
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    prefill_events: int = 0
    prefill_source: str | None = None  # FROM_LEDGER | FROM_CALIBRATION | None
    prefill_tokens: float | None = None
    prefill_s: float | None = None
    prefill_s_per_token: float | None = None
    load_events: int = 0
    load_tokens: float | None = None
    load_s: float | None = None
    generate_events: int = 0
    step_source: str | None = None  # FROM_LEDGER | FROM_CALIBRATION | None
    generate_s: float | None = None
    step_s: float | None = None
    reuse_ratio: float | None = None
    ratio_source: str | None = None  # FROM_LEDGER | FROM_CALIBRATION | MIXED | None
    ratio_prefill_s: float | None = None  # the pair of medians the ratio divides
    ratio_prefill_tokens: float | None = None
    ratio_step_s: float | None = None
    calibration_events: int = 0  # calibration rows in the ledger for this artifact (used or not)
    timings: dict[str, Timing] = field(default_factory=dict)  # prefill_s, prefill_s_per_token, load_s, generate_s, step_s
    raw_bytes: int | None = None
    stored_bytes: int | None = None
    size_source: str | None = None
    size_tokens: int | None = None
    ship: ReaderBytes = field(default_factory=_reader_bytes("ship", READ))  # this node the reader
    host: ReaderBytes = field(default_factory=_reader_bytes("host", READ))
    ship_served: ReaderBytes = field(default_factory=_reader_bytes("ship", SERVED))  # this node the provider
    host_served: ReaderBytes = field(default_factory=_reader_bytes("host", SERVED))
    transfer_events: int = 0
    compute_events: int = 0

    def reader_bytes(self, way: str) -> ReaderBytes:
        """Per-reader bytes for `way`: this node's own reads, else the readers it served."""
        mine, served = (self.ship, self.ship_served) if way == "ship" else (self.host, self.host_served)
        return mine if mine.readers else served

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timings"] = {k: t.to_dict() for k, t in self.timings.items()}
        return out


def _choose_artifact(computes: list[ComputeRow]) -> str | None:
    """The artifact with the most prefill + generate events (the best-measured one)."""
    counts = Counter(c.artifact for c in computes if c.artifact and c.kind in ("prefill", *GENERATE_KINDS))
    if not counts:
        return None
    best = max(counts.values())
    return sorted(a for a, n in counts.items() if n == best)[0]


def _prefer_real(rows: list[ComputeRow]) -> tuple[list[ComputeRow], str | None]:
    """Events of real work when there are any, else calibration events; and which it was."""
    real = [r for r in rows if not is_calibration(r)]
    if real:
        return real, FROM_LEDGER
    calibrated = [r for r in rows if is_calibration(r)]
    return calibrated, (FROM_CALIBRATION if calibrated else None)


def _timing(rows: list[ComputeRow], value: Callable[[ComputeRow], float]) -> Timing | None:
    return summarize(Sample(value(r), r.id, r.at) for r in rows)


def _reuse_ratio(out: Measured, prefill_rows: list[ComputeRow], step_rows: list[ComputeRow]) -> None:
    """The reuse ratio from a pair of timings taken under the same conditions: both of real work, else both
    from calibration runs (calibration.py times a prefill and a reuse step together), else whatever exists
    (MIXED: a prefill and a step timed at different moments on a machine whose load changes)."""
    real = lambda rows: [r for r in rows if not is_calibration(r)]  # noqa: E731
    calibrated = lambda rows: [r for r in rows if is_calibration(r)]  # noqa: E731
    pairs = ((real(prefill_rows), real(step_rows), FROM_LEDGER),
             (calibrated(prefill_rows), calibrated(step_rows), FROM_CALIBRATION))
    chosen = next(((p, s, src) for p, s, src in pairs if p and s), None)
    if chosen is None:
        prefills, _ = _prefer_real(prefill_rows)
        steps, _ = _prefer_real(step_rows)
        if not (prefills and steps):
            return
        chosen = (prefills, steps, MIXED)
    prefills, steps, out.ratio_source = chosen
    p = _timing(prefills, lambda c: c.seconds)
    s = _timing(steps, lambda c: c.seconds / c.tokens)
    if p is None or s is None or not (p.median > 0 and s.median > 0):
        return
    out.ratio_prefill_s, out.ratio_step_s = p.median, s.median
    out.ratio_prefill_tokens = statistics.median([float(c.tokens) for c in prefills])
    out.reuse_ratio = p.median / s.median
    if out.ratio_source != out.prefill_source:  # not the timings shown as prefill / reuse step: show them too
        out.timings["ratio_prefill_s"] = p
    if out.ratio_source != out.step_source:
        out.timings["ratio_step_s"] = s


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


def manifest_from_store(home: Path | None, artifact: str | None) -> Any | None:
    """The local store's manifest of `artifact`, or None when the store cannot tell.

    The store is optional here: the report must work on a node that has only a ledger."""
    if home is None or artifact is None or not (Path(home) / "store" / "index.sqlite").is_file():
        return None  # no store here: do not create one just to look
    from ..home import Home
    from ..protocol.cid import Cid

    try:
        with Home(Path(home)) as h:
            cid = Cid.parse(artifact)
            return h.store.get_manifest(cid) if h.store.has_artifact(cid) else None
    except (KvswapError, OSError, sqlite3.Error):  # a store failure just means "unknown here"; the report says so
        return None


def only_stored_artifact(home: Path | None) -> str | None:
    """The CID of the one artifact in the local store, or None when it holds none or several (no guessing)."""
    if home is None or not (Path(home) / "store" / "index.sqlite").is_file():
        return None
    from ..home import Home

    try:
        with Home(Path(home)) as h:
            listed = h.store.list_artifacts()
    except (KvswapError, OSError, sqlite3.Error):
        return None
    return str(listed[0]["cid"]) if len(listed) == 1 else None


def sizes_from_store(home: Path | None, artifact: str | None) -> tuple[int, int, int | None] | None:
    """(raw, stored, tokens) from the local store's manifest, or None when the store cannot tell."""
    manifest = manifest_from_store(home, artifact)
    if manifest is None:
        return None
    # KV chunks only, raw and stored alike: the tail (last-position logits) is a per-artifact constant
    # that does not scale with tokens, and comparing chunks with chunks keeps the codec ratio honest
    chunks = manifest.chunks
    return sum(c.raw_size for c in chunks), sum(c.stored_size for c in chunks), int(manifest.n_tokens)


def measure(ledger: Ledger, *, artifact: str | None = None, home: Path | None = None,
            store_sizes: Callable[[Path | None, str | None], tuple[int, int, int | None] | None] = sizes_from_store
            ) -> Measured:
    """Derive the report's measured inputs; `artifact` restricts everything to one artifact CID."""
    all_computes = ledger.computes(artifact=artifact)
    requests = group_requests(ledger.transfers())

    chosen = artifact or _choose_artifact(all_computes)
    out = Measured(artifact=chosen, compute_events=len(all_computes))
    out.artifact_choice = "given" if artifact else ("most measured" if chosen else "all events")
    computes = [c for c in all_computes if c.artifact == chosen] if chosen else all_computes
    out.calibration_events = sum(1 for c in computes if is_calibration(c))

    prefill_rows = [c for c in computes if c.kind == "prefill"]
    step_rows = [c for c in computes if c.kind in GENERATE_KINDS and c.tokens > 0]
    prefills, out.prefill_source = _prefer_real(prefill_rows)
    gens, out.step_source = _prefer_real(step_rows)
    loads = [c for c in computes if c.kind == "load"]
    out.prefill_events, out.load_events, out.generate_events = len(prefills), len(loads), len(gens)
    timings = {
        "prefill_s": _timing(prefills, lambda c: c.seconds),
        "prefill_s_per_token": _timing([c for c in prefills if c.tokens > 0], lambda c: c.seconds / c.tokens),
        "load_s": _timing(loads, lambda c: c.seconds),
        "generate_s": _timing([g for g in gens if not is_calibration(g)], lambda c: c.seconds),
        "step_s": _timing(gens, lambda c: c.seconds / c.tokens),
    }
    out.timings = {k: t for k, t in timings.items() if t is not None}
    median = lambda key: out.timings[key].median if key in out.timings else None  # noqa: E731
    out.prefill_s, out.prefill_s_per_token = median("prefill_s"), median("prefill_s_per_token")
    out.load_s, out.generate_s, out.step_s = median("load_s"), median("generate_s"), median("step_s")
    _reuse_ratio(out, prefill_rows, step_rows)
    out.prefill_tokens = statistics.median([float(c.tokens) for c in prefills]) if prefills else None
    token_loads = [float(c.tokens) for c in loads if c.tokens > 0]
    out.load_tokens = statistics.median(token_loads) if token_loads else None
    described = prefills or loads or gens
    if described:
        last = described[-1]
        out.model, out.dtype, out.device = last.model or None, last.dtype or None, last.device or None

    mine = of_artifact(requests, chosen)
    rows_of_artifact = ledger.transfers(artifact=chosen) if chosen else []
    for source, sizes in (
        ("store manifest", lambda: store_sizes(home, chosen)),
        ("ledger compute extra", lambda: _sizes_from_extra(computes)),
        ("chunk transfers", lambda: _sizes_from_transfers(rows_of_artifact)),
    ):
        found = sizes()
        if found:
            out.raw_bytes, out.stored_bytes, out.size_tokens = found
            out.size_source = source
            break

    out.transfer_events = sum(r.rows for r in mine)
    out.ship, out.ship_served = per_reader(mine, "ship", READ), per_reader(mine, "ship", SERVED)
    out.host, out.host_served = per_reader(mine, "host", READ), per_reader(mine, "host", SERVED)
    return out
