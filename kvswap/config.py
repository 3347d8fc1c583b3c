"""A node's home directory and its one configuration file, `<home>/config.toml`.

    <home>/identity.key   32-byte raw Ed25519 seed, mode 0600 (the libp2p peer id derives from it too)
    <home>/config.toml    every setting (SETTINGS below) and the report's [prices]; `kvswap config show`
    <home>/store/         chunks by CID, temp files, SQLite index (kvswap/store.py)
    <home>/ledger.sqlite  transfer and compute events (kvswap/ledger.py)
    <home>/payments.sqlite terms, vouchers and deliveries (kvswap/payments/book.py)
    <home>/node.json, api.token, node.log   files of a running daemon (node/runfiles.py)

Every setting is declared once, in SETTINGS: its table and key in config.toml, its type, its default, and
the environment variable that overrides it. A value comes from, lowest to highest: the default, config.toml,
the environment, a command-line flag; `Config.source(...)` says which (LMCache's "single configuration
definition centre"). `kvswap trust` and `kvswap config set` edit config.toml with tomlkit, which keeps a
user's comments and layout. Older homes kept the trust list in trust.json and the store budget in
config.json: both are still read, and moved into config.toml on the first write.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol.errors import FormatError, UsageError
from .artifact.audit import DEFAULT_AUDIT_FRACTION
from .modes import DecodeMode, Dtype, HostBackend, SwarmMode

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
#: the default libp2p port: fixed, so a node's address (and so every other node's --bootstrap) survives a
#: restart; a second node on one machine names another with --listen
DEFAULT_PORT = 4001


@dataclass(frozen=True)
class HomeLayout:
    root: Path

    @property
    def identity_key(self) -> Path:
        return self.root / "identity.key"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def legacy_trust_file(self) -> Path:
        return self.root / "trust.json"

    @property
    def legacy_config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    def ensure(self) -> "HomeLayout":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def parse_size(text: str | int) -> int:
    """'500M', '20GiB', '1.5g', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 500M, 20GiB, 1048576)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# --- keys in the trust lists -------------------------------------------------------------------------
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


def peer_id_of_key(key_hex: str) -> str:
    """The libp2p peer id ("12D3KooW...") of an Ed25519 public key (hex): key_of_peer_id's inverse."""
    raw = _PEER_ID_PREFIX + bytes.fromhex(key_hex)
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _BASE58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def check_key(key: str) -> str:
    """A trust-list key: 64 hex digits (`kvswap id`), or the peer id every other command prints."""
    key = str(key).strip()
    from_peer = key_of_peer_id(key)
    if from_peer is not None:
        return from_peer
    key = key.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise UsageError(f"not an Ed25519 public key (64 hex digits) or a peer id (12D3KooW...): {key!r:.80}")
    return key


