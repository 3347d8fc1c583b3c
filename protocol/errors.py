"""One exception tree for all of kvswap, so callers catch by meaning, not by library.

    KvswapError                      root: every failure kvswap raises on purpose
     +-- FormatError                 bytes that do not parse as what they claim (manifest, chunk, frame)
     +-- IntegrityError              bytes that parse but do not match their hash, size or signature
     |    +-- UntrustedSigner        a valid signature by a key the trust policy does not accept
     |    +-- AuditFailed            KV that does not follow from its tokens (kvswap/audit.py)
     +-- ModelMismatch               an artifact for another model fingerprint, dtype or shape
     +-- NotFound                    no such artifact / chunk / provider / peer
     +-- ProtocolError               the wire conversation went wrong
     |    +-- LocalProtocolError     we misused the protocol (a bug on our side)
     |    +-- RemoteProtocolError    the peer misbehaved: garbage, oversized frame, stall
     |         +-- DataPlaneFailed   its bulk data plane was unusable: take the chunks over libp2p instead
     +-- LimitExceeded               a named limit (protocol/, artifact/ or control/ limits.py) was hit
     +-- Busy                        a node at capacity, or an asker over its share: ask again later or elsewhere
 +-- PaymentRequired             a priced provider refused: terms not accepted, vouchers lag, a bad voucher
 |    +-- OverBudget             this node refused to pay: a price over its caps, or its budget spent
     +-- UsageError                  the user asked for something that cannot be done (bad flag, empty doc)

Each class carries what every edge needs to say about it, so there is one table, the classes themselves:
`exit_code` (the CLI's exit status), `http_status` (the control API's answer, node/api.py) and `wire_code`
(the ErrorMessage code a node answers a peer's failed request with, node/exchange.py). The functions below
derive each translation from them: to and from the control API's {"type", "message"} payload, to and from a
wire code. A wire code is decoded back only to the class that declares it (NotFound, ModelMismatch,
LimitExceeded); any other refusal is the peer failing our request, a RemoteProtocolError.

Errors raised by third-party libraries are translated where they enter, with `map_exceptions` (the httpx
pattern): msgpack, zstandard and cryptography in the artifact layer, libp2p and sockets in node/. Nothing
above those boundaries sees a third-party exception. The CLI prints `error: <message>` on one line and exits
with the error's exit code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

#: the ErrorMessage code of a failure that is no KvswapError: a bug on the serving side, never explained
INTERNAL_WIRE_CODE = "internal"


class KvswapError(Exception):
    """Root of every error kvswap raises on purpose."""

    exit_code = 1
    http_status = 500
    wire_code = "bad_request"


class FormatError(KvswapError):
    """Bytes that do not parse as the structure they claim to be."""

    http_status = 400


class IntegrityError(KvswapError):
    """Bytes that parse but do not match their content address, declared size or signature."""

    http_status = 422


class UntrustedSigner(IntegrityError):
    """A manifest whose signatures are valid but none is by a trusted key (or that is unsigned)."""


class AuditFailed(IntegrityError):
    """A recomputed block of an artifact differs from the stored one beyond what the audit allows: the KV does
    not follow from its tokens. `result` holds the audit's measurements (kvswap.audit.AuditResult)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class ModelMismatch(KvswapError):
    """An artifact made for another model fingerprint, tokenizer, dtype or tensor layout."""

    http_status = 409
    wire_code = "model_mismatch"


class NotFound(KvswapError):
    """No such artifact, chunk, provider or peer."""

    http_status = 404
    wire_code = "not_found"


class ProtocolError(KvswapError):
    """The wire conversation went wrong."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved: garbage, an oversized frame, a stall, a wrong answer."""

    http_status = 502


class DataPlaneFailed(RemoteProtocolError):
    """The peer's data plane could not be used: unreachable, refused or reset the connection, stalled, or did
    not answer the hello as a kvswap data plane. Not a lie about chunks: the fetcher asks for the same chunks
    on a libp2p stream instead (a peer that breaks the frame rules raises plain RemoteProtocolError)."""


class RelayOnly(RemoteProtocolError):
    """A peer is reachable only through a relay, and chunk bytes may not go over relays (`node.relay_data`):
    the fetch moves on to other providers (node/nat.py)."""


class LimitExceeded(KvswapError):
    """A named limit from kvswap.protocol.limits was exceeded."""

    http_status = 413
    wire_code = "limit"


