"""The typed messages of the kvswap wire protocol: frozen dataclasses, no I/O.

Each message class has a one-byte frame `TYPE`, `to_body()` (bytes) and `from_body(bytes)`. Bodies are
msgpack maps with short keys, except `ChunkData`, whose payload is appended raw after a small msgpack header
so a multi-megabyte chunk is never re-encoded or copied through msgpack. Everything a peer sends is checked
here (types, sizes, CIDs) and anything else raises `RemoteProtocolError`: node/ never sees a half-valid
message.

The protocol ids these messages travel under, the gossip topic and the DHT keys are in protocol/names.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from .cid import Cid
from .errors import KvswapError, RemoteProtocolError, UsageError
from .keys import ArtifactKey, DocumentKey

from . import limits

#: Error codes an ErrorMessage may carry (a closed set: a peer cannot invent codes we must interpret).
ERROR_CODES = frozenset({"not_found", "bad_request", "busy", "limit", "model_mismatch", "payment", "internal"})

_HEX = frozenset("0123456789abcdef")


# --- field validation (peer-supplied values) --------------------------------------------------------------


def _bad(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed message: {text}")


def _req(body: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in body:
        raise _bad(f"{what} lacks field {key!r}")
    value = body[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _bad(f"{what}.{key} has the wrong type ({type(value).__name__})")
    return value


def _hexstr(value: Any, what: str, max_len: int = limits.MAX_HEX_CHARS) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len or not set(value) <= _HEX:
        raise _bad(f"{what} must be lowercase hex of at most {max_len} chars")
    return value


def _cid(value: Any, what: str) -> Cid:
    if not isinstance(value, bytes):
        raise _bad(f"{what} must be a binary CID")
    try:
        return Cid.from_bytes(value)
    except KvswapError as exc:
        raise _bad(f"{what}: {exc}") from exc


_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def _peer_id(value: Any, what: str) -> str:
    """A libp2p peer id in its base58 text form (shape only; dialling it proves the key)."""
    if not isinstance(value, str) or not 0 < len(value) <= limits.MAX_PEER_ID_CHARS or not set(value) <= _BASE58:
        raise _bad(f"{what} must be a base58 peer id of at most {limits.MAX_PEER_ID_CHARS} chars")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(f"{what} must be an int in [{lo}, {hi}]")
    return value


class _ContainerBudget:
    """Counts the maps and arrays msgpack builds for one body and stops it past MAX_MESSAGE_CONTAINERS: a frame
    of nested empty arrays (one byte each) would otherwise become a million Python lists, 64 bytes and more
    apiece, from one 1 MiB frame."""

    def __init__(self) -> None:
        self.left = limits.MAX_MESSAGE_CONTAINERS

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many nested maps and arrays")
        return obj


def _unpack(body: bytes | memoryview, what: str) -> dict:
    """A message body as a dict, decoded within bounds that hold for every valid message: at most
    MAX_MESSAGE_CONTAINERS maps and arrays, arrays of at most MAX_MESSAGE_ARRAY entries, maps of at most
    MAX_TIMINGS keys (the largest valid map is a GenerateResponse's timings). What a peer sends therefore
    decodes into at most a few times its own size, never into hundreds of megabytes."""
    budget = _ContainerBudget()
    try:
        obj = msgpack.unpackb(bytes(body), raw=False, strict_map_key=True, use_list=True, list_hook=budget,
                              object_hook=budget, max_array_len=limits.MAX_MESSAGE_ARRAY,
                              max_map_len=limits.MAX_TIMINGS)
    except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise _bad(f"{what} body is not msgpack within the message bounds ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise _bad(f"{what} body is not a map")
    return obj


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _check_terms_digest(value: Any, what: str) -> None:
    if value is not None and (not isinstance(value, bytes) or len(value) != limits.TERMS_DIGEST_BYTES):
        raise _bad(f"{what}.terms must be a {limits.TERMS_DIGEST_BYTES}-byte digest")


# --- messages ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestRequest:
    """Ask for an artifact's manifest: by its CID, by a document for one model, or by a document alone, meaning
    "an artifact of this document for any model" (asked only to name the model a peer has it for when there
    is none for the asker's; a peer that predates this form refuses it, and the asker names no model then).
    The key is protocol/keys.py's, the same one the CLI and the fetch name."""

    TYPE: ClassVar[int] = 1
    key: ArtifactKey

    def __post_init__(self) -> None:
        if not isinstance(self.key, (Cid, DocumentKey)):
            raise _bad("ManifestRequest names a CID or a document")

    @property
    def any_model(self) -> bool:
        """True when this asks for the document's artifact for whichever model the peer holds it for."""
        return isinstance(self.key, DocumentKey) and self.key.any_model

    def to_body(self) -> bytes:
        if isinstance(self.key, Cid):
            return _pack({"c": self.key.to_bytes()})
        if self.key.model_fingerprint is None:
            return _pack({"d": self.key.document_hash})
        return _pack({"m": self.key.model_fingerprint, "d": self.key.document_hash})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ManifestRequest":
        d = _unpack(body, "ManifestRequest")
        if "c" in d:
            return cls(_cid(d["c"], "ManifestRequest.cid"))
        model = d.get("m")
        doc = _hexstr(d.get("d"), "ManifestRequest.document_hash")
        model = None if model is None else _hexstr(model, "ManifestRequest.model_fingerprint")
        try:
            return cls(DocumentKey(doc, model))
        except UsageError as exc:
            raise _bad(f"ManifestRequest: {exc}") from None


@dataclass(frozen=True)
class ManifestResponse:
    """A canonical manifest, its signature envelopes and its audit attestations (one encoded attestation list,
    FORMAT.md; empty when there are none), exactly as stored (verified by the receiver). The attestations key
    is optional on the wire, so peers that predate audits still read these answers and send theirs."""

    TYPE: ClassVar[int] = 2
    manifest: bytes
    envelopes: tuple[bytes, ...] = ()
    attestations: bytes = b""
    terms: bytes = b""  # the provider's signed terms (kvswap/payments/terms.py); empty: it serves for free

    def to_body(self) -> bytes:
        body = {"m": self.manifest, "e": list(self.envelopes)}
        if self.attestations:
            body["a"] = self.attestations
        if self.terms:
            body["t"] = self.terms
        return _pack(body)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ManifestResponse":
        d = _unpack(body, "ManifestResponse")
        manifest = _req(d, "m", bytes, "ManifestResponse")
        envelopes = _req(d, "e", list, "ManifestResponse")
        if len(manifest) > limits.MAX_WIRE_MANIFEST_BYTES:
            raise _bad("manifest larger than MAX_WIRE_MANIFEST_BYTES")
        if not all(isinstance(e, bytes) for e in envelopes):
            raise _bad("ManifestResponse.envelopes must be a list of bytes")
        if sum(len(e) for e in envelopes) > limits.MAX_WIRE_SIGNATURES_BYTES:
            raise _bad("envelopes larger than MAX_WIRE_SIGNATURES_BYTES")
        attestations = d.get("a", b"")
        if not isinstance(attestations, bytes) or len(attestations) > limits.MAX_WIRE_SIGNATURES_BYTES:
            raise _bad("ManifestResponse.attestations must be bytes of at most MAX_WIRE_SIGNATURES_BYTES")
        terms = d.get("t", b"")
        if not isinstance(terms, bytes) or len(terms) > limits.MAX_WIRE_TERMS_BYTES:
            raise _bad("ManifestResponse.terms must be bytes of at most MAX_WIRE_TERMS_BYTES")
        return cls(manifest=manifest, envelopes=tuple(envelopes), attestations=attestations, terms=terms)


@dataclass(frozen=True)
class ChunkRequest:
    """Ask for stored chunks by CID. `dataplane=True` lets the server answer with a DataGrant instead."""

    TYPE: ClassVar[int] = 3
    cids: tuple[Cid, ...]
    dataplane: bool = False
    artifact: Cid | None = None  # the artifact these chunks belong to, for the server's ledger and vouchers
    terms: bytes | None = None  # the digest of the provider's terms the asker accepts and pays under

    def __post_init__(self) -> None:
        if not 0 < len(self.cids) <= limits.MAX_CHUNKS_PER_REQUEST:
            raise _bad(f"a ChunkRequest names 1..{limits.MAX_CHUNKS_PER_REQUEST} chunks")
        _check_terms_digest(self.terms, "ChunkRequest")

    def to_body(self) -> bytes:
        body = {"c": [c.to_bytes() for c in self.cids], "p": self.dataplane}
        if self.artifact is not None:
            body["a"] = self.artifact.to_bytes()
        if self.terms is not None:
            body["t"] = self.terms
        return _pack(body)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ChunkRequest":
        d = _unpack(body, "ChunkRequest")
        cids = _req(d, "c", list, "ChunkRequest")
        dataplane = d.get("p", False)
        if not isinstance(dataplane, bool):
            raise _bad("ChunkRequest.dataplane must be a bool")
        artifact = d.get("a")
        return cls(
            cids=tuple(_cid(c, "ChunkRequest.cids[]") for c in cids),
            dataplane=dataplane,
            artifact=None if artifact is None else _cid(artifact, "ChunkRequest.artifact"),
            terms=d.get("t"),
        )


#: Bytes of a ChunkData frame's header: the chunk's binary CID.
CHUNK_HEADER_BYTES = len(Cid(bytes(32)).to_bytes())


@dataclass(frozen=True)
class ChunkData:
    """One stored chunk: a tiny header (its CID) and the stored bytes, verified by the receiver. The data
    plane hands its receive buffer (a bytearray of the exact size) through as the payload, uncopied."""

    TYPE: ClassVar[int] = 4
    cid: Cid
    payload: bytes | bytearray = field(repr=False)

    def to_body(self) -> bytes:
        return self.cid.to_bytes() + self.payload

    def body_parts(self) -> tuple[bytes, bytes]:
        """Header and payload separately, so a sender can write them without concatenating megabytes."""
        return self.cid.to_bytes(), self.payload

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ChunkData":
        if len(body) < CHUNK_HEADER_BYTES:
            raise _bad("ChunkData shorter than its CID header")
        cid = _cid(bytes(body[:CHUNK_HEADER_BYTES]), "ChunkData.cid")
        return cls(cid=cid, payload=bytes(body[CHUNK_HEADER_BYTES:]))


@dataclass(frozen=True)
class ChunkMissing:
    """No bytes for this chunk now. Either the server does not hold it (`rationed` False: ask another
    provider), or it holds it but has already sent its share of copies to other fetchers of the same
    artifact (`rationed` True, node/ration.py): `holders` names peers it sent the chunk to, which the client
    should ask first. A rationed chunk is served anyway once the client has waited ration.patience_s."""

    TYPE: ClassVar[int] = 5
    cid: Cid
    rationed: bool = False
    holders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.holders) > limits.MAX_HOLDER_HINTS:
            raise _bad(f"a ChunkMissing names at most {limits.MAX_HOLDER_HINTS} holders")
        if self.holders and not self.rationed:
            raise _bad("only a rationed ChunkMissing names holders")

    def to_body(self) -> bytes:
        body: dict = {"c": self.cid.to_bytes()}
        if self.rationed:
            body["r"] = True
            body["h"] = list(self.holders)
        return _pack(body)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ChunkMissing":
        d = _unpack(body, "ChunkMissing")
        rationed = d.get("r", False)
        if not isinstance(rationed, bool):
            raise _bad("ChunkMissing.rationed must be a bool")
        holders = d.get("h", [])
        if not isinstance(holders, list):
            raise _bad("ChunkMissing.holders must be a list")
        return cls(cid=_cid(d.get("c"), "ChunkMissing.cid"), rationed=rationed,
                   holders=tuple(_peer_id(h, "ChunkMissing.holders[]") for h in holders))


@dataclass(frozen=True)
class DataGrant:
    """Fetch these chunks over the node's data plane: connect to host:port, send the token, read frames.

    The grant travels inside the authenticated, encrypted libp2p stream; the data plane only moves bytes that
    the receiver verifies against the CIDs it asked for, exactly as on the libp2p path.
    """

    TYPE: ClassVar[int] = 6
    host: str
    port: int
    token: bytes
    cids: tuple[Cid, ...]

    def to_body(self) -> bytes:
        return _pack({"h": self.host, "p": self.port, "t": self.token, "c": [c.to_bytes() for c in self.cids]})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "DataGrant":
        d = _unpack(body, "DataGrant")
        host = _req(d, "h", str, "DataGrant")
        if not 0 < len(host) <= limits.MAX_HOST_CHARS:
            raise _bad("DataGrant.host too long")
        token = _req(d, "t", bytes, "DataGrant")
        if len(token) != limits.DATAPLANE_TOKEN_BYTES:
            raise _bad("DataGrant.token has the wrong length")
        cids = _req(d, "c", list, "DataGrant")
        if not 0 < len(cids) <= limits.MAX_CHUNKS_PER_REQUEST:
            raise _bad("DataGrant names too many chunks")
        return cls(
            host=host,
            port=_int(d.get("p"), "DataGrant.port", 1, 65535),
            token=token,
            cids=tuple(_cid(c, "DataGrant.cids[]") for c in cids),
        )


@dataclass(frozen=True)
class GenerateRequest:
    """Hosted generation: the holder of the artifact decodes after its cached document."""

    TYPE: ClassVar[int] = 7
    artifact_cid: Cid
    suffix_ids: tuple[int, ...]
    max_new_tokens: int = 24
    seed: int | None = None
    terms: bytes | None = None  # the digest of the host's terms the asker accepts and pays under

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or len(self.suffix_ids) + self.max_new_tokens > limits.MAX_GENERATE_TOKENS:
            raise _bad(f"suffix + max_new_tokens exceeds MAX_GENERATE_TOKENS ({limits.MAX_GENERATE_TOKENS})")
        _check_terms_digest(self.terms, "GenerateRequest")

    def to_body(self) -> bytes:
        body = {"a": self.artifact_cid.to_bytes(), "s": list(self.suffix_ids), "n": self.max_new_tokens, "r": self.seed}
        if self.terms is not None:
            body["t"] = self.terms
        return _pack(body)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "GenerateRequest":
        d = _unpack(body, "GenerateRequest")
        suffix = _req(d, "s", list, "GenerateRequest")
        seed = d.get("r")
        return cls(
            artifact_cid=_cid(d.get("a"), "GenerateRequest.artifact_cid"),
            suffix_ids=tuple(_int(t, "GenerateRequest.suffix_ids[]", 0, limits.MAX_TOKEN_ID) for t in suffix),
            max_new_tokens=_int(d.get("n"), "GenerateRequest.max_new_tokens", 0, limits.MAX_GENERATE_TOKENS),
            seed=None if seed is None else _int(seed, "GenerateRequest.seed", 0, limits.MAX_GENERATE_SEED),
            terms=d.get("t"),
        )


@dataclass(frozen=True)
class GenerateResponse:
    """Generated token ids, the decoded text, and the host's timings in seconds (prefill/load/decode)."""

    TYPE: ClassVar[int] = 8
    tokens: tuple[int, ...]
    text: str = ""
    timings: tuple[tuple[str, float], ...] = ()

    def to_body(self) -> bytes:
        return _pack({"t": list(self.tokens), "x": self.text, "s": {k: float(v) for k, v in self.timings}})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "GenerateResponse":
        d = _unpack(body, "GenerateResponse")
        tokens = _req(d, "t", list, "GenerateResponse")
        if len(tokens) > limits.MAX_GENERATE_TOKENS:
            raise _bad("GenerateResponse has more than MAX_GENERATE_TOKENS tokens")
        timings = _req(d, "s", dict, "GenerateResponse")
        if len(timings) > limits.MAX_TIMINGS or not all(
            isinstance(k, str) and len(k) <= limits.MAX_TIMING_NAME_CHARS and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in timings.items()
        ):
            raise _bad("GenerateResponse.timings must map short names to seconds")
        return cls(
            tokens=tuple(_int(t, "GenerateResponse.tokens[]", 0, limits.MAX_TOKEN_ID) for t in tokens),
            text=_req(d, "x", str, "GenerateResponse"),
            timings=tuple(sorted((k, float(v)) for k, v in timings.items())),
        )

@dataclass(frozen=True)
class ErrorMessage:
    """A refusal with a code from ERROR_CODES and one line of text."""

    TYPE: ClassVar[int] = 9
    code: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise _bad(f"unknown error code {self.code!r}")

    def to_body(self) -> bytes:
        return _pack({"c": self.code, "t": self.text[:limits.MAX_ERROR_TEXT_CHARS]})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ErrorMessage":
        d = _unpack(body, "ErrorMessage")
        text = _req(d, "t", str, "ErrorMessage")
        return cls(code=_req(d, "c", str, "ErrorMessage"), text=text[:limits.MAX_ERROR_TEXT_CHARS])


@dataclass(frozen=True)
class Announce:
    """A gossipsub announcement: `publisher` (peer id) holds this artifact."""

    TYPE: ClassVar[int] = 10
    artifact_cid: Cid
    model_fingerprint: str
    document_hash: str
    n_tokens: int
    publisher: str

    def to_body(self) -> bytes:
        return _pack(
            {
                "a": self.artifact_cid.to_bytes(),
                "m": self.model_fingerprint,
                "d": self.document_hash,
                "n": self.n_tokens,
                "p": self.publisher,
            }
        )

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "Announce":
        d = _unpack(body, "Announce")
        publisher = _req(d, "p", str, "Announce")
        if not 0 < len(publisher) <= limits.MAX_PEER_ID_CHARS:
            raise _bad("Announce.publisher must be a peer id")
        return cls(
            artifact_cid=_cid(d.get("a"), "Announce.artifact_cid"),
            model_fingerprint=_hexstr(d.get("m"), "Announce.model_fingerprint"),
            document_hash=_hexstr(d.get("d"), "Announce.document_hash"),
            n_tokens=_int(d.get("n"), "Announce.n_tokens", 0, limits.MAX_WIRE_TOKENS),
            publisher=publisher,
        )


@dataclass(frozen=True)
class Voucher:
    """A consumer's signed, cumulative voucher for a provider (opaque here: kvswap/payments/vouchers.py parses
    and checks it), sent on /kvswap/pay/1 as verified bytes or hosted tokens arrive."""

    TYPE: ClassVar[int] = 11
    voucher: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.voucher, bytes) or not 0 < len(self.voucher) <= limits.MAX_WIRE_VOUCHER_BYTES:
            raise _bad(f"a Voucher carries 1..{limits.MAX_WIRE_VOUCHER_BYTES} bytes")

    def to_body(self) -> bytes:
        return _pack({"v": self.voucher})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "Voucher":
        return cls(_req(_unpack(body, "Voucher"), "v", bytes, "Voucher"))


