"""Every name two kvswap peers must agree on, defined once: protocol ids, the gossip topic and the DHT keys.

A node that spelled any of these differently would silently stop finding or talking to the others, so they
live here, beside the messages, and nowhere else: node/ uses them to register handlers, provide and look up
records; the ledger and the report (kvswap/ledger.py, kvswap/reporting/) match rows on the same protocol ids.
Pure functions of their inputs, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from .cid import Cid

#: libp2p protocol ids (multistream-select strings), one per conversation kind. Versioned: a breaking change
#: to any message bumps the id, never silently reinterprets bytes.
MANIFEST_PROTOCOL = "/kvswap/manifest/1"
CHUNKS_PROTOCOL = "/kvswap/chunks/1"
GENERATE_PROTOCOL = "/kvswap/generate/1"
#: a consumer's vouchers to a priced provider (kvswap/payments/)
PAY_PROTOCOL = "/kvswap/pay/1"
#: not a libp2p protocol: the name ledger rows carry for chunk bytes that crossed the data plane, which a
#: /kvswap/chunks/1 request negotiated (same chunks and frames, plain TCP)
DATAPLANE_PROTOCOL = CHUNKS_PROTOCOL + "+tcp"

#: domain separator of document keys: a document key never collides with a CID's multihash
_DOCUMENT_KEY_DOMAIN = "kvswap/document/1"
#: domain separator of "this document, for any model" keys
_ANY_MODEL_KEY_DOMAIN = "kvswap/document-any-model/1"


def announce_topic(model_fingerprint: str) -> str:
    """The gossipsub topic on which artifacts for one model fingerprint are announced."""
    return f"kvswap/announce/{model_fingerprint[:16]}"


def cid_key(cid: Cid) -> str:
    """DHT key of an artifact or chunk: its CID string (libp2p parses it to the CID's multihash)."""
    return str(cid)


def document_key(model_fingerprint: str, document_hash: str) -> str:
    """DHT key for "an artifact of this document for this model": hex of a sha2-256 multihash over a
    domain-separated string, so any node can compute it from the document's text and its model."""
    digest = hashlib.sha256(f"{_DOCUMENT_KEY_DOMAIN}\0{model_fingerprint}\0{document_hash}".encode()).digest()
    return (b"\x12\x20" + digest).hex()


def any_model_key(document_hash: str) -> str:
    """DHT key for "an artifact of this document, for some model": what a node asks when the document is not
    found for its own model, to tell its user which model a peer has it for (an artifact is bound to one
    model, so this key is never used to fetch). Same construction as `document_key`, another domain."""
    digest = hashlib.sha256(f"{_ANY_MODEL_KEY_DOMAIN}\0{document_hash}".encode()).digest()
    return (b"\x12\x20" + digest).hex()


def artifact_keys(cid: Cid, model_fingerprint: str, document_hash: str, chunk_cids: Iterable[Cid],
                  complete: bool) -> list[str]:
    """The DHT keys a node provides for an artifact it holds: its CID, document key and any-model key when it
    holds all of it (a node holding a prefix must not claim the whole artifact), and every chunk it holds
    under the chunk's own CID (other fetchers take chunks from whoever has them)."""
    keys = ([cid_key(cid), document_key(model_fingerprint, document_hash), any_model_key(document_hash)]
            if complete else [])
    keys += [cid_key(c) for c in chunk_cids]
    return list(dict.fromkeys(keys))


__all__ = [
    "CHUNKS_PROTOCOL",
    "DATAPLANE_PROTOCOL",
    "GENERATE_PROTOCOL",
    "MANIFEST_PROTOCOL",
    "PAY_PROTOCOL",
    "announce_topic",
    "any_model_key",
    "artifact_keys",
    "cid_key",
    "document_key",
]
