"""Signed audit attestations: "I recomputed these blocks of artifact CID with this engine, and they passed".

An auditor (any node: `kvswap audit`, or a daemon auditing what it fetched) signs what it checked, so others
can rely on audits they did not run: the trust policy can accept an artifact from a publisher outside the
trust list when enough trusted auditors attest it, or require attestations for everything
(artifact/signing.py `check_trust`). Attestations are kept beside the manifest like envelopes (store table
`attestations`), served with it, and listed by `kvswap inspect`.

An attestation is a msgpack map `{auditor: bin(32), cid: bin(36), signature: bin(64), statement: bin,
time: int}`; the statement is itself a canonical msgpack map (keys sorted, no floats):

    blocks      array of int   the block indices recomputed (sorted)
    device      str            where ("cpu", "cuda:0", ...), informative
    drawn       int            how many of them were drawn uniformly (the detection bound's k)
    dtype       str            the artifact's dtype
    engine      str            the auditing engine's model fingerprint (must equal the manifest's)
    max_rel_ppb int            the largest relative difference measured, in parts per billion, rounded up
    mode        str            "exact" (every block bit-equal) or "tolerance" (within kvswap.audit.TOLERANCE)
    n_blocks    int            the artifact's block count
    tool        str            "kvswap <version>"

The signature is Ed25519 by `auditor` over

    b"kvswap/audit-attestation/v1\\n" || artifact CID (36) || auditor key (32) || time (u64 BE) || sha256(statement)

a domain of its own, so an attestation can never pass as a manifest signature or the other way round. Only a
passing audit is attested; the statement says how strong the pass was (exact or within tolerance).
"""

from __future__ import annotations

import hashlib
import math
import struct
import time as _time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..protocol.cid import Cid
from ..protocol.errors import FormatError, IntegrityError
from .limits import MAX_ATTESTATIONS_BYTES, MAX_CHUNKS
from .manifest import MSGPACK_DECODE_ERRORS, pack_list, unpack_list

DOMAIN = b"kvswap/audit-attestation/v1\n"
_TIME = struct.Struct(">Q")
_KEYS = {"auditor", "cid", "signature", "statement", "time"}
_STATEMENT_KEYS = {"blocks", "device", "drawn", "dtype", "engine", "max_rel_ppb", "mode", "n_blocks", "tool"}
_MODES = ("exact", "tolerance")


def signed_message(cid: Cid, auditor: bytes, when: int, statement: bytes) -> bytes:
    return DOMAIN + cid.to_bytes() + auditor + _TIME.pack(when) + hashlib.sha256(statement).digest()


def make_statement(*, blocks, drawn: int, n_blocks: int, dtype: str, engine: str, device: str, exact: bool,
                   max_rel: float, tool: str) -> bytes:
    """The canonical statement bytes of a passing audit (kvswap.audit.AuditResult's fields)."""
    body = {"blocks": sorted(int(b) for b in blocks), "device": str(device)[:64], "drawn": int(drawn),
            "dtype": dtype, "engine": engine, "max_rel_ppb": int(math.ceil(max_rel * 1e9)),
            "mode": "exact" if exact else "tolerance", "n_blocks": int(n_blocks), "tool": str(tool)[:64]}
    return msgpack.packb(dict(sorted(body.items())), use_bin_type=True)


def parse_statement(data: bytes) -> dict:
    """The statement's fields, validated (FormatError otherwise)."""
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_ext_len=0,
                              max_array_len=MAX_CHUNKS, max_str_len=256, max_bin_len=0)
    except MSGPACK_DECODE_ERRORS as exc:
        raise FormatError(f"attestation statement is not msgpack ({type(exc).__name__})") from None
    if type(obj) is not dict or set(obj) != _STATEMENT_KEYS:
        raise FormatError("attestation statement has unexpected or missing fields")
    ints = ("drawn", "max_rel_ppb", "n_blocks")
    if (any(type(obj[k]) is not int or obj[k] < 0 for k in ints) or obj["mode"] not in _MODES
            or type(obj["blocks"]) is not list or any(type(b) is not int or not 0 <= b < obj["n_blocks"] for b in obj["blocks"])
            or any(type(obj[k]) is not str for k in ("device", "dtype", "engine", "tool"))):
        raise FormatError("attestation statement has bad field types")
    if msgpack.packb(dict(sorted(obj.items())), use_bin_type=True) != bytes(data):
        raise FormatError("attestation statement is not in canonical form")
    return obj


