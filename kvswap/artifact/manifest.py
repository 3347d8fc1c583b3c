"""The artifact manifest: what the chunks are, in one canonical msgpack encoding whose hash is the
artifact's CID.

Canonical means one byte string per meaning: msgpack maps with sorted keys, the shortest int/str/bin
forms (msgpack-python's packer), no floats, no time- or signer-dependent field. Decoding re-encodes and
compares, so a manifest with reordered keys, padded ints or duplicate keys is refused rather than being a
second CID for the same artifact. Signatures live in separate envelopes (signing.py), which is why
several parties can attest one CID.

Validation happens here, before any tensor is allocated: version, types, limits, token ranges that tile
[0, n_tokens) in block order with no hole or overlap, raw sizes that equal tokens x bytes per token,
stored sizes within each codec's bound, prefix keys and the token hash recomputed from the token ids.
msgpack's exceptions are mapped here to FormatError; a manifest fetched under a known CID that does not
hash to it is an IntegrityError, checked before parsing (FORMAT.md "Validation").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import msgpack

from ..protocol.cid import Cid
from ..protocol.errors import FormatError, IntegrityError, LimitExceeded, UsageError
from ..kvtensors import KvLayout
from .limits import (
    MAX_CHUNK_RAW_BYTES,
    MAX_CHUNKS,
    MAX_MANIFEST_BYTES,
    MAX_TAIL_RAW_BYTES,
    MAX_TOKENS,
)
from . import chunking, codecs

#: what msgpack raises on bytes that are not valid msgpack within the given bounds (ExtraData, StackError and
#: its FormatError are ValueErrors; unhashable map keys are TypeErrors): the one decode boundary of the format
MSGPACK_DECODE_ERRORS = (msgpack.UnpackException, ValueError, TypeError)


def pack_list(items: list[dict], max_bytes: int, limit_name: str, noun: str) -> bytes:
    """A signature-side list (envelopes, attestations) as one msgpack array, within its byte limit."""
    data = msgpack.packb(items, use_bin_type=True)
    if len(data) > max_bytes:
        raise LimitExceeded(f"{len(items)} {noun}s take {len(data)} bytes, over {limit_name}")
    return data


def unpack_list(data: bytes, max_bytes: int, limit_name: str, noun: str) -> list:
    """The msgpack array `pack_list` wrote, checked for size and shape (its items are the caller's to check)."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"{noun} list is {len(data)} bytes, over {limit_name} ({max_bytes})")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_ext_len=0)
    except MSGPACK_DECODE_ERRORS as exc:
        raise FormatError(f"{noun}s: not valid msgpack ({type(exc).__name__})") from None
    if type(obj) is not list:
        raise FormatError(f"{noun}s: expected a list")
    return obj

#: bumped on any change to the manifest fields or the chunk byte layout; version 2 added `compute`
FORMAT_VERSION = 2
#: versions this build reads: 1 (no compute identity) and 2
READ_VERSIONS = (1, 2)
#: most entries in a manifest's compute identity, and the longest key / value (chars)
MAX_COMPUTE_ENTRIES = 16
MAX_COMPUTE_CHARS = 128
_COMPUTE_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: the "format" field: tells a kvswap manifest from any other msgpack map
FORMAT_NAME = "kvswap-kv"
_HEX = re.compile(r"^[0-9a-f]{16,128}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MAX_MODEL_ID = 256


@dataclass(frozen=True)
class BlobRef:
    """A stored blob the manifest points to: its CID, codec and sizes (the tail uses this directly)."""

    cid: Cid
    codec: str
    raw_size: int
    stored_size: int

    def _fields(self) -> dict:
        return {"cid": self.cid.to_bytes(), "codec": self.codec, "raw_size": self.raw_size, "stored_size": self.stored_size}


@dataclass(frozen=True)
class ChunkRef(BlobRef):
    """One token block: tokens [t0, t1) of every layer, and the block's chained prefix key."""

    t0: int = 0
    t1: int = 0
    prefix_key: bytes = b""

    @property
    def n_tokens(self) -> int:
        return self.t1 - self.t0

    def _fields(self) -> dict:
        return {**super()._fields(), "prefix_key": self.prefix_key, "t0": self.t0, "t1": self.t1}


@dataclass(frozen=True)
class Manifest:
    """Everything needed to fetch, verify and rebuild a document's KV, and nothing that varies by signer."""

    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    layout: KvLayout
    block_tokens: int
    token_ids: tuple[int, ...]
    token_hash: str
    document_hash: str
    chunks: tuple[ChunkRef, ...]
    tail: BlobRef | None = None
    #: how the KV was computed (kvswap/engine/identity.py), as sorted (name, value) pairs; () in a version-1
    #: manifest. An auditor whose own identity is the same expects the stored bits exactly.
    compute_identity: tuple[tuple[str, str], ...] = ()
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        validate(self)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def compute(self) -> dict[str, str] | None:
        """The compute identity as a dict, or None when the manifest declares none (version 1)."""
        return dict(self.compute_identity) if self.compute_identity else None

    @property
    def raw_size(self) -> int:
        """Bytes of KV (all chunks, decompressed); the tail is not counted."""
        return sum(c.raw_size for c in self.chunks)

    @property
    def kv_stored_size(self) -> int:
        """Bytes on disk / on the wire for the KV chunks alone (the ratio's denominator)."""
        return sum(c.stored_size for c in self.chunks)

    @property
    def stored_size(self) -> int:
        """Bytes on disk / on the wire for all chunks plus the tail."""
        return sum(b.stored_size for b in self.blobs())

    def blobs(self) -> list[BlobRef]:
        """Every blob to fetch: the chunks in token order, then the tail if any."""
        return list(self.chunks) + ([self.tail] if self.tail is not None else [])

    def chunks_for(self, n_tokens: int) -> list[ChunkRef]:
        """The leading chunks that cover the first `n_tokens` tokens."""
        if not 0 < n_tokens <= self.n_tokens:
            raise UsageError(f"asked for {n_tokens} tokens of a {self.n_tokens}-token artifact")
        return [c for c in self.chunks if c.t0 < n_tokens]

    def to_dict(self) -> dict:
        """The manifest as the msgpack map it is encoded from (sorted keys)."""
        extra = {"compute": dict(self.compute_identity)} if self.version >= 2 else {}
        return {
            **extra,
            "block_tokens": self.block_tokens,
            "chunks": [c._fields() for c in self.chunks],
            "document_hash": self.document_hash,
            "format": FORMAT_NAME,
            "layout": self.layout.to_dict(),
            "model_fingerprint": self.model_fingerprint,
            "model_id": self.model_id,
            "tail": self.tail._fields() if self.tail is not None else None,
            "token_hash": self.token_hash,
            "tokens": chunking.tokens_bytes(self.token_ids),
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "version": self.version,
        }

    @cached_property
    def canonical_bytes(self) -> bytes:
        return _pack(self.to_dict())

    @cached_property
    def cid(self) -> Cid:
        """The artifact's CID: the hash of the canonical manifest bytes."""
        return Cid.of(self.canonical_bytes)

    def summary(self) -> dict:
        """A JSON-friendly description for `kvswap inspect` and the control API."""
        return {
            "cid": str(self.cid),
            "version": self.version,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "dtype": self.dtype,
            "layout": {**self.layout.to_dict(), "block_tokens": self.block_tokens},
            "n_tokens": self.n_tokens,
            "token_hash": self.token_hash,
            "document_hash": self.document_hash,
            "raw_size": self.raw_size,
            "stored_size": self.stored_size,
            "kv_stored_size": self.kv_stored_size,
            "chunks": [
                {"cid": str(c.cid), "t0": c.t0, "t1": c.t1, "codec": c.codec, "raw_size": c.raw_size,
                 "stored_size": c.stored_size, "prefix_key": c.prefix_key.hex()}
                for c in self.chunks
            ],
            "tail": None if self.tail is None else {
                "cid": str(self.tail.cid), "codec": self.tail.codec, "raw_size": self.tail.raw_size,
                "stored_size": self.tail.stored_size},
            "compute": self.compute,
        }


def _sorted(obj):
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_sorted(x) for x in obj]
    return obj


def _pack(obj) -> bytes:
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _fail(msg: str):
    raise FormatError(f"manifest: {msg}")


def _int(d: dict, key: str, lo: int, hi: int, what: str = "") -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what + ': ' if what else ''}{key} must be an int in {lo}..{hi}, got {v!r:.40}")
    return v


