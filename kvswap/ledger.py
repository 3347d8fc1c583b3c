"""The node's ledger: every byte that crosses the wire and every second of compute, one SQLite row each.

Why: the report (kvswap/reporting/) answers "does shipping KV beat re-prefill?" with this node's own
numbers, so the daemon records events as they happen, from its worker threads:

    ledger = Ledger(home / "ledger.sqlite")
    ledger.transfer(peer=pid, protocol="/kvswap/chunks/1", direction="out", wire_bytes=n, raw_bytes=r,
                    artifact=cid, chunk=chunk_cid, request=req_id)
    ledger.compute(kind="prefill", seconds=s, tokens=t, model=m, dtype="bf16", device="cpu", artifact=cid)

Durability: the file is in WAL mode with synchronous=FULL and every event is its own committed
transaction, so once `transfer()`/`compute()` returns the row survives a killed process and a power cut
(NORMAL would survive a killed process only). An fsync per event is cheap next to moving a multi-MB
chunk or running a forward pass. One connection guarded by a lock serves all threads: SQLite serialises
writers anyway, and one connection is one thing to close.

Rows of one logical request (one artifact fetch, one hosted generation) may share a `request` id; the
report groups by it to measure bytes per request (and falls back to (artifact, peer) without it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .protocol.errors import FormatError, KvswapError, UsageError

#: the file name inside a node's home
LEDGER_FILE = "ledger.sqlite"
#: schema version written to PRAGMA user_version
SCHEMA_VERSION = 1
#: compute event kinds the report understands
COMPUTE_KINDS = ("audit", "generate", "hosted_generate", "load", "prefill")
#: transfer directions, seen from this node
DIRECTIONS = ("in", "out")
#: columns `totals()` may group transfers by
TOTAL_KEYS = ("artifact", "direction", "peer", "protocol")
# Rows carry the protocol id they travelled under (kvswap.protocol.names; any other id is recorded as given).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    peer TEXT NOT NULL,
    protocol TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    wire_bytes INTEGER NOT NULL CHECK (wire_bytes >= 0),
    raw_bytes INTEGER CHECK (raw_bytes IS NULL OR raw_bytes >= 0),
    artifact TEXT,
    chunk TEXT,
    request TEXT
);
CREATE INDEX IF NOT EXISTS transfers_at ON transfers (at);
CREATE INDEX IF NOT EXISTS transfers_artifact ON transfers (artifact);
CREATE INDEX IF NOT EXISTS transfers_peer ON transfers (peer);
CREATE TABLE IF NOT EXISTS computes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    dtype TEXT NOT NULL,
    tokens INTEGER NOT NULL CHECK (tokens >= 0),
    seconds REAL NOT NULL CHECK (seconds >= 0),
    device TEXT NOT NULL,
    artifact TEXT,
    extra TEXT
);
CREATE INDEX IF NOT EXISTS computes_at ON computes (at);
CREATE INDEX IF NOT EXISTS computes_artifact ON computes (artifact);
CREATE INDEX IF NOT EXISTS computes_kind ON computes (kind);
"""


@dataclass(frozen=True)
class TransferRow:
    """One transfer event: bytes that crossed the wire on one protocol, one direction, with one peer."""

    id: int
    at: float
    peer: str
    protocol: str
    direction: str
    wire_bytes: int
    raw_bytes: int | None
    artifact: str | None
    chunk: str | None
    request: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ComputeRow:
    """One compute event: a prefill, a KV load or a generation, how many tokens and how long."""

    id: int
    at: float
    kind: str
    model: str
    dtype: str
    tokens: int
    seconds: float
    device: str
    artifact: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_or_none(value: Any) -> str | None:
    """CIDs may arrive as `Cid` objects or strings; the ledger stores their string form."""
    return None if value is None else str(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"ledger: {name} must be a non-negative integer, got {value!r}")
    return value


