"""One exception tree for all of kvswap, so callers catch by meaning, not by library.

    KvswapError                      root: every failure kvswap raises on purpose
     +-- FormatError                 bytes that do not parse as what they claim (manifest, chunk, frame)
     +-- IntegrityError              bytes that parse but do not match their hash, size or signature
     |    +-- UntrustedSigner        a valid signature by a key the trust policy does not accept
     +-- ModelMismatch               an artifact for another model fingerprint, dtype or shape
     +-- NotFound                    no such artifact / chunk / provider / peer
     +-- ProtocolError               the wire conversation went wrong
     |    +-- LocalProtocolError     we misused the protocol (a bug on our side)
     |    +-- RemoteProtocolError    the peer misbehaved: garbage, oversized frame, stall
     +-- LimitExceeded               a named limit (protocol/limits.py) was hit
     +-- UsageError                  the user asked for something that cannot be done (bad flag, empty doc)

Errors raised by msgpack, zstandard and cryptography are mapped to these at one boundary each
(artifact/manifest.py, artifact/codecs.py, artifact/signing.py); nothing above those modules sees a
third-party exception. The CLI prints `error: <message>` on one line and exits non-zero.
"""

from __future__ import annotations


class KvswapError(Exception):
    """Root of every error kvswap raises on purpose."""

    exit_code = 1


class FormatError(KvswapError):
    """Bytes that do not parse as the structure they claim to be."""


class IntegrityError(KvswapError):
    """Bytes that parse but do not match their content address, declared size or signature."""


class UntrustedSigner(IntegrityError):
    """A manifest whose signatures are valid but none is by a trusted key (or that is unsigned)."""


class ModelMismatch(KvswapError):
    """An artifact made for another model fingerprint, tokenizer, dtype or tensor layout."""


class NotFound(KvswapError):
    """No such artifact, chunk, provider or peer."""


class ProtocolError(KvswapError):
    """The wire conversation went wrong."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved: garbage, an oversized frame, a stall, a wrong answer."""


class LimitExceeded(KvswapError):
    """A named limit from kvswap.protocol.limits was exceeded."""


class UsageError(KvswapError):
    """The request cannot be honoured as asked (bad flag, empty document, document too long)."""

    exit_code = 2
