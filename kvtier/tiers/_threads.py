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
import contextlib
import math
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar, TypeVarTuple, Unpack

import anyio
import anyio.lowlevel
import anyio.to_thread

from kvtier.log import get_logger

__all__ = ["ThreadEvent", "run_to_end"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
_log = get_logger("kvtier.tiers")
_UNBOUNDED = anyio.CapacityLimiter(math.inf)  # the caller holds its own limiter's token


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: anyio's shields stop every cancellation there
        return False
    return True


class ThreadEvent:
    """An event set from any thread and awaited from any event loop, with no thread.

    :meth:`wait` holds every cancellation until the event is set, then raises
    the last one: the waits it serves (a close waiting for the copies in
    flight) must never end early.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._event = threading.Event()  # for a thread, and for trio
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._set

    def set(self) -> None:
        """Set the event and wake every waiter, on its own loop."""
        with self._lock:
            self._set = True
            waiters, self._waiters = self._waiters, []
        self._event.set()
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_wake, future)

    async def wait(self) -> None:
        """Wait until set; a cancellation meanwhile is raised once it is."""
        if self._set:
            return
        if not _on_asyncio():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._event.wait)
            return
        loop = asyncio.get_running_loop()
        cancel: BaseException | None = None
        with anyio.CancelScope(shield=True):  # anyio's own wait for the scope's end
            while True:
                with self._lock:
                    if self.is_set():  # (set by another thread meanwhile)
                        break
                    future: asyncio.Future[None] = loop.create_future()
                    self._waiters.append((loop, future))
                try:
                    await future
                except asyncio.CancelledError as exc:  # asyncio's own: held until set
                    cancel = exc
                    with self._lock, contextlib.suppress(ValueError):  # (already woken)
                        self._waiters.remove((loop, future))
        if cancel is not None:
            raise cancel


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Call(Generic[T]):
    """One call of ``func`` in a worker thread, which may be abandoned before it starts.

    Once the thread has started it (``running``), it runs to its end
    (``ended`` is set); abandoned before, it never starts.
    """

    def __init__(self, func: Callable[[], T]) -> None:
        self._func = func
        self._lock = threading.Lock()
        self._abandoned = False
        self.running = False
        self.ended = ThreadEvent()
        self.result: T | None = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        with self._lock:
            if self._abandoned:
                return
            self.running = True
        try:
            self.result = self._func()
        except BaseException as exc:  # handed to the caller, whatever it is
            self.error = exc
        finally:
            self.ended.set()

    def abandon(self) -> bool:
        """Keep the call from starting; False when it has started already."""
        with self._lock:
            self._abandoned = not self.running
            return self._abandoned

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


async def run_to_end(
    func: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    limiter: anyio.CapacityLimiter | None = None,
    undo: Callable[[T], object] | None = None,
    must_run: bool = False,
    executor: Executor | None = None,
) -> T:
    """``func(*args)`` in a worker thread; its result (or error) once the thread has ended.

    The thread holds a token of ``limiter`` (if given) from before it
    starts until ``func`` has ended. A caller cancelled before ``func``
    starts is cancelled at once and ``func`` never runs. Once ``func`` has
    started it always ends first: anyio's cancellation is then delivered at
    the caller's next await, as anyio does (the caller gets the result and
    may record it); asyncio's own is raised as soon as ``func`` has ended
    (so that ``asyncio.timeout`` turns it into its ``TimeoutError``), after
    ``undo(result)`` (called on the event loop's thread; an error is
    logged) has released what the call made, which no caller will record.

    ``must_run`` (cleanup: an unpin, a stream drain) hands ``func`` to
    ``executor`` (asyncio's default executor when None) at once, outside any
    limiter, and waits for it whatever cancels the caller, which then gets
    the cancellation. A caller that may queue many such calls, or calls that
    may hang (deletes on a stuck network file system), passes an executor of
    its own, so they neither starve nor wait behind other users of the
    default one.
    """
    if not _on_asyncio():
        if not must_run:
            return await anyio.to_thread.run_sync(func, *args, limiter=limiter)
        with anyio.CancelScope(shield=True):
            return await anyio.to_thread.run_sync(func, *args)
    call = _Call(lambda: func(*args))
    if must_run:
        asyncio.get_running_loop().run_in_executor(executor, call)  # no await before it starts
        cancel: BaseException | None = await _wait_held(call.ended)
    else:
        await anyio.lowlevel.checkpoint_if_cancelled()
        ran, cancel = await _attempt(call, limiter)
        if not ran and cancel is not None:
            raise cancel  # it never started, and now never will
    if cancel is None:
        return call.outcome()
    if call.error is None and undo is not None:
        try:
            undo(call.result)  # type: ignore[arg-type]
        except Exception as exc:  # the caller's cancellation is what it must see
            _log.warning("tier_undo_failed", undo=repr(undo), error=repr(exc))
    raise cancel


async def _wait_held(event: ThreadEvent) -> BaseException | None:
    """Wait for ``event`` to its end; asyncio's cancellation meanwhile, returned, not raised."""
    try:
        await event.wait()
    except asyncio.CancelledError as exc:
        return exc
    return None


async def _attempt(
    call: _Call[T], limiter: anyio.CapacityLimiter | None
) -> tuple[bool, BaseException | None]:
    """Run ``call`` once: (whether it ran, asyncio's own cancellation meanwhile).

    It did not run when that cancellation came before its thread started.
    ``limiter`` None: anyio's default limiter, whose token anyio holds (a
    cancelled caller's may go back before its thread ends: the default
    limiter bounds nothing of the tiers').
    """
    if limiter is not None:  # held here, until the call ends (anyio's would go back early)
        await limiter.acquire_on_behalf_of(call)  # cancelled here: nothing started
    cancel: BaseException | None = None
    try:
        try:  # anyio's run_sync waits for its thread under anyio's own cancellation
            await anyio.to_thread.run_sync(call, limiter=None if limiter is None else _UNBOUNDED)
        except asyncio.CancelledError as exc:  # asyncio's own: the thread may run on
            if call.abandon():
                return False, exc
            cancel = await _wait_held(call.ended) or exc
    finally:
        if limiter is not None:
            limiter.release_on_behalf_of(call)
    return True, cancel
