"""run_cancellable: SIGINT and SIGTERM cancel the work through anyio, then interrupt."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import anyio
import pytest

from kvtier.replay.signals import run_cancellable


@pytest.fixture
def sentinel_handlers() -> Iterator[None]:
    """Handlers of the test's own for both signals (checked to be back afterwards)."""

    def ignore(signum: int, frame: object) -> None:
        raise AssertionError(f"signal {signum} reached the caller's handler")

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, ignore)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_the_work_s_result_comes_back_and_the_handlers_too(sentinel_handlers: None) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    async def work() -> int:
        await anyio.sleep(0)
        return 42

    assert run_cancellable(work) == 42
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("when", ["awaiting", "before the first await"])
def test_a_signal_cancels_the_work_which_cleans_up_before_the_interrupt(
    sentinel_handlers: None, signum: int, when: str
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    events: list[str] = []

    async def work() -> None:
        try:
            if when == "before the first await":
                os.kill(os.getpid(), signum)  # arrives during synchronous code
                events.append("synchronous code ran on")
            else:  # arrives while the work waits for a worker thread
                await anyio.to_thread.run_sync(lambda: os.kill(os.getpid(), signum))
            await anyio.sleep(30)
            events.append("not cancelled")
        finally:
            events.append("cleaned up")

    with pytest.raises(KeyboardInterrupt):
        run_cancellable(work)
    expected = ["cleaned up"]
    if when == "before the first await":
        expected.insert(0, "synchronous code ran on")
    assert events == expected
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_work_s_error_comes_back_as_itself(sentinel_handlers: None) -> None:
    async def work() -> None:
        await anyio.sleep(0)
        raise LookupError("no such trace")

    with pytest.raises(LookupError, match="no such trace"):
        run_cancellable(work)
