"""One open at a time for a tier's ``__aenter__``, concurrent entrants waiting for it."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread

__all__ = ["OpenGate"]


class OpenGate:
    """Lets one ``__aenter__`` open a tier while the others wait for it.

    A thread's event, as :class:`~kvtier.tiers._close_gate.CloseGate` uses:
    two entrants may come from different event loops.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy: threading.Event | None = None

    async def once(self, settled: Callable[[], bool], open_: Callable[[], Awaitable[None]]) -> None:
        """Run ``open_`` unless ``settled()`` (open, or closed); concurrent callers wait for it.

        A waiter is woken when the open ends, whichever way: after a failed
        one it takes its own turn (and gets its own error, or succeeds).
        Waiting can be cancelled; the open it waited for goes on.

        Raises:
            Exception: What ``open_`` raised, to the caller that ran it.
        """
        while not settled():
            with self._mutex:
                busy = self._busy
                if busy is None:
                    self._busy = threading.Event()
            if busy is not None:  # its own thread token: waiters never starve the open's thread
                await anyio.to_thread.run_sync(
                    busy.wait, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
                )
                continue
            try:
                if not settled():
                    await open_()
            finally:
                with self._mutex:
                    busy, self._busy = self._busy, None
                if busy is not None:
                    busy.set()
