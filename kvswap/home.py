"""`kvswap.Home`: one node home directory and everything in it, opened once.

    home = kvswap.Home("~/.kvswap-b")          # or Home() for $KVSWAP_HOME, else ~/.kvswap
    home.config["node.listen"]                 # effective settings (config.toml < env < flags)
    home.store, home.ledger, home.key          # opened on first use, shared, closed by home.close()
    home.payments, home.purse(...)             # the payment book; what one operation may pay
    home.policy()                              # the trust policy as config.toml says now
    home.node()                                # a client of the daemon running in this home, or None

The CLI, the daemon and Python callers all reach a home through this one object (kvswap/ops/ uses it), so
paths, keys and settings are decided once instead of by each command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import Config, HomeLayout, load_config


def default_home_path() -> Path:
    """--home, else $KVSWAP_HOME, else ~/.kvswap."""
    return Path(os.environ.get("KVSWAP_HOME") or Path.home() / ".kvswap").expanduser()


class Home:
    """A node's home: store, ledger, identity key, trust policy, config and run files."""

    def __init__(self, path: str | Path | None = None, *, flags: dict[str, Any] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_home_path()
        self.layout = HomeLayout(self.path)
        self._flags = dict(flags or {})
        self._config: Config | None = None
        self._key = self._store = self._ledger = self._payments = None
        self._tier: Any = False  # False: not looked for yet; None: this home has none

    def __repr__(self) -> str:
        return f"Home({str(self.path)!r})"

    # --- settings ----------------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.path, self._flags)
        return self._config

    def reload(self) -> None:
        """Read config.toml again (after `kvswap config set` or `kvswap trust add` changed it)."""
        self._config = None

    # --- what lives in the home --------------------------------------------------------------------------
    @property
    def key(self):
        """This node's Ed25519 identity (created, 0600, on first use)."""
        if self._key is None:
            from .artifact.signing import NodeKey

            self._key = NodeKey.load_or_create(self.layout.ensure().identity_key)
        return self._key

    @property
    def store(self):
        """The local artifact store, keyed by this home's identity for raw local forms."""
        if self._store is None:
            from .store import Store, local_key_from_seed

            self.layout.ensure()
            self._store = Store(self.layout.store_dir, local_key=local_key_from_seed(self.key.seed),
                                keep_raw=self.config["store.keep_raw"])
            self._store.tier = self.tier  # told when an artifact is removed or fsck finds a problem
        return self._store

    @property
    def tier(self):
        """The home's host-memory tier of recently loaded artifacts (kvswap/hosttier.py), or None when
        `store.host_cache_bytes` is 0 or this machine has no memory filesystem for it."""
        if self._tier is False:
            from .config import parse_size
            from .hosttier import HostTier

            self._tier = HostTier.for_home(self.path, parse_size(self.config["store.host_cache_bytes"]),
                                           is_pinned=self._pinned)
        return self._tier

    def _pinned(self, cid) -> bool:
        rows = [a for a in self.store.list_artifacts() if a["cid"] == str(cid)]
        return bool(rows and rows[0]["pinned"])

    @property
    def ledger(self):
        if self._ledger is None:
            from .ledger import Ledger

            self._ledger = Ledger.for_home(self.layout.ensure().root)
        return self._ledger

    @property
    def payments(self):
        """The payment book (<home>/payments.sqlite: terms, vouchers, deliveries; kvswap/payments/book.py)."""
        if self._payments is None:
            from .payments.book import PaymentBook

            self._payments = PaymentBook.for_home(self.layout.ensure().root, self.key.public_bytes)
        return self._payments

    def purse(self, max_price_mb: int | None = None, max_price_token: int | None = None, budget: int | None = None):
        """What one operation may pay (kvswap/payments/rules.py Purse): config.toml [pay], overridden per call."""
        from .payments.rules import Purse

        return Purse.of(self.config, max_price_mb, max_price_token, budget)

    def policy(self, accept_any: bool | None = None):
        """The trust policy as config.toml says it now (re-read: `kvswap trust add` applies without a restart)."""
        from .artifact.signing import TrustPolicy

        self.reload()
        any_key = self.config["node.accept_any"] if accept_any is None else accept_any
        return TrustPolicy.for_home(self.path, node_key=self.key, accept_any=bool(any_key))

    def node(self):
        """A client of the daemon running in this home, or None when none runs."""
        from .control.client import maybe_client

        return maybe_client(self.path)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._payments is not None:
            self._payments.close()
            self._payments = None

    def __enter__(self) -> "Home":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_home(home: "Home | str | Path | None") -> tuple[Home, bool]:
    """(a Home, whether the caller opened it and should close it) for an argument that may be either."""
    if isinstance(home, Home):
        return home, False
    return Home(home), True


__all__ = ["Home", "as_home", "default_home_path"]
