"""The payment book of one node, in SQLite beside its ledger (<home>/payments.sqlite, WAL).

    terms      every terms this node signed or met, by digest (a voucher names its terms by digest)
    vouchers   the latest voucher of each series (provider, consumer, artifact): the receipts. A series this
               node is the provider of is earned; one it is the consumer of is owed.
    delivered  what this node, as a provider, sent each consumer of each artifact (stored bytes, hosted
               tokens): what its vouchers are reconciled against

A voucher is stored only through `accept` (kvswap/payments/rules.py decides), in one transaction, so a replayed
or older voucher counts once and a refused one changes nothing. The book trusts a voucher no further than its
signature and its sequence.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..config import peer_id_of_key
from ..protocol.cid import Cid
from ..protocol.errors import FormatError, KvswapError
from . import rules
from .terms import Terms, decode_terms
from .vouchers import Voucher, decode_voucher

BOOK_FILE = "payments.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS terms (digest BLOB PRIMARY KEY, blob BLOB NOT NULL, provider BLOB NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vouchers (
    provider BLOB NOT NULL, consumer BLOB NOT NULL, artifact TEXT NOT NULL,
    sequence INTEGER NOT NULL, amount INTEGER NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL,
    terms BLOB NOT NULL, blob BLOB NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (provider, consumer, artifact));
CREATE TABLE IF NOT EXISTS delivered (
    consumer BLOB NOT NULL, artifact TEXT NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (consumer, artifact));
"""


def book_path(home: str | Path) -> Path:
    return Path(home) / BOOK_FILE