@dataclass(frozen=True)
class VoucherAck:
    """The provider counted a voucher: the sequence it now holds for that series (a replay is acked too)."""

    TYPE: ClassVar[int] = 12
    sequence: int

    def to_body(self) -> bytes:
        return _pack({"s": self.sequence})

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "VoucherAck":
        return cls(_int(_unpack(body, "VoucherAck").get("s"), "VoucherAck.sequence", 0, 2**63 - 1))


Message = (
    ManifestRequest
    | ManifestResponse
    | ChunkRequest
    | ChunkData
    | ChunkMissing
    | DataGrant
    | GenerateRequest
    | GenerateResponse
    | ErrorMessage
    | Announce
    | Voucher
    | VoucherAck
)

#: frame type byte -> message class
MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        ManifestRequest,
        ManifestResponse,
        ChunkRequest,
        ChunkData,
        ChunkMissing,
        DataGrant,
        GenerateRequest,
        GenerateResponse,
        ErrorMessage,
        Announce,
        Voucher,
        VoucherAck,
    )
}

#: frame type byte -> largest body accepted (checked as soon as the length prefix is read). Requests are what
#: any peer may send a serving node unasked, so they get the tight MAX_REQUEST_FRAME_BYTES.
MAX_BODY_BYTES: dict[int, int] = {
    t: limits.MAX_FRAME_BYTES for t in MESSAGE_TYPES
} | {
    ManifestRequest.TYPE: limits.MAX_REQUEST_FRAME_BYTES,
    ChunkRequest.TYPE: limits.MAX_REQUEST_FRAME_BYTES,
    GenerateRequest.TYPE: limits.MAX_REQUEST_FRAME_BYTES,
    Voucher.TYPE: limits.MAX_REQUEST_FRAME_BYTES,
    ManifestResponse.TYPE: limits.MAX_MANIFEST_FRAME_BYTES,
    ChunkData.TYPE: limits.MAX_DATA_FRAME_BYTES,
    Announce.TYPE: limits.MAX_ANNOUNCE_BYTES,
}
