"""Settlement statements: the latest vouchers per counterpart, signed by the node that settles, in JSON.

`kvswap ledger settle --out FILE` writes one; `kvswap receipts verify FILE` checks one offline, with no node and
no network: every voucher's signature (voucher domain) and fields, every terms' signature (terms domain), one
voucher per series, each earned voucher paying the signer and each owed one signed by it, the sums, and the
statement's own signature (statement domain) over its canonical body. The file must be exactly the canonical
JSON of what it holds (sorted keys, two-space indent, ASCII, one final newline), so any changed byte fails.

    {"statement": {"issued": int, "signer": hex(32), "terms": {digest hex: terms hex},
                   "vouchers": [{"role": "earned"|"owed", "counterpart": hex, "artifact": CID, "unit": str,
                                 "sequence", "amount", "bytes", "tokens": int, "voucher": hex(228)}],
                   "totals": [{"counterpart": hex, "unit": str, "earned": int, "owed": int}],
                   "version": 1},
     "signature": hex(64)}

The signature is Ed25519 by `signer` over b"kvswap/settlement-statement/v1\\n" || sha256(canonical body), the
body being the "statement" object in the same canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import time as _time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..protocol.errors import FormatError, IntegrityError, KvswapError
from .limits import MAX_STATEMENT_BYTES
from .terms import decode_terms
from .vouchers import decode_voucher

DOMAIN = b"kvswap/settlement-statement/v1\n"
VERSION = 1


def canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()


def signed_message(body: dict) -> bytes:
    return DOMAIN + hashlib.sha256(canonical(body)).digest()


def build_statement(book, key, issued: int | None = None) -> bytes:
    """The canonical bytes of a statement of `book` (kvswap/payments/book.py), signed by `key` (its node key)."""
    me = key.public_bytes
    entries, terms, totals = [], {}, {}
    for v in book.vouchers():
        role = "earned" if v.provider == me else "owed"
        t = book.terms(v.terms)
        if t is None:
            raise KvswapError(f"the book lacks the terms {v.terms.hex()[:16]} a voucher pays under")
        terms[t.digest.hex()] = t.encode().hex()
        counterpart = (v.consumer if role == "earned" else v.provider).hex()
        entries.append({"role": role, "counterpart": counterpart, "artifact": str(v.artifact), "unit": t.unit,
                        "sequence": v.sequence, "amount": v.amount, "bytes": v.bytes, "tokens": v.tokens,
                        "voucher": v.encode().hex()})
        tab = totals.setdefault((counterpart, t.unit), {"counterpart": counterpart, "unit": t.unit, "earned": 0, "owed": 0})
        tab[role] += v.amount
    entries.sort(key=lambda e: (e["role"], e["counterpart"], e["artifact"]))
    body = {"version": VERSION, "signer": me.hex(), "issued": int(_time.time()) if issued is None else int(issued),
            "terms": terms, "vouchers": entries, "totals": [totals[k] for k in sorted(totals)]}
    return canonical({"statement": body, "signature": key.sign_bytes(signed_message(body)).hex()})


def _hex(value: Any, what: str, n: int | None = None) -> bytes:
    if not isinstance(value, str) or value != value.lower():
        raise FormatError(f"statement: {what} must be lowercase hex")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise FormatError(f"statement: {what} is not hex") from None
    if n is not None and len(raw) != n:
        raise FormatError(f"statement: {what} must be {n} bytes")
    return raw


def verify_statement(data: bytes) -> dict:
    """What a statement says, after every check above (FormatError / IntegrityError with the first failure)."""
    if len(data) > MAX_STATEMENT_BYTES:
        raise FormatError(f"statement larger than {MAX_STATEMENT_BYTES} bytes")
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"statement is not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or set(obj) != {"statement", "signature"} or not isinstance(obj["statement"], dict):
        raise FormatError("statement must hold exactly 'statement' and 'signature'")
    if canonical(obj) != data:
        raise FormatError("statement is not in canonical form (a byte was changed, or it was re-formatted)")
    body = obj["statement"]
    if set(body) != {"version", "signer", "issued", "terms", "vouchers", "totals"} or body["version"] != VERSION:
        raise FormatError("statement body has unexpected fields or version")
    signer = _hex(body["signer"], "signer", 32)
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(_hex(obj["signature"], "signature", 64), signed_message(body))
    except (InvalidSignature, ValueError):
        raise IntegrityError("statement signature does not verify") from None
    if not isinstance(body["terms"], dict) or not isinstance(body["vouchers"], list) or not isinstance(body["totals"], list):
        raise FormatError("statement: terms, vouchers and totals have the wrong types")
    terms = {}
    for digest, blob in body["terms"].items():
        t = decode_terms(_hex(blob, "terms"))
        if t.digest.hex() != digest:
            raise IntegrityError(f"statement: terms filed under {digest[:16]} have another digest")
        terms[digest] = t
    series, sums = set(), {}
    for i, e in enumerate(body["vouchers"]):
        if not isinstance(e, dict) or set(e) != {"role", "counterpart", "artifact", "unit", "sequence", "amount",
                                                 "bytes", "tokens", "voucher"}:
            raise FormatError(f"statement: voucher {i} has unexpected fields")
        v = decode_voucher(_hex(e["voucher"], f"voucher {i}"))
        t = terms.get(v.terms.hex())
        if t is None:
            raise IntegrityError(f"statement: voucher {i} pays under terms the statement does not hold")
        if t.provider != v.provider:
            raise IntegrityError(f"statement: voucher {i} names terms of another provider")
        if e["role"] == "earned":
            if v.provider != signer:
                raise IntegrityError(f"statement: earned voucher {i} does not pay the signer")
            counterpart = v.consumer
        elif e["role"] == "owed":
            if v.consumer != signer:
                raise IntegrityError(f"statement: owed voucher {i} is not signed by the signer")
            counterpart = v.provider
        else:
            raise FormatError(f"statement: voucher {i} has role {e['role']!r}")
        said = (e["counterpart"], e["artifact"], e["unit"], e["sequence"], e["amount"], e["bytes"], e["tokens"])
        if said != (counterpart.hex(), str(v.artifact), t.unit, v.sequence, v.amount, v.bytes, v.tokens):
            raise IntegrityError(f"statement: voucher {i}'s fields do not match its signed bytes")
        if v.series in series:
            raise IntegrityError(f"statement: voucher {i} repeats a series (only the latest voucher counts)")
        series.add(v.series)
        tab = sums.setdefault((counterpart.hex(), t.unit), {"counterpart": counterpart.hex(), "unit": t.unit,
                                                            "earned": 0, "owed": 0})
        tab[e["role"]] += v.amount
    if body["totals"] != [sums[k] for k in sorted(sums)]:
        raise IntegrityError("statement: the totals are not the sums of its vouchers")
    return {"signer": signer.hex(), "issued": body["issued"], "vouchers": len(body["vouchers"]),
            "series": len(series), "totals": body["totals"],
            "earned": _by_unit(body["totals"], "earned"), "owed": _by_unit(body["totals"], "owed")}


def _by_unit(totals: list[dict], role: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in totals:
        out[t["unit"]] = out.get(t["unit"], 0) + t[role]
    return out


__all__ = ["DOMAIN", "build_statement", "canonical", "verify_statement"]
