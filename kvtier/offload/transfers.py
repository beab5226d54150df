"""Store and load events in flight: dispatch, completion and release.

:class:`Transfers` owns the events the manager planned, starts their jobs on
the runtime, and applies the jobs' outcomes: commits or aborts the tiers'
reservations, releases pins and the device blocks it referenced, counts, and
records finished loads for the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from kvtier.errors import InvalidRequestError, TransferCancelledError
from kvtier.log import get_logger
from kvtier.offload import jobs, load_counts, placement
from kvtier.offload._state import (
    Demotion,
    LoadEvent,
    LoadOutcome,
    RequestState,
    StoreEvent,
    StoreOutcome,
)
from kvtier.offload.plan import FinishedLoad, LoadSpec
from kvtier.offload.request_book import RequestBook
from kvtier.offload.runtime import Runtime
from kvtier.offload.stats import OffloadStats, TierStats
from kvtier.offload.writeback import WriteBack
from kvtier.policies.prefetch import StagingCostModel
from kvtier.pool import BlockPool
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline

__all__ = ["Transfers"]

_log = get_logger("kvtier.offload")


class Transfers(RequestBook):
    """The manager's events in flight (internal to :mod:`kvtier.offload`)."""

    def __init__(
        self,
        pool: BlockPool,
        device: BlockStore,
        tiers: Sequence[BlockStore],
        indexes: Sequence[TierIndex],
        stats: OffloadStats,
        tier_stats: Sequence[TierStats],
        pipeline: TransferPipeline,
        world_size: int,
        requests: dict[str, RequestState],
    ) -> None:
        self.block_pool = pool
        self.device = device
        self.tiers = list(tiers)
        self.indexes = list(indexes)
        self.stats = stats
        self.tier_stats = list(tier_stats)
        self.pipeline = pipeline
        self.world_size = world_size
        self.requests = requests
        self.runtime = Runtime()
        push = self.runtime.push
        self._run_store = functools.partial(jobs.run_store, pipeline, device, self.tiers, push)
        self._run_load = functools.partial(jobs.run_load, pipeline, device, self.tiers, push)
        self.stores: dict[int, StoreEvent] = {}
        self.loads: dict[int, LoadEvent] = {}
        # Device block ids being stored (seed 003), for the planners that pick
        # referenced blocks (eager, selective). Lazy mode leaves it empty: its
        # walk only takes blocks from the free queue, which holds no block a
        # store references (see in_flight_ids).
        self.in_flight: set[int] = set()
        self.finished: list[FinishedLoad] = []
        self.writeback: WriteBack | None = None  # lazy mode: told of written blocks freed
        # Seconds per block of staging from each slow tier, from finished loads'
        # copies: what the prefetch policy weighs at lookup.
        self.staging_costs = StagingCostModel()

    def in_flight_ids(self) -> frozenset[int]:
        """Device block ids whose store has not ended, whatever the mode."""
        if self.writeback is None:
            return frozenset(self.in_flight)
        return frozenset().union(*(event.block_ids for event in self.stores.values()))

    def busy(self) -> bool:
        """A started store or load has not ended locally."""
        stores = any(e.dispatched and not e.local_done for e in self.stores.values())
        return stores or any(e.dispatched for e in self.loads.values())

    # -- dispatch ----------------------------------------------------------------------

    def dispatch_store(self, event: StoreEvent) -> None:
        """Start the event's job (its blocks' bytes must exist by now).

        Raises:
            ClosedError: The manager is not running (the event stays unstarted).
        """
        self.runtime.spawn(self._run_store, event)
        event.dispatched = True

    def dispatch_planned_loads(self) -> tuple[LoadSpec, ...]:
        """Start every load planned and not started yet; their specs."""
        specs = []
        for event in list(self.loads.values()):  # planned and running loads
            state = self.requests.get(event.request_id)
            if not event.dispatched and state is not None and state.load is event:
                spec = self.dispatch_load(state)
                if spec is not None:
                    specs.append(spec)
        return tuple(specs)

    def dispatch_load(self, state: RequestState) -> LoadSpec | None:
        """Start the request's planned load; its spec, or None.

        Raises:
            ClosedError: The manager is not running (the load stays unstarted).
        """
        event = state.load
        if event is None or event.dispatched:
            return None
        self.runtime.check_running()
        if event.stages:
            placement.reserve_stages(self.indexes, self.tier_stats, event)
        try:
            self.runtime.spawn(self._run_load, event)
        except BaseException:
            placement.release_stages(self.indexes, event)  # unstarted, as before
            raise
        event.dispatched = True
        sources = []
        first_name = self.tiers[0].name
        staged = {
            key: (self.tiers[stage.level].name, slot)
            for stage in event.stages
            for slot, key in zip(stage.src_slots, stage.keys, strict=True)
        }
        for key, slot in zip(event.keys, event.first_slots, strict=True):
            sources.append(staged.get(key, (first_name, slot)))
        return LoadSpec(
            event.event_id,
            event.request_id,
            tuple(block.block_id for block in event.targets),
            tuple(sources),
            event.first_block,
        )

    # -- completions -------------------------------------------------------------------

    def started_loads(self, request_ids: Iterable[str]) -> set[int]:
        """The event ids of the requests' loads in flight, to wait for.

        Raises:
            InvalidRequestError: A request's load is planned and not started.
        """
        self.drain()
        events = set()
        for rid in request_ids:
            state = self.requests.get(rid)
            load = None if state is None else state.load
            if load is None:
                continue
            if not load.dispatched:
                raise InvalidRequestError(
                    f"the load of request {rid!r} has not started: it starts at the "
                    "next build_step, so wait after that"
                )
            events.add(load.event_id)
        return events

    def drain(self) -> None:
        """Apply the outcomes the jobs reported since the last call."""
        outcomes = self.runtime.outcomes
        while outcomes:
            outcome = outcomes.popleft()
            if isinstance(outcome, StoreOutcome):
                self._on_store(outcome)
            else:
                self._on_load(outcome)

    def _on_store(self, outcome: StoreOutcome) -> None:
        event = self.stores.get(outcome.event_id)
        if event is None:
            return
        self._settle_demotions(event.demotions, outcome.demotions)
        event.demotions = []
        event.local_done = True
        event.seconds = outcome.seconds
        event.error = outcome.error
        event.reports += 1
        # Even after a local failure the event waits for the other workers: until
        # they report, they may still be copying into its slots from its blocks.
        if event.reports >= self.world_size:
            self.end_store(event, ok=event.error is None)

    def _settle_demotions(self, demotions: list[Demotion], seconds: Sequence[float | None]) -> None:
        """Commit the demotions that copied (their bytes and time count as the tier's stores).

        ``seconds`` covers the demotions that ran, in order (see
        :attr:`~kvtier.offload._state.StoreOutcome.demotions`): one that
        failed counts as failed transfers; those after them never ran and are
        aborted uncounted, as :meth:`end_store` and :meth:`end_load` abort the
        demotions of an event that ended without its job.
        """
        for demotion in demotions[len(seconds) :]:  # never ran
            self.indexes[demotion.level + 1].abort(demotion.keys)
        for demotion, took in zip(demotions, seconds, strict=False):
            below = self.indexes[demotion.level + 1]
            stats = self.tier_stats[demotion.level + 1]
            if took is not None:
                below.commit(demotion.keys, demotion.hints)
                stats.demotions += len(demotion.keys)
                stats.bytes_stored += len(demotion.keys) * self.device.layout.block_bytes
                stats.store_seconds += took
            else:  # the evicted blocks are lost, as without a tier below
                below.abort(demotion.keys)
                stats.failed_transfers += len(demotion.keys)

    def report(self, event_id: int, workers: int) -> None:
        """Count store completions reported by other workers."""
        self.drain()
        event = self.stores.get(event_id)
        if event is None:
            return
        event.reports += workers
        if event.reports >= self.world_size and event.local_done:
            self.end_store(event, ok=event.error is None)

    def end_store(self, event: StoreEvent, *, ok: bool, ran: bool = True) -> None:
        """Settle a store: commit or abort (uncounted if it never ``ran``), release its blocks."""
        del self.stores[event.event_id]
        index = self.indexes[event.level]
        stats = self.tier_stats[event.level]
        for demotion in event.demotions:  # never ran
            self.indexes[demotion.level + 1].abort(demotion.keys)
        if ok:
            index.commit(event.keys, event.hints)
            stats.stores += len(event.keys)
            if event.level:
                stats.spilled_stores += len(event.keys)
            stats.bytes_stored += len(event.keys) * self.device.layout.block_bytes
            stats.store_seconds += event.seconds
        else:
            index.abort(event.keys)
            stats.failed_transfers += len(event.keys) if ran else 0
            if isinstance(event.error, TransferCancelledError):  # closing: expected
                _log.debug("store_cancelled", task=event.event_id)
            elif event.error is not None:
                _log.warning("store_failed", task=event.event_id, error=repr(event.error))
        if self.in_flight:
            self.in_flight.difference_update(event.block_ids)
        writeback = self.writeback
        passed = ok and writeback is not None and writeback.at_tail(self.block_pool)
        blocks = list(map(self.block_pool.blocks.__getitem__, event.block_ids))
        self.block_pool.free_blocks(blocks)
        if passed and writeback is not None:
            writeback.returned(self.block_pool, blocks)
        for rid in event.request_ids:
            state = self.requests.get(rid)
            if state is not None and event.event_id in state.store_events:
                state.store_events.discard(event.event_id)  # (not a new request of that id)
                self.forget_if_idle(state)

    def _on_load(self, outcome: LoadOutcome) -> None:
        event = self.loads.get(outcome.event_id)
        if event is None:
            return
        self._settle_demotions(event.demotions, outcome.demotions)
        event.demotions = []
        self.end_load(
            event,
            error=outcome.error is not None,
            missing=outcome.missing,
            seconds=dict(outcome.seconds),
            demotion_seconds=sum(took for took in outcome.demotions if took is not None),
            cut=outcome.cut,
        )
        if isinstance(outcome.error, TransferCancelledError):  # closing: expected
            _log.debug("load_cancelled", task=event.event_id)
        elif outcome.error is not None:
            loaded = "none" if outcome.cut is None else f"positions before {outcome.cut}"
            _log.warning(
                "load_failed", task=event.event_id, loaded=loaded, error=repr(outcome.error)
            )

    def end_load(
        self,
        event: LoadEvent,
        *,
        error: bool,
        missing: tuple[tuple[int, BlockKey], ...],
        seconds: dict[int, float] | None = None,
        demotion_seconds: float = 0.0,
        ran: bool = True,
        cut: int | None = None,
    ) -> None:
        """Settle a load: release pins and targets, forget missing blocks, report it.

        ``seconds``: time spent reading from each tier level;
        ``demotion_seconds``: time its demotions (room made in the first tier
        for the staged blocks) took, charged to the staged blocks in the
        staging cost model. A load that never ``ran`` (never dispatched) is
        reported failed, but counted nowhere. A failed load with a ``cut``
        loaded the positions before it (see :func:`~kvtier.offload.jobs.run_load`):
        they count as loaded, their staged copies stay in the first tier, and
        only the blocks from the cut on are reported failed.
        """
        self.loads.pop(event.event_id, None)
        first = self.indexes[0]
        if not error:
            arrived = set(event.keys)
        elif cut is None:
            arrived = set()
        else:
            arrived = {k for k, p in zip(event.keys, event.positions, strict=True) if p < cut}
        staged = event.staged_keys()
        if staged:
            first.commit([key for key in staged if key in arrived])
            first.abort([key for key in staged if key not in arrived])
        for demotion in event.demotions:
            self.indexes[demotion.level + 1].abort(demotion.keys)
        self.unpin(event)
        for level, key in missing:
            self.indexes[level].remove([key])
        if not error and seconds:
            load_counts.observe_staging(self.staging_costs, event, seconds, demotion_seconds)
        if ran:
            block_bytes = self.device.layout.block_bytes
            load_counts.count(self.tier_stats, block_bytes, event, arrived, seconds or {})
        self.block_pool.free_blocks(event.targets)
        ids = [
            block.block_id
            for block, key in zip(event.targets, event.keys, strict=True)
            if key not in arrived
        ]
        ids.extend(event.failed)  # positions already gone when the load was planned
        state = self.requests.get(event.request_id)
        # A state that does not hold this load is a new request's: the load's
        # request finished, and the new one would take this report for its own.
        owner = state if state is not None and state.load is event else None
        # Nor is a finished request told: its id is free, and a request that
        # reuses it before allocating would take the report for its own.
        tell = owner is not None and not owner.finished
        partial = bool(ids) and bool(arrived)
        self.report_load(event.request_id, ids, tell=tell, counted=ran, partial=partial)
        if owner is not None:
            owner.load = None
            self.forget_if_idle(owner)

    def report_load(
        self,
        request_id: str,
        failed: Sequence[int],
        *,
        tell: bool = True,
        counted: bool = True,
        partial: bool = False,
    ) -> None:
        """Count (if ``counted``) a request's load that ended; if ``tell``, report it.

        ``failed``: the device blocks to recompute; ``partial``: some others
        arrived.
        """
        if tell:
            self.finished.append(FinishedLoad(request_id, not failed, tuple(failed)))
        if counted:
            self.stats.loads_finished += 1
            self.stats.loads_failed += int(bool(failed))
            self.stats.loads_partial += int(partial)
