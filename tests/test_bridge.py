"""The asyncio <-> trio bridge on its own: results, errors, cancellation, many calls, callbacks, clean stop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from kvswap.protocol.errors import LocalProtocolError, NotFound
from kvswap.node.bridge import TrioBridge


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _trio_add(a, b):
    await trio.sleep(0.01)
    assert trio.lowlevel.current_trio_token() is not None  # really on trio
    return a + b, threading.current_thread().name


def test_call_returns_the_trio_result_and_runs_on_the_trio_thread():
    async def main():
        bridge = TrioBridge(name="test-trio")
        await bridge.start()
        try:
            result, thread = await bridge.call(_trio_add, 2, 3)
        finally:
            await bridge.stop()
        return result, thread

    assert run(main()) == (5, "test-trio")


def test_errors_propagate_with_their_type():
    async def boom():
        await trio.sleep(0)
        raise NotFound("nothing here")

    async def main():
        bridge = TrioBridge()
        await bridge.start()
        try:
            with pytest.raises(NotFound, match="nothing here"):
                await bridge.call(boom)
        finally:
            await bridge.stop()

    run(main())


def test_cancelling_the_asyncio_side_cancels_the_trio_task():
    state = {"cancelled": False}

    async def slow():
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            state["cancelled"] = True
            raise

    async def main():
        bridge = TrioBridge()
        await bridge.start()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(bridge.call(slow), 0.2)
            for _ in range(100):
                if state["cancelled"]:
                    break
                await asyncio.sleep(0.02)
        finally:
            await bridge.stop()

    run(main())
    assert state["cancelled"]


def test_many_concurrent_calls_hold_no_threads():
    """200 pending bridged calls while the default executor still answers at once (no thread per call)."""

    async def wait_for(event_holder):
        await event_holder["event"].wait()
        return 1

    async def main():
        bridge = TrioBridge()
        holder = {}

        async def make_event():
            holder["event"] = trio.Event()

        await bridge.start()
        try:
            await bridge.call(make_event)
            threads_before = threading.active_count()
            tasks = [asyncio.create_task(bridge.call(wait_for, holder)) for _ in range(200)]
            await asyncio.sleep(0.2)
            assert threading.active_count() <= threads_before + 1
            # the default executor is free for the daemon's own work
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
            bridge.run_sync_in_trio(holder["event"].set)
            assert sum(await asyncio.gather(*tasks)) == 200
        finally:
            await bridge.stop()

    run(main())


def test_trio_can_call_back_into_asyncio():
    async def main():
        bridge = TrioBridge()
        await bridge.start()
        got = asyncio.Queue()
        loop_thread = threading.current_thread().name

        async def emit():
            bridge.call_soon_in_asyncio(lambda v: got.put_nowait((v, threading.current_thread().name)), "hello")

        try:
            await bridge.call(emit)
            value, thread = await asyncio.wait_for(got.get(), 5)
        finally:
            await bridge.stop()
        return value, thread == loop_thread

    assert run(main()) == ("hello", True)


def test_start_waits_for_setup_and_stop_cancels_background_work():
    state = {"ready": False, "stopped": False}

    async def main_task(nursery, ready):
        await trio.sleep(0.05)
        state["ready"] = True
        ready()
        try:
            await trio.sleep_forever()
        finally:
            state["stopped"] = True

    async def main():
        bridge = TrioBridge()
        await bridge.start(main_task)
        assert state["ready"]
        await bridge.stop()
        assert not bridge.running
        with pytest.raises(LocalProtocolError):
            await bridge.call(_trio_add, 1, 2)

    run(main())
    assert state["stopped"]


def test_setup_failure_raises_from_start():
    async def failing(nursery, ready):
        raise NotFound("no such listen address")

    async def main():
        bridge = TrioBridge()
        with pytest.raises(NotFound, match="no such listen address"):
            await bridge.start(failing)
        assert not bridge.running

    run(main())


def test_stop_fails_pending_calls_cleanly():
    async def forever():
        await trio.sleep_forever()

    async def main():
        bridge = TrioBridge()
        await bridge.start()
        pending = asyncio.create_task(bridge.call(forever))
        await asyncio.sleep(0.1)
        await bridge.stop()
        with pytest.raises(LocalProtocolError, match="stopped"):
            await asyncio.wait_for(pending, 5)

    run(main())
