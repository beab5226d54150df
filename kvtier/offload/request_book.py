"""The requests an offload manager tracks: their states, finish and forgetting (internal).

A base of :class:`~kvtier.offload.transfers.Transfers`: a request gets a
state when it is given device blocks, keeps it while its transfers run after
it finished, and a new request reusing its id gets a state of its own.
"""

from __future__ import annotations

from kvtier.offload._state import LoadEvent, RequestState
from kvtier.offload.plan import FinishedLoad
from kvtier.pool import BlockPool

__all__ = ["RequestBook"]


class RequestBook:
    """Request states of the manager's transfers (not constructed on its own)."""

    block_pool: BlockPool
    requests: dict[str, RequestState]
    loads: dict[int, LoadEvent]
    finished: list[FinishedLoad]

    def track(self, request_id: str, block_ids: list[list[int]]) -> RequestState:
        """The state of a request given device blocks: its own, or a fresh one.

        A request that finished keeps its state while its transfers run; a new
        request reusing its id gets a state of its own instead, so the old
        transfers, as they end, settle only the old state (which nothing else
        holds) and never the new request's (whose reports it never makes:
        :meth:`finish_request` dropped them).
        """
        state = self.requests.get(request_id)
        if state is not None and not state.finished:
            state.block_ids = block_ids
            return state
        state = self.requests[request_id] = RequestState(request_id, block_ids)
        return state

    def forget_if_idle(self, state: RequestState) -> None:
        """Forget a finished request once none of its transfers is in flight."""
        if state.finished and not state.busy and self.requests.get(state.request_id) is state:
            del self.requests[state.request_id]

    def finish_request(self, request_id: str) -> bool:
        """The request ended: drop its unstarted load and its load reports not taken yet.

        Returns:
            True while a transfer of it is in flight.
        """
        if self.finished:
            self.finished = [done for done in self.finished if done.request_id != request_id]
        state = self.requests.get(request_id)
        if state is None:
            return False
        if state.load is not None and not state.load.dispatched:
            self.drop_load(state.load)
            state.load = None
        state.finished = True
        if state.busy:
            return True
        del self.requests[request_id]
        return False

    def drop_load(self, event: LoadEvent) -> None:
        """Forget a load that was planned and never started."""
        self.loads.pop(event.event_id, None)
        self.unpin(event)
        self.block_pool.free_blocks(event.targets)

    @staticmethod
    def unpin(event: LoadEvent) -> None:
        """Release the event's source pins (once)."""
        for index, key in event.pins:
            index.unpin([key])
        event.pins = []
