"""OffloadManager: each step, what to copy down the tier stack and what to load back.

The manager is bound to the device :class:`~kvtier.pool.BlockPool` (the one
the engine's :class:`~kvtier.manager.KVCacheManager` uses), the device tier
that wraps the KV cache tensors, and an ordered stack of lower tiers (CPU
first, then disk…). Its plan methods are synchronous and cheap; the bytes move
in jobs on the transfer pipeline (see :mod:`kvtier.offload.runtime`).

The engine calls, per request and step, in this order (vLLM's connector
calls have the same names and meaning):

1. :meth:`~OffloadManager.get_num_new_matched_tokens` after the device
   prefix-cache lookup: how many more tokens the lower tiers hold;
2. :meth:`~OffloadManager.update_state_after_alloc` once the device blocks
   are allocated: the blocks at positions ``N … N+M-1`` of
   ``| device hit (N) | external hit (M) | new (P) |`` receive loads;
3. :meth:`~OffloadManager.build_step` once per step: starts the loads, plans
   the stores;
4. :meth:`~OffloadManager.step_computed` when the step's forward pass has
   written the KV cache: the stores of newly computed blocks start (never
   before: their bytes do not exist yet);
5. :meth:`~OffloadManager.take_finished` (or ``await wait_for_loads``) for the
   requests whose loads ended, and :meth:`~OffloadManager.request_finished`
   when a request ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kvtier.errors import InvalidRequestError
from kvtier.manager import KVCacheBlocks
from kvtier.offload import candidates, options
from kvtier.offload._state import RequestState
from kvtier.offload.lifecycle import ManagerLifecycle
from kvtier.offload.loads import LoadPlanner
from kvtier.offload.options import check_flush, check_stack, positive, prefetch_policy
from kvtier.offload.plan import (
    FinishedLoad,
    SchedulerOutput,
    StepPlan,
    WriteMode,
)
from kvtier.offload.remote import ProbePlan, RemoteProbe
from kvtier.offload.reset import CacheReset, ResetsRunning
from kvtier.offload.stats import OffloadStats, TierStats
from kvtier.offload.stores import StorePlanner
from kvtier.offload.transfers import Transfers
from kvtier.offload.views import ManagerViews
from kvtier.offload.waits import TransferWaits
from kvtier.offload.writeback import WriteBack
from kvtier.policies.prefetch import PrefetchPolicy, StagingCostModel
from kvtier.pool import BlockPool
from kvtier.request import KVCacheRequest
from kvtier.tiers.base import BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline

__all__ = ["OffloadManager"]


class OffloadManager(ManagerLifecycle, TransferWaits, ManagerViews, CacheReset):
    """Plans and runs the copies between the device and the lower tiers.

    Entered once, with ``async with`` (async engines) or ``with``
    (synchronous ones; see :class:`~kvtier.offload.lifecycle.ManagerLifecycle`).
    The waits (``wait_for_loads``, ``wait_idle`` and their ``_blocking``
    forms, ``load_in_flight``) come from
    :class:`~kvtier.offload.waits.TransferWaits`, the read-only views
    (``hit_info``, ``has_request``, ``stats``, ``take_events``,
    ``lazy_store_budget``, ``in_flight_store_blocks``, ``staging_costs``,
    ``spills``) from
    :class:`~kvtier.offload.views.ManagerViews`, and the lower tiers' reset
    (``reset_cache`` and ``reset_cache_blocking``) from
    :class:`~kvtier.offload.reset.CacheReset`.

    Args:
        block_pool: The device block pool.
        device: The device tier (slots are device block ids).
        tiers: Lower tiers, fastest first (CPU, then disk…). The manager
            opens and closes them, and the device tier.
        block_size: Tokens per block.
        mode: ``"eager"``, ``"lazy"`` or ``"selective"`` (see
            :data:`~kvtier.offload.plan.WriteMode`).
        eviction_policy: Eviction policy name of every lower tier's index, or
            one name per tier.
        lazy_free_target: Lazy mode: free device blocks, from the eviction
            end of the free queue, kept safe to evict (unhashed or already
            stored below); also the least per-step budget for writing freed
            blocks back early (see :mod:`kvtier.offload.writeback`).
        selective_min_hits: Selective mode: device prefix-cache hits a block
            needs before it is stored.
        num_groups: KV cache groups (a block position holds one block per group).
        world_size: Workers that must report a store before it counts
            (tensor parallelism); the local pipeline is one of them. Above
            1, the stack must have one lower tier (see the ``ConfigError``).
        pipeline: Transfer pipeline settings (a fresh pipeline is owned by the
            manager); ``None`` for the defaults.
        max_probe_blocks: Most blocks one :meth:`probe` asks the shared tiers
            about; 0 turns probing off.
        flush_on_close: On a clean exit, once the jobs ended, copy the
            blocks of the tiers held in memory (the CPU tier) into the first
            lasting tier below them (disk or Redis; see
            :mod:`kvtier.offload.flush`), so a warm restart on a disk tier
            finds them.
        prefetch: How much of a lower-tier hit a lookup loads: a policy of
            :mod:`kvtier.policies.prefetch` or its name (``"wait_complete"``,
            every hit; ``"best_effort"``, only the first tier's prefix;
            ``"timeout"``, staging that fits a budget, weighed with
            :attr:`staging_costs`). The rest of the hit is left to compute.
        staging_costs: The cost model the timeout policy weighs (its weight,
            prior and half-life); a new default one when ``None``.
        spill_stores: Eager and selective modes: store the blocks the first
            tier has no room for (its slots pinned by loads or being written)
            straight into the next tier down with room, instead of dropping
            them (see :mod:`kvtier.offload.stores`). ``None`` (the default):
            unless the prefetch policy is ``best_effort``, which never loads
            from below the first tier. Lazy mode never spills (True there
            is a ``ConfigError``).

    Raises:
        ConfigError: No lower tier, mismatched layouts, or a bad setting.
    """

    def __init__(
        self,
        block_pool: BlockPool,
        device: BlockStore,
        tiers: Sequence[BlockStore],
        *,
        block_size: int,
        mode: WriteMode = "eager",
        eviction_policy: str | Sequence[str] = "lru",
        lazy_free_target: int = 32,
        selective_min_hits: int = 2,
        num_groups: int = 1,
        world_size: int = 1,
        pipeline: TransferPipeline | None = None,
        max_probe_blocks: int = 256,
        flush_on_close: bool = False,
        prefetch: PrefetchPolicy | str = "wait_complete",
        staging_costs: StagingCostModel | None = None,
        spill_stores: bool | None = None,
    ) -> None:
        check_stack(block_pool, device, tiers, mode, lazy_free_target, block_size)
        names = [tier.name for tier in tiers]
        self.block_pool = block_pool
        self.device = device
        self.tiers = list(tiers)
        self.block_size = positive("block_size", block_size)
        self.mode: WriteMode = mode
        self.lazy_free_target = positive("lazy_free_target", lazy_free_target)
        self.selective_min_hits = positive("selective_min_hits", selective_min_hits)
        self.num_groups = positive("num_groups", num_groups)
        self.world_size = options.check_world_size(world_size, len(tiers))
        policies = options.tier_policies(eviction_policy, len(tiers))
        self.indexes = [
            TierIndex(t.name, t.num_slots, policy, block_size=block_size)
            for t, policy in zip(tiers, policies, strict=True)
        ]
        self._tier_stats = [TierStats() for _ in tiers]
        self._stats = OffloadStats(tiers=dict(zip(names, self._tier_stats, strict=True)))
        self._pipeline = pipeline or TransferPipeline()
        self._requests: dict[str, RequestState] = {}
        self._lazy = WriteBack(self.lazy_free_target)
        self._hit_counter = candidates.HitCounter(
            self.selective_min_hits, 4 * block_pool.num_gpu_blocks
        )
        self._transfers = Transfers(
            block_pool,
            device,
            self.tiers,
            self.indexes,
            self._stats,
            self._tier_stats,
            self._pipeline,
            self.world_size,
            self._requests,
        )
        self._transfers.staging_costs = options.staging_cost_model(staging_costs)
        if mode == "lazy":
            self._transfers.writeback = self._lazy
        event_ids = itertools.count(1)  # shared by loads and stores
        selective = self._hit_counter if mode == "selective" else None
        self._loads = LoadPlanner(
            self._transfers,
            event_ids,
            self.block_size,
            num_groups,
            selective,
            prefetch_policy(prefetch),
        )
        self.spill_stores = options.check_spill(spill_stores, mode)
        spills = None if self.spill_stores is False else lambda: self.spills
        self._stores = StorePlanner(self._transfers, event_ids, mode, self._lazy, spill=spills)
        self._probe = RemoteProbe(
            self.tiers,
            self.indexes,
            self._tier_stats,
            block_size=self.block_size,
            num_groups=self.num_groups,
            max_blocks=positive("max_probe_blocks", max_probe_blocks, minimum=0),
        )
        self._step_ids = itertools.count(1)
        self.flush_on_close = check_flush(flush_on_close, self.tiers)
        self._failed = False  # a synchronous engine left by an error: no flush
        self._entered = False
        self._resets = ResetsRunning()

    @property
    def prefetch(self) -> PrefetchPolicy:
        """The prefetch policy lookups apply; an engine may set another between lookups.

        Raises:
            UnknownNameError: Set to a name no policy has.
            ConfigError: Set to something that is neither a name nor a policy.
        """
        return self._loads.prefetch

    @prefetch.setter
    def prefetch(self, prefetch: PrefetchPolicy | str) -> None:
        self._loads.prefetch = prefetch_policy(prefetch)

    # -- lookups -----------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: KVCacheRequest, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens beyond the device hit to load from the lower tiers, as a prefix.

        Of the prefix the lower tiers hold, the manager's ``prefetch`` policy
        decides how much is worth waiting for (:meth:`hit_info` tells what
        was found and declined). At least one prompt token is always left to
        compute: when the whole prompt would hit, the last full block is dropped.

        Returns:
            ``(num_tokens, is_async)``: ``is_async`` is True when blocks must
            be loaded (the request waits for :meth:`take_finished`).

        Raises:
            InvalidRequestError: ``num_computed_tokens`` is not a multiple of
                the block size >= 0.
            ConfigError: The prefetch policy answered a count outside the hit.
        """
        self._transfers.drain()
        return self._loads.matched_tokens(request, num_computed_tokens)

    @property
    def probes(self) -> bool:
        """Some lower tier is shared and can be probed (see :meth:`probe`)."""
        return bool(self._probe.levels)

    async def probe(self, request: KVCacheRequest, num_computed_tokens: int) -> int:
        """Ask the shared tiers for blocks other engines stored; call before the lookup.

        For the blocks after ``num_computed_tokens`` that no tier's index
        holds, each shared tier (a :class:`~kvtier.tiers.base.ProbingStore`,
        such as Redis) is asked once, all at once, which it holds now; the
        longest held prefix enters their indexes, so the next
        :meth:`get_num_new_matched_tokens` counts it. A shared tier that fails
        answers nothing (counted in ``failed_probes``). Async engines only; see
        :meth:`probe_blocking`.

        Returns:
            How many blocks were entered (0 without shared tiers).

        Raises:
            InvalidRequestError: ``num_computed_tokens`` is not a multiple of
                the block size >= 0.
        """
        plan = self._probe_plan(request, num_computed_tokens)
        return 0 if plan is None else self._probe.adopt(plan, await self._probe.ask(plan))

    def probe_blocking(self, request: KVCacheRequest, num_computed_tokens: int) -> int:
        """:meth:`probe` for synchronous engines (the manager entered with ``with``).

        The round trips run on the manager's background loop; the engine's
        thread waits for them (each is bounded by its tier's timeouts).

        Raises:
            ClosedError: The manager is not entered with ``with``.
            InvalidRequestError: As :meth:`probe`.
        """
        plan = self._probe_plan(request, num_computed_tokens)
        if plan is None:
            return 0
        answers: dict[int, list[bool]] = self._transfers.runtime.call(self._probe.ask, plan)
        return self._probe.adopt(plan, answers)

    def _probe_plan(self, request: KVCacheRequest, num_computed_tokens: int) -> ProbePlan | None:
        self._transfers.drain()  # outcomes first: a store that ended holds its blocks now
        return self._probe.plan(request, num_computed_tokens)

    # -- after allocation --------------------------------------------------------------

    def update_state_after_alloc(
        self, request: KVCacheRequest, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Record the request's device blocks; plan loads into the external ones.

        Loads target hash positions ``N … N+M-1``, where ``N`` counts the
        leading blocks that hold a hash (the device hit) and ``M`` is
        ``num_external_tokens / block_size``. Their sources are pinned in
        their tiers now; the load starts at the next :meth:`build_step`.

        Raises:
            InvalidRequestError: ``num_external_tokens`` is not a multiple of
                the block size, the groups do not match, external tokens
                come for a running request whose earlier load has not finished,
                or a load target already holds a hash (allocate requests with
                external tokens with ``delay_cache_blocks=True``).

        The request's latest lookup is counted in :meth:`stats` here.
        """
        self._transfers.drain()
        self._loads.after_alloc(request, blocks, num_external_tokens)

    # -- per step ----------------------------------------------------------------------

    def build_step(self, scheduler_output: SchedulerOutput) -> StepPlan:
        """Start this step's loads and plan its stores.

        Raises:
            ClosedError: The manager is not entered (nothing is planned).
        """
        self._transfers.runtime.check_running()
        self._transfers.drain()
        step_id = next(self._step_ids)
        loads = self._transfers.dispatch_planned_loads()
        candidates.track_blocks(
            self._transfers, scheduler_output, self.num_groups, live=self.mode == "eager"
        )
        if self.mode == "lazy":
            stores = self._stores.plan_lazy(step_id)
        else:
            if self.mode == "eager":
                columns = candidates.eager(self.block_pool, self._requests, scheduler_output)
            else:
                due = self._hit_counter.take_due()
                columns = candidates.selective(self.block_pool, due, self.num_groups)
            stores = self._stores.plan(step_id, columns)
        return StepPlan(step_id, loads, stores)

    def step_computed(self, step_id: int) -> None:
        """The forward pass of step ``step_id`` (and of every earlier one) ended.

        Starts the stores of blocks those steps computed.

        Raises:
            ClosedError: The manager is not entered (nothing is started).
        """
        self._transfers.runtime.check_running()
        self._transfers.drain()
        for event in list(self._transfers.stores.values()):
            if not event.dispatched and event.step_id <= step_id:
                self._transfers.dispatch_store(event)

    # -- engine-facing results -----------------------------------------------------------

    def report_store_done(self, event_id: int, workers: int = 1) -> None:
        """Count store completions reported by other tensor-parallel workers.

        An event ends when ``world_size`` workers (the local pipeline
        included) reported it. Unknown or ended events are ignored.

        Raises:
            InvalidRequestError: ``workers`` is not an integer >= 1 (a count
                of 0 or less, or a fraction, would keep the event, its tier
                reservation and its device blocks forever).
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidRequestError(f"workers must be an integer >= 1, got {workers!r}")
        self._transfers.report(event_id, workers)

    def take_finished(self) -> list[FinishedLoad]:
        """Loads that ended since the last call (each reported once; none of a finished request)."""
        self._transfers.drain()
        finished, self._transfers.finished = self._transfers.finished, []
        return finished

    def request_finished(self, request: KVCacheRequest) -> bool:
        """The request ended (finished, aborted or preempted for good).

        Its id is free at once: a new request of that id gets its own state,
        untouched by this one's transfers. This one's load is not reported
        from now on (a report not taken yet is dropped, and a load still
        running ends unreported), so an engine reusing the id can never take
        it for the new request's.

        Returns:
            True when a load or store of it is still in flight: its state is
            kept until they end (the device blocks involved stay referenced
            by the manager meanwhile, so the engine may free them now).
        """
        self._transfers.drain()
        self._loads.hits.pop(request.request_id, None)
        self._loads.lookups.pop(request.request_id, None)
        return self._transfers.finish_request(request.request_id)