class Ledger:
    """Append-only event log in SQLite; safe to share between threads; every write is durable on return."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FormatError(f"ledger {self.path} has schema {version}; this kvswap reads up to {SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:  # only a new file is written to here: readers (the CLI) stay readers
                self._conn.executescript(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"ledger {self.path} is not a usable SQLite database: {exc}") from exc
        except OSError as exc:
            raise KvswapError(f"cannot open ledger {self.path}: {exc}") from exc

    @classmethod
    def for_home(cls, home: str | Path) -> "Ledger":
        """The ledger of the node whose home is `home` (<home>/ledger.sqlite)."""
        return cls(ledger_path(home))

    # --- writing -----------------------------------------------------------------------------------
    def transfer(
        self,
        *,
        peer: str,
        protocol: str,
        direction: str,
        wire_bytes: int,
        raw_bytes: int | None = None,
        artifact: Any = None,
        chunk: Any = None,
        request: str | None = None,
        at: float | None = None,
    ) -> int:
        """Record bytes that crossed the wire; returns the row id once the row is durable.

        wire_bytes: what the socket carried (stored/compressed chunk bytes plus framing);
        raw_bytes: the decompressed size of the payload, when it has one (chunks)."""
        if direction not in DIRECTIONS:
            raise UsageError(f"ledger: direction must be 'in' or 'out', got {direction!r}")
        if not peer or not protocol:
            raise UsageError("ledger: a transfer needs a peer and a protocol id")
        _check_count("wire_bytes", wire_bytes)
        if raw_bytes is not None:
            _check_count("raw_bytes", raw_bytes)
        row = (
            time.time() if at is None else float(at),
            str(peer),
            str(protocol),
            direction,
            wire_bytes,
            raw_bytes,
            _text_or_none(artifact),
            _text_or_none(chunk),
            _text_or_none(request),
        )
        return self._insert(
            "INSERT INTO transfers (at, peer, protocol, direction, wire_bytes, raw_bytes, artifact, chunk, request)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    def compute(
        self,
        *,
        kind: str,
        seconds: float,
        tokens: int = 0,
        model: str = "",
        dtype: str = "",
        device: str = "",
        artifact: Any = None,
        extra: dict[str, Any] | None = None,
        at: float | None = None,
    ) -> int:
        """Record a compute event; returns the row id once the row is durable.

        kind "prefill": tokens = document tokens, seconds = the forward pass;
        "load": seconds to turn stored chunks into a ready cache (tokens = cached tokens);
        "generate" / "hosted_generate": tokens = new tokens decoded over a loaded KV, seconds = their
        decode time (suffix prefill and load belong in their own events or in `extra`);
        "audit": tokens = tokens recomputed, seconds = the recomputation (kvswap/audit.py)."""
        if kind not in COMPUTE_KINDS:
            raise UsageError(f"ledger: compute kind must be one of {', '.join(COMPUTE_KINDS)}, got {kind!r}")
        _check_count("tokens", tokens)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise UsageError(f"ledger: seconds must be a non-negative number, got {seconds!r}")
        try:
            extra_text = json.dumps(extra, sort_keys=True, allow_nan=False) if extra else None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"ledger: extra must be JSON-serialisable: {exc}") from exc
        row = (
            time.time() if at is None else float(at),
            kind,
            str(model),
            str(dtype),
            tokens,
            float(seconds),
            str(device),
            _text_or_none(artifact),
            extra_text,
        )
        return self._insert(
            "INSERT INTO computes (at, kind, model, dtype, tokens, seconds, device, artifact, extra)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    def _insert(self, sql: str, row: tuple) -> int:
        with self._lock:
            conn = self._connection()
            try:
                cur = conn.execute(sql, row)  # autocommit: its own transaction, fsynced (synchronous=FULL)
            except sqlite3.Error as exc:
                raise KvswapError(f"ledger write failed ({self.path}): {exc}") from exc
            return int(cur.lastrowid)

    # --- reading -----------------------------------------------------------------------------------
    def transfers(
        self,
        *,
        artifact: Any = None,
        peer: str | None = None,
        protocol: str | None = None,
        protocols: Iterable[str] | None = None,
        direction: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[TransferRow]:
        """Transfer rows matching every given filter, oldest first (the newest `limit` when limited)."""
        where, params = self._where(artifact=artifact, peer=peer, protocol=protocol, direction=direction,
                                    since=since, until=until)
        if protocols is not None:
            names = list(protocols)
            where.append(f"protocol IN ({', '.join('?' * len(names))})" if names else "0")
            params.extend(names)
        rows = self._select("transfers", where, params, limit)
        return [TransferRow(*row) for row in rows]

    def computes(
        self,
        *,
        artifact: Any = None,
        kind: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[ComputeRow]:
        """Compute rows matching every given filter, oldest first (the newest `limit` when limited)."""
        where, params = self._where(artifact=artifact, kind=kind, model=model, since=since, until=until)
        rows = self._select("computes", where, params, limit)
        return [ComputeRow(*row[:-1], extra=json.loads(row[-1]) if row[-1] else {}) for row in rows]

    def totals(
        self,
        by: Iterable[str] = ("protocol", "direction"),
        *,
        artifact: Any = None,
        peer: str | None = None,
        protocol: str | None = None,
        direction: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Transfer bytes summed per group: [{<by keys>..., events, wire_bytes, raw_bytes}, ...]."""
        keys = list(by)
        bad = [k for k in keys if k not in TOTAL_KEYS]
        if bad:
            raise UsageError(f"ledger: cannot group by {', '.join(bad)} (choose from {', '.join(TOTAL_KEYS)})")
        where, params = self._where(artifact=artifact, peer=peer, protocol=protocol, direction=direction,
                                    since=since, until=until)
        cols = ", ".join(keys)
        sql = (
            f"SELECT {cols + ', ' if cols else ''}COUNT(*), COALESCE(SUM(wire_bytes), 0), COALESCE(SUM(raw_bytes), 0)"
            f" FROM transfers {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" {'GROUP BY ' + cols + ' ORDER BY ' + cols if cols else ''}"
        )
        out = []
        for row in self._fetch(sql, params):
            entry = dict(zip(keys, row[: len(keys)]))
            entry.update(events=row[-3], wire_bytes=row[-2], raw_bytes=row[-1])
            if entry["events"]:
                out.append(entry)
        return out

    @staticmethod
    def _where(**filters: Any) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for name, value in filters.items():
            if value is None:
                continue
            if name == "since":
                where.append("at >= ?")
                params.append(float(value))
            elif name == "until":
                where.append("at < ?")
                params.append(float(value))
            else:
                where.append(f"{name} = ?")
                params.append(str(value))
        return where, params

    def _select(self, table: str, where: list[str], params: list[Any], limit: int | None) -> list[tuple]:
        cols = (
            "id, at, peer, protocol, direction, wire_bytes, raw_bytes, artifact, chunk, request"
            if table == "transfers"
            else "id, at, kind, model, dtype, tokens, seconds, device, artifact, extra"
        )
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        if limit is None:
            return self._fetch(f"SELECT {cols} FROM {table} {clause} ORDER BY id", params)
        _check_count("limit", limit)
        newest = self._fetch(f"SELECT {cols} FROM {table} {clause} ORDER BY id DESC LIMIT ?", [*params, limit])
        return newest[::-1]

    def _fetch(self, sql: str, params: list[Any]) -> list[tuple]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise KvswapError(f"ledger read failed ({self.path}): {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageError(f"ledger {self.path} is closed")
        return self._conn

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent); later calls raise UsageError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ledger_path(home: str | Path) -> Path:
    """Where a node home keeps its ledger."""
    return Path(home) / LEDGER_FILE
