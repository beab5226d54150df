"""Worker-thread calls that have ended before their caller goes on, whatever cancelled it.

anyio's :func:`anyio.to_thread.run_sync` waits for its thread when the
caller's cancel scope is cancelled, and the cancellation lands at the
caller's next await: the tiers rely on that (a copy in a worker thread
reads and writes the tier's memory, the caller's buffer or the tier's
files). A plain asyncio cancellation does not wait: ``task.cancel()``, or an
engine's ``asyncio.wait_for`` / ``asyncio.timeout`` around a tier call, ends
the await while the thread goes on, so a close could free memory, release a
directory or forget keys under it. :func:`run_to_end` treats both kinds
alike: the thread ends, its result is returned, and the cancellation is
raised at the caller's next await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.lowlevel
import anyio.to_thread

__all__ = ["run_to_end"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_to_end(
    func: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    limiter: anyio.CapacityLimiter | None = None,
    undo: Callable[[T], object] | None = None,
) -> T:
    """``func(*args)`` in a worker thread; its result (or error) once the thread has ended.

    A caller already cancelled when it calls is cancelled at once (the
    thread never starts). Once the thread has started it always ends first:
    anyio's cancellation is then delivered at the caller's next await, as
    anyio does (the caller gets the result and may record it); asyncio's
    own is raised as soon as the thread has ended (so that
    ``asyncio.timeout`` turns it into its ``TimeoutError``), after
    ``undo(result)`` (in a worker thread too) has released what the call
    made, which no caller will record.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not asyncio (trio): anyio's own shield is enough there
        task = None
    if task is None:
        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)
    call = asyncio.ensure_future(anyio.to_thread.run_sync(func, *args, limiter=limiter))
    cancel: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):  # anyio's cancellations wait for the scope's end
        while not call.done():
            try:
                await asyncio.wait((call,))
            except asyncio.CancelledError as exc:  # asyncio's own: held while the thread runs
                cancel = exc
        made = not call.cancelled() and call.exception() is None
        if cancel is not None and made and undo is not None:
            await run_to_end(undo, call.result())
    if cancel is not None:
        raise cancel
    return call.result()
