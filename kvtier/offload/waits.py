"""The offload manager's waits: until a request's loads, or every transfer, ended.

A base of :class:`~kvtier.offload.manager.OffloadManager` (its engine-facing
waits, async and blocking), apart from the planning, and the two loops they
run (:func:`wait_async`, :func:`wait_blocking`): apply the jobs' outcomes as
they come until a condition holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from kvtier.errors import ClosedError
from kvtier.offload._state import RequestState
from kvtier.offload.transfers import Transfers

__all__ = ["TransferWaits", "wait_async", "wait_blocking"]


async def wait_async(transfers: Transfers, done: Callable[[], bool]) -> None:
    """Apply outcomes as they come (async engines) until ``done()``."""
    transfers.drain()
    while not done():
        await transfers.runtime.wait_async()
        transfers.drain()


def wait_blocking(transfers: Transfers, done: Callable[[], bool], timeout: float | None) -> bool:
    """Apply outcomes as they come (synchronous engines) until ``done()``.

    Returns:
        False when ``timeout`` seconds (in all) passed first.

    Raises:
        ClosedError: Not done, a positive or no ``timeout``, and no
            background loop runs the jobs (the manager is entered with
            ``async with``, or not at all): they start only when the
            caller's own loop runs, so blocking here could never end. A
            ``timeout`` of 0 only polls.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    transfers.drain()
    polls = timeout is not None and timeout <= 0
    if not done() and not transfers.runtime.thread_mode and not polls:
        raise ClosedError(
            "blocking waits need the manager entered with `with`; under `async with`, "
            "await wait_for_loads() or wait_idle()"
        )
    while not done():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not transfers.runtime.wait_blocking(left):
            return False
        transfers.drain()
    return True


class TransferWaits:
    """Waits on the transfers of an offload manager (not constructed on its own).

    :class:`~kvtier.offload.manager.OffloadManager` sets the state these read.
    """

    _transfers: Transfers
    _requests: dict[str, RequestState]

    def load_in_flight(self, request_id: str) -> bool:
        """The request has a load planned or running."""
        state = self._requests.get(request_id)
        return state is not None and state.load is not None

    async def wait_for_loads(self, request_ids: Iterable[str]) -> None:
        """Wait (async engines) until the requests' started loads ended.

        Requests without a load, or unknown ones, are not waited for.

        Raises:
            InvalidRequestError: A request's load is planned but not started
                (it starts at the next :meth:`build_step`): it would never end.
        """
        loads = self._transfers.started_loads(request_ids)
        await wait_async(self._transfers, lambda: loads.isdisjoint(self._transfers.loads))

    def wait_for_loads_blocking(
        self, request_ids: Iterable[str], timeout: float | None = None
    ) -> bool:
        """Block (synchronous engines) until the requests' started loads ended.

        Args:
            request_ids: The requests to wait for (as :meth:`wait_for_loads`).
            timeout: Most seconds to wait in all; ``None`` waits as long as it takes.

        Returns:
            False when ``timeout`` seconds passed first.

        Raises:
            InvalidRequestError: As :meth:`wait_for_loads`.
            ClosedError: The loads have not ended and the manager is not
                entered with ``with`` (see :meth:`wait_idle_blocking`).
        """
        loads = self._transfers.started_loads(request_ids)
        return wait_blocking(
            self._transfers, lambda: loads.isdisjoint(self._transfers.loads), timeout
        )

    async def wait_idle(self) -> None:
        """Wait (async engines) until every started store and load ended locally."""
        await wait_async(self._transfers, lambda: not self._transfers.busy())

    def wait_idle_blocking(self, timeout: float | None = None) -> bool:
        """Block (synchronous engines) until every started transfer ended locally.

        Args:
            timeout: Most seconds to wait in all; ``None`` waits as long as it takes.

        Returns:
            False when ``timeout`` seconds passed first.

        Raises:
            ClosedError: Transfers are in flight and the manager is not
                entered with ``with``: under ``async with`` the jobs run on
                the caller's loop, which a blocking wait would stall for good.
        """
        return wait_blocking(self._transfers, lambda: not self._transfers.busy(), timeout)
