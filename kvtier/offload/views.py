"""The offload manager's read-only views: what it tracks, counts and plans.

A base of :class:`~kvtier.offload.manager.OffloadManager`, beside
:class:`~kvtier.offload.waits.TransferWaits`, apart from the planning.
"""

from __future__ import annotations

import attrs

from kvtier.events import KVCacheEvent
from kvtier.offload._state import RequestState
from kvtier.offload.loads import LoadPlanner
from kvtier.offload.plan import HitInfo, WriteMode
from kvtier.offload.stats import OffloadStats
from kvtier.offload.transfers import Transfers
from kvtier.offload.writeback import WriteBack
from kvtier.policies.prefetch import BestEffort, StagingCostModel
from kvtier.tiers.index import TierIndex

__all__ = ["ManagerViews"]


class ManagerViews:
    """Lookups, counters and events of an offload manager (not constructed on its own).

    :class:`~kvtier.offload.manager.OffloadManager` sets the state these read.
    """

    indexes: list[TierIndex]
    _transfers: Transfers
    _loads: LoadPlanner
    _requests: dict[str, RequestState]
    _stats: OffloadStats
    _lazy: WriteBack
    spill_stores: bool | None
    mode: WriteMode

    def hit_info(self, request_id: str) -> HitInfo | None:
        """Where the request's blocks were found at its last lookup."""
        return self._loads.hits.get(request_id)

    @property
    def staging_costs(self) -> StagingCostModel:
        """Seconds per block of staging from each slow tier, learned from finished loads.

        What the prefetch policy weighs at each lookup (it is updated as
        loads end; read it, do not feed it).
        """
        return self._transfers.staging_costs

    @property
    def spills(self) -> bool:
        """Whether a step's stores spill past a full first tier now.

        Never in lazy mode or with one lower tier. Else ``spill_stores`` when
        it is a bool; when it is None, whether the prefetch policy may load
        from below the first tier (any but ``best_effort``: blocks spilled
        past the first tier would never be loaded under it, only written).
        """
        if self.mode == "lazy" or len(self.indexes) < 2:
            return False
        if self.spill_stores is None:
            return not isinstance(self._loads.prefetch, BestEffort)
        return self.spill_stores

    def has_request(self, request_id: str) -> bool:
        """The manager still tracks the request."""
        return request_id in self._requests

    def stats(self) -> OffloadStats:
        """A snapshot of the cumulative counters."""
        self._transfers.drain()
        tiers = {name: attrs.evolve(stats) for name, stats in self._stats.tiers.items()}
        return attrs.evolve(self._stats, tiers=tiers)

    def take_events(self) -> list[KVCacheEvent]:
        """Lower tiers' events since the last call.

        ``BlockStored`` / ``BlockRemoved``, and ``AllBlocksCleared`` for a reset.
        """
        self._transfers.drain()
        return [event for index in self.indexes for event in index.take_events()]

    @property
    def lazy_store_budget(self) -> int:
        """Lazy mode: the stores the last step could plan past what safety needed.

        ``max(lazy_free_target, 2 x rate)``, where rate is a moving average of
        the blocks joining the device free queue per step (see
        :mod:`kvtier.offload.writeback`).
        """
        return self._lazy.budget

    @property
    def in_flight_store_blocks(self) -> frozenset[int]:
        """Device block ids whose store has not ended, as of the manager's last call.

        Stores that end meanwhile are applied at the start of the next call
        (which may then store those blocks again).
        """
        return self._transfers.in_flight_ids()