def _str(d: dict, key: str, pattern: re.Pattern | None = None, max_len: int = 256) -> str:
    v = d.get(key)
    if type(v) is not str or not 0 < len(v) <= max_len or (pattern is not None and not pattern.match(v)):
        _fail(f"{key} must be a {'well-formed ' if pattern else ''}string, got {v!r:.40}")
    return v


def _bin(d: dict, key: str, length: int | None = None) -> bytes:
    v = d.get(key)
    if type(v) is not bytes or (length is not None and len(v) != length):
        _fail(f"{key} must be {length if length is not None else ''} bytes")
    return v


def _map(v, keys: set[str], what: str) -> dict:
    if type(v) is not dict:
        _fail(f"{what} must be a map")
    if set(v) != keys:
        extra, missing = sorted(set(v) - keys), sorted(keys - set(v))
        _fail(f"{what} has unexpected keys {extra} / missing {missing}")
    return v


_TOP_KEYS = {"block_tokens", "chunks", "document_hash", "format", "layout", "model_fingerprint", "model_id",
             "tail", "token_hash", "tokens", "tokenizer_fingerprint", "version"}
_BLOB_KEYS = {"cid", "codec", "raw_size", "stored_size"}
_CHUNK_KEYS = _BLOB_KEYS | {"prefix_key", "t0", "t1"}
_LAYOUT_KEYS = {"layers", "kv_heads", "head_dim", "dtype"}


