"""FairSender on its own: first come first served, places passed on, close and broken ends."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from kvtier.fair_send import FairSender


def queue(size: int) -> tuple[FairSender[int], anyio.abc.ObjectReceiveStream[int]]:
    send, receive = anyio.create_memory_object_stream[int](size)
    return FairSender(send), receive


@pytest.mark.asyncio
async def test_waiting_senders_are_served_in_order_and_newcomers_queue_behind() -> None:
    sender, receive = queue(1)
    sender.send_nowait(0)  # full
    got = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            for i in range(1, 5):
                group.start_soon(sender.send, i)
                await anyio.wait_all_tasks_blocked()
            for _ in range(4):  # four senders wait
                got.append(receive.receive_nowait())
                with pytest.raises(anyio.WouldBlock):  # the freed place is a waiting sender's
                    sender.send_nowait(99)
                sender.took()
                await anyio.wait_all_tasks_blocked()
            got.append(receive.receive_nowait())
    assert got == [0, 1, 2, 3, 4]
    sender.send_nowait(5)  # nobody waits: a free place is anyone's
    assert receive.receive_nowait() == 5
    sender.close()
    receive.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("when", ["waiting", "woken"])
async def test_a_cancelled_sender_queues_nothing_and_the_next_gets_the_place(when: str) -> None:
    """Cancelled while it waits, or after it was woken but before it ran (then its place
    passes on to the next sender)."""
    sender, receive = queue(1)
    sender.send_nowait(0)
    tasks: dict[str, asyncio.Task[None]] = {}
    outcome: dict[str, str] = {}

    async def send(name: str, item: int) -> None:
        tasks[name] = asyncio.current_task()  # type: ignore[assignment]
        try:
            await sender.send(item)
            outcome[name] = "queued"
        except asyncio.CancelledError:
            outcome[name] = "cancelled"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(send, "first", 1)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(send, "second", 2)
            await anyio.wait_all_tasks_blocked()
            assert receive.receive_nowait() == 0
            if when == "waiting":
                tasks["first"].cancel()
                await anyio.wait_all_tasks_blocked()
                sender.took()
            else:
                sender.took()  # wakes the first...
                tasks["first"].cancel()  # ...which is cancelled before it runs
    assert outcome == {"first": "cancelled", "second": "queued"}
    assert receive.receive_nowait() == 2  # nothing of the first was queued
    with pytest.raises(anyio.WouldBlock):
        receive.receive_nowait()
    sender.close()
    receive.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["close", "broken"])
async def test_closing_or_a_gone_receiver_ends_every_waiting_sender(end: str) -> None:
    sender, receive = queue(1)
    sender.send_nowait(0)
    errors: list[type[BaseException]] = []

    async def waiter(i: int) -> None:
        try:
            await sender.send(i)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            errors.append(type(exc))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            for i in range(1, 4):
                group.start_soon(waiter, i)
            await anyio.wait_all_tasks_blocked()
            if end == "close":
                sender.close()
            else:
                receive.close()
                sender.broken()
    expected = anyio.ClosedResourceError if end == "close" else anyio.BrokenResourceError
    assert errors == [expected] * 3
    sender.close()
    receive.close()