@dataclass(frozen=True)
class Attestation:
    """One auditor's signed statement about one artifact."""

    artifact_cid: Cid
    auditor: bytes
    time: int
    statement: bytes
    signature: bytes

    def verify(self, cid: Cid) -> dict:
        """The statement's fields, after checking this is a valid signature by `auditor` over exactly `cid`
        (IntegrityError) and the statement parses (FormatError)."""
        if self.artifact_cid != cid:
            raise IntegrityError(f"attestation is for {self.artifact_cid.short()}, not {cid.short()}")
        try:
            Ed25519PublicKey.from_public_bytes(self.auditor).verify(
                self.signature, signed_message(cid, self.auditor, self.time, self.statement))
        except (InvalidSignature, ValueError):
            raise IntegrityError(f"bad audit attestation by {self.auditor.hex()[:16]}... on {cid.short()}") from None
        return parse_statement(self.statement)

    def to_dict(self) -> dict:
        return {"auditor": self.auditor, "cid": self.artifact_cid.to_bytes(), "signature": self.signature,
                "statement": self.statement, "time": self.time}

    def summary(self) -> dict:
        claims = parse_statement(self.statement)
        return {"auditor": self.auditor.hex(), "time": self.time, "mode": claims["mode"],
                "blocks": len(claims["blocks"]), "n_blocks": claims["n_blocks"], "drawn": claims["drawn"],
                "max_rel": claims["max_rel_ppb"] / 1e9, "engine": claims["engine"], "device": claims["device"]}


def sign_attestation(key, cid: Cid, statement: bytes, when: int | None = None) -> Attestation:
    """`key` (a kvswap.artifact.signing.NodeKey) attests `statement` about artifact `cid`."""
    parse_statement(statement)
    when = int(_time.time()) if when is None else int(when)
    signature = key.sign_bytes(signed_message(cid, key.public_bytes, when, statement))
    return Attestation(cid, key.public_bytes, when, statement, signature)


def encode_attestations(attestations: list[Attestation]) -> bytes:
    """msgpack array of attestation maps (sorted keys), sorted by (auditor, time, signature)."""
    ordered = sorted(attestations, key=lambda a: (a.auditor, a.time, a.signature))
    return pack_list([a.to_dict() for a in ordered], MAX_ATTESTATIONS_BYTES, "MAX_ATTESTATIONS_BYTES", "attestation")


def decode_attestations(data: bytes) -> list[Attestation]:
    """Parse an attestation list (signatures NOT verified here: Attestation.verify)."""
    obj = unpack_list(data, MAX_ATTESTATIONS_BYTES, "MAX_ATTESTATIONS_BYTES", "attestation")
    out = []
    for a in obj:
        if type(a) is not dict or set(a) != _KEYS:
            raise FormatError("attestations: each is a map {auditor, cid, signature, statement, time}")
        if (type(a["auditor"]) is not bytes or len(a["auditor"]) != 32 or type(a["signature"]) is not bytes
                or len(a["signature"]) != 64 or type(a["time"]) is not int or not 0 <= a["time"] < 1 << 63
                or type(a["cid"]) is not bytes or type(a["statement"]) is not bytes):
            raise FormatError("attestations: bad field types or sizes")
        out.append(Attestation(Cid.from_bytes(a["cid"]), a["auditor"], a["time"], a["statement"], a["signature"]))
    return out


__all__ = ["DOMAIN", "Attestation", "decode_attestations", "encode_attestations", "make_statement",
           "parse_statement", "sign_attestation", "signed_message"]
