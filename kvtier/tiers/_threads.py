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
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.lowlevel
import anyio.to_thread

from kvtier.log import get_logger

__all__ = ["run_to_end"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
_log = get_logger("kvtier.tiers")


class _Call(Generic[T]):
    """One call of ``func`` in a worker thread that its caller may abandon before it starts.

    Once the thread has started it (``running``), the call always runs to
    its end (``ended`` is set); abandoned before, it never starts.
    """

    def __init__(self, func: Callable[[], T]) -> None:
        self._func = func
        self._lock = threading.Lock()
        self._abandoned = False
        self.running = False
        self.ended = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def __call__(self) -> T:
        with self._lock:
            if self._abandoned:
                raise asyncio.CancelledError  # never reported: its caller has gone
            self.running = True
        try:
            self.result = self._func()
            return self.result
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ended.set()

    def abandon(self) -> bool:
        """Keep the call from starting; False when it has started already."""
        with self._lock:
            self._abandoned = not self.running
            return self._abandoned


async def run_to_end(
    func: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    limiter: anyio.CapacityLimiter | None = None,
    undo: Callable[[T], object] | None = None,
) -> T:
    """``func(*args)`` in a worker thread; its result (or error) once the thread has ended.

    A caller already cancelled when it calls is cancelled at once (the
    thread never starts), and so is one cancelled while it waits for a
    thread. Once ``func`` has started it always ends first: anyio's
    cancellation is then delivered at the caller's next await, as anyio
    does (the caller gets the result and may record it); asyncio's own is
    raised as soon as ``func`` has ended (so that ``asyncio.timeout`` turns
    it into its ``TimeoutError``), after ``undo(result)`` (in a worker
    thread too) has released what the call made, which no caller will
    record.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    try:
        asyncio.current_task()
    except RuntimeError:  # not asyncio (trio): anyio's own shield is enough there
        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)
    call = _Call(lambda: func(*args))
    try:  # anyio's run_sync waits for its thread under anyio's own cancellation
        return await anyio.to_thread.run_sync(call, limiter=limiter)
    except asyncio.CancelledError as exc:
        if call.ended.is_set() and call.error is exc:
            raise  # func itself raised it: passed on as raised
        cancel = exc  # asyncio's own: the await ended, the thread may not have
    if call.abandon():
        raise cancel  # it never started, and now never will
    while not call.ended.is_set():  # each wait's thread ends when the call does
        try:
            await anyio.to_thread.run_sync(call.ended.wait)
        except asyncio.CancelledError as again:
            cancel = again
    if call.error is None and undo is not None:
        with anyio.CancelScope(shield=True):  # an anyio cancellation must not skip it
            await _undo(undo, call.result)  # type: ignore[arg-type]
    raise cancel


async def _undo(undo: Callable[[T], object], result: T) -> None:
    """``undo(result)`` in a worker thread, run to its end; an error is logged, not raised."""
    try:
        await run_to_end(undo, result)
    except Exception as exc:  # the caller's cancellation is what it must see
        _log.warning("tier_undo_failed", undo=repr(undo), error=repr(exc))