class PaymentBook:
    """Terms, vouchers and deliveries of one node; safe to share between threads."""

    def __init__(self, path: str | Path, me: bytes) -> None:
        self.path = Path(path)
        self.me = me  # this node's public key: which series it earns and which it owes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL under WAL: a crashed process loses nothing, a power cut at most the last commits (a newer
            # voucher supersedes them; the provider holds its own copy): no fsync per voucher on the fetch path
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FormatError(f"payment book {self.path} is not a usable SQLite database: {exc}") from exc
        except OSError as exc:
            raise KvswapError(f"cannot open payment book {self.path}: {exc}") from exc

    @classmethod
    def for_home(cls, home: str | Path, me: bytes) -> "PaymentBook":
        return cls(book_path(home), me)

    def _run(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise KvswapError(f"payment book failed ({self.path}): {exc}") from exc

    # --- terms ---------------------------------------------------------------------------------------
    def add_terms(self, terms: Terms) -> None:
        self._run("INSERT OR IGNORE INTO terms VALUES (?, ?, ?, ?)",
                  (terms.digest, terms.encode(), terms.provider, time.time()))

    def terms(self, digest: bytes) -> Terms | None:
        rows = self._run("SELECT blob FROM terms WHERE digest = ?", (bytes(digest),))
        return decode_terms(rows[0][0]) if rows else None

    # --- vouchers ------------------------------------------------------------------------------------
    def latest(self, provider: bytes, consumer: bytes, artifact: Cid) -> Voucher | None:
        rows = self._run("SELECT blob FROM vouchers WHERE provider = ? AND consumer = ? AND artifact = ?",
                         (provider, consumer, str(artifact)))
        return decode_voucher(rows[0][0]) if rows else None

    def accept(self, voucher: Voucher, terms: Terms) -> bool:
        """Store `voucher` (signature checked) if it advances its series (rules.accept): True; a replay of the
        one held: False, nothing changes; PaymentRequired when it is refused."""
        return self.advance(voucher, terms)[0]

    def advance(self, voucher: Voucher, terms: Terms) -> tuple[bool, Voucher | None]:
        """`accept`, and the voucher the series held before it, read in the same transaction: what a new
        voucher paid for is its totals minus those, counted once however many vouchers arrive at once."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = conn.execute("SELECT blob FROM vouchers WHERE provider = ? AND consumer = ? AND artifact = ?",
                                        (voucher.provider, voucher.consumer, str(voucher.artifact))).fetchall()
                    held = decode_voucher(rows[0][0]) if rows else None
                    advanced = rules.accept(held, voucher, terms)
                    if advanced:
                        conn.execute("INSERT OR REPLACE INTO vouchers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     (voucher.provider, voucher.consumer, str(voucher.artifact), voucher.sequence,
                                      voucher.amount, voucher.bytes, voucher.tokens, voucher.terms, voucher.encode(),
                                      time.time()))
                    conn.execute("COMMIT")
                    return advanced, held
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise KvswapError(f"payment book failed ({self.path}): {exc}") from exc

    def vouchers(self, role: str | None = None) -> list[Voucher]:
        """The latest voucher of every series: `earned` (this node provided), `owed` (it consumed), or both."""
        where, params = "", ()
        if role == "earned":
            where, params = " WHERE provider = ?", (self.me,)
        elif role == "owed":
            where, params = " WHERE consumer = ?", (self.me,)
        return [decode_voucher(r[0]) for r in self._run(f"SELECT blob FROM vouchers{where} ORDER BY at", params)]

    # --- deliveries (provider side) ------------------------------------------------------------------
    def delivered(self, consumer: bytes, artifact: Cid, nbytes: int = 0, tokens: int = 0) -> None:
        """Add what was just sent to `consumer` for `artifact`."""
        self._run("INSERT INTO delivered VALUES (?, ?, ?, ?) ON CONFLICT (consumer, artifact) DO UPDATE SET "
                  "bytes = bytes + excluded.bytes, tokens = tokens + excluded.tokens",
                  (consumer, str(artifact), int(nbytes), int(tokens)))

    def deliveries(self) -> dict[tuple[bytes, str], tuple[int, int]]:
        return {(r[0], r[1]): (r[2], r[3]) for r in self._run("SELECT consumer, artifact, bytes, tokens FROM delivered")}

    def unpaid(self, consumer: bytes) -> tuple[int, int]:
        """(bytes, tokens) sent to `consumer` and not yet covered by its vouchers, over all its artifacts."""
        sent = self._run("SELECT COALESCE(SUM(bytes), 0), COALESCE(SUM(tokens), 0) FROM delivered WHERE consumer = ?",
                         (consumer,))[0]
        paid = self._run("SELECT COALESCE(SUM(bytes), 0), COALESCE(SUM(tokens), 0) FROM vouchers "
                         "WHERE provider = ? AND consumer = ?", (self.me, consumer))[0]
        return max(0, sent[0] - paid[0]), max(0, sent[1] - paid[1])

    # --- views ---------------------------------------------------------------------------------------
    def tabs(self) -> list[dict[str, Any]]:
        """Earned and owed per counterpart key (hex), with the bytes and tokens behind them and the units."""
        out: dict[str, dict[str, Any]] = {}
        for v in self.vouchers():
            earned = v.provider == self.me
            peer = (v.consumer if earned else v.provider).hex()
            terms = self.terms(v.terms)
            tab = out.setdefault(peer, {"peer": peer, "earned": 0, "owed": 0, "bytes_sold": 0, "bytes_bought": 0,
                                        "tokens_sold": 0, "tokens_bought": 0, "artifacts": 0, "units": set()})
            tab["earned" if earned else "owed"] += v.amount
            tab["bytes_sold" if earned else "bytes_bought"] += v.bytes
            tab["tokens_sold" if earned else "tokens_bought"] += v.tokens
            tab["artifacts"] += 1
            if terms is not None:
                tab["units"].add(terms.unit)
        for consumer, artifact in self.deliveries():
            peer = consumer.hex()
            if peer in out:
                continue
            out[peer] = {"peer": peer, "earned": 0, "owed": 0, "bytes_sold": 0, "bytes_bought": 0, "tokens_sold": 0,
                         "tokens_bought": 0, "artifacts": 0, "units": set()}
        for tab in out.values():
            tab["peer_id"] = peer_id_of_key(tab["peer"])  # what every other command names a peer by
            tab["unit"] = ",".join(sorted(tab.pop("units"))) or "-"
            tab["unpaid_bytes"], tab["unpaid_tokens"] = self.unpaid(bytes.fromhex(tab["peer"]))
        return sorted(out.values(), key=lambda t: (-t["earned"] - t["owed"], t["peer"]))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


__all__ = ["BOOK_FILE", "PaymentBook", "book_path"]
