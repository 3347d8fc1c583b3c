"""The local artifact store: chunk files named by CID, and an SQLite index of what they belong to.

    <home>/store/chunks/<cid>    stored chunk bytes, visible only once complete and verified
    <home>/store/raw/<cid>       decoded ("raw local form") bytes of compressed chunks: a load cache
    <home>/store/tmp/            temp files (same filesystem), renamed into chunks/ after fsync
    <home>/store/index.sqlite    WAL: artifacts (manifest bytes, state, pins, last use), envelopes,
                                 artifact -> blob lists, chunks with reference counts, raw forms

Invariants (checked by fsck):
- A file under chunks/ is named by the CID of its bytes: put_chunk hashes before writing, and the file
  appears by an atomic rename after fsync, so a crash leaves at most a stray temp file, never a half chunk.
- A chunk is presence-by-file: the index records which artifacts need it (refcount = number of
  artifacts listing it), the filesystem records whether it is here.
- An artifact is registered (put_manifest) before its chunks arrive: a fetch or publish in progress is an
  incomplete artifact; `complete` flips when the last blob lands. Only complete, unpinned artifacts are
  evicted, least recently used first.
- Reads verify: read_chunk re-hashes the file (IntegrityError on a corrupted one), get_manifest re-hashes
  the manifest against its CID.

Raw local forms (why: a compressed chunk saves wire and disk bytes, but decompressing it on every load
would make local loads slower than a raw chunk; kvswap/artifact/loader.py): the decoded bytes of a chunk,
written by the loader from bytes it had just verified against the CID, with their sha256 and a MAC of
(CID, size, sha256) under a key derived from the node's identity seed. A raw form is a cache: gc drops raw
forms before it evicts any artifact, a raw form whose MAC or digest does not check is dropped and the chunk
is loaded from its stored bytes, and only a store opened with a local key (kvswap.Home's, unless the home's
`store.keep_raw` is off) keeps them.

Policy (who is trusted) is not the store's business: it keeps valid signatures, callers apply the trust
policy (artifact/signing.py). One SQLite connection per thread plus a process lock around writes make it
safe to call from a daemon's worker threads; several processes may share a store through SQLite's locks.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import blake3

from .artifact.attestation import Attestation
from .artifact.manifest import Manifest, decode_manifest
from .artifact.signing import Envelope, TrustPolicy, decode_envelopes, encode_envelopes, verify_envelopes
from .protocol.cid import Cid
from .protocol.errors import FormatError, IntegrityError, KvswapError, LimitExceeded, NotFound, UsageError
from .artifact.limits import (
    MAX_ATTESTATIONS_PER_ARTIFACT,
    MAX_CHUNK_STORED_BYTES,
    MAX_ENVELOPES_BYTES,
    MAX_MANIFEST_BYTES,
)

_SCHEMA_VERSION = 2  # 2 added chunk_records (a version-1 store gains the table when opened)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts(
    cid TEXT PRIMARY KEY,
    manifest BLOB NOT NULL,
    model_id TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    document_hash TEXT NOT NULL,
    dtype TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    raw_size INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    added REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_document ON artifacts(model_fingerprint, document_hash);
CREATE TABLE IF NOT EXISTS envelopes(
    artifact_cid TEXT NOT NULL,
    signer BLOB NOT NULL,
    time INTEGER NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY(artifact_cid, signer, time)
);
CREATE TABLE IF NOT EXISTS artifact_blobs(
    artifact_cid TEXT NOT NULL,
    idx INTEGER NOT NULL,
    chunk_cid TEXT NOT NULL,
    PRIMARY KEY(artifact_cid, idx)
);
CREATE INDEX IF NOT EXISTS artifact_blobs_by_chunk ON artifact_blobs(chunk_cid);
CREATE TABLE IF NOT EXISTS chunks(
    cid TEXT PRIMARY KEY,
    stored_size INTEGER NOT NULL,
    refcount INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attestations(
    artifact_cid TEXT NOT NULL,
    auditor BLOB NOT NULL,
    time INTEGER NOT NULL,
    statement BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY(artifact_cid, auditor)
);
CREATE TABLE IF NOT EXISTS chunk_records(
    chunk_cid TEXT NOT NULL,
    form TEXT NOT NULL,
    size INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY(chunk_cid, form)
);
CREATE TABLE IF NOT EXISTS raw_forms(
    chunk_cid TEXT PRIMARY KEY,
    raw_size INTEGER NOT NULL,
    raw_sha256 BLOB NOT NULL,
    mac BLOB NOT NULL,
    created REAL NOT NULL
);
"""