# --- the settings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting, declared once: its table and key in config.toml, its kind, its default, the environment
    variable that overrides it, and (for the node's settings) the `kvswap node start` flag that overrides it
    for one run, with that flag's argparse options. The CLI builds the flags from here (kvswap/cli/node_cmds.py)
    and the daemon reads the effective values from the same table (`Config`)."""

    table: str
    key: str
    default: Any
    kind: str  # str | int | float | bool | size | list | keys | choice
    env: str | None
    help: str
    flag: str | None = None
    choices: tuple[str, ...] = ()
    flag_args: tuple[tuple[str, Any], ...] = ()  # extra argparse options of the flag (action, nargs, metavar)

    @property
    def name(self) -> str:
        return f"{self.table}.{self.key}"


SETTINGS: tuple[Setting, ...] = (
    Setting("node", "listen", [f"/ip4/127.0.0.1/tcp/{DEFAULT_PORT}"], "list", "KVSWAP_LISTEN",
            "libp2p listen multiaddrs (a fixed port keeps the address across restarts)",
            flag="--listen", flag_args=(("action", "append"), ("metavar", "MULTIADDR"))),
    Setting("node", "bootstrap", [], "list", "KVSWAP_BOOTSTRAP",
            "peers to join through (`kvswap node addr` on a running node prints one)",
            flag="--bootstrap", flag_args=(("nargs", "*"), ("metavar", "MULTIADDR"))),
    Setting("node", "api", "127.0.0.1:0", "str", "KVSWAP_API", "control API host:port (loopback only; 0 = any port)",
            flag="--api", flag_args=(("metavar", "HOST:PORT"),)),
    Setting("node", "model", "", "str", "KVSWAP_MODEL",
            "model name, hub id or folder ('' = the default model; `kvswap models` lists them)", flag="--model", flag_args=(("metavar", "NAME"),)),
    Setting("node", "no_model", False, "bool", None,
            "run without a model: store, forward, serve and provide only (torch is never imported; hosted and "
            "local generation answer 'no model here')", flag="--no-model"),
    Setting("node", "dtype", Dtype.BF16.value, "choice", "KVSWAP_DTYPE", "KV dtype of the node's engine",
            flag="--dtype", choices=Dtype.choices()),
    Setting("node", "decode", "", "choice", "KVSWAP_DECODE",
            "decode step ('' = compiled with CUDA graphs on a GPU, paid once at start; eager on the CPU)",
            flag="--decode", choices=("",) + DecodeMode.choices()),
    Setting("node", "audit_fraction", DEFAULT_AUDIT_FRACTION, "float", "KVSWAP_AUDIT_FRACTION",
            "fraction of the blocks of each fetched artifact audited before use, signing an attestation when it "
            "passes (0 = off)", flag="--audit-fraction", flag_args=(("metavar", "F"),)),
    Setting("node", "accept_any", False, "bool", None, "accept manifests signed by any key (never the default)",
            flag="--accept-any"),
    Setting("node", "ration_copies", 1, "int", None,
            "copies of each chunk of an artifact sent before further fetchers are pointed at holders "
            "(0 = no rationing)", flag="--ration-copies", flag_args=(("metavar", "N"),)),
    Setting("node", "swarm", SwarmMode.SUPERSEED.value, "choice", "KVSWAP_SWARM",
            "upload rules: superseed (upload slots, a chunk's next copy after its last completed, progress-based "
            "timeouts) or legacy (the rules before, kept measurable)", flag="--swarm", choices=SwarmMode.choices()),
    Setting("node", "reachability", "auto", "choice", "KVSWAP_REACHABILITY",
            "whether peers can dial this node: learnt from AutoNAT (auto), or said (public, private)",
            flag="--reachability", choices=("auto", "public", "private")),
    Setting("node", "relay", "auto", "choice", "KVSWAP_RELAY",
            "relay for NAT'd peers (circuit relay v2, within nat.relay_* limits): when public (auto), on, off",
            flag="--relay", choices=("auto", "on", "off")),
    Setting("node", "relays", [], "list", "KVSWAP_RELAYS",
            "relays a private node reserves a slot on, besides its bootstrap peers and relays it meets",
            flag="--relays", flag_args=(("nargs", "*"), ("metavar", "MULTIADDR"))),
    Setting("node", "hole_punching", "on", "choice", "KVSWAP_HOLE_PUNCHING",
            "upgrade relayed connections to direct ones (DCUtR)", flag="--hole-punching", choices=("on", "off")),
    Setting("node", "relay_data", False, "bool", "KVSWAP_RELAY_DATA",
            "let chunk bytes go over a relayed connection (within the relay's byte budget) when no direct one "
            "can be made; off: only control traffic goes over relays", flag="--relay-data"),
    Setting("node", "host_backend", HostBackend.ENGINE.value, "choice", "KVSWAP_HOST_BACKEND",
            "what serves hosted generations: engine (kvswap's engine, one at a time) or vllm (a vLLM server the "
            "node starts in the vLLM venv: continuous batching; docs/vllm.md \"Hosting\")",
            flag="--host-backend", choices=HostBackend.choices()),
    Setting("node", "vllm_python", "", "str", "KVSWAP_VLLM_PYTHON",
            "the python of the venv vLLM is installed in ('' = .venv-vllm next to kvswap's source, else this "
            "python if it has vllm)", flag="--vllm-python", flag_args=(("metavar", "PATH"),)),
    Setting("store", "budget", "20GiB", "size", "KVSWAP_STORE_BUDGET", "`kvswap gc` evicts down to this size"),
    Setting("store", "keep_raw", True, "bool", None, "keep decoded copies of compressed chunks for fast local loads"),
    Setting("store", "host_cache_bytes", "2GiB", "size", "KVSWAP_HOST_CACHE_BYTES",
            "host-memory tier of recently loaded artifacts, shared by the home's processes (0 = off; "
            "kvswap/hosttier.py)"),
    Setting("pay", "unit", "micro-usd", "str", "KVSWAP_PAY_UNIT",
            "the unit every price and budget of this node counts in (a provider priced in another is refused)"),
    Setting("pay", "price_per_mb", 0, "int", "KVSWAP_PRICE_PER_MB",
            "what this node charges per 10**6 stored bytes it ships (0 = free; kvswap/payments/)",
            flag="--price-per-mb", flag_args=(("metavar", "UNITS"),)),
    Setting("pay", "price_per_token", 0, "int", "KVSWAP_PRICE_PER_TOKEN",
            "what this node charges per hosted output token (0 = free)", flag="--price-per-token",
            flag_args=(("metavar", "UNITS"),)),
    Setting("pay", "credit_bytes", "64MiB", "size", "KVSWAP_CREDIT_BYTES",
            "bytes a priced node sends a consumer ahead of its vouchers (its exposure per consumer; 64 MiB is ~5 s "
            "at 100 Mbit/s, and the testnet's till never waited on it: BENCHMARKS.md \"Buying KV\")",
            flag="--credit-bytes", flag_args=(("metavar", "SIZE"),)),
    Setting("pay", "credit_tokens", 256, "int", "KVSWAP_CREDIT_TOKENS",
            "hosted tokens a priced node generates for a consumer ahead of its vouchers", flag="--credit-tokens",
            flag_args=(("metavar", "N"),)),
    Setting("pay", "max_price_mb", 0, "int", "KVSWAP_MAX_PRICE_MB",
            "the most this node pays per MB (a provider above is refused; `get --max-price` for one fetch)"),
    Setting("pay", "max_price_token", 0, "int", "KVSWAP_MAX_PRICE_TOKEN",
            "the most this node pays per hosted token (`generate --max-price-token` for one generation)"),
    Setting("pay", "budget", 0, "int", "KVSWAP_PAY_BUDGET",
            "the most one fetch or hosted generation may spend, in pay.unit (0 = pay nobody; `--budget`)"),
    Setting("trust", "trusted", [], "keys", None, "publisher keys whose artifacts this node accepts"),
    Setting("trust", "auditors", [], "keys", None, "auditor keys whose attestations count"),
    Setting("trust", "accept_audited", 0, "int", None,
            "accept an untrusted publisher's artifact once this many trusted auditors attest it (0 = never)"),
    Setting("trust", "require_audits", 0, "int", None, "attestations by trusted auditors every artifact needs"),
    Setting("trust", "exact_audits", False, "bool", None, "count only bit-exact audits"),
)
_BY_NAME = {s.name: s for s in SETTINGS}
#: tables config.toml may hold; [prices] belongs to the report (kvswap/reporting/prices.py checks its keys)
TABLES = sorted({s.table for s in SETTINGS} | {"prices"})


def setting(name: str) -> Setting:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"no setting {name!r} (known: {', '.join(sorted(_BY_NAME))})") from None


def coerce(s: Setting, value: Any, origin: str) -> Any:
    """`value` as setting `s` holds it; UsageError naming `origin` (the file, variable or flag) otherwise."""
    try:
        if s.kind in ("list", "keys"):
            if isinstance(value, str):
                value = [v for v in re.split(r"[\s,]+", value) if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            return sorted({check_key(v) for v in value}) if s.kind == "keys" else list(value)
        if s.kind == "bool":
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if s.kind == "int":
            value = int(value) if isinstance(value, str) else value
            if type(value) is not int or value < 0:
                raise TypeError("a non-negative integer")
            return value
        if s.kind == "float":
            value = float(value) if isinstance(value, str) else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise TypeError("a number from 0 to 1")
            return float(value)
        if s.kind == "choice":
            value = str(value)
            if value not in s.choices:
                raise TypeError(f"one of {', '.join(repr(c) for c in s.choices)}")
            return value
        if s.kind == "size":
            try:
                parse_size(value)
            except UsageError:
                raise TypeError("a size such as 500M or 20GiB") from None
            return value
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    except (TypeError, ValueError, UsageError) as exc:
        raise UsageError(f"{origin}: {s.name} must be {exc}, got {value!r:.60}") from None


@dataclass
class Config:
    """The effective settings of one home: values and where each came from."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    prices: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[setting(name).name]

    def source(self, name: str) -> str:
        return self.sources[setting(name).name]

    def show(self) -> dict:
        """What `kvswap config show --json` prints."""
        return {"file": str(self.path),
                "settings": {n: {"value": self.values[n], "source": self.sources[n], "help": _BY_NAME[n].help}
                             for n in sorted(self.values)},
                "prices": self.prices}


def _read_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise FormatError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise FormatError(f"{path}: unknown table(s) {', '.join(unknown)} (known: {', '.join(TABLES)})")
    for table, body in data.items():
        if not isinstance(body, dict):
            raise FormatError(f"{path}: [{table}] must be a table")
        if table != "prices":
            extra = sorted(f"{table}.{k}" for k in body if f"{table}.{k}" not in _BY_NAME)
            if extra:
                raise FormatError(f"{path}: unknown setting(s) {', '.join(extra)} (`kvswap config show` lists them)")
    return data


def _legacy(layout: HomeLayout) -> dict[str, Any]:
    """Settings an older home kept in trust.json / config.json (until config.toml takes them over)."""
    out: dict[str, Any] = {}
    if layout.legacy_trust_file.is_file():
        try:
            data = json.loads(layout.legacy_trust_file.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{layout.legacy_trust_file}: bad trust file ({exc})") from None
        if isinstance(data, dict):
            out.update({f"trust.{k}": v for k, v in data.items() if f"trust.{k}" in _BY_NAME})
    if layout.legacy_config_file.is_file():
        try:
            data = json.loads(layout.legacy_config_file.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{layout.legacy_config_file}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "store_budget" in data:
            out["store.budget"] = data["store_budget"]
    return out


def load_config(home: Path, flags: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults < config.toml (and legacy files) < environment < `flags` ({"node.listen": [...], ...}; None
    values ignored). Every value is checked against its setting's type."""
    layout = HomeLayout(Path(home))
    environ = os.environ if environ is None else environ
    data = _read_file(layout.config_file)
    cfg = Config(layout.config_file, prices=dict(data.get("prices", {})))
    legacy = _legacy(layout)
    for s in SETTINGS:
        value, source = s.default, "default"
        in_file = data.get(s.table, {})
        if s.key in in_file:
            value, source = coerce(s, in_file[s.key], str(layout.config_file)), "config.toml"
        elif s.name in legacy:
            value, source = coerce(s, legacy[s.name], "legacy file"), "legacy file"
        if s.env and environ.get(s.env):
            value, source = coerce(s, environ[s.env], f"${s.env}"), f"env {s.env}"
        if flags and flags.get(s.name) is not None:
            value, source = coerce(s, flags[s.name], s.flag or "flag"), "flag"
        cfg.values[s.name], cfg.sources[s.name] = value, source
    return cfg


def update_config(home: Path, changes: dict[str, Any]) -> Config:
    """Set settings in config.toml (tomlkit: the user's comments and order stay), moving legacy values in."""
    import tomlkit

    layout = HomeLayout(Path(home)).ensure()
    path = layout.config_file
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
    legacy = _legacy(layout)
    pending = {**{k: v for k, v in legacy.items() if k.split(".")[1] not in doc.get(k.split(".")[0], {})}, **changes}
    for name, value in pending.items():
        s = setting(name)
        value = coerce(s, value, str(path))
        if s.table not in doc:
            doc[s.table] = tomlkit.table()
        doc[s.table][s.key] = value
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)
    for old in (layout.legacy_trust_file, layout.legacy_config_file):  # moved into config.toml now
        old.unlink(missing_ok=True)
    return load_config(home)


# --- trust lists (config.toml [trust]) ----------------------------------------------------------------
TRUST_KEYS = ("trusted", "auditors", "accept_audited", "require_audits", "exact_audits")


def read_trust(home: Path) -> dict:
    """The [trust] table with every field (defaults for the missing ones), keys validated."""
    cfg = load_config(home)
    return {k: cfg[f"trust.{k}"] for k in TRUST_KEYS}


def write_trust(home: Path, trust: dict) -> None:
    update_config(home, {f"trust.{k}": v for k, v in trust.items() if k in TRUST_KEYS})


def read_trusted(home: Path) -> set[str]:
    """Hex public keys of trusted publishers (the node's own key is trusted separately, always)."""
    return set(read_trust(home)["trusted"])


def trust_add(home: Path, key: str, role: str = "trusted") -> set[str]:
    keys = set(read_trust(home)[role]) | {check_key(key)}
    update_config(home, {f"trust.{role}": sorted(keys)})
    return keys


def trust_rm(home: Path, key: str, role: str = "trusted") -> set[str]:
    key = check_key(key)
    keys = set(read_trust(home)[role])
    if key not in keys:
        raise UsageError(f"key {key[:16]}... is not in the {'trust' if role == 'trusted' else 'auditor'} list")
    keys.discard(key)
    update_config(home, {f"trust.{role}": sorted(keys)})
    return keys


def store_budget(home: Path) -> int:
    return parse_size(load_config(home)["store.budget"])
