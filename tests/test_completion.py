"""Completion: resolves once, awaits, runs callbacks."""

from __future__ import annotations

import logging

import anyio
import pytest
import structlog

from kvtier.completion import Completion, CompletionState
from kvtier.errors import KVTierError, TierIOError, TransferCancelledError


@pytest.mark.asyncio
async def test_result_resolves_once_and_wakes_waiters() -> None:
    completion: Completion[int] = Completion("c")
    seen: list[int] = []

    async def waiter() -> None:
        seen.append(await completion)

    async with anyio.create_task_group() as group:
        group.start_soon(waiter)
        group.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not completion.done()
        with pytest.raises(KVTierError, match="not resolved"):
            completion.result()
        assert completion.set_result(7)
        assert not completion.set_result(8)
        assert not completion.set_error(RuntimeError())
        assert not completion.set_cancelled()
    assert seen == [7, 7]
    assert completion.state is CompletionState.DONE
    assert completion.exception() is None
    assert "done" in repr(completion)


@pytest.mark.asyncio
async def test_failure_and_cancellation() -> None:
    failed: Completion[int] = Completion("f")
    failed.set_error(TierIOError("disk gone", tier="disk"))
    with pytest.raises(TierIOError, match="disk gone"):
        await failed
    assert isinstance(failed.exception(), TierIOError)

    cancelled: Completion[int] = Completion("x")
    cancelled.set_cancelled()
    assert cancelled.cancelled()
    with pytest.raises(TransferCancelledError, match="x was cancelled"):
        await cancelled.wait()


@pytest.mark.asyncio
async def test_callbacks_run_once_in_order_even_when_one_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    structlog.reset_defaults()
    completion: Completion[str] = Completion("cb")
    calls: list[str] = []

    def broken(_: Completion[str]) -> None:
        raise ValueError("bug in a callback")

    completion.add_done_callback(lambda c: calls.append(f"first:{c.result()}"))
    completion.add_done_callback(broken)
    completion.add_done_callback(lambda c: calls.append("second"))
    with caplog.at_level(logging.ERROR, logger="kvtier"):
        completion.set_result("ok")
    completion.add_done_callback(lambda c: calls.append("late"))  # already done: runs now
    assert calls == ["first:ok", "second", "late"]
    assert any("completion_callback_failed" in r.getMessage() for r in caplog.records)
    structlog.reset_defaults()


def test_a_keyboard_interrupt_in_a_callback_is_raised_after_the_others_ran() -> None:
    completion: Completion[str] = Completion("cb")
    calls: list[str] = []

    def interrupt(_: Completion[str]) -> None:
        calls.append("interrupt")
        raise KeyboardInterrupt

    completion.add_done_callback(interrupt)
    completion.add_done_callback(lambda c: calls.append(f"cleanup:{c.result()}"))
    with pytest.raises(KeyboardInterrupt):
        completion.set_result("ok")
    assert calls == ["interrupt", "cleanup:ok"]
    assert completion.result() == "ok"


def test_a_second_base_exception_from_the_callbacks_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    structlog.reset_defaults()
    completion: Completion[str] = Completion("cb")

    def interrupt(_: Completion[str]) -> None:
        raise KeyboardInterrupt("first")

    def exit_(_: Completion[str]) -> None:
        raise SystemExit("second")

    completion.add_done_callback(interrupt)
    completion.add_done_callback(exit_)
    with caplog.at_level(logging.ERROR, logger="kvtier"), pytest.raises(KeyboardInterrupt):
        completion.set_result("ok")
    assert any("second" in r.getMessage() for r in caplog.records)
    structlog.reset_defaults()


@pytest.mark.asyncio
async def test_awaiting_a_failed_completion_again_does_not_grow_its_traceback() -> None:
    """Each await re-raises the error: it must not keep every awaiter's frames."""
    completion: Completion[int] = Completion("c")
    try:
        raise TierIOError("disk gone")
    except TierIOError as exc:
        completion.set_error(exc)
    sizes = []
    for _ in range(50):
        with pytest.raises(TierIOError) as info:
            await completion
        sizes.append(len(info.traceback))
    assert len(set(sizes)) == 1


@pytest.mark.asyncio
async def test_a_callback_raising_cancelled_error_is_logged_and_the_pipeline_keeps_serving() -> (
    None
):
    """A synchronous callback that reads a cancelled future must not stop the worker."""
    import asyncio

    from kvtier.transfer import StoreTask, TransferPipeline
    from tests.test_transfer import fill, keys_for
    from tests.tier_doubles import MemoryStore

    device, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    keys = keys_for(0, 1)
    fill(device, [0, 1], keys)
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()
    reached = False
    with structlog.testing.capture_logs() as logs:
        async with TransferPipeline() as pipeline:
            first = pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys[:1]))
            first.add_done_callback(lambda _: cancelled.result())
            await first
            second = await pipeline.submit(StoreTask(device, [1], cpu, [1], keys[1:]))
            assert (await second).n_blocks == 1
            reached = True
    assert reached
    assert "completion_callback_failed" in [entry["event"] for entry in logs]
