"""kvswap: compute a document's KV cache once, share it peer to peer, generate without prefill.

The package is layered so data flows one way (ARCHITECTURE.md):
engine (torch) -> kvtensors -> artifact (chunks, manifest, signatures) -> store -> node (libp2p) and back.
Importing `kvswap` is cheap: torch and transformers load only when the engine is used.
"""

from .cid import Cid
from .errors import (
    FormatError,
    IntegrityError,
    KvswapError,
    LimitExceeded,
    LocalProtocolError,
    ModelMismatch,
    NotFound,
    ProtocolError,
    RemoteProtocolError,
    UsageError,
)
from .kvtensors import KvLayout, KvTensors

__version__ = "0.1.0"

__all__ = sorted(
    [
        "Cid",
        "FormatError",
        "IntegrityError",
        "KvLayout",
        "KvTensors",
        "KvswapError",
        "LimitExceeded",
        "LocalProtocolError",
        "ModelMismatch",
        "NotFound",
        "ProtocolError",
        "RemoteProtocolError",
        "UsageError",
    ]
)
