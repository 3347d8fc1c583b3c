"""A node's home directory: where its key, trust list, config and store live.

    <home>/identity.key   32-byte raw Ed25519 seed, mode 0600 (the libp2p peer id derives from it too)
    <home>/trust.json     {"trusted": ["<hex public key>", ...]}: publishers whose artifacts we accept
    <home>/config.json    optional settings, e.g. {"store_budget": "20GiB"}
    <home>/store/         chunks by CID, temp files, SQLite index (kvswap/store.py)

One place knows these paths so the CLI, the daemon and tests agree on them (`--home` / KVSWAP_HOME let
several nodes share one machine).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, UsageError

#: default store size budget for `kvswap gc` when neither --budget nor config.json says otherwise
DEFAULT_STORE_BUDGET = 20 * 1024**3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class HomeLayout:
    root: Path

    @property
    def identity_key(self) -> Path:
        return self.root / "identity.key"

    @property
    def trust_file(self) -> Path:
        return self.root / "trust.json"

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def ensure(self) -> "HomeLayout":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def parse_size(text: str | int) -> int:
    """'500M', '20GiB', '1.5g', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 500M, 20GiB, 1048576)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def load_config(home: Path) -> dict:
    path = HomeLayout(Path(home)).config_file
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def store_budget(home: Path) -> int:
    return parse_size(load_config(home).get("store_budget", DEFAULT_STORE_BUDGET))


_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
#: a libp2p Ed25519 peer id is base58 of: identity multihash (0x00, length 36) over the protobuf PublicKey
#: {Type: Ed25519 (field 1 = 1), Data: 32 bytes (field 2)}; the key is its last 32 bytes
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def key_of_peer_id(peer_id: str) -> str | None:
    """The Ed25519 public key (hex) inside a libp2p peer id ("12D3KooW..."), or None if it is not one."""
    if not 40 <= len(peer_id) <= 64 or any(c not in _BASE58 for c in peer_id):
        return None
    n = 0
    for c in peer_id:
        n = n * 58 + _BASE58.index(c)
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    raw = b"\0" * (len(peer_id) - len(peer_id.lstrip("1"))) + raw
    if len(raw) != 38 or not raw.startswith(_PEER_ID_PREFIX):
        return None
    return raw[6:].hex()


def _check_key_hex(key: str) -> str:
    """A trust-list key: 64 hex digits (`kvswap id`), or the peer id every other command prints."""
    key = key.strip()
    from_peer = key_of_peer_id(key)
    if from_peer is not None:
        return from_peer
    key = key.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise UsageError(f"not an Ed25519 public key (64 hex digits) or a peer id (12D3KooW...): {key!r:.80}")
    return key


#: trust.json fields and their defaults (artifact/signing.py TrustPolicy says what each means)
TRUST_DEFAULTS = {"trusted": [], "auditors": [], "accept_audited": 0, "require_audits": 0, "exact_audits": False}


def read_trust(home: Path) -> dict:
    """<home>/trust.json as a dict with every field (TRUST_DEFAULTS for the missing ones), keys validated."""
    path = HomeLayout(Path(home)).trust_file
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in TRUST_DEFAULTS.items()}
    if not path.exists():
        return out
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or set(data) - set(TRUST_DEFAULTS):
            raise TypeError(f"expected an object with fields among {sorted(TRUST_DEFAULTS)}")
        for name in ("trusted", "auditors"):
            keys = data.get(name, [])
            if not isinstance(keys, list):
                raise TypeError(f"'{name}' is not a list")
            out[name] = sorted({_check_key_hex(k) for k in keys})
        for name in ("accept_audited", "require_audits"):
            value = data.get(name, 0)
            if type(value) is not int or value < 0:
                raise TypeError(f"'{name}' must be a non-negative integer")
            out[name] = value
        if type(data.get("exact_audits", False)) is not bool:
            raise TypeError("'exact_audits' must be true or false")
        out["exact_audits"] = data.get("exact_audits", False)
    except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
        raise FormatError(f"{path}: bad trust file ({exc})") from None
    return out


def write_trust(home: Path, trust: dict) -> None:
    """Replace trust.json atomically (temp file + rename)."""
    layout = HomeLayout(Path(home)).ensure()
    tmp = layout.trust_file.with_suffix(".json.tmp")
    body = {**TRUST_DEFAULTS, **trust}
    body["trusted"], body["auditors"] = sorted(set(body["trusted"])), sorted(set(body["auditors"]))
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, layout.trust_file)


def read_trusted(home: Path) -> set[str]:
    """Hex public keys of trusted publishers (the node's own key is trusted separately, always)."""
    return set(read_trust(home)["trusted"])


def trust_add(home: Path, key: str, role: str = "trusted") -> set[str]:
    trust = read_trust(home)
    trust[role] = sorted(set(trust[role]) | {_check_key_hex(key)})
    write_trust(home, trust)
    return set(trust[role])


def trust_rm(home: Path, key: str, role: str = "trusted") -> set[str]:
    key = _check_key_hex(key)
    trust = read_trust(home)
    if key not in trust[role]:
        raise UsageError(f"key {key[:16]}... is not in the {'trust' if role == 'trusted' else 'auditor'} list")
    trust[role] = sorted(set(trust[role]) - {key})
    write_trust(home, trust)
    return set(trust[role])
