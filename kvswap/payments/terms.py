"""A provider's terms: what it charges for what it serves, signed by its node key in a domain of its own.

The price is attached to a provider, not to an artifact: one artifact can be sold by several providers at
different prices, and the same terms cover everything one provider serves. Terms travel in the provider's
manifest answers (protocol/messages.py ManifestResponse `t`), and every voucher names the digest of the terms
it pays under. Price 0 for both is free: a free node has no terms at all.

Encoding (FORMAT.md "Payments"): `body || signature`, where body is a canonical msgpack map (keys sorted, ints
only, no floats)

    credit_bytes   int   bytes the provider sends ahead of payment (its credit window for chunks)
    credit_tokens  int   hosted output tokens it generates ahead of payment
    issued         int   unix seconds the terms were signed
    price_per_mb   int   units per 10**6 stored bytes shipped (floor of the cumulative product)
    price_per_token int  units per hosted output token delivered
    provider       bin   the provider's Ed25519 public key (32)
    unit           str   what one unit is, e.g. "micro-usd" (at most MAX_UNIT_CHARS)

and signature is Ed25519 by `provider` over `b"kvswap/payment-terms/v1\\n" || sha256(body)`. The digest of the
terms is sha256(body).
"""

from __future__ import annotations

import hashlib
import re
import time as _time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..protocol.errors import FormatError, IntegrityError
from .limits import MAX_CREDIT_BYTES, MAX_PRICE, MAX_TERMS_BYTES, MAX_UNIT_CHARS

DOMAIN = b"kvswap/payment-terms/v1\n"
SIGNATURE_BYTES = 64
_KEYS = ("credit_bytes", "credit_tokens", "issued", "price_per_mb", "price_per_token", "provider", "unit")
_UNIT = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
#: the MSGPACK decode failures a peer's bytes can cause (mapped to FormatError here)
_DECODE_ERRORS = (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError)


@dataclass(frozen=True)
class Terms:
    """One provider's prices and credit windows, as signed."""

    provider: bytes
    unit: str
    price_per_mb: int
    price_per_token: int
    credit_bytes: int
    credit_tokens: int
    issued: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.provider, bytes) or len(self.provider) != 32:
            raise FormatError("terms: provider must be a 32-byte Ed25519 key")
        if not isinstance(self.unit, str) or not 0 < len(self.unit) <= MAX_UNIT_CHARS or not _UNIT.match(self.unit):
            raise FormatError(f"terms: unit must be a lowercase name of at most {MAX_UNIT_CHARS} chars")
        for name, hi in (("price_per_mb", MAX_PRICE), ("price_per_token", MAX_PRICE),
                         ("credit_bytes", MAX_CREDIT_BYTES), ("credit_tokens", MAX_CREDIT_BYTES),
                         ("issued", 2**63 - 1)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= hi:
                raise FormatError(f"terms: {name} must be an integer in [0, {hi}]")

    @property
    def free(self) -> bool:
        return self.price_per_mb == 0 and self.price_per_token == 0

    @property
    def body(self) -> bytes:
        fields = {k: getattr(self, k) for k in _KEYS}
        return msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)

    @property
    def digest(self) -> bytes:
        """sha256 of the body: what a voucher names as the terms it pays under."""
        return hashlib.sha256(self.body).digest()

    def encode(self) -> bytes:
        if len(self.signature) != SIGNATURE_BYTES:
            raise FormatError("terms are not signed")
        return self.body + self.signature

    def summary(self) -> dict:
        return {"provider": self.provider.hex(), "unit": self.unit, "price_per_mb": self.price_per_mb,
                "price_per_token": self.price_per_token, "credit_bytes": self.credit_bytes,
                "credit_tokens": self.credit_tokens, "issued": self.issued, "digest": self.digest.hex()}


def signed_message(body: bytes) -> bytes:
    return DOMAIN + hashlib.sha256(body).digest()


def sign_terms(key, *, unit: str, price_per_mb: int, price_per_token: int, credit_bytes: int, credit_tokens: int,
               issued: int | None = None) -> Terms:
    """`key` (kvswap.artifact.signing.NodeKey) offers these prices."""
    unsigned = Terms(key.public_bytes, unit, price_per_mb, price_per_token, credit_bytes, credit_tokens,
                     int(_time.time()) if issued is None else int(issued))
    return Terms(**{**unsigned.__dict__, "signature": key.sign_bytes(signed_message(unsigned.body))})


def decode_terms(data: bytes) -> Terms:
    """Terms from their encoding, signature checked (IntegrityError) and fields validated (FormatError)."""
    data = bytes(data)
    if not SIGNATURE_BYTES < len(data) <= MAX_TERMS_BYTES:
        raise FormatError(f"terms must be {SIGNATURE_BYTES + 1}..{MAX_TERMS_BYTES} bytes")
    body, signature = data[:-SIGNATURE_BYTES], data[-SIGNATURE_BYTES:]
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0, max_array_len=0,
                              max_map_len=len(_KEYS), max_str_len=MAX_UNIT_CHARS, max_bin_len=32)
    except _DECODE_ERRORS as exc:
        raise FormatError(f"terms are not msgpack ({type(exc).__name__})") from None
    if type(obj) is not dict or tuple(sorted(obj)) != _KEYS:
        raise FormatError("terms have unexpected or missing fields")
    terms = Terms(**obj, signature=signature)
    if terms.body != body:
        raise FormatError("terms are not in canonical form")
    try:
        Ed25519PublicKey.from_public_bytes(terms.provider).verify(signature, signed_message(body))
    except (InvalidSignature, ValueError):
        raise IntegrityError(f"bad signature on the terms of {terms.provider.hex()[:16]}...") from None
    return terms


__all__ = ["DOMAIN", "Terms", "decode_terms", "sign_terms", "signed_message"]
