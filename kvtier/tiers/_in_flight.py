"""A count of a tier's operations in progress that a close can wait on from any event loop."""

from __future__ import annotations

import threading
from types import TracebackType

from kvtier.tiers._threads import ThreadEvent

__all__ = ["InFlight"]


class InFlight:
    """Counts operations in progress (``with in_flight:``); :meth:`wait_idle` returns once none is.

    A thread's lock and event, not an anyio event: the operations may run on
    one event loop (the offload runtime's) while the close that waits for
    them runs on another (the engine's), and an anyio event set from another
    thread does not wake the loop that waits on it. The event is made only
    when someone waits: counting costs two lock round trips.
    """

    __slots__ = ("_count", "_idle", "_lock")

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._idle: ThreadEvent | None = None  # made by a waiter, set at count 0

    def __len__(self) -> int:
        """Operations in progress now."""
        return self._count

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._count -= 1
            if not self._count and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        """Wait, without blocking the event loop, until no operation is in progress.

        The wait runs to its end even when cancelled, by anyio or by asyncio
        itself (the cancellation is raised afterwards, see
        :class:`~kvtier.tiers._threads.ThreadEvent`): callers are closes,
        which must not let go of memory or files an operation still uses.
        """
        while True:
            with self._lock:
                if not self._count:
                    return
                if self._idle is None:
                    self._idle = ThreadEvent()
                idle = self._idle
            await idle.wait()