class Busy(KvswapError):
    """A node refused work for now: it is at capacity, or the asking peer is over its share of it (too many
    streams, slots or generations at once; node/quota.py). Not a failure of either side: ask again later, or
    ask someone else."""

    http_status = 503
    wire_code = "busy"


class PaymentRequired(KvswapError):
    """A priced provider will not serve (more) without payment: the asker has not accepted its terms, its
    vouchers lag more than the credit window behind what it was sent, or a voucher it sent does not count
    (kvswap/payments/rules.py). Ask for the terms, pay, or go to another provider."""

    http_status = 402
    wire_code = "payment"


class OverBudget(PaymentRequired):
    """This node will not pay what is asked: a provider's price is over `--max-price`, its unit is not this
    node's, or the operation's `--budget` is spent (kvswap/payments/rules.py Purse). Nothing was signed for it."""


class UsageError(KvswapError):
    """The request cannot be honoured as asked (bad flag, empty document, document too long)."""

    exit_code = 2
    http_status = 400


# --- translations, all derived from the classes above ------------------------------------------------------


def error_classes() -> dict[str, type[KvswapError]]:
    """Every KvswapError class by name (the names the control API reports)."""
    found: dict[str, type[KvswapError]] = {}
    todo: list[type[KvswapError]] = [KvswapError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


def error_payload(exc: KvswapError) -> dict:
    """What the control API (and a failed job) reports for `exc`: {"type": class name, "message": text}."""
    return {"type": type(exc).__name__, "message": str(exc)}


def error_from_payload(payload: Mapping) -> KvswapError:
    """The exception a control-API error payload describes (an unknown type becomes a plain KvswapError)."""
    cls = error_classes().get(str(payload.get("type", "")), KvswapError)
    return cls(str(payload.get("message", "")) or cls.__name__)


def wire_code_of(exc: BaseException) -> str:
    """The ErrorMessage code to answer a peer with when serving its request failed with `exc`."""
    return exc.wire_code if isinstance(exc, KvswapError) else INTERNAL_WIRE_CODE


def wire_codes() -> frozenset[str]:
    """Every code wire_code_of can give (protocol/messages.py's ERROR_CODES must hold them all)."""
    return frozenset({INTERNAL_WIRE_CODE} | {cls.wire_code for cls in error_classes().values()})


def error_from_wire(code: str, text: str) -> KvswapError:
    """Our exception for a peer's ErrorMessage: the class that declares `code` as its own, else
    RemoteProtocolError (the peer failed our request for a reason we cannot act on)."""
    for cls in error_classes().values():
        if cls is not KvswapError and cls.__dict__.get("wire_code") == code:
            return cls(text)
    return RemoteProtocolError(text)


@contextlib.contextmanager
def map_exceptions(mapping: Mapping[type[BaseException] | tuple[type[BaseException], ...], type[KvswapError]],
                   what: str = "") -> Iterator[None]:
    """Translate third-party exceptions into kvswap's at one boundary (httpx's `map_exceptions`):

        with map_exceptions({OSError: RemoteProtocolError}, "data plane of peer X"):
            ...

    An exception matching a key is raised again as its value, with `what` as the message's prefix and the
    original chained as its cause; the first matching key wins. Anything else passes through untouched: an
    exception nobody expected is a bug to see, not a failure to re-label.
    """
    sources: list[type[BaseException]] = []
    for key in mapping:
        sources += list(key) if isinstance(key, tuple) else [key]
    try:
        yield
    except tuple(sources) as exc:
        for key, target in mapping.items():
            if isinstance(exc, key):
                text = f"{exc}" or type(exc).__name__
                raise target(f"{what}: {text}" if what else text) from exc
        raise  # unreachable: exc matched one of the keys


__all__ = [
    "AuditFailed",
    "Busy",
    "DataPlaneFailed",
    "FormatError",
    "INTERNAL_WIRE_CODE",
    "IntegrityError",
    "KvswapError",
    "LimitExceeded",
    "RelayOnly",
    "LocalProtocolError",
    "ModelMismatch",
    "NotFound",
    "OverBudget",
    "PaymentRequired",
    "ProtocolError",
    "RemoteProtocolError",
    "UntrustedSigner",
    "UsageError",
    "error_classes",
    "error_from_payload",
    "error_from_wire",
    "error_payload",
    "map_exceptions",
    "wire_code_of",
    "wire_codes",
]
