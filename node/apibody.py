"""The control API's request bodies, checked field by field before the daemon sees them.

Every route's body is declared here as a table of fields (type, bounds, default); `parse(route, body)` returns
a plain dict of checked values or raises UsageError with one line naming the field, which the API answers as
400. So a non-integer `block_tokens`, a negative `max_new_tokens`, a CID that does not parse or a 10,000-deep
JSON nesting is the caller's error, never a 500 with a traceback in the node's log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..artifact.codecs import CODEC_CHOICES
from ..cid import Cid
from ..errors import FormatError, UsageError
from ..protocol.limits import MAX_API_JSON_DEPTH, MAX_CHUNKS_PER_REQUEST, MAX_GENERATE_TOKENS, MAX_TOKENS

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Field:
    kind: str  # str | text | int | float | bool | cid | hash | choice
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    required: bool = False


ROUTES: dict[str, dict[str, Field]] = {
    "publish": {"text": Field("text", required=True), "codec": Field("choice", "auto", choices=CODEC_CHOICES),
                "block_tokens": Field("int", 64, 1, 65_536)},
    "get": {"cid": Field("cid"), "document_hash": Field("hash"), "document": Field("text"),
            "tokens": Field("int", None, 1, MAX_TOKENS), "accept_any": Field("bool", False)},
    "generate": {"cid": Field("cid"), "document_hash": Field("hash"), "document": Field("text"),
                 "prompt": Field("str", ""), "max_new_tokens": Field("int", 24, 0, MAX_GENERATE_TOKENS),
                 "seed": Field("int", None, 0, 2**63 - 1), "temperature": Field("float", 1.0, 1e-6, 100.0),
                 "host": Field("str")},
    "audit": {"cid": Field("cid", required=True), "fraction": Field("float", None, 1e-9, 1.0),
              "blocks": Field("int", None, 1, MAX_CHUNKS_PER_REQUEST * 64), "full": Field("bool", False),
              "seed": Field("int", None, 0, 2**63 - 1), "exact": Field("bool", False), "sign": Field("bool", True),
              "document": Field("text")},
}


def loads(raw: bytes) -> dict:
    """The JSON object of a request body; UsageError (one line) for anything else, however malformed."""
    if not raw:
        return {}
    depth = max_depth = 0
    for ch in raw:  # refuse deep nesting before the parser recurses into it
        if ch in b"[{":
            depth += 1
            max_depth = max(max_depth, depth)
            if max_depth > MAX_API_JSON_DEPTH:
                raise UsageError(f"request body nests deeper than {MAX_API_JSON_DEPTH} levels")
        elif ch in b"]}":
            depth -= 1
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


def parse(route: str, body: dict) -> dict:
    """The checked fields of `body` for `route` (unknown fields are refused: a typo is not silently ignored)."""
    fields = ROUTES[route]
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise UsageError(f"{route}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    out = {}
    for name, f in fields.items():
        value = body.get(name)
        if value is None:
            if f.required:
                raise UsageError(f"{route}: field {name!r} is required")
            out[name] = f.default
            continue
        out[name] = _check(route, name, f, value)
    return out


def _check(route: str, name: str, f: Field, value: Any) -> Any:
    what = f"{route}: field {name!r}"
    if f.kind in ("str", "text"):
        if not isinstance(value, str):
            raise UsageError(f"{what} must be a string")
        if f.kind == "text" and not value.strip():
            raise UsageError(f"{what} is empty")
        return value
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{what} must be true or false")
        return value
    if f.kind in ("int", "float"):
        ok = isinstance(value, int) if f.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (f.lo is not None and value < f.lo) or (f.hi is not None and value > f.hi):
            raise UsageError(f"{what} must be {'an integer' if f.kind == 'int' else 'a number'} from {f.lo:g} to {f.hi:g}")
        return float(value) if f.kind == "float" else value
    if f.kind == "choice":
        if value not in f.choices:
            raise UsageError(f"{what} must be one of {', '.join(f.choices)}")
        return value
    if f.kind == "cid":
        if not isinstance(value, str):
            raise UsageError(f"{what} must be a CID string")
        try:
            return Cid.parse(value)
        except FormatError:
            raise UsageError(f"{what} is not a CID: {value!r:.80}") from None
    if f.kind == "hash":
        if not isinstance(value, str) or not _HEX64.match(value):
            raise UsageError(f"{what} must be 64 lowercase hex digits (sha256)")
        return value
    raise UsageError(f"{what}: unknown kind {f.kind}")  # pragma: no cover - a table typo


__all__ = ["ROUTES", "loads", "parse"]
