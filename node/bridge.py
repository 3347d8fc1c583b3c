"""Run a trio event loop in a dedicated thread and let asyncio code await trio functions (and back).

py-libp2p runs on trio only; the daemon (aiohttp control API) runs on asyncio. Rather than the recipe
`asyncio.to_thread(trio.from_thread.run, ...)`, which parks one executor thread per pending call (a handful
of slow fetches would starve the default executor on a 2-core machine), a bridged call here holds NO thread:
asyncio schedules a task into the trio loop's nursery with `TrioToken.run_sync_soon`, and the trio task hands
its outcome back with `loop.call_soon_threadsafe`. Cancelling the asyncio awaiter cancels the trio task.

The other direction (trio -> asyncio): `call_soon_in_asyncio(fn, *args)` schedules a plain callback on the
asyncio loop (gossip arrivals, ledger rows), so daemon callbacks always run on the daemon's own thread.

The trio side also gets a private `trio.CapacityLimiter` (`worker_limiter`) for `trio.to_thread.run_sync`,
sized by `ServeTuning.worker_threads` (node/tuning.py), so store/engine work in handlers is bounded and independent of asyncio's
default executor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

import trio

from kvswap.protocol.errors import LocalProtocolError
from .tuning import DaemonTuning, ServeTuning

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrioBridge:
    """A trio loop in its own thread, owned by one asyncio loop.

    `await bridge.start(main)` starts the thread and waits until `main(nursery, ready)` has called
    `ready()` (setup done: host listening, services started). `await bridge.call(fn, *args)` runs
    `await fn(*args)` on the trio loop. `await bridge.stop()` cancels everything trio-side and joins the thread.
    """

    def __init__(self, name: str = "kvswap-trio", worker_threads: int = ServeTuning.worker_threads) -> None:
        self.worker_threads = worker_threads
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None
        self.worker_limiter: trio.CapacityLimiter | None = None

    @property
    def running(self) -> bool:
        return self._token is not None and self._thread is not None and self._thread.is_alive()

    async def start(self, main: Callable[[trio.Nursery, Callable[[], None]], Awaitable[None]] | None = None) -> None:
        """Start the trio thread. `main(nursery, ready)` runs as the loop's main task; it must call `ready()`
        once setup is done, and may keep running (it is cancelled by stop()). Errors before ready() raise here."""
        if self._thread is not None:
            raise LocalProtocolError("bridge already started")
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future = self._loop.create_future()
        self._done = self._loop.create_future()

        def resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        async def trio_main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop_event = trio.Event()
            self.worker_limiter = trio.CapacityLimiter(self.worker_threads)

            def ready() -> None:
                self._loop.call_soon_threadsafe(resolve, started, None)

            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if main is not None:
                    nursery.start_soon(main, nursery, ready)
                else:
                    ready()
                await self._stop_event.wait()
                nursery.cancel_scope.cancel()

        def thread_body() -> None:
            error: BaseException | None = None
            try:
                trio.run(trio_main)
            except BaseException as exc:  # boundary: the thread's whole life. Whatever ended the trio loop is
                # handed to the asyncio side (start() raises it, stop() logs it); a thread must not die silently
                error = _unwrap(exc)
                log.debug("trio loop ended with %r", exc)
            finally:
                self._token = None
                self._nursery = None
                loop = self._loop
                if loop is not None and not loop.is_closed():
                    try:
                        loop.call_soon_threadsafe(resolve, started, error or LocalProtocolError("trio loop exited"))
                        loop.call_soon_threadsafe(_set_result, self._done, error)
                    except RuntimeError:
                        pass

        self._thread = threading.Thread(target=thread_body, name=self._name, daemon=True)
        self._thread.start()
        ready = False
        try:
            await started
            ready = True
        finally:
            if not ready:  # setup failed or the caller gave up: take the half-started thread down
                await self.stop()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` on the trio loop and return its result (or raise its exception).

        Holds no thread while waiting. If the awaiting asyncio task is cancelled, the trio task is cancelled.
        """
        if not self.running:
            raise LocalProtocolError("the network layer is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        scope_box: list[trio.CancelScope] = []

        def deliver(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        async def runner() -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                try:
                    result = await fn(*args)
                except trio.Cancelled:
                    # our own scope is only cancelled after the awaiter was (its future is already done);
                    # otherwise the whole trio side is shutting down
                    _safe_call(loop, deliver, None, LocalProtocolError("the network layer stopped"))
                    raise
                except BaseException as exc:  # boundary: the call crosses threads. Its failure, whatever it is,
                    # belongs to the awaiting asyncio task, and must not take the trio loop's nursery down
                    _safe_call(loop, deliver, None, _unwrap(exc))
                    return
                _safe_call(loop, deliver, result, None)

        def spawn() -> None:
            if self._nursery is None:
                _safe_call(loop, deliver, None, LocalProtocolError("the network layer is stopping"))
                return
            self._nursery.start_soon(runner)

        try:
            self._token.run_sync_soon(spawn)
        except (trio.RunFinishedError, AttributeError):
            raise LocalProtocolError("the network layer is not running") from None
        try:
            return await fut
        except asyncio.CancelledError:
            if scope_box and self.running:
                try:
                    self._token.run_sync_soon(scope_box[0].cancel)
                except (trio.RunFinishedError, AttributeError):
                    pass
            raise

    def call_soon_in_asyncio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the trio thread: run `fn(*args)` on the asyncio loop soon (fire and forget)."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                # a callback that raises is logged by asyncio's exception handler; the loop goes on
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def run_sync_in_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: run a plain function on the trio loop soon (fire and forget)."""
        if self._token is not None:
            try:
                self._token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

    async def stop(self, timeout: float = DaemonTuning.shutdown_timeout_s) -> None:
        """Cancel all trio work and join the thread (waits at most `timeout` seconds)."""
        if self._thread is None:
            return
        if self._token is not None and self._stop_event is not None:
            try:
                self._token.run_sync_soon(self._stop_event.set)
            except trio.RunFinishedError:
                pass
        if self._done is not None:
            try:
                error = await asyncio.wait_for(asyncio.shield(self._done), timeout)  # what ended the loop, or None
            except asyncio.TimeoutError:
                log.warning("trio loop did not stop within %.1f s", timeout)
            else:
                if error is not None:
                    log.debug("trio loop failed: %r", error)
        thread = self._thread
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 1.0)
        self._thread = None


def _unwrap(exc: BaseException) -> BaseException:
    """A nursery wraps a lone failure in an ExceptionGroup; give callers the failure itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _safe_call(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the asyncio loop is closed: nobody is waiting any more
        pass


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
