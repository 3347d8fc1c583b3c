"""Ed25519 node keys, signature envelopes over manifest CIDs, and the trust policy.

The manifest carries no signature so that its CID stays one value whoever signs it; each signature is an
`Envelope` beside it (signer key, time, signature), and several parties may attest one manifest. The
signed message is domain-separated (it cannot be replayed as any other kvswap signature) and binds the
manifest's CID, which is the sha256 of its canonical bytes, plus the signer key and the time:

    b"kvswap/manifest-signature/v1\\n" || CID bytes (36) || signer public key (32) || time (u64 big-endian)

The node key is a raw 32-byte Ed25519 seed in <home>/identity.key (0600). The network layer derives the
libp2p peer id from the same seed, so the key that signs artifacts is the key that serves them.
cryptography's exceptions are mapped here to IntegrityError / FormatError.
"""

from __future__ import annotations

import os
import stat
import struct
import time as _time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..protocol.cid import Cid
from ..protocol.errors import FormatError, IntegrityError, UntrustedSigner
from .limits import MAX_ENVELOPES_BYTES
from .manifest import pack_list, unpack_list

DOMAIN = b"kvswap/manifest-signature/v1\n"
SEED_BYTES = 32
_TIME = struct.Struct(">Q")


def signed_message(manifest_cid: Cid, signer: bytes, time: int) -> bytes:
    return DOMAIN + manifest_cid.to_bytes() + signer + _TIME.pack(time)


