"""Writes on a libp2p secure channel that a trio cancellation cannot cut in half (py-libp2p 0.8.1).

Every stream to a peer shares one connection: a TCP socket carrying one Noise (or TLS, secio) session
carrying Yamux frames. py-libp2p's `SecureSession.write` encrypts a frame, which advances the session's
nonce, and only then writes it to the socket, passing trio checkpoints on the way (the socket's write lock,
`send_all`). A cancellation delivered there leaves the frame encrypted but unsent, or half sent: the peer
cannot decrypt anything after it and the whole connection dies, with every stream on it, though neither
side misbehaved. kvswap cancels libp2p work all the time (a late chunk request still dialling a holder
through a DHT lookup, a DHT query past DHT_QUERY_TIMEOUT_S, the end of a fetch, a hedged manifest request),
so a fetch could lose its one honest provider to its own timeouts (issue 15's flaky hostile-hints test,
tests/test_p2p.py::test_a_cancelled_write_leaves_the_connection_usable).

`install()` makes each such write atomic with respect to cancellation: once started it runs to its end,
shielded, for at most STREAM_IDLE_TIMEOUT_S. A write the peer has not taken by then leaves the connection
unusable anyway: it is closed and ConnectionClosedError raised, which py-libp2p and node/p2p.py treat as a
peer failure. A caller cancelled meanwhile sees the cancellation at its next checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.security.secure_session import SecureSession

from kvswap.protocol import limits


def install() -> None:
    """Wrap SecureSession.write (once per process; idempotent)."""
    original = SecureSession.write
    if getattr(original, "_kvswap_cancel_safe", False):
        return

    @functools.wraps(original)
    async def write(self: Any, data: bytes) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + limits.STREAM_IDLE_TIMEOUT_S) as scope:
            await original(self, data)
        if scope.cancelled_caught:  # the peer took no frame for that long: part of one may be on the wire
            with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
                await self.close()  # closing a socket: anything it raises means it is gone already
            raise ConnectionClosedError(
                f"a write of {len(data)} bytes was not taken within {limits.STREAM_IDLE_TIMEOUT_S:g} s")

    write._kvswap_cancel_safe = True  # type: ignore[attr-defined]
    SecureSession.write = write  # type: ignore[method-assign]


__all__ = ["install"]
