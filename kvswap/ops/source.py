"""What a caller names, which engine runs it, and where the work runs.

- `Source.of(x)`: an artifact CID, a document (a file path or `Document(text)`), or a document hash, as one
  key (protocol/keys.py) plus the document's text when the caller has it; a given document is always bound
  to the artifact before use (ops/checks.py `check_document`);
- `engine_for(model)`: an Engine for a name, hub id, folder, Engine or `(transformers model, tokenizer)`;
- `node_for(home, model)`: THE place that decides where work runs: through the daemon running in the home
  when there is one (its resident model is used, new artifacts are announced, fetches need it), else in
  this process; a `model` other than the one the daemon runs is an error naming both, never a silent switch;
- `resolve(home, engine, source)`: the stored artifact a source names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control.client import NodeClient
from ..document import Document
from ..home import Home
from ..modes import DecodeMode, Dtype
from ..protocol.cid import Cid
from ..protocol.errors import FormatError, ModelMismatch, NotFound, UsageError
from ..protocol.keys import ArtifactKey, DocumentKey, is_hex64


@dataclass(frozen=True)
class Source:
    """What a caller names: `key` (a Cid, or a DocumentKey whose model the engine fills in) and, when the
    caller holds it, the document itself."""

    key: ArtifactKey
    document: Document | None = None

    @property
    def cid(self) -> Cid | None:
        return self.key if isinstance(self.key, Cid) else None

    @property
    def document_hash(self) -> str | None:
        return None if isinstance(self.key, Cid) else self.key.document_hash

    @classmethod
    def of(cls, source: Any) -> "Source":
        if isinstance(source, Source):
            return source
        if isinstance(source, (Cid, DocumentKey)):
            return cls(source)
        if isinstance(source, Document):
            return cls(DocumentKey(source.hash), source)
        if isinstance(source, Path):
            doc = Document.read(source)
            return cls(DocumentKey(doc.hash), doc)
        if isinstance(source, str):
            try:
                return cls(Cid.parse(source))
            except FormatError:
                pass
            if is_hex64(source.lower()):
                return cls(DocumentKey(source.lower()))
            if Path(source).expanduser().exists():
                return cls.of(Path(source).expanduser())
            raise UsageError(f"{source!r:.80} is neither a CID, a document hash nor an existing file "
                             "(wrap a document's text as kvswap.Document(text))")
        raise UsageError(f"cannot use {type(source).__name__} as a source: give a CID, a path, "
                         "kvswap.Document(text) or a document hash")


def engine_for(model: Any = None, dtype: Dtype | str | None = None, *, device: str | None = None,
               decode: DecodeMode | str = DecodeMode.EAGER):
    """An Engine for `model`: a built-in name, a hub id or folder, None (the default model), an Engine, or a
    transformers model together with its tokenizer as `(model, tokenizer)`."""
    from ..engine import Engine, load_engine

    decode = DecodeMode.parse(decode, "decode")
    if isinstance(model, Engine):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        from ..engine.models import engine_from_model

        engine = engine_from_model(*model)
        engine.set_decode_mode(decode)
        return engine
    if model is not None and not isinstance(model, (str, Path)):
        raise UsageError("model must be a name, a hub id, a folder, an Engine, or (transformers model, tokenizer)")
    return load_engine(str(model) if model is not None else None, dtype=Dtype.parse(dtype or Dtype.BF16, "dtype"),
                       device=device, decode=decode)


def node_for(home: Home, model: Any = None) -> NodeClient | None:
    """The daemon's client when one runs in this home (and `model`, if given by name, is the one it runs),
    else None: the work runs in this process."""
    client = home.node()
    if client is None or model is None:
        return client
    if not isinstance(model, (str, Path)):
        return None  # a model object the caller loaded runs here, not in the daemon
    running = client.status().get("model")
    if running and str(model) != running and Path(str(model)).expanduser().resolve().as_posix() != running:
        raise ModelMismatch(f"--model {model} was asked for, but the node running in {home.path} serves {running}; "
                            f"stop it (`kvswap node stop`) or leave --model out")
    return client


def resolve(home: Home, engine, source: Source) -> Cid:
    """The stored artifact a source names: its CID, or the newest complete artifact of the document for this
    engine's model."""
    if source.cid is not None:
        return source.cid
    found = home.store.find_by_document(engine.fingerprint, source.document_hash, complete_only=True)
    if not found:
        raise NotFound(f"no complete artifact of document {source.document_hash[:12]} for {engine.model_id} in "
                       f"{home.path} (publish it, or fetch it with `kvswap get --doc FILE`)")
    return found[0]


__all__ = ["Source", "engine_for", "node_for", "resolve"]
