"""FairSender: the send side of a bounded queue, served first come, first served.

The transfer pipeline's queues are anyio memory-object streams. Their own
``send`` is not used: a sender cancelled while it waits for room can be woken
by a receiver that took its item in the same loop tick and still see the
cancellation, so a cancelled submit would say "nothing queued" of a task
that runs (its caller then aborts the reservation and reuses the slot the
copy writes into). Here an item enters the queue only through
``send_nowait``, after the sender's last await, and the senders waiting for
room queue in a deque: each take wakes one per free place not already
promised to a woken sender (waking them all cost O(W²) wakeups for W
waiting senders), a woken sender that is cancelled passes its place on, and
newcomers, ``send_nowait`` included, queue behind them.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["FairSender"]

T = TypeVar("T")


class FairSender(Generic[T]):
    """First-come-first-served sends into ``stream``, a bounded memory-object stream.

    The receiving side calls :meth:`took` after it takes items and
    :meth:`broken` when it stops receiving; :meth:`close` closes the stream.
    """

    def __init__(self, stream: MemoryObjectSendStream[T]) -> None:
        self._stream = stream
        self._waiting: deque[anyio.Event] = deque()
        # Senders woken for a free place that have not taken it yet.
        self._promised = 0
        self._closed = False

    async def send(self, item: T) -> None:
        """Queue ``item``, waiting for room; when it raises, nothing was queued.

        Raises:
            anyio.ClosedResourceError: :meth:`close` was called.
            anyio.BrokenResourceError: The receiving side is gone.
        """
        await anyio.lowlevel.checkpoint()
        waiting = self._waiting
        if self._closed or not (waiting or self._promised):
            try:  # (closed: this raises, where waiting would wait for no one)
                self._stream.send_nowait(item)
                return
            except anyio.WouldBlock:
                pass
        first = False  # woken but beaten to the place: first in line again
        while True:
            turn = anyio.Event()
            if first:
                waiting.appendleft(turn)
            else:
                waiting.append(turn)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():  # woken for a place it will not take: pass it on
                    self._promised -= 1
                    self._wake(1)
                else:
                    waiting.remove(turn)
                raise
            self._promised -= 1
            try:
                self._stream.send_nowait(item)
            except anyio.WouldBlock:
                first = True
                continue
            except BaseException:  # closed or broken: those queued behind must see it too
                self._wake()
                raise
            self.took()  # room left (a take freed several places): the next
            return

    def send_nowait(self, item: T) -> None:
        """Queue ``item`` or fail at once.

        Raises:
            anyio.WouldBlock: The queue is full, or senders wait for room
                (they come first).
            anyio.ClosedResourceError: :meth:`close` was called.
            anyio.BrokenResourceError: The receiving side is gone.
        """
        if (self._waiting or self._promised) and not self._closed:
            raise anyio.WouldBlock  # the free places are the waiting senders'
        self._stream.send_nowait(item)

    def took(self) -> None:
        """Items were taken from the queue: wake a waiting sender per free place."""
        if self._waiting:
            room = self._stream.statistics()
            free = int(room.max_buffer_size) - room.current_buffer_used
            self._wake(free - self._promised)

    def broken(self) -> None:
        """The receiving side stopped: the waiting senders find out."""
        self._wake()

    def close(self) -> None:
        """Close the stream; the waiting senders find out (``ClosedResourceError``)."""
        self._closed = True
        self._stream.close()
        self._wake()

    def _wake(self, count: int | None = None) -> None:
        """Wake the first ``count`` waiting senders (None: all)."""
        waiting = self._waiting
        if count is None:
            count = len(waiting)
        while count > 0 and waiting:
            waiting.popleft().set()
            self._promised += 1
            count -= 1
