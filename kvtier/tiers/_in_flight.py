"""A count of a tier's operations in progress that a close can wait on from any event loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread

__all__ = ["InFlight"]


class InFlight:
    """Counts operations in progress; :meth:`wait_idle` returns once none is.

    A thread's lock and event, not an anyio event: the operations may run on
    one event loop (the offload runtime's) while the close that waits for
    them runs on another (the engine's), and an anyio event set from another
    thread does not wake the loop that waits on it.
    """

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def __len__(self) -> int:
        """Operations in progress now."""
        return self._count

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count one operation while the block runs."""
        with self._lock:
            self._count += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if not self._count:
                    self._idle.set()

    async def wait_idle(self) -> None:
        """Wait, without blocking the event loop, until no operation is in progress.

        Not shielded: callers that must not be cancelled here shield it.
        """
        while not self._idle.is_set():
            await anyio.to_thread.run_sync(self._idle.wait, abandon_on_cancel=True)
