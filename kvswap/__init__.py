"""kvswap: compute a document's KV cache once, share it peer to peer, generate without prefill.

    import kvswap
    loaded = kvswap.load_cache("story.txt", model="smollm2-135m")      # a verified DynamicCache
    out = model.generate(**loaded.inputs(suffix_ids), max_new_tokens=24)
    kvswap.publish("story.txt"); kvswap.get(kvswap.Document(text)); kvswap.generate(cid, "Summary:")

The package is layered so data flows one way (ARCHITECTURE.md):
engine (torch) -> kvtensors -> artifact (chunks, manifest, signatures) -> store -> node (libp2p) and back;
`Home` and the operations (kvswap/ops/) sit on top, shared by the CLI, the daemon and Python callers.
Importing `kvswap` is cheap: torch and transformers load only when the engine is used.
"""

from .protocol.cid import Cid
from .document import Document
from .protocol.errors import (
    AuditFailed,
    FormatError,
    IntegrityError,
    KvswapError,
    LimitExceeded,
    LocalProtocolError,
    ModelMismatch,
    NotFound,
    ProtocolError,
    RemoteProtocolError,
    UntrustedSigner,
    UsageError,
)
from .home import Home
from .kvtensors import KvLayout, KvTensors
from .engine.loaded import LoadedCache
from .ops import audit, generate, get, load_cache, publish, report

from .version import __version__

__all__ = sorted(
    [
        "AuditFailed",
        "Cid",
        "Document",
        "FormatError",
        "Home",
        "IntegrityError",
        "KvLayout",
        "KvTensors",
        "KvswapError",
        "LimitExceeded",
        "LoadedCache",
        "LocalProtocolError",
        "ModelMismatch",
        "NotFound",
        "ProtocolError",
        "RemoteProtocolError",
        "UntrustedSigner",
        "UsageError",
        "audit",
        "generate",
        "get",
        "load_cache",
        "publish",
        "report",
    ]
)
