"""A consumer's voucher: a cumulative, signed promise to pay one provider for one artifact, in its own domain.

The consumer signs a voucher as verified bytes (or hosted tokens) arrive, each one covering everything so far
of one series (consumer, provider, artifact): the totals only grow, and the sequence number grows by one per
voucher. The latest voucher of a series is its receipt; an older or replayed one adds nothing. Only bytes that
verified against their CID are ever signed for, so a provider that sends bad bytes is not paid for them.

Encoding (FORMAT.md "Payments"), 228 bytes, integers big-endian:

    provider  32   the provider's Ed25519 key (it is paid)
    consumer  32   the consumer's Ed25519 key (it signs, it pays)
    artifact  36   the artifact's CID (binary)
    terms     32   sha256 of the body of the terms it pays under (terms.py)
    sequence  u64  1 for a series' first voucher, +1 for each later one
    amount    u64  units owed in all, under the terms' unit
    bytes     u64  stored chunk bytes received and verified, in all
    tokens    u64  hosted output tokens delivered, in all
    signature 64   Ed25519 by `consumer` over b"kvswap/payment-voucher/v1\\n" || the 164 bytes above

The domain differs from every other kvswap signature (manifest, audit attestation, terms, statement), so no
signature made for one is ever accepted as another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..protocol.cid import Cid
from ..protocol.errors import FormatError, IntegrityError, KvswapError
from .limits import MAX_COUNTER, VOUCHER_BYTES

DOMAIN = b"kvswap/payment-voucher/v1\n"
_COUNTERS = struct.Struct(">QQQQ")
_SIGNED_BYTES = VOUCHER_BYTES - 64


@dataclass(frozen=True)
class Voucher:
    provider: bytes
    consumer: bytes
    artifact: Cid
    terms: bytes
    sequence: int
    amount: int
    bytes: int
    tokens: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        for name in ("provider", "consumer", "terms"):
            value = getattr(self, name)
            if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
                raise FormatError(f"voucher: {name} must be 32 bytes")
        if not isinstance(self.artifact, Cid):
            raise FormatError("voucher: artifact must be a CID")
        for name in ("sequence", "amount", "bytes", "tokens"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_COUNTER:
                raise FormatError(f"voucher: {name} must be an integer in [0, 2**63)")
        if self.sequence < 1:
            raise FormatError("voucher: sequence starts at 1")

    @property
    def series(self) -> tuple[bytes, bytes, Cid]:
        return self.provider, self.consumer, self.artifact

    def signed_part(self) -> bytes:
        part = (self.provider + self.consumer + self.artifact.to_bytes() + self.terms
                + _COUNTERS.pack(self.sequence, self.amount, self.bytes, self.tokens))
        if len(part) != _SIGNED_BYTES:
            raise FormatError("voucher: the artifact CID is not a 36-byte CIDv1")
        return part

    def signed_message(self) -> bytes:
        return DOMAIN + self.signed_part()

    def encode(self) -> bytes:
        if len(self.signature) != 64:
            raise FormatError("voucher is not signed")
        return self.signed_part() + self.signature

    def verify(self) -> "Voucher":
        """Itself, once its signature by `consumer` checks (IntegrityError otherwise)."""
        try:
            Ed25519PublicKey.from_public_bytes(self.consumer).verify(self.signature, self.signed_message())
        except (InvalidSignature, ValueError):
            raise IntegrityError(f"bad voucher signature by {self.consumer.hex()[:16]}... "
                                 f"(sequence {self.sequence})") from None
        return self

    def summary(self) -> dict:
        return {"provider": self.provider.hex(), "consumer": self.consumer.hex(), "artifact": str(self.artifact),
                "terms": self.terms.hex(), "sequence": self.sequence, "amount": self.amount, "bytes": self.bytes,
                "tokens": self.tokens}


def sign_voucher(key, *, provider: bytes, artifact: Cid, terms: bytes, sequence: int, amount: int, nbytes: int,
                 tokens: int) -> Voucher:
    """`key` (the consumer's kvswap.artifact.signing.NodeKey) promises `amount` in all for this series."""
    unsigned = Voucher(provider, key.public_bytes, artifact, terms, sequence, amount, nbytes, tokens)
    return Voucher(**{**unsigned.__dict__, "signature": key.sign_bytes(unsigned.signed_message())})


def decode_voucher(data: bytes) -> Voucher:
    """A voucher from its 228 bytes, signature checked (FormatError / IntegrityError)."""
    data = bytes(data)
    if len(data) != VOUCHER_BYTES:
        raise FormatError(f"a voucher is {VOUCHER_BYTES} bytes, not {len(data)}")
    try:
        artifact = Cid.from_bytes(data[64:100])
    except KvswapError as exc:
        raise FormatError(f"voucher: artifact is no CID ({exc})") from None
    seq, amount, nbytes, tokens = _COUNTERS.unpack(data[132:164])
    return Voucher(data[:32], data[32:64], artifact, data[100:132], seq, amount, nbytes, tokens,
                   data[164:]).verify()


__all__ = ["DOMAIN", "Voucher", "decode_voucher", "sign_voucher"]
