"""The offload manager's lifecycle: entered once, with ``async with`` or ``with``.

A base of :class:`~kvtier.offload.manager.OffloadManager`, beside
:class:`~kvtier.offload.waits.TransferWaits` and
:class:`~kvtier.offload.views.ManagerViews`. ``async with`` serves the
session (:func:`kvtier.offload.session.serve`) on the caller's event loop;
``with`` serves it on a background loop thread whose copies are ordered after
the engine thread's current CUDA streams. Either way, once the jobs ended,
:func:`kvtier.offload.session.release_all` settles what never finished.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Self

from kvtier.errors import InvalidRequestError
from kvtier.offload import session
from kvtier.offload.reset import ResetsRunning
from kvtier.offload.runtime import current_streams
from kvtier.offload.transfers import Transfers
from kvtier.tiers.base import BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline

__all__ = ["ManagerLifecycle"]


class ManagerLifecycle:
    """Entering and leaving an offload manager (not constructed on its own).

    :class:`~kvtier.offload.manager.OffloadManager` sets the state these use.
    """

    device: BlockStore
    tiers: list[BlockStore]
    indexes: list[TierIndex]
    flush_on_close: bool
    _pipeline: TransferPipeline
    _transfers: Transfers
    _failed: bool  # a synchronous engine left by an error: no flush
    _entered: bool
    _session: AbstractAsyncContextManager[None]
    _resets: ResetsRunning

    def _serve(self) -> AbstractAsyncContextManager[None]:
        return session.serve(
            self.device,
            self.tiers,
            self.indexes,
            self._pipeline,
            self._transfers,
            flush_on_close=lambda: self.flush_on_close and not self._failed,
        )

    def _enter(self) -> None:
        if self._entered:
            raise InvalidRequestError("an OffloadManager can be entered once")
        self._entered = True

    async def __aenter__(self) -> Self:
        self._enter()
        tiers = [self.device, *self.tiers]
        self._transfers.runtime.follow_streams(lambda: current_streams(tiers))
        self._session = self._serve()
        await self._session.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Wait for the jobs, flush if configured, close the pipeline and the tiers.

        An exception raised in the body comes out as raised (the manager's
        task group would wrap it in an exception group): an engine's
        ``except InvalidRequestError`` around its loop still matches.
        """
        try:
            await self._resets.wait()  # a reset's deletes, from another task, end first
            return await self._session.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and _wraps(group, exc):
                return False  # the body's own exception goes on, unwrapped
            raise
        finally:
            session.release_all(self._transfers)

    def __enter__(self) -> Self:
        self._enter()
        tiers = [self.device, *self.tiers]
        self._transfers.runtime.start_thread(self._serve, lambda: current_streams(tiers))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._failed = exc_type is not None  # the background loop only sees a clean exit
        try:
            self._transfers.runtime.stop_thread()
        finally:
            session.release_all(self._transfers)


def _wraps(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether ``group`` only wraps ``exc`` (through groups of one; ``exc`` may be a group)."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if inner is exc:
            return True
        if not isinstance(inner, BaseExceptionGroup):
            return False
        group = inner
    return False