class NodeKey:
    """This node's Ed25519 identity, from a raw 32-byte seed."""

    def __init__(self, seed: bytes):
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise FormatError(f"an identity key is a {SEED_BYTES}-byte Ed25519 seed")
        self.seed = seed
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_bytes = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    @classmethod
    def generate(cls) -> "NodeKey":
        return cls(os.urandom(SEED_BYTES))

    @classmethod
    def load_or_create(cls, path: Path) -> "NodeKey":
        """Read the seed file, or create it (0600, exclusive create so two processes cannot race)."""
        path = Path(path)
        try:
            seed = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = os.urandom(SEED_BYTES)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it first: use theirs
                return cls.load_or_create(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(seed)
                fh.flush()
                os.fsync(fh.fileno())
            return cls(seed)
        if len(seed) != SEED_BYTES:
            raise FormatError(f"{path}: expected a {SEED_BYTES}-byte Ed25519 seed, found {len(seed)} bytes")
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise FormatError(f"{path}: identity key is readable by others; chmod 600 it")
        return cls(seed)

    def sign_bytes(self, message: bytes) -> bytes:
        """A raw Ed25519 signature. Callers pass a domain-separated message (attestation.py), never a manifest
        CID alone: every kvswap signature kind has its own domain prefix."""
        return self._private.sign(message)

    def sign_manifest(self, manifest_cid: Cid, time: int | None = None) -> "Envelope":
        when = int(_time.time()) if time is None else int(time)
        sig = self._private.sign(signed_message(manifest_cid, self.public_bytes, when))
        return Envelope(manifest_cid, self.public_bytes, when, sig)


@dataclass(frozen=True)
class Envelope:
    """One party's signature over one manifest CID."""

    manifest_cid: Cid
    signer: bytes
    time: int
    signature: bytes

    def to_dict(self) -> dict:
        return {"cid": self.manifest_cid.to_bytes(), "signature": self.signature, "signer": self.signer,
                "time": self.time}

    def summary(self) -> dict:
        return {"signer": self.signer.hex(), "time": self.time, "manifest_cid": str(self.manifest_cid)}

    def verify(self, manifest_cid: Cid) -> None:
        """IntegrityError unless this is a valid signature by `signer` over exactly `manifest_cid`."""
        if self.manifest_cid != manifest_cid:
            raise IntegrityError(f"signature is for {self.manifest_cid.short()}, not {manifest_cid.short()}")
        try:
            Ed25519PublicKey.from_public_bytes(self.signer).verify(
                self.signature, signed_message(manifest_cid, self.signer, self.time))
        except (InvalidSignature, ValueError):
            raise IntegrityError(
                f"bad signature by {self.signer.hex()[:16]}... on manifest {manifest_cid.short()}") from None


def encode_envelopes(envelopes: list[Envelope]) -> bytes:
    """msgpack array of maps {cid, signature, signer, time} (sorted keys), sorted by signer then time."""
    ordered = sorted(envelopes, key=lambda e: (e.signer, e.time, e.signature))
    return pack_list([e.to_dict() for e in ordered], MAX_ENVELOPES_BYTES, "MAX_ENVELOPES_BYTES", "envelope")


def decode_envelopes(data: bytes) -> list[Envelope]:
    """Parse an envelope list (signatures are NOT verified here; see verify_envelopes)."""
    obj = unpack_list(data, MAX_ENVELOPES_BYTES, "MAX_ENVELOPES_BYTES", "envelope")
    out = []
    for e in obj:
        if type(e) is not dict or set(e) != {"cid", "signature", "signer", "time"}:
            raise FormatError("envelopes: each envelope is a map {cid, signature, signer, time}")
        if (type(e["signer"]) is not bytes or len(e["signer"]) != 32 or type(e["signature"]) is not bytes
                or len(e["signature"]) != 64 or type(e["time"]) is not int or not 0 <= e["time"] < 1 << 63
                or type(e["cid"]) is not bytes):
            raise FormatError("envelopes: bad field types or sizes")
        out.append(Envelope(Cid.from_bytes(e["cid"]), e["signer"], e["time"], e["signature"]))
    return out


@dataclass(frozen=True)
class TrustPolicy:
    """What makes an artifact acceptable (FORMAT.md "Trust policy").

    A publisher's valid signature by a trusted key (this node's own key always is one), or, when the user asks
    for it, audits: `accept_audited` > 0 admits an artifact whose publisher is not trusted once that many
    distinct trusted auditors attest it (artifact/attestation.py); `require_audits` > 0 asks that many of
    every artifact, trusted publisher or not; `exact_audits` counts only bit-exact audits. This node's own key
    is always a trusted auditor. `accept_any` (any valid signature will do) only when the user asks for it."""

    trusted: frozenset[bytes]
    accept_any: bool = False
    auditors: frozenset[bytes] = frozenset()
    accept_audited: int = 0
    require_audits: int = 0
    exact_audits: bool = False

    @classmethod
    def for_home(cls, home: Path, node_key: NodeKey | None = None, accept_any: bool = False) -> "TrustPolicy":
        from ..config import HomeLayout, read_trust

        trust = read_trust(home)
        key = node_key or NodeKey.load_or_create(HomeLayout(Path(home)).identity_key)
        keys = {bytes.fromhex(k) for k in trust["trusted"]} | {key.public_bytes}
        auditors = {bytes.fromhex(k) for k in trust["auditors"]} | {key.public_bytes}
        return cls(frozenset(keys), accept_any, frozenset(auditors), trust["accept_audited"],
                   trust["require_audits"], trust["exact_audits"])


def verify_envelopes(envelopes: list[Envelope], manifest_cid: Cid, policy: TrustPolicy,
                     attestations=(), model_fingerprint: str | None = None) -> list[Envelope]:
    """Check every signature, then the policy. Returns the envelopes by trusted publishers (may be empty when
    audits admitted the artifact).

    Any invalid signature or attestation (or one for another CID) is IntegrityError: it means tampering, even
    if another is fine. No envelope at all, or only envelopes by untrusted keys and not enough audits, is
    UntrustedSigner. Attestations count only when they verify, are by a trusted auditor, and were made with
    the artifact's own model (`model_fingerprint`, the manifest's)."""
    for env in envelopes:
        env.verify(manifest_cid)
    audited = _trusted_audits(attestations, manifest_cid, policy, model_fingerprint)
    if policy.require_audits and len(audited) < policy.require_audits:
        raise UntrustedSigner(
            f"artifact {manifest_cid.short()} has {len(audited)} audit(s) by trusted auditors, the trust policy "
            f"requires {policy.require_audits} (`kvswap audit CID`, or trust another auditor)")
    if not envelopes and not audited:
        raise UntrustedSigner(f"artifact {manifest_cid.short()} is unsigned")
    accepted = [e for e in envelopes if policy.accept_any or e.signer in policy.trusted]
    if accepted:
        return accepted
    if policy.accept_audited and len(audited) >= policy.accept_audited:
        return []
    signers = ", ".join(sorted({e.signer.hex()[:16] + "..." for e in envelopes})) or "nobody"
    audits = (f"; {len(audited)} of the {policy.accept_audited} trusted audits that would admit it"
              if policy.accept_audited else "")
    raise UntrustedSigner(
        f"artifact {manifest_cid.short()} is signed only by untrusted keys ({signers}){audits}; "
        "`kvswap trust add KEY` or pass --accept-any")


def _trusted_audits(attestations, cid: Cid, policy: TrustPolicy, model_fingerprint: str | None) -> set[bytes]:
    """The distinct trusted auditors whose valid attestations about `cid` count under `policy`."""
    auditors: set[bytes] = set()
    for att in attestations:
        claims = att.verify(cid)  # IntegrityError / FormatError: a forged or mangled attestation
        if att.auditor not in policy.auditors:
            continue
        if model_fingerprint is not None and claims["engine"] != model_fingerprint:
            continue
        if policy.exact_audits and claims["mode"] != "exact":
            continue
        auditors.add(att.auditor)
    return auditors