#: domain of the key a home derives from its identity seed for raw-form MACs (never used to sign anything)
LOCAL_KEY_DOMAIN = b"kvswap/store-local-key/v1"
#: domain of a raw form's MAC: HMAC-SHA256(local key, RAW_FORM_DOMAIN || chunk CID (36) || size (u64 BE) || sha256)
RAW_FORM_DOMAIN = b"kvswap/raw-form/v1\n"
#: domain of the key a home derives from its local key for chunk records (never used for anything else)
RECORD_KEY_DOMAIN = b"kvswap/chunk-record-key/v1"
#: a chunk record is keyed BLAKE3 over the bytes || RECORD_DOMAIN || form || "\n" || chunk CID (36) || size
#: (u64 BE): it binds the bytes to their chunk, form and size (the size at the end makes the encoding
#: unambiguous). The bytes come first so they start at offset 0, where BLAKE3 hashes 16 of its 1 KiB chunks at
#: once on AVX-512; behind a header they ran at half that speed (2.0 against 3.6 GB/s per thread here)
RECORD_DOMAIN = b"kvswap/chunk-record/v1\n"
#: the forms a chunk is recorded in: its stored bytes, and the decoded bytes of a compressed chunk
RECORD_FORMS = ("stored", "raw")


def local_key_from_seed(seed: bytes) -> bytes:
    """The store's MAC key for raw forms, derived from the node's 32-byte identity seed."""
    return hmac.new(seed, LOCAL_KEY_DOMAIN, hashlib.sha256).digest()


def record_key_from_local(local_key: bytes) -> bytes:
    """The 32-byte BLAKE3 key of a store's chunk records, derived from its local key (hence from the node's
    identity seed)."""
    return hmac.new(local_key, RECORD_KEY_DOMAIN, hashlib.sha256).digest()


def chunk_record(key: bytes, form: str, cid: Cid, runs: Iterable[bytes | memoryview]) -> bytes:
    """The keyed BLAKE3 record of a chunk's bytes in one form, given as runs that together are those bytes."""
    h = blake3.blake3(key=key)
    size = 0
    for run in runs:
        h.update(run)
        size += len(run)
    h.update(RECORD_DOMAIN + form.encode() + b"\n" + cid.to_bytes() + struct.pack(">Q", size))
    return h.digest()


def _raw_form_mac(key: bytes, cid: Cid, raw_size: int, digest: bytes) -> bytes:
    return hmac.new(key, RAW_FORM_DOMAIN + cid.to_bytes() + struct.pack(">Q", raw_size) + digest,
                    hashlib.sha256).digest()

# --- export container (FORMAT.md "Export file") ----------------------------------------------------
EXPORT_MAGIC = b"KVSWAPX\x01"
_RECORD = struct.Struct(">BQ")
REC_END, REC_MANIFEST, REC_ENVELOPES, REC_BLOB = 0, 1, 2, 3


