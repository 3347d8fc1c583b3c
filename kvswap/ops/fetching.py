"""Fetch an artifact from the network into the home's store, through the node running there (the network
lives in the daemon: a fetch needs one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..control import routes
from ..control.client import wait_job
from ..home import Home, as_home
from ..protocol.errors import NotFound
from .source import Source


def get(source: Any, *, home: Home | str | Path | None = None, n_tokens: int | None = None,
        accept_any: bool = False, progress: Callable[[dict], None] | None = None, max_price: int | None = None,
        budget: int | None = None) -> dict:
    """Fetch an artifact (by CID, document or document hash) into the home's store through its running node;
    a given document is bound to the artifact before first use. Returns the fetch's summary, with what it paid.
    `max_price` (per MB) and `budget` cap what priced providers are paid (None: config.toml [pay])."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        client = h.node()
        if client is None:
            raise NotFound(f"no node is running in {h.path}: fetching needs one (`kvswap node start --home {h.path}`)")
        body = routes.GetBody(key=src.key, document=src.document.text if src.document else None, tokens=n_tokens,
                              accept_any=accept_any, max_price=max_price, budget=budget)
        return wait_job(client, client.call(routes.GET, body), progress=progress, cancel_on_interrupt=True)
    finally:
        if owned:
            h.close()


__all__ = ["get"]
