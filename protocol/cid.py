"""Content identifiers: CIDv1 over sha2-256, as IPFS writes them (`bafkrei...`).

A chunk's CID hashes its stored bytes; an artifact's CID hashes its canonical manifest bytes. Both use the
`raw` multicodec (0x55): kvswap bytes are opaque to IPFS tooling, but the strings are self-describing and any
multiformats library can parse them. A `Cid` is a value type, not a hex string, so a digest cannot be passed
where a document hash is expected (iroh-blobs' Hash does the same).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from .errors import FormatError, IntegrityError

_CID_VERSION = 1
_CODEC_RAW = 0x55
_MH_SHA2_256 = 0x12
_DIGEST_LEN = 32
_PREFIX = bytes([_CID_VERSION, _CODEC_RAW, _MH_SHA2_256, _DIGEST_LEN])
_MULTIBASE_BASE32 = "b"


@dataclass(frozen=True, order=True)
class Cid:
    """A CIDv1 (raw codec, sha2-256) held as its 32-byte digest."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_LEN:
            raise FormatError("a CID digest is 32 bytes of sha2-256")

    @classmethod
    def of(cls, data: bytes | memoryview) -> "Cid":
        """The CID of `data`."""
        return cls(hashlib.sha256(data).digest())

    @classmethod
    def parse(cls, text: str) -> "Cid":
        """Parse the string form (`b` + base32 of the binary CID); FormatError on anything else."""
        if not isinstance(text, str) or not text.startswith(_MULTIBASE_BASE32) or len(text) > 100:
            raise FormatError(f"not a kvswap CID (expected a CIDv1 base32 string starting with 'b'): {text!r:.80}")
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except (ValueError, TypeError) as exc:
            raise FormatError(f"not a kvswap CID (bad base32): {text!r:.80}") from exc
        return cls.from_bytes(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Cid":
        """Parse the binary form: version, codec, multihash code, length, digest."""
        if len(raw) != len(_PREFIX) + _DIGEST_LEN or raw[: len(_PREFIX)] != _PREFIX:
            raise FormatError("not a CIDv1 raw sha2-256 CID")
        return cls(bytes(raw[len(_PREFIX) :]))

    def to_bytes(self) -> bytes:
        return _PREFIX + self.digest

    def __str__(self) -> str:
        return _MULTIBASE_BASE32 + base64.b32encode(self.to_bytes()).decode("ascii").lower().rstrip("=")

    def __repr__(self) -> str:
        return f"Cid({self.short()})"

    def short(self) -> str:
        """A readable abbreviation for tables and logs (never for lookups)."""
        text = str(self)
        return f"{text[:10]}..{text[-6:]}"

    def verify(self, data: bytes | memoryview) -> None:
        """Raise IntegrityError unless `data` hashes to this CID."""
        if hashlib.sha256(data).digest() != self.digest:
            raise IntegrityError(f"content does not match its CID {self.short()}")


def sha256_hex(data: bytes) -> str:
    """Hex sha256, used for document and token hashes (plain digests, not content addresses)."""
    return hashlib.sha256(data).hexdigest()