class Store:
    """Files by CID + SQLite index. Create one per process (or per daemon) and share it across threads."""

    def __init__(self, root: Path, local_key: bytes | None = None, keep_raw: bool = True):
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.raw_dir = self.root / "raw"
        self.tmp_dir = self.root / "tmp"
        self.db_path = self.root / "index.sqlite"
        self.local_key = local_key  # raw forms are kept (and trusted) only with a key, and so are chunk records
        self.keep_raw = keep_raw and local_key is not None
        self.record_key = record_key_from_local(local_key) if local_key is not None else None
        self.tier = None  # the home's host-memory tier (kvswap/hosttier.py): told when an artifact goes
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._all_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._db()
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row[0] == "1":  # version 2 only added chunk_records, created above: the store is now version 2
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(_SCHEMA_VERSION),))
            row = (str(_SCHEMA_VERSION),)
        if row[0] != str(_SCHEMA_VERSION):
            raise FormatError(f"{self.db_path}: store schema {row[0]}, this build reads {_SCHEMA_VERSION}")

    # --- connections and transactions ---------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._conns_lock:
                self._all_conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: take the write lock up front, no upgrade deadlocks)."""
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                yield db
                db.execute("COMMIT")
                committed = True
            finally:
                if not committed:  # the body failed or was interrupted: nothing of it stays
                    db.execute("ROLLBACK")

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._all_conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all_conns.clear()
        self._local = threading.local()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- paths ------------------------------------------------------------------------------------------
    def _chunk_file(self, cid: Cid) -> Path:
        return self.chunks_dir / str(cid)

    def has_chunk(self, cid: Cid) -> bool:
        return self._chunk_file(cid).is_file()

    def chunk_path(self, cid: Cid) -> Path:
        """The file holding a chunk, for zero-copy serving (sendfile/mmap). Serving code that does not
        re-hash should rely on put_chunk's verification and a periodic fsck."""
        path = self._chunk_file(cid)
        if not path.is_file():
            raise NotFound(f"chunk {cid.short()} is not in the store")
        return path

    def _fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- artifacts ----------------------------------------------------------------------------------------
    def put_manifest(self, manifest: Manifest, envelopes: Iterable[Envelope] = ()) -> bool:
        """Register an artifact (before its chunks arrive) and keep its valid envelopes.
        Returns True if the artifact is new. Envelopes with a bad signature raise IntegrityError."""
        envelopes = list(envelopes)
        cid = manifest.cid
        for env in envelopes:
            env.verify(cid)
        key = str(cid)
        blobs = manifest.blobs()
        now = time.time()
        with self._tx() as db:
            exists = db.execute("SELECT 1 FROM artifacts WHERE cid = ?", (key,)).fetchone() is not None
            if not exists:
                db.execute(
                    "INSERT INTO artifacts(cid, manifest, model_id, model_fingerprint, document_hash, dtype, n_tokens,"
                    " raw_size, stored_size, complete, pinned, added, last_used) VALUES (?,?,?,?,?,?,?,?,?,0,0,?,?)",
                    (key, manifest.canonical_bytes, manifest.model_id, manifest.model_fingerprint,
                     manifest.document_hash, manifest.dtype, manifest.n_tokens, manifest.raw_size,
                     manifest.stored_size, now, now),
                )
                db.executemany(
                    "INSERT INTO artifact_blobs(artifact_cid, idx, chunk_cid) VALUES (?,?,?)",
                    [(key, i, str(b.cid)) for i, b in enumerate(blobs)],
                )
                sizes = {str(b.cid): b.stored_size for b in blobs}
                for chunk_key, size in sizes.items():
                    db.execute(
                        "INSERT INTO chunks(cid, stored_size, refcount) VALUES (?,?,1)"
                        " ON CONFLICT(cid) DO UPDATE SET refcount = refcount + 1",
                        (chunk_key, size),
                    )
            db.executemany(
                "INSERT OR IGNORE INTO envelopes(artifact_cid, signer, time, signature) VALUES (?,?,?,?)",
                [(key, e.signer, e.time, e.signature) for e in envelopes],
            )
            if not exists and not any(not self.has_chunk(b.cid) for b in blobs):
                db.execute("UPDATE artifacts SET complete = 1 WHERE cid = ?", (key,))
        return not exists

    def add_attestations(self, cid: Cid, attestations: Iterable[Attestation], prefer: set[bytes] = frozenset()
                         ) -> int:
        """Keep valid audit attestations of a registered artifact: one per auditor (the newest), at most
        MAX_ATTESTATIONS_PER_ARTIFACT; when full, one by an auditor in `prefer` (those the node trusts)
        replaces one by an auditor outside it. A bad signature raises IntegrityError. Returns how many were
        kept."""
        attestations = list(attestations)
        for att in attestations:
            att.verify(cid)
        kept = 0
        with self._tx() as db:
            self._row(cid, db)
            key = str(cid)
            for att in attestations:
                rows = {bytes(a): int(t) for a, t in db.execute(
                    "SELECT auditor, time FROM attestations WHERE artifact_cid = ?", (key,))}
                if att.auditor in rows:
                    if rows[att.auditor] >= att.time:
                        continue
                elif len(rows) >= MAX_ATTESTATIONS_PER_ARTIFACT:
                    victims = [a for a in rows if a not in prefer]
                    if att.auditor not in prefer or not victims:
                        continue
                    db.execute("DELETE FROM attestations WHERE artifact_cid = ? AND auditor = ?", (key, victims[0]))
                db.execute("INSERT OR REPLACE INTO attestations(artifact_cid, auditor, time, statement, signature)"
                           " VALUES (?,?,?,?,?)", (key, att.auditor, att.time, att.statement, att.signature))
                kept += 1
        return kept

    def get_attestations(self, cid: Cid) -> list[Attestation]:
        rows = self._db().execute(
            "SELECT auditor, time, statement, signature FROM attestations WHERE artifact_cid = ? ORDER BY auditor",
            (str(cid),))
        return [Attestation(cid, bytes(a), int(t), bytes(st), bytes(sig)) for a, t, st, sig in rows]

    def _row(self, cid: Cid, db: sqlite3.Connection | None = None) -> sqlite3.Row:
        db = db or self._db()
        cur = db.execute(
            "SELECT cid, manifest, complete, pinned, added, last_used FROM artifacts WHERE cid = ?", (str(cid),))
        row = cur.fetchone()
        if row is None:
            raise NotFound(f"artifact {cid.short()} is not in the store")
        return row

    def has_artifact(self, cid: Cid) -> bool:
        return self._db().execute("SELECT 1 FROM artifacts WHERE cid = ?", (str(cid),)).fetchone() is not None

    def get_manifest_bytes(self, cid: Cid) -> bytes:
        return bytes(self._row(cid)[1])

    def get_manifest(self, cid: Cid) -> Manifest:
        """The manifest, re-hashed against its CID (IntegrityError if the index was tampered with)."""
        return decode_manifest(self.get_manifest_bytes(cid), expected_cid=cid)

    def get_envelopes(self, cid: Cid) -> list[Envelope]:
        rows = self._db().execute(
            "SELECT signer, time, signature FROM envelopes WHERE artifact_cid = ? ORDER BY signer, time", (str(cid),))
        return [Envelope(cid, bytes(s), int(t), bytes(sig)) for s, t, sig in rows]

    def _blob_cids(self, cid: Cid, db: sqlite3.Connection | None = None) -> list[Cid]:
        db = db or self._db()
        rows = db.execute(
            "SELECT chunk_cid FROM artifact_blobs WHERE artifact_cid = ? ORDER BY idx", (str(cid),)).fetchall()
        return [Cid.parse(r[0]) for r in rows]

    def missing_chunks(self, cid: Cid) -> list[Cid]:
        """Blobs (chunks, then the tail) of a registered artifact that are not here yet, in manifest order."""
        self._row(cid)
        seen, out = set(), []
        for c in self._blob_cids(cid):
            if c not in seen and not self.has_chunk(c):
                out.append(c)
            seen.add(c)
        return out

    def is_complete(self, cid: Cid) -> bool:
        return not self.missing_chunks(cid)

    def find_by_document(self, model_fingerprint: str | None, document_hash: str,
                         complete_only: bool = False) -> list[Cid]:
        """Artifacts of this document for this model (for any model when `model_fingerprint` is None),
        complete ones first, then most recently used."""
        sql = "SELECT cid FROM artifacts WHERE document_hash = ?"
        args: tuple = (document_hash,)
        if model_fingerprint is not None:
            sql += " AND model_fingerprint = ?"
            args += (model_fingerprint,)
        if complete_only:
            sql += " AND complete = 1"
        sql += " ORDER BY complete DESC, last_used DESC"
        return [Cid.parse(r[0]) for r in self._db().execute(sql, args)]

    def list_artifacts(self) -> list[dict]:
        rows = self._db().execute(
            "SELECT a.cid, a.model_id, a.model_fingerprint, a.document_hash, a.dtype, a.n_tokens, a.raw_size,"
            " a.stored_size, a.complete, a.pinned, a.added, a.last_used,"
            " (SELECT COUNT(*) FROM envelopes e WHERE e.artifact_cid = a.cid)"
            " FROM artifacts a ORDER BY a.added")
        keys = ("cid", "model_id", "model_fingerprint", "document_hash", "dtype", "n_tokens", "raw_size",
                "stored_size", "complete", "pinned", "added", "last_used", "signatures")
        out = []
        for row in rows:
            d = dict(zip(keys, row))
            d["complete"], d["pinned"] = bool(d["complete"]), bool(d["pinned"])
            out.append(d)
        return out

    def pin(self, cid: Cid, pinned: bool = True) -> None:
        with self._tx() as db:
            self._row(cid, db)
            db.execute("UPDATE artifacts SET pinned = ? WHERE cid = ?", (int(pinned), str(cid)))

    def unpin(self, cid: Cid) -> None:
        self.pin(cid, False)

    def touch(self, cid: Cid) -> None:
        """Mark an artifact used now (LRU eviction order)."""
        with self._tx() as db:
            db.execute("UPDATE artifacts SET last_used = ? WHERE cid = ?", (time.time(), str(cid)))

    # --- chunks -----------------------------------------------------------------------------------------
    def put_chunk(self, cid: Cid, data: bytes | memoryview) -> bool:
        """Store one blob of a registered artifact. Hashes first: bytes that do not match `cid` raise
        IntegrityError and never touch chunks/. Returns False if it was already here."""
        row = self._db().execute("SELECT stored_size FROM chunks WHERE cid = ?", (str(cid),)).fetchone()
        if row is None:
            raise NotFound(f"chunk {cid.short()} belongs to no registered artifact (put_manifest first)")
        if len(data) != row[0]:
            raise IntegrityError(f"chunk {cid.short()} is {len(data)} bytes, its manifest says {row[0]}")
        cid.verify(data)
        final = self._chunk_file(cid)
        if final.is_file():
            return False
        tmp = self.tmp_dir / f"{cid}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._fsync_dir(self.chunks_dir)
        self.put_record(cid, "stored", [data])  # verified against the CID just above
        self._mark_complete_for(cid)
        return True

    def _mark_complete_for(self, chunk: Cid) -> None:
        with self._tx() as db:
            rows = db.execute(
                "SELECT DISTINCT a.cid FROM artifacts a JOIN artifact_blobs b ON b.artifact_cid = a.cid"
                " WHERE b.chunk_cid = ? AND a.complete = 0", (str(chunk),)).fetchall()
            for (art,) in rows:
                # newest blobs first: a publish or in-order fetch fills from the front, so the first missing
                # blob is found at once instead of after stat-ing every present one (O(n) per artifact, not n^2)
                blobs = db.execute("SELECT chunk_cid FROM artifact_blobs WHERE artifact_cid = ? ORDER BY idx DESC",
                                   (art,)).fetchall()
                if all((self.chunks_dir / c).is_file() for (c,) in blobs):
                    db.execute("UPDATE artifacts SET complete = 1 WHERE cid = ?", (art,))

    def read_chunk_for_verifier(self, cid: Cid) -> bytes:
        """A blob's file bytes NOT re-hashed here, for a caller that hashes them itself against the manifest
        (assemble_kv / verified_blob do): one sha256 per chunk on the load path instead of two."""
        try:
            return self._chunk_file(cid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"chunk {cid.short()} is not in the store") from None

    def read_chunk(self, cid: Cid) -> bytes:
        """A blob's bytes, re-hashed: IntegrityError if the file was corrupted on disk."""
        data = self.read_chunk_for_verifier(cid)
        try:
            cid.verify(data)
        except IntegrityError:
            raise IntegrityError(f"stored chunk {cid.short()} is corrupted (run `kvswap fsck --repair`)") from None
        return data

    # --- chunk records (keyed BLAKE3 of verified bytes: what a default local load checks) -------------------
    def put_record(self, cid: Cid, form: str, runs: Iterable[bytes | memoryview]) -> bool:
        """Record chunk `cid`'s bytes in `form` ("stored" or "raw"), which the caller has just verified (against
        the CID, or decoded from bytes that were). False, nothing written, without a local key or for a chunk
        that belongs to no artifact."""
        if self.record_key is None:
            return False
        runs = list(runs)
        record = chunk_record(self.record_key, form, cid, runs)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM chunks WHERE cid = ?", (str(cid),)).fetchone() is None:
                return False
            db.execute("INSERT OR REPLACE INTO chunk_records(chunk_cid, form, size, record) VALUES (?,?,?,?)",
                       (str(cid), form, sum(len(r) for r in runs), record))
        return True

    def check_record(self, cid: Cid, form: str, runs: Iterable[bytes | memoryview]) -> bool | None:
        """Whether `runs` are the bytes recorded for chunk `cid` in `form`: None when there is no record to
        check against (no local key, or a chunk stored before records existed), else True or False."""
        if self.record_key is None:
            return None
        row = self._db().execute("SELECT size, record FROM chunk_records WHERE chunk_cid = ? AND form = ?",
                                 (str(cid), form)).fetchone()
        if row is None:
            return None
        runs = list(runs)
        if sum(len(r) for r in runs) != int(row[0]):
            return False
        return hmac.compare_digest(bytes(row[1]), chunk_record(self.record_key, form, cid, runs))

    def drop_record(self, cid: Cid, form: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM chunk_records WHERE chunk_cid = ? AND form = ?", (str(cid), form))

    # --- raw local forms (a load cache of decoded compressed chunks) -----------------------------------
    def put_raw_form(self, cid: Cid, raw: bytes | memoryview) -> bool:
        """Keep the decoded bytes of chunk `cid` (which the caller has just decoded from bytes verified against
        the CID). False, and nothing written, without a local key or when the chunk belongs to no artifact."""
        if not self.keep_raw:
            return False
        if self._db().execute("SELECT 1 FROM chunks WHERE cid = ?", (str(cid),)).fetchone() is None:
            return False
        raw = memoryview(raw).cast("B")
        digest = hashlib.sha256(raw).digest()
        final = self.raw_dir / str(cid)
        tmp = self.tmp_dir / f"{cid}.raw.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        try:
            with open(tmp, "wb") as fh:  # no fsync: a cache; a torn file fails its digest and is dropped
                fh.write(raw)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO raw_forms(chunk_cid, raw_size, raw_sha256, mac, created)"
                       " VALUES (?,?,?,?,?)",
                       (str(cid), len(raw), digest, _raw_form_mac(self.local_key, cid, len(raw), digest), time.time()))
        self.put_record(cid, "raw", [raw])
        return True

    def raw_form(self, cid: Cid) -> tuple[Path, bytes] | None:
        """(file, recorded sha256) of chunk `cid`'s raw form, when there is one whose row this home's key
        authenticates; the caller hashes the file's bytes against the digest. A row that fails its MAC (written
        by someone without the key) is dropped."""
        if self.local_key is None:
            return None
        row = self._db().execute("SELECT raw_size, raw_sha256, mac FROM raw_forms WHERE chunk_cid = ?",
                                 (str(cid),)).fetchone()
        if row is None:
            return None
        size, digest, mac = int(row[0]), bytes(row[1]), bytes(row[2])
        path = self.raw_dir / str(cid)
        if not hmac.compare_digest(mac, _raw_form_mac(self.local_key, cid, size, digest)) or not path.is_file():
            self.drop_raw_form(cid)
            return None
        return path, digest

    def drop_raw_form(self, cid: Cid) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM raw_forms WHERE chunk_cid = ?", (str(cid),))
            db.execute("DELETE FROM chunk_records WHERE chunk_cid = ? AND form = 'raw'", (str(cid),))
        (self.raw_dir / str(cid)).unlink(missing_ok=True)

    def raw_forms_usage(self) -> int:
        return int(self._db().execute("SELECT COALESCE(SUM(raw_size), 0) FROM raw_forms").fetchone()[0])

    def put_artifact(self, manifest: Manifest, envelopes: Iterable[Envelope],
                     chunks: Iterable[tuple[Cid, bytes]]) -> Cid:
        """Register, then store every chunk as it streams past (publish, import)."""
        self.put_manifest(manifest, envelopes)
        for cid, data in chunks:
            self.put_chunk(cid, data)
        return manifest.cid

    # --- removal, budget, eviction --------------------------------------------------------------------
    def remove(self, cid: Cid, force: bool = False) -> int:
        """Drop an artifact and every chunk no other artifact uses. Returns bytes freed."""
        with self._tx() as db:
            row = self._row(cid, db)
            if row[3] and not force:
                raise UsageError(f"artifact {cid.short()} is pinned (unpin it first)")
            key = str(cid)
            chunk_keys = {r[0] for r in db.execute(
                "SELECT DISTINCT chunk_cid FROM artifact_blobs WHERE artifact_cid = ?", (key,))}
            db.execute("DELETE FROM artifact_blobs WHERE artifact_cid = ?", (key,))
            db.execute("DELETE FROM envelopes WHERE artifact_cid = ?", (key,))
            db.execute("DELETE FROM attestations WHERE artifact_cid = ?", (key,))
            db.execute("DELETE FROM artifacts WHERE cid = ?", (key,))
            dead = []
            for ck in chunk_keys:
                db.execute("UPDATE chunks SET refcount = refcount - 1 WHERE cid = ?", (ck,))
                left = db.execute("SELECT refcount FROM chunks WHERE cid = ?", (ck,)).fetchone()
                if left is not None and left[0] <= 0:
                    db.execute("DELETE FROM chunks WHERE cid = ?", (ck,))
                    db.execute("DELETE FROM raw_forms WHERE chunk_cid = ?", (ck,))
                    db.execute("DELETE FROM chunk_records WHERE chunk_cid = ?", (ck,))
                    dead.append(ck)
        if self.tier is not None:  # a host-memory copy of a removed artifact must not outlive it
            self.tier.drop(cid)
        # files go after the index commit: a crash in between leaves unreferenced files (garbage), never an
        # index entry pointing at a deleted file of a complete artifact
        freed = 0
        for ck in dead:
            for path in (self.chunks_dir / ck, self.raw_dir / ck):
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed

    def usage(self) -> int:
        """Bytes of chunk files present and indexed, plus raw forms."""
        total = 0
        for ck, size in self._db().execute("SELECT cid, stored_size FROM chunks"):
            if (self.chunks_dir / ck).is_file():
                total += size
        return total + self.raw_forms_usage()

    def gc(self, budget: int) -> dict:
        """Evict complete, unpinned artifacts, least recently used first, until usage <= budget."""
        if budget < 0:
            raise UsageError("budget must be >= 0")
        before = self.usage()
        used, evicted, freed = before, [], 0
        # raw forms first: they are a load cache, oldest first, before any artifact is evicted
        for (key, size) in self._db().execute(
                "SELECT chunk_cid, raw_size FROM raw_forms ORDER BY created ASC").fetchall():
            if used <= budget:
                break
            self.drop_raw_form(Cid.parse(key))
            used -= size
            freed += size
        rows = self._db().execute(
            "SELECT cid FROM artifacts WHERE complete = 1 AND pinned = 0 ORDER BY last_used ASC").fetchall()
        for (key,) in rows:
            if used <= budget:
                break
            got = self.remove(Cid.parse(key))
            freed += got
            used -= got
            evicted.append(key)
        return {"budget": budget, "before": before, "after": self.usage(), "freed": freed, "evicted": evicted}

    # --- consistency ------------------------------------------------------------------------------------
    def fsck(self, repair: bool = False) -> dict:
        """Check every invariant in the module docstring. `problems` are real inconsistencies (corrupt or
        misnamed chunk files, complete artifacts missing blobs, bad refcounts, manifests that do not hash
        to their CID); `garbage` is harmless leftovers of interrupted work (temp files, unreferenced chunk
        files, stale 'incomplete' flags). With repair, both are fixed: bad files and entries removed,
        counts and flags recomputed. Run --repair with no writer active (it deletes temp files)."""
        problems: list[str] = []
        garbage: list[str] = []
        repaired: list[str] = []
        db = self._db()
        # temp files: never visible as chunks, but leftovers of a crash
        for tmp in sorted(self.tmp_dir.iterdir()):
            garbage.append(f"temp file {tmp.name}")
            if repair:
                tmp.unlink(missing_ok=True)
                repaired.append(f"removed temp file {tmp.name}")
        # artifacts: manifest hashes to its CID and parses; blob list matches the manifest
        bad_artifacts = []
        for key, blob in db.execute("SELECT cid, manifest FROM artifacts").fetchall():
            try:
                cid = Cid.parse(key)
                manifest = decode_manifest(bytes(blob), expected_cid=cid)
                if [str(b.cid) for b in manifest.blobs()] != [str(c) for c in self._blob_cids(cid)]:
                    raise IntegrityError("blob list in the index differs from the manifest")
            except KvswapError as exc:
                problems.append(f"artifact {key}: {exc}")
                bad_artifacts.append(key)
        if repair:
            for key in bad_artifacts:
                self.remove(Cid.parse(key), force=True)
                repaired.append(f"removed artifact {key}")
        # chunk files: named by CID of their bytes, referenced by the index
        indexed = {ck: size for ck, size in db.execute("SELECT cid, stored_size FROM chunks")}
        checked = 0
        for path in sorted(self.chunks_dir.iterdir()):
            name = path.name
            try:
                cid = Cid.parse(name)
            except FormatError:
                garbage.append(f"stray file chunks/{name}")
                if repair:
                    path.unlink(missing_ok=True)
                    repaired.append(f"removed stray file chunks/{name}")
                continue
            checked += 1
            data = path.read_bytes()
            if Cid.of(data) != cid:
                problems.append(f"chunk {name}: content does not match its CID")
                if repair:
                    path.unlink(missing_ok=True)
                    repaired.append(f"removed corrupted chunk {name}")
            elif name not in indexed:
                garbage.append(f"unreferenced chunk {name}")
                if repair:
                    path.unlink(missing_ok=True)
                    repaired.append(f"removed unreferenced chunk {name}")
            elif len(data) != indexed[name]:
                problems.append(f"chunk {name}: {len(data)} bytes, index says {indexed[name]}")
        # chunk records: each must match its bytes; one that does not was changed with the file or without it
        for key, form, size, record in db.execute(
                "SELECT chunk_cid, form, size, record FROM chunk_records").fetchall():
            path = (self.chunks_dir if form == "stored" else self.raw_dir) / key
            if key not in indexed or not path.is_file():
                garbage.append(f"record ({form}) of {key} without its chunk")
            elif self.record_key is not None and not hmac.compare_digest(
                    bytes(record), chunk_record(self.record_key, form, Cid.parse(key), [path.read_bytes()])):
                problems.append(f"chunk {key}: its {form} record does not match its bytes")
            else:
                continue
            if repair:
                self.drop_record(Cid.parse(key), form)
                repaired.append(f"dropped the {form} record of {key} (the next load verifies it by sha256)")
        # refcounts
        counts = dict(db.execute("SELECT chunk_cid, COUNT(DISTINCT artifact_cid) FROM artifact_blobs GROUP BY chunk_cid"))
        for ck in set(indexed) | set(counts):
            want, have = counts.get(ck, 0), None
            row = db.execute("SELECT refcount FROM chunks WHERE cid = ?", (ck,)).fetchone()
            have = None if row is None else row[0]
            if have != want:
                if want == 0:
                    garbage.append(f"chunk row {ck} referenced by no artifact")
                else:
                    problems.append(f"chunk {ck}: refcount {have}, referenced by {want} artifacts")
                if repair:
                    with self._tx() as wdb:
                        if want == 0:
                            wdb.execute("DELETE FROM chunks WHERE cid = ?", (ck,))
                            (self.chunks_dir / ck).unlink(missing_ok=True)
                        elif row is None:
                            size = self._size_from_manifests(ck)
                            wdb.execute("INSERT INTO chunks(cid, stored_size, refcount) VALUES (?,?,?)", (ck, size, want))
                        else:
                            wdb.execute("UPDATE chunks SET refcount = ? WHERE cid = ?", (want, ck))
                    repaired.append(f"fixed refcount of {ck}")
        # raw forms: a row per file, digest and MAC as recorded (a cache: anything wrong is dropped)
        raw_rows = {k: (int(n), bytes(d), bytes(m)) for k, n, d, m in
                    db.execute("SELECT chunk_cid, raw_size, raw_sha256, mac FROM raw_forms").fetchall()}
        for path in sorted(self.raw_dir.iterdir()):
            if path.name not in raw_rows:
                garbage.append(f"raw form {path.name} without an index row")
                if repair:
                    path.unlink(missing_ok=True)
                    repaired.append(f"removed raw form file {path.name}")
        for key, (size, digest, mac) in raw_rows.items():
            path = self.raw_dir / key
            bad = None
            if key not in indexed:
                bad = "belongs to no indexed chunk"
            elif not path.is_file():
                bad = "file is missing"
            elif self.local_key is not None and not hmac.compare_digest(
                    mac, _raw_form_mac(self.local_key, Cid.parse(key), size, digest)):
                bad = "MAC does not verify with this home's key"
            elif hashlib.sha256(path.read_bytes()).digest() != digest:
                bad = "content does not match its recorded digest"
            if bad:
                garbage.append(f"raw form {key}: {bad}")
                if repair:
                    self.drop_raw_form(Cid.parse(key))
                    repaired.append(f"dropped raw form {key}")
        # completeness flags
        for key, complete in db.execute("SELECT cid, complete FROM artifacts").fetchall():
            present = all((self.chunks_dir / str(c)).is_file() for c in self._blob_cids(Cid.parse(key)))
            if bool(complete) != present:
                if complete:
                    problems.append(f"artifact {key} is marked complete but misses chunks")
                else:
                    garbage.append(f"artifact {key} has every chunk but is marked incomplete")
                if repair:
                    with self._tx() as wdb:
                        wdb.execute("UPDATE artifacts SET complete = ? WHERE cid = ?", (int(present), key))
                    repaired.append(f"set complete={int(present)} on {key}")
        ok = not problems
        if problems and self.tier is not None:  # a host-memory copy may hold what the disk no longer does
            self.tier.clear()
        if repair and problems:
            ok = not self.fsck(repair=False)["problems"]
        return {"ok": ok, "problems": problems,
                "garbage": garbage, "repaired": repaired, "artifacts": len(self.list_artifacts()),
                "chunk_files": checked}

    def _size_from_manifests(self, chunk_key: str) -> int:
        for (key,) in self._db().execute(
                "SELECT DISTINCT artifact_cid FROM artifact_blobs WHERE chunk_cid = ?", (chunk_key,)).fetchall():
            for b in self.get_manifest(Cid.parse(key)).blobs():
                if str(b.cid) == chunk_key:
                    return b.stored_size
        return 0

    # --- export / import --------------------------------------------------------------------------------
    def export_artifact(self, cid: Cid, out: Path) -> dict:
        """Write one complete artifact as a single file (FORMAT.md "Export file"), atomically."""
        manifest = self.get_manifest(cid)
        missing = self.missing_chunks(cid)
        if missing:
            raise UsageError(f"artifact {cid.short()} is incomplete ({len(missing)} blobs missing); fetch it first")
        envelopes = encode_envelopes(self.get_envelopes(cid))
        out = Path(out)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
        size = 0
        try:
            with open(tmp, "wb") as fh:
                def record(kind: int, payload: bytes) -> None:
                    nonlocal size
                    fh.write(_RECORD.pack(kind, len(payload)))
                    fh.write(payload)
                    size += _RECORD.size + len(payload)

                fh.write(EXPORT_MAGIC)
                size += len(EXPORT_MAGIC)
                record(REC_MANIFEST, manifest.canonical_bytes)
                record(REC_ENVELOPES, envelopes)
                for blob in manifest.blobs():
                    record(REC_BLOB, self.read_chunk(blob.cid))
                record(REC_END, b"")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return {"cid": str(cid), "file": str(out), "bytes": size, "blobs": len(manifest.blobs())}

    def import_artifact(self, src: Path | BinaryIO, policy: TrustPolicy) -> Manifest:
        """Read an export file, verifying the manifest, every signature (and the trust policy), and every
        blob's size and CID as it streams in. On any failure an artifact this import registered is removed."""
        if isinstance(src, (str, Path)):
            with open(src, "rb") as fh:
                return self.import_artifact(fh, policy)
        fh = src
        if _read_exact(fh, len(EXPORT_MAGIC)) != EXPORT_MAGIC:
            raise FormatError("not a kvswap export file (bad magic)")
        manifest = decode_manifest(_read_record(fh, REC_MANIFEST, MAX_MANIFEST_BYTES, "manifest"))
        envelopes = decode_envelopes(_read_record(fh, REC_ENVELOPES, MAX_ENVELOPES_BYTES, "envelopes"))
        verify_envelopes(envelopes, manifest.cid, policy, model_fingerprint=manifest.model_fingerprint)
        new = self.put_manifest(manifest, envelopes)
        imported = False
        try:
            for blob in manifest.blobs():
                data = _read_record(fh, REC_BLOB, MAX_CHUNK_STORED_BYTES, "blob", exact=blob.stored_size)
                self.put_chunk(blob.cid, data)
            _read_record(fh, REC_END, 0, "end")
            if fh.read(1):
                raise FormatError("export file has trailing bytes after its end record")
            imported = True
        finally:
            if new and not imported:  # a bad file, or an interrupt: the half-imported artifact goes
                self.remove(manifest.cid, force=True)
        return manifest


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise FormatError(f"export file is truncated (wanted {n} bytes, got {len(data)})")
    return data


def _read_record(fh: BinaryIO, kind: int, limit: int, what: str, exact: int | None = None) -> bytes:
    got_kind, length = _RECORD.unpack(_read_exact(fh, _RECORD.size))
    if got_kind != kind:
        raise FormatError(f"export file: expected a {what} record (type {kind}), found type {got_kind}")
    if exact is not None and length != exact:
        raise IntegrityError(f"export file: {what} record is {length} bytes, the manifest says {exact}")
    if length > limit:
        raise LimitExceeded(f"export file: {what} record of {length} bytes is over its limit ({limit})")
    return _read_exact(fh, length)


__all__ = ["EXPORT_MAGIC", "Store"]
