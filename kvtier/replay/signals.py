"""Running a replay so that SIGINT and SIGTERM cancel it cleanly.

A signal turned into ``KeyboardInterrupt`` lands at whatever bytecode runs
then: between ``mkdtemp`` and the registration of its cleanup (a stranded
temporary directory), inside :mod:`tempfile`'s first probe of the directory
(a stray file), or inside a finalizer, where Python ignores it and the run
carries on. :func:`run_cancellable` instead receives the signals on the event
loop (:func:`anyio.open_signal_receiver`, installed before the work starts)
and cancels the work through anyio: it unwinds at an await, waits for its
worker threads, closes its tiers and removes its temporary files, and only
then does the call raise ``KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

__all__ = ["run_cancellable"]

T = TypeVar("T")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_cancellable(work: Callable[[], Awaitable[T]]) -> T:
    """``anyio.run(work)``, cancelled through anyio by SIGINT or SIGTERM.

    The handlers the caller had for both signals are in place again when
    this returns (the event loop resets them to the defaults when it stops
    receiving, so a second signal in that instant, after the work has
    unwound, takes the default action).

    Raises:
        KeyboardInterrupt: A signal cancelled the work (after it unwound).
    """
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    try:
        return anyio.run(_cancel_on_signal, work)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _cancel_on_signal(work: Callable[[], Awaitable[T]]) -> T:
    interrupted = False
    results: list[T] = []
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(*_SIGNALS) as signals:
                task_status.started()
                async for _ in signals:
                    interrupted = True
                    group.cancel_scope.cancel()
                    return

        await group.start(watch)  # receiving before the work's first line runs
        try:
            results.append(await work())
        except Exception as exc:  # raised as itself below, not in the group's ExceptionGroup
            error = exc
        group.cancel_scope.cancel()  # done: stop watching
    if interrupted:
        raise KeyboardInterrupt
    if error is not None:
        raise error
    return results[0]