def _blob(d: dict, itemsize: int, max_raw: int, what: str) -> dict:
    codec = d.get("codec")
    if codec not in codecs.CODECS:
        _fail(f"{what}: unknown codec {codec!r:.40} (known: {', '.join(codecs.CODECS)})")
    raw_size = _int(d, "raw_size", itemsize, max_raw, what)
    if raw_size % itemsize:
        _fail(f"{what}: raw_size {raw_size} is not a whole number of {itemsize}-byte values")
    stored_size = _int(d, "stored_size", 1, codecs.max_stored_size(codec, raw_size, itemsize), what)
    if codec == "raw" and stored_size != raw_size:
        _fail(f"{what}: a raw blob's stored_size must equal its raw_size")
    return {"cid": Cid.from_bytes(_bin(d, "cid")), "codec": codec, "raw_size": raw_size, "stored_size": stored_size}


def decode_manifest(data: bytes | memoryview, expected_cid: Cid | None = None) -> Manifest:
    """Parse and fully validate manifest bytes.

    With `expected_cid` (the CID it was fetched or looked up by), bytes that do not hash to it raise
    IntegrityError before any parsing. Bytes over MAX_MANIFEST_BYTES raise LimitExceeded; bytes that do
    not parse, are not canonical, or fail validation raise FormatError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise LimitExceeded(f"manifest is {len(data)} bytes, over MAX_MANIFEST_BYTES ({MAX_MANIFEST_BYTES})")
    data = bytes(data)
    if expected_cid is not None:
        try:
            expected_cid.verify(data)
        except IntegrityError:
            raise IntegrityError(f"manifest does not match its CID {expected_cid.short()}") from None
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=MAX_MANIFEST_BYTES, max_str_len=4096, max_array_len=MAX_CHUNKS, max_map_len=64,
            max_ext_len=0,
        )
    except MSGPACK_DECODE_ERRORS as exc:
        raise FormatError(f"manifest: not valid msgpack ({type(exc).__name__}: {exc})"[:300]) from None
    version = obj.get("version") if type(obj) is dict else None
    if type(version) is not int or version not in READ_VERSIONS:
        _fail(f"unsupported format version {version!r:.20} (this build reads versions "
              f"{', '.join(map(str, READ_VERSIONS))})")
    d = _map(obj, _TOP_KEYS | ({"compute"} if version >= 2 else set()), "manifest")
    if d.get("format") != FORMAT_NAME:
        _fail(f"format must be {FORMAT_NAME!r}, got {d.get('format')!r:.40}")
    compute = _compute(d["compute"]) if version >= 2 else ()
    lay = _map(d["layout"], _LAYOUT_KEYS, "layout")
    for key in ("layers", "kv_heads", "head_dim"):
        _int(lay, key, 1, 65_536)
    try:
        layout = KvLayout(lay["layers"], lay["kv_heads"], lay["head_dim"], lay["dtype"])
    except FormatError as exc:
        _fail(str(exc))
    tokens = _bin(d, "tokens")
    if len(tokens) % 4:
        _fail("tokens must be little-endian uint32 values")
    n_tokens = len(tokens) // 4
    if n_tokens > MAX_TOKENS:
        raise LimitExceeded(f"manifest lists {n_tokens} tokens, over MAX_TOKENS ({MAX_TOKENS})")
    raw_chunks = d.get("chunks")
    if type(raw_chunks) is not list:
        _fail("chunks must be a list")
    if len(raw_chunks) > MAX_CHUNKS:
        raise LimitExceeded(f"manifest lists {len(raw_chunks)} chunks, over MAX_CHUNKS ({MAX_CHUNKS})")
    chunk_refs = []
    for i, c in enumerate(raw_chunks):
        c = _map(c, _CHUNK_KEYS, f"chunk {i}")
        blob = _blob(c, layout.itemsize, MAX_CHUNK_RAW_BYTES, f"chunk {i}")
        chunk_refs.append(ChunkRef(**blob, t0=_int(c, "t0", 0, MAX_TOKENS), t1=_int(c, "t1", 0, MAX_TOKENS),
                                   prefix_key=_bin(c, "prefix_key", 32)))
    tail = None
    if d["tail"] is not None:
        tail = BlobRef(**_blob(_map(d["tail"], _BLOB_KEYS, "tail"), 4, MAX_TAIL_RAW_BYTES, "tail"))
    import numpy as np  # local: keeps this module's import cheap for the CLI's --help

    manifest = Manifest(
        model_id=_str(d, "model_id", max_len=_MAX_MODEL_ID),
        model_fingerprint=_str(d, "model_fingerprint", _HEX),
        tokenizer_fingerprint=_str(d, "tokenizer_fingerprint", _HEX),
        layout=layout,
        block_tokens=_int(d, "block_tokens", 1, MAX_TOKENS),
        token_ids=tuple(np.frombuffer(tokens, dtype="<u4").tolist()),
        token_hash=_str(d, "token_hash", _SHA256_HEX),
        document_hash=_str(d, "document_hash", _SHA256_HEX),
        chunks=tuple(chunk_refs),
        tail=tail,
        compute_identity=compute,
        version=version,
    )
    if manifest.canonical_bytes != data:
        _fail("not in canonical form (key order, int widths or duplicate keys differ from the encoder's)")
    return manifest


def _compute(v) -> tuple[tuple[str, str], ...]:
    """A version-2 manifest's compute identity: a map of at most MAX_COMPUTE_ENTRIES short lowercase names to
    strings of at most MAX_COMPUTE_CHARS, as sorted pairs."""
    if type(v) is not dict or len(v) > MAX_COMPUTE_ENTRIES:
        _fail(f"compute must be a map of at most {MAX_COMPUTE_ENTRIES} entries")
    for key, value in v.items():
        if type(key) is not str or not _COMPUTE_KEY.match(key) or type(value) is not str \
                or not len(value) <= MAX_COMPUTE_CHARS:
            _fail(f"compute entries are lowercase names to strings of at most {MAX_COMPUTE_CHARS} chars")
    return tuple(sorted(v.items()))


def validate(m: Manifest) -> None:
    """Every rule of FORMAT.md "Validation" that spans fields; FormatError/LimitExceeded on the first break."""
    lay = m.layout
    if m.version not in READ_VERSIONS:
        _fail(f"unsupported format version {m.version}")
    if m.version < 2 and m.compute_identity:
        _fail("a version-1 manifest has no compute identity")
    if m.compute_identity:
        _compute(dict(m.compute_identity))
    if not isinstance(m.model_id, str) or not 0 < len(m.model_id) <= _MAX_MODEL_ID:
        _fail("model_id must be a non-empty string of at most 256 characters")
    for name in ("model_fingerprint", "tokenizer_fingerprint"):
        if not isinstance(getattr(m, name), str) or not _HEX.match(getattr(m, name)):
            _fail(f"{name} must be lowercase hex (16-128 digits)")
    for name in ("token_hash", "document_hash"):
        if not isinstance(getattr(m, name), str) or not _SHA256_HEX.match(getattr(m, name)):
            _fail(f"{name} must be a sha256 hex digest")
    n = m.n_tokens
    if not 0 < n <= MAX_TOKENS:
        raise LimitExceeded(f"token count {n} outside 1..MAX_TOKENS ({MAX_TOKENS})")
    if not isinstance(m.block_tokens, int) or m.block_tokens <= 0:
        _fail("block_tokens must be a positive int")
    if m.block_tokens * lay.bytes_per_token > MAX_CHUNK_RAW_BYTES:
        raise LimitExceeded(
            f"{m.block_tokens}-token blocks of {lay.bytes_per_token} B/token exceed MAX_CHUNK_RAW_BYTES ({MAX_CHUNK_RAW_BYTES})")
    if len(m.chunks) > MAX_CHUNKS:
        raise LimitExceeded(f"{len(m.chunks)} chunks, over MAX_CHUNKS ({MAX_CHUNKS})")
    if chunking.token_hash(m.token_ids) != m.token_hash:
        _fail("token_hash does not match the token ids")
    want_ranges = chunking.block_ranges(n, m.block_tokens)
    got_ranges = [(c.t0, c.t1) for c in m.chunks]
    if got_ranges != want_ranges:
        _fail(f"chunk token ranges must tile [0, {n}) in blocks of {m.block_tokens} with no hole or overlap")
    keys = chunking.prefix_keys(m.token_ids, m.block_tokens)
    for i, (c, key) in enumerate(zip(m.chunks, keys)):
        if c.codec not in codecs.CODECS:
            _fail(f"chunk {i}: unknown codec {c.codec!r}")
        if c.raw_size != c.n_tokens * lay.bytes_per_token:
            _fail(f"chunk {i}: raw_size {c.raw_size} != {c.n_tokens} tokens x {lay.bytes_per_token} bytes")
        bound = codecs.max_stored_size(c.codec, c.raw_size, lay.itemsize)
        if not 0 < c.stored_size <= bound or (c.codec == "raw" and c.stored_size != c.raw_size):
            _fail(f"chunk {i}: stored_size {c.stored_size} outside 1..{bound} for codec {c.codec}")
        if c.prefix_key != key:
            _fail(f"chunk {i}: prefix key does not match the token ids")
    if m.tail is not None:
        t = m.tail
        if t.codec not in codecs.CODECS or not 4 <= t.raw_size <= MAX_TAIL_RAW_BYTES or t.raw_size % 4:
            _fail("tail: bad codec or raw_size")
        if not 0 < t.stored_size <= codecs.max_stored_size(t.codec, t.raw_size, 4) or (
            t.codec == "raw" and t.stored_size != t.raw_size
        ):
            _fail("tail: stored_size out of bounds")
