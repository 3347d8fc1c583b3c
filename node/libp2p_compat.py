"""Everything kvswap needs from py-libp2p beyond its public API, in one place, for the one version pinned.

kvswap pins `libp2p==0.8.1` (pyproject.toml). Every private attribute it touches, every patch and every
logger level it changes is here, so an upgrade is reviewed in one file, and `check()` says plainly which of
them a different version lacks (tests/test_libp2p_compat.py runs it). Nothing happens on import: `apply()`
is called when a host starts (node/p2p.py), so importing kvswap changes nothing in a process that embeds
py-libp2p for its own use until it starts a kvswap host.

What and why:
- **a cancel-safe secure-channel write** (`SecureSession.write`). Every stream to a peer shares one
  connection: a TCP socket carrying one Noise session carrying Yamux frames. py-libp2p encrypts a frame,
  which advances the session's nonce, and only then writes it, passing trio checkpoints on the way. A
  cancellation delivered there leaves the frame encrypted but unsent, or half sent: the peer cannot decrypt
  anything after it and the whole connection dies, with every stream on it, though neither side
  misbehaved. kvswap cancels libp2p work all the time (a late chunk request, a DHT query past its timeout,
  a hedged manifest request), so a fetch could lose its one honest provider to its own timeouts. Each write
  therefore runs to its end, shielded, for at most the stream idle timeout; one the peer has not taken by
  then leaves the connection unusable anyway: it is closed and ConnectionClosedError raised, which
  py-libp2p and node/p2p.py treat as a peer failure.
- **the DHT's ADD_PROVIDER rate** (`KadDHT._provider_rate_max`): py-libp2p allows 10 per 10 s per sender,
  tuned for IPFS; kvswap provides every chunk CID.
- **the DHT key encoding** (`kad_dht._encode_key`) and **one GET_PROVIDERS round to one peer**
  (`ProviderStore._get_providers_from_peer_with_closers`): py-libp2p's find_providers answers from the local
  record store first, so a node that provides a key itself would never ask the network (node/p2p.py).
- **quieter loggers**: KadDHT logs a WARNING each time a peer closes a DHT stream normally, several per
  lookup, the auto-connector logs its state at INFO every cycle, and gossipsub logs a WARNING for every
  message its own spam protection drops (a flood became a line per message). Raised to ERROR / WARNING;
  kvswap's own refusals are counted and logged once per interval (node/quota.py RefusalLog). Set them lower
  after `apply()` to debug.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
from typing import Any, Awaitable

import trio

#: the py-libp2p release every attribute below was read in (pyproject.toml pins it)
PINNED_VERSION = "0.8.1"
#: logger -> the lowest level kvswap lets it log at
_QUIET_LOGGERS = {"libp2p.kad_dht.kad_dht": logging.ERROR, "libp2p.network.auto_connector": logging.WARNING,
                  "libp2p.pubsub.gossipsub": logging.ERROR}


def installed_version() -> str:
    return importlib.metadata.version("libp2p")


def check(version: str | None = None) -> list[str]:
    """What this py-libp2p lacks of what kvswap relies on ([] when all is there). A version other than
    PINNED_VERSION is named first: nothing below was checked against it."""
    problems = []
    version = installed_version() if version is None else version
    if version != PINNED_VERSION:
        problems.append(f"py-libp2p {version} is installed; kvswap was built against {PINNED_VERSION} "
                        f"(node/libp2p_compat.py lists what it relies on): pip install libp2p=={PINNED_VERSION}")
    from libp2p.kad_dht import kad_dht
    from libp2p.kad_dht.provider_store import ProviderStore
    from libp2p.security.secure_session import SecureSession

    wanted = [(kad_dht, "_encode_key"), (ProviderStore, "_get_providers_from_peer_with_closers"),
              (SecureSession, "write"), (kad_dht.KadDHT, "__init__")]
    problems += [f"py-libp2p {version} has no {getattr(owner, '__name__', owner)}.{name}"
                 for owner, name in wanted if not hasattr(owner, name)]
    return problems


def apply(write_idle_s: float) -> None:
    """What a kvswap host needs before it starts (idempotent): the cancel-safe write, quieter loggers."""
    _shield_secure_writes(write_idle_s)
    for name, level in _QUIET_LOGGERS.items():
        if logging.getLogger(name).level < level:
            logging.getLogger(name).setLevel(level)


def _shield_secure_writes(idle_s: float) -> None:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.secure_session import SecureSession

    original = SecureSession.write
    if getattr(original, "_kvswap_cancel_safe", False):
        return

    @functools.wraps(original)
    async def write(self: Any, data: bytes) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + idle_s) as scope:
            await original(self, data)
        if scope.cancelled_caught:  # the peer took no frame for that long: part of one may be on the wire
            with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
                await self.close()  # closing a socket: anything it raises means it is gone already
            raise ConnectionClosedError(f"a write of {len(data)} bytes was not taken within {idle_s:g} s")

    write._kvswap_cancel_safe = True  # type: ignore[attr-defined]
    SecureSession.write = write  # type: ignore[method-assign]


def set_provider_rate(dht: Any, per_10_s: int) -> None:
    """ADD_PROVIDER messages a KadDHT accepts per 10 s from one peer."""
    dht._provider_rate_max = per_10_s


def encode_dht_key(key: str) -> bytes:
    """A DHT key as KadDHT hashes and routes it (a CID string parses to its multihash)."""
    from libp2p.kad_dht.kad_dht import _encode_key

    return _encode_key(key)


def providers_from_peer(dht: Any, peer: Any, key_bytes: bytes) -> Awaitable[tuple[list, list]]:
    """One GET_PROVIDERS round to `peer`: (providers, closer peers), the local record store skipped."""
    return dht.provider_store._get_providers_from_peer_with_closers(peer, key_bytes)


__all__ = ["PINNED_VERSION", "apply", "check", "encode_dht_key", "installed_version", "providers_from_peer",
           "set_provider_rate"]
