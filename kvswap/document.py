"""A document: the exact text whose KV an artifact holds, and the hash it is found by.

Every command that hashes or tokenizes a document reads it here, so `publish FILE` and `get --doc FILE`
always agree on its hash (a file read once as bytes and once as text with newline translation gave two
hashes for a CRLF file). The rules, also in FORMAT.md ("Documents"):

- a file is read as bytes and decoded as strict UTF-8; anything else is a clear UsageError;
- CR, LF and every other character are content: no newline translation, no normalisation;
- a leading UTF-8 byte-order mark (EF BB BF) is an encoding marker, not content: it is dropped, so a file
  saved with and without a BOM is the same document;
- document_hash = sha256 hex of the text encoded as UTF-8 (the file's bytes minus a leading BOM);
- a document that is empty or only whitespace is refused with EMPTY_DOCUMENT, wherever it comes from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .protocol.errors import UsageError

#: the one message for an empty document (the engine, the CLI and the API all raise it)
EMPTY_DOCUMENT = "the document is empty (nothing to prefill)"
_BOM = "\ufeff"


@dataclass(frozen=True)
class Document:
    """A document's text, ready to hash and tokenize. `Document(text)` for text you hold;
    `Document.read(path)` / `Document.from_bytes(data)` for a file's bytes."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise UsageError(f"a document is text, not {type(self.text).__name__}")
        if self.text.startswith(_BOM):
            object.__setattr__(self, "text", self.text[len(_BOM):])
        if not self.text.strip():
            raise UsageError(EMPTY_DOCUMENT)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "document") -> "Document":
        try:
            text = bytes(data).decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{name} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from None
        return cls(text)

    @classmethod
    def read(cls, path: str | Path) -> "Document":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"no such document: {path}") from None
        except IsADirectoryError:
            raise UsageError(f"{path} is a directory, not a document") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        return cls.from_bytes(data, str(path))

    @cached_property
    def hash(self) -> str:
        """sha256 hex of the UTF-8 text: how the document is found on the network (manifest document_hash)."""
        return document_hash(self.text)

    def __repr__(self) -> str:
        return f"Document({len(self.text)} chars, hash {self.hash[:12]})"


def document_hash(text: str) -> str:
    """sha256 hex of `text` encoded as UTF-8 (a leading BOM already removed by Document)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["EMPTY_DOCUMENT", "Document", "document_hash"]
