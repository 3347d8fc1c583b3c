"""A rate-limited TCP path on 127.0.0.1, for tests that need a slow link without network namespaces.

`Throttle(target_port, rate_bytes_s)` listens on a port of its own and forwards every connection to the target
port, each direction paced by a token bucket at `rate_bytes_s` (per connection, like a link's share). A
fetcher that dials the throttle's port instead of the provider's reaches the same libp2p host over a slow
path: the bytes are real, only their pace is set. Bounded: it serves until its nursery is cancelled.

    throttle = Throttle(provider_port, 256 * 1024)
    await nursery.start(throttle.run)
    await fetcher.p2p.connect(f"/ip4/127.0.0.1/tcp/{throttle.port}/p2p/{provider_id}")
"""

from __future__ import annotations

import trio

#: bytes forwarded per step: small enough that pacing is smooth at tens of KiB/s
PIECE_BYTES = 16 * 1024


class Throttle:
    def __init__(self, target_port: int, rate_bytes_s: float, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.rate_bytes_s = float(rate_bytes_s)
        self.host = host
        self.port = 0
        self.forwarded = 0  # bytes forwarded, both directions

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, inbound: trio.SocketStream) -> None:
        try:
            outbound = await trio.open_tcp_stream(self.host, self.target_port)
        except OSError:
            await inbound.aclose()
            return
        async with inbound, outbound:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, inbound, outbound, nursery.cancel_scope)
                nursery.start_soon(self._pump, outbound, inbound, nursery.cancel_scope)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        """Copy src -> dst at rate_bytes_s: each piece leaves once the link would have carried it (a quiet spell
        earns no burst: the link's clock never runs behind the present)."""
        free_at = trio.current_time()
        try:
            while True:
                data = await src.receive_some(PIECE_BYTES)
                if not data:
                    break
                free_at = max(free_at, trio.current_time()) + len(data) / self.rate_bytes_s
                await trio.sleep_until(free_at)
                await dst.send_all(data)
                self.forwarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()  # one side ended: close both


__all__ = ["Throttle"]
