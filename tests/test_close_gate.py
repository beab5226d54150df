"""CloseGate: the first aclose runs, later ones wait for it, from any event loop."""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import pytest

from kvtier.tiers._close_gate import CloseGate


@pytest.mark.asyncio
async def test_later_closes_wait_for_the_first_even_when_cancelled_or_when_it_fails() -> None:
    gate = CloseGate()
    order: list[str] = []
    release = anyio.Event()

    async def failing_close() -> None:
        async with gate.closing() as runs:
            assert runs
            await release.wait()
            order.append("first closed")
            raise OSError("unpin failed")  # the others are released all the same

    async def first() -> None:
        with pytest.raises(OSError, match="unpin failed"):
            await failing_close()

    async def later(name: str, cancelled: bool) -> None:
        with anyio.CancelScope() as scope:
            if cancelled:
                scope.cancel()  # a close in a cancelled scope still waits (shielded)
            async with gate.closing() as runs:
                assert not runs
                order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.sleep(0.01)
        assert gate.started
        tg.start_soon(later, "second", False)
        tg.start_soon(later, "third", True)
        await anyio.sleep(0.05)
        assert order == []
        release.set()
    assert order[0] == "first closed"
    assert sorted(order[1:]) == ["second", "third"]
    async with gate.closing() as runs:  # after it: at once
        assert not runs


def test_a_close_from_another_event_loop_is_woken_when_the_first_ends() -> None:
    gate = CloseGate()
    inside, release = threading.Event(), threading.Event()

    async def first() -> None:
        async with gate.closing() as runs:
            assert runs
            inside.set()
            await anyio.to_thread.run_sync(release.wait, 10)

    async def second() -> bool:
        await anyio.to_thread.run_sync(inside.wait, 10)
        threading.Timer(0.05, release.set).start()
        async with gate.closing() as runs:
            return not runs and release.is_set()

    with anyio.from_thread.start_blocking_portal() as portal:
        running = portal.start_task_soon(first)
        assert anyio.run(second)
        running.result(timeout=10)
