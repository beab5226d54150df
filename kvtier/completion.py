"""Completion: the awaitable outcome of one transfer.

A completion resolves exactly once: with a result, with an error, or as
cancelled. ``await completion`` returns the result or raises (a cancelled one
raises :class:`~kvtier.errors.TransferCancelledError`). Callbacks added with
:meth:`Completion.add_done_callback` run synchronously when it resolves (or at
once if it already has): that is how an offload manager releases a request's
blocks after its last transfer. Completions are created and resolved on the
event loop that runs the pipeline.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio

from kvtier.errors import KVTierError, TransferCancelledError
from kvtier.log import get_logger

__all__ = ["Completion", "CompletionState"]

T = TypeVar("T")
_log = get_logger("kvtier.completion")


class CompletionState(enum.Enum):
    """Where a completion stands."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Completion(Generic[T]):
    """The outcome of one asynchronous operation, resolved exactly once.

    Args:
        name: Identifies the operation in logs and reprs.
    """

    __slots__ = ("_callbacks", "_error", "_event", "_result", "_state", "_traceback", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._state = CompletionState.PENDING
        self._result: T | None = None
        self._error: BaseException | None = None
        self._traceback: TracebackType | None = None
        self._event = anyio.Event()
        self._callbacks: list[Callable[[Completion[T]], object]] = []

    def __repr__(self) -> str:
        return f"Completion({self.name!r}, {self._state.value})"

    @property
    def state(self) -> CompletionState:
        """The current state."""
        return self._state

    def done(self) -> bool:
        """True once resolved, whichever way."""
        return self._state is not CompletionState.PENDING

    def cancelled(self) -> bool:
        """True when resolved as cancelled."""
        return self._state is CompletionState.CANCELLED

    def result(self) -> T:
        """The result of a completion that is done.

        Raises:
            KVTierError: It is still pending.
            TransferCancelledError: It was cancelled.
            BaseException: The error it failed with.
        """
        if self._state is CompletionState.DONE:
            return self._result  # type: ignore[return-value]
        if self._state is CompletionState.PENDING:
            raise KVTierError(f"{self!r} is not resolved yet")
        if self._state is CompletionState.CANCELLED:
            raise TransferCancelledError(f"{self.name} was cancelled")
        # Raised with the traceback it failed with: raising the same object
        # again would add each awaiter's frames to it, for ever.
        raise self._error.with_traceback(self._traceback)  # type: ignore[union-attr]

    def exception(self) -> BaseException | None:
        """The error of a failed completion, else ``None``."""
        return self._error if self._state is CompletionState.FAILED else None

    async def wait(self) -> T:
        """Wait until resolved; return the result or raise as :meth:`result`."""
        await self._event.wait()
        return self.result()

    async def settled(self) -> None:
        """Wait until resolved, whichever way, without raising its error."""
        await self._event.wait()

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait().__await__()

    def add_done_callback(self, callback: Callable[[Completion[T]], object]) -> None:
        """Call ``callback(self)`` when resolved (now, if it already is).

        A callback that raises an ``Exception`` (or asyncio's
        ``CancelledError``, which a synchronous callback raises only by
        mistake, say reading a cancelled future) is logged and does not stop
        the others. One that raises another ``BaseException`` (such as
        ``KeyboardInterrupt``) does not stop them either: the first such
        error is raised again once every callback has run, so no cleanup
        is skipped on the way out.
        """
        if self.done():
            self._run(callback)
        else:
            self._callbacks.append(callback)

    # -- resolution (by the owner of the operation) -------------------------------

    def set_result(self, result: T) -> bool:
        """Resolve with ``result``; False (and no change) if already resolved."""
        if self.done():
            return False
        self._result = result
        return self._resolve(CompletionState.DONE)

    def set_error(self, error: BaseException) -> bool:
        """Resolve as failed; False (and no change) if already resolved."""
        if self.done():
            return False
        self._error = error
        self._traceback = error.__traceback__
        return self._resolve(CompletionState.FAILED)

    def set_cancelled(self) -> bool:
        """Resolve as cancelled; False (and no change) if already resolved."""
        if self.done():
            return False
        return self._resolve(CompletionState.CANCELLED)

    def _resolve(self, state: CompletionState) -> bool:
        self._state = state
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        interrupt: BaseException | None = None
        for callback in callbacks:
            try:
                self._run(callback)
            except BaseException as exc:  # KeyboardInterrupt and kin: after the rest
                if interrupt is None:
                    interrupt = exc
                else:  # only the first is raised: the others are logged
                    _log.error("completion_callback_failed", completion=self.name, error=repr(exc))
        if interrupt is not None:
            raise interrupt
        return True

    def _run(self, callback: Callable[[Completion[T]], object]) -> None:
        try:
            callback(self)
        # A callback's bug must not break the pipeline. A synchronous callback
        # is never cancelled itself: a CancelledError out of it is a bug too
        # (it read a cancelled future), and passed on it would stop the worker
        # that resolved this completion as though the pipeline were cancelled.
        except (Exception, asyncio.CancelledError) as exc:
            _log.error("completion_callback_failed", completion=self.name, error=repr(exc))
