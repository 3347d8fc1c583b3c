"""What a request names: an artifact by its CID, or a document by its hash, for one model or for any.

One key type runs from the command line to the wire: `kvswap get --doc-hash H` makes a `DocumentKey(H)`,
the node fills in its model (`for_model`), the fetch looks it up in the DHT (`dht_key`) and asks peers for
it in a ManifestRequest, whose body carries the same key. A CID is a `Cid`; a document hash is checked once,
by `check_hex64`, wherever it enters (a flag, a JSON body, a message, a config file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from .cid import Cid
from .errors import UsageError
from .names import cid_key, document_key

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_hex64(value: object) -> bool:
    """True for 64 lowercase hex digits: a sha256 digest as kvswap writes it (document hashes, fingerprints,
    public keys)."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def check_hex64(value: object, what: str, error: type[Exception] = UsageError) -> str:
    """`value` when it is 64 lowercase hex digits, else `error` naming `what` (one line)."""
    if not is_hex64(value):
        raise error(f"{what} must be 64 lowercase hex digits (a sha256), got {str(value)!r:.80}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class DocumentKey:
    """The artifact of a document (its sha256, of the UTF-8 text) for one model fingerprint, or for whichever
    model a peer holds it for (`model_fingerprint=None`: asked only to name that model; an artifact is bound
    to one model, so nothing is fetched by it)."""

    document_hash: str
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_hex64(self.document_hash, "a document hash")
        if self.model_fingerprint is not None:
            check_hex64(self.model_fingerprint, "a model fingerprint")

    def for_model(self, model_fingerprint: str) -> "DocumentKey":
        return DocumentKey(self.document_hash, model_fingerprint)

    @property
    def any_model(self) -> bool:
        return self.model_fingerprint is None

    def __str__(self) -> str:
        model = "any model" if self.model_fingerprint is None else self.model_fingerprint[:12]
        return f"document {self.document_hash[:12]} for {model}"


#: an artifact named by CID, or a document's artifact
ArtifactKey = Union[Cid, DocumentKey]


def dht_key(key: ArtifactKey) -> str:
    """The DHT key whose providers hold what `key` names (protocol/names.py); a document for any model is
    looked up by its own key there (`any_model_key`), not here."""
    if isinstance(key, Cid):
        return cid_key(key)
    if key.model_fingerprint is None:
        raise UsageError("a document's artifact is looked up for one model (give its fingerprint)")
    return document_key(key.model_fingerprint, key.document_hash)


def describe(key: ArtifactKey) -> str:
    """A short name for logs and errors."""
    return key.short() if isinstance(key, Cid) else str(key)


__all__ = ["ArtifactKey", "DocumentKey", "check_hex64", "describe", "dht_key", "is_hex64"]
