"""One close at a time for a tier's ``aclose``, the later calls waiting for the first."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kvtier.tiers._threads import ThreadEvent

__all__ = ["CloseGate"]


class CloseGate:
    """Lets the first ``aclose`` run; later ones wait (shielded) until it has finished.

    A thread's event, not an anyio one: a second close may come from another
    event loop than the first's (an engine's loop while the offload runtime's
    portal closes the tier), and an anyio event wakes only the loop that
    waits on it first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # two closes on two loops' threads
        self._done: ThreadEvent | None = None

    @property
    def started(self) -> bool:
        """Some ``aclose`` has begun."""
        return self._done is not None

    @asynccontextmanager
    async def closing(self) -> AsyncIterator[bool]:
        """Yield True to the first caller (its close runs in the block), False to the others.

        The others have waited, shielded from cancellation, until the first
        left the block (whichever way it left).
        """
        with self._lock:
            done = self._done
            first = done is None
            if done is None:
                done = self._done = ThreadEvent()
        if not first:
            await done.wait()  # to its end, whatever cancels it
            yield False
            return
        try:
            yield True
        finally:
            done.set()
