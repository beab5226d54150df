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
from collections.abc import Collection, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self, cast

import anyio
import attrs

from kvtier.block import KVCacheBlock
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.events import KVCacheEvent
from kvtier.hashing import BlockHash, make_block_hash_with_group_id
from kvtier.log import get_logger
from kvtier.manager import KVCacheBlocks
from kvtier.offload import candidates, placement
from kvtier.offload._state import (
    LoadEvent,
    RequestState,
    Stage,
    StoreEvent,
)
from kvtier.offload.plan import (
    FinishedLoad,
    HitInfo,
    SchedulerOutput,
    StepPlan,
    StoreSpec,
    WriteMode,
)
from kvtier.offload.stats import OffloadStats, TierStats
from kvtier.offload.transfers import Transfers
from kvtier.offload.writeback import WriteBack
from kvtier.pool import BlockPool
from kvtier.request import KVCacheRequest
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline

__all__ = ["OffloadManager"]

_log = get_logger("kvtier.offload")
_MODES: tuple[WriteMode, ...] = ("eager", "lazy", "selective")


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class OffloadManager:
    """Plans and runs the copies between the device and the lower tiers.

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
            (tensor parallelism); the local pipeline is one of them.
        pipeline: Transfer pipeline settings (a fresh pipeline is owned by the
            manager); ``None`` for the defaults.

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
    ) -> None:
        if not tiers:
            raise ConfigError("an offload manager needs at least one lower tier")
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        for tier in tiers:
            if tier.layout != device.layout:
                raise ConfigError(f"tier {tier.name!r} has another block layout than the device")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}")
        self.block_pool = block_pool
        self.device = device
        self.tiers = list(tiers)
        self.block_size = _positive("block_size", block_size)
        self.mode: WriteMode = mode
        self.lazy_free_target = _positive("lazy_free_target", lazy_free_target)
        self.selective_min_hits = _positive("selective_min_hits", selective_min_hits)
        self.num_groups = _positive("num_groups", num_groups)
        self.world_size = _positive("world_size", world_size)
        policies = (
            [eviction_policy] * len(tiers)
            if isinstance(eviction_policy, str)
            else list(eviction_policy)
        )
        if len(policies) != len(tiers):
            raise ConfigError(f"{len(policies)} eviction policies for {len(tiers)} tiers")
        self.indexes = [
            TierIndex(t.name, t.num_slots, policy, block_size=block_size)
            for t, policy in zip(tiers, policies, strict=True)
        ]
        self._tier_stats = [TierStats() for _ in tiers]
        self._stats = OffloadStats(tiers=dict(zip(names, self._tier_stats, strict=True)))
        self._pipeline = pipeline or TransferPipeline()
        self._requests: dict[str, RequestState] = {}
        self._hits: dict[str, HitInfo] = {}
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
            self._maybe_forget,
        )
        if mode == "lazy":
            self._transfers.writeback = self._lazy
        self._event_ids = itertools.count(1)
        self._step_ids = itertools.count(1)
        self._entered = False

    # -- lifecycle -------------------------------------------------------------------

    @asynccontextmanager
    async def _serve(self) -> Any:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(cast(Any, self.device))
            for tier, index in zip(self.tiers, self.indexes, strict=True):
                await stack.enter_async_context(cast(Any, tier))
                recover = getattr(tier, "recover", None)
                if recover is not None:
                    index.restore(await recover())
            await stack.enter_async_context(self._pipeline)
            group = await stack.enter_async_context(anyio.create_task_group())
            self._transfers.runtime.bind(group)
            try:
                yield self
            finally:
                self._transfers.runtime.bind(None)

    def _enter(self) -> None:
        if self._entered:
            raise InvalidRequestError("an OffloadManager can be entered once")
        self._entered = True

    async def __aenter__(self) -> Self:
        self._enter()
        self._session = self._serve()
        await self._session.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._session.__aexit__(exc_type, exc, tb)
        finally:
            self._release_all()

    def __enter__(self) -> Self:
        self._enter()
        self._transfers.runtime.start_thread(self._serve)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._transfers.runtime.stop_thread()
        finally:
            self._release_all()

    def _release_all(self) -> None:
        """After the jobs ended: apply their outcomes, drop what never ran."""
        self._transfers.drain()
        for store in list(self._transfers.stores.values()):
            self._transfers.end_store(store, ok=False)
        for load in list(self._transfers.loads.values()):
            self._transfers.end_load(load, error=True, missing=())

    # -- lookups -----------------------------------------------------------------------

    def _keys(self, block_hash: BlockHash) -> list[BlockKey]:
        return [make_block_hash_with_group_id(block_hash, g) for g in range(self.num_groups)]

    def _holder(self, keys: list[BlockKey], stats: bool = False) -> int | None:
        """The first tier holding every key, or None."""
        for level, index in enumerate(self.indexes):
            if stats:
                self._tier_stats[level].queries += 1
            if all(index.contains(key) for key in keys):
                if stats:
                    self._tier_stats[level].hits += 1
                return level
        return None

    def get_num_new_matched_tokens(
        self, request: KVCacheRequest, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens beyond the device hit that the lower tiers hold, as a prefix.

        At least one prompt token is always left to compute: when the whole
        prompt would hit, the last full block is dropped.

        Returns:
            ``(num_tokens, is_async)``: ``is_async`` is True when blocks must
            be loaded (the request waits for :meth:`take_finished`).
        """
        self._transfers.drain()
        if num_computed_tokens < 0 or num_computed_tokens % self.block_size:
            raise InvalidRequestError(
                f"num_computed_tokens must be a multiple of {self.block_size} >= 0, "
                f"got {num_computed_tokens}"
            )
        hashes = request.block_hashes
        start = num_computed_tokens // self.block_size
        limit = min(len(hashes), max(0, request.num_tokens - 1) // self.block_size)
        found: dict[str, int] = {tier.name: 0 for tier in self.tiers}
        hit = 0
        for position in range(start, limit):
            level = self._holder(self._keys(hashes[position]), stats=True)
            if level is None:
                break
            found[self.tiers[level].name] += 1
            hit += 1
        if self.mode == "selective":
            self._hit_counter.record(hashes[:start])
        tokens = hit * self.block_size
        info = HitInfo(start, found, max(0, request.num_tokens - num_computed_tokens - tokens))
        self._hits[request.request_id] = info
        self._stats.lookups += 1
        self._stats.device_hit_blocks += start
        self._stats.tokens_to_compute += info.tokens_to_compute
        return tokens, hit > 0

    def hit_info(self, request_id: str) -> HitInfo | None:
        """Where the request's blocks were found at its last lookup."""
        return self._hits.get(request_id)

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
                the block size, or the groups do not match.
        """
        self._transfers.drain()
        if len(blocks.blocks) != self.num_groups:
            raise InvalidRequestError(
                f"expected {self.num_groups} KV cache group(s), got {len(blocks.blocks)}"
            )
        if num_external_tokens < 0 or num_external_tokens % self.block_size:
            raise InvalidRequestError(
                f"num_external_tokens must be a multiple of {self.block_size} >= 0, "
                f"got {num_external_tokens}"
            )
        rid = request.request_id
        state = self._requests.get(rid)
        ids = [[block.block_id for block in group] for group in blocks.blocks]
        if state is None:
            state = self._requests[rid] = RequestState(rid, ids)
        else:
            state.block_ids = ids
        if num_external_tokens and state.load is None:
            state.load = self._plan_load(request, blocks, num_external_tokens // self.block_size)

    def _plan_load(
        self, request: KVCacheRequest, blocks: KVCacheBlocks, count: int
    ) -> LoadEvent | None:
        group0 = blocks.blocks[0]
        first = 0
        while first < len(group0) and (group0[first].is_null or group0[first].block_hash):
            first += 1
        hashes = request.block_hashes
        end = min(first + count, len(group0), len(hashes))
        event = LoadEvent(next(self._event_ids), request.request_id, [], [], [], first_block=first)
        failed: list[int] = []
        for position in range(first, end):
            keys = self._keys(hashes[position])
            level = self._holder(keys)
            targets = [blocks.blocks[g][position] for g in range(self.num_groups)]
            if level is None or failed:  # evicted since the lookup: this and the rest fail
                failed.extend(b.block_id for b in targets if not b.is_null)
                continue
            for key, target in zip(keys, targets, strict=True):
                if target.is_null or target.block_hash is not None:
                    continue  # nothing to load, or it already holds computed bytes
                slot = self.indexes[level].pin([key])[0]
                event.pins.append((self.indexes[level], key))
                event.targets.append(target)
                event.keys.append(key)
                event.first_slots.append(slot if level == 0 else -1)
                if level:
                    self._stage(event, level, slot, key)
        event.failed = failed
        if not event.targets:
            self._transfers.unpin(event)
            if failed:  # nothing left to load: report the failure now
                self._transfers.finished.append(
                    FinishedLoad(request.request_id, False, tuple(failed))
                )
            return None
        self.block_pool.touch(event.targets)
        self._transfers.loads[event.event_id] = event
        return event

    @staticmethod
    def _stage(event: LoadEvent, level: int, slot: int, key: BlockKey) -> None:
        for stage in event.stages:
            if stage.level == level:
                stage.src_slots.append(slot)
                stage.keys.append(key)
                return
        event.stages.append(Stage(level, [slot], [key]))

    # -- per step ----------------------------------------------------------------------

    def build_step(self, scheduler_output: SchedulerOutput) -> StepPlan:
        """Start this step's loads and plan its stores.

        Raises:
            ClosedError: The manager is not entered.
        """
        self._transfers.drain()
        step_id = next(self._step_ids)
        loads = []
        for event in list(self._transfers.loads.values()):  # planned and running loads
            state = self._requests.get(event.request_id)
            if not event.dispatched and state is not None and state.load is event:
                loads.append(self._transfers.dispatch_load(state))
        candidates.track_blocks(
            self._requests, scheduler_output, self.num_groups, live=self.mode == "eager"
        )
        if self.mode == "lazy":
            stores = self._plan_lazy(step_id)
        else:
            if self.mode == "eager":
                columns = candidates.eager(self.block_pool, self._requests, scheduler_output)
            else:
                due = self._hit_counter.take_due()
                columns = candidates.selective(self.block_pool, due, self.num_groups)
            stores = self._plan_stores(step_id, columns)
        return StepPlan(
            step_id,
            tuple(spec for spec in loads if spec is not None),
            () if stores is None else (stores,),
        )

    def step_computed(self, step_id: int) -> None:
        """The forward pass of step ``step_id`` (and of every earlier one) ended.

        Starts the stores of blocks those steps computed.
        """
        self._transfers.drain()
        for event in list(self._transfers.stores.values()):
            if not event.dispatched and event.step_id <= step_id:
                self._transfers.dispatch_store(event)

    def _plan_stores(self, step_id: int, columns: list[candidates.Column]) -> StoreSpec | None:
        first = self.indexes[0]
        blocks: list[KVCacheBlock] = []
        keys: list[BlockKey] = []
        owners: set[str] = set()
        seen: set[BlockKey] = set()
        for column, rid in columns:
            for block in column:
                key = block.block_hash
                if block.is_null or key is None or block.block_id in self._transfers.in_flight:
                    continue
                if key in seen or first.holds(key):
                    continue  # held below, or being stored by an earlier step's event
                seen.add(key)
                blocks.append(block)
                keys.append(key)
                if rid:
                    owners.add(rid)
        room = first.num_free + first.num_evictable
        if len(keys) > room:
            self._tier_stats[0].dropped_stores += len(keys) - room
            blocks, keys = blocks[:room], keys[:room]
        if not keys:
            return None
        reservation = first.reserve(keys)
        event = StoreEvent(
            next(self._event_ids),
            step_id,
            blocks,
            list(reservation.keys),
            list(reservation.slots),
            placement.demotions(self.indexes, self._tier_stats, 0, reservation),
            owners,
        )
        self.block_pool.touch(blocks)
        self._transfers.in_flight.update(block.block_id for block in blocks)
        self._transfers.stores[event.event_id] = event
        for rid in owners:
            self._requests[rid].store_events.add(event.event_id)
        if self.mode != "eager":  # blocks computed in earlier steps: their bytes exist
            self._transfers.dispatch_store(event)
        ids = tuple(block.block_id for block in blocks)
        return StoreSpec(event.event_id, self.tiers[0].name, ids, tuple(event.slots))

    def _plan_lazy(self, step_id: int) -> StoreSpec | None:
        """Write-back: the blocks :class:`WriteBack` picks, in one batch (no owners)."""
        first = self.indexes[0]
        room = first.num_free + first.num_evictable
        found = self._lazy.scan(self.block_pool, first, room)  # taken and referenced
        keys: Collection[BlockKey] = found.keys()
        blocks = list(found.values())
        ids = [block.block_id for block in blocks]
        in_flight = self._transfers.in_flight
        if len(blocks) > room or not in_flight.isdisjoint(ids):
            kept = [i for i, block_id in enumerate(ids) if block_id not in in_flight]  # all
            if len(kept) > room:  # the safety part of the walk needed more than fits
                self._tier_stats[0].dropped_stores += len(kept) - room
                self._lazy.reset()  # the blocks left out are still unwritten
            left = set(range(len(ids))) - set(kept[:room])
            self.block_pool.free_blocks(blocks[i] for i in sorted(left))
            listed = list(keys)
            keys = [listed[i] for i in kept[:room]]
            blocks = [blocks[i] for i in kept[:room]]
            ids = [ids[i] for i in kept[:room]]
        if not blocks:
            self._lazy.settle(self.block_pool, first)
            return None
        reservation = first.reserve_new(keys)
        in_flight.update(ids)
        event = StoreEvent(
            next(self._event_ids),
            step_id,
            blocks,
            list(reservation.keys),
            list(reservation.slots),
            placement.demotions(self.indexes, self._tier_stats, 0, reservation),
            set(),
        )
        self._transfers.stores[event.event_id] = event
        self._lazy.settle(self.block_pool, first)
        self._transfers.dispatch_store(event)  # computed in earlier steps: their bytes exist
        return StoreSpec(event.event_id, self.tiers[0].name, tuple(ids), reservation.slots)

    # -- engine-facing results -----------------------------------------------------------

    def report_store_done(self, event_id: int, workers: int = 1) -> None:
        """Count store completions reported by other tensor-parallel workers.

        An event ends when ``world_size`` workers (the local pipeline
        included) reported it. Unknown or ended events are ignored.
        """
        self._transfers.report(event_id, workers)

    def take_finished(self) -> list[FinishedLoad]:
        """Loads that ended since the last call (each reported exactly once)."""
        self._transfers.drain()
        finished, self._transfers.finished = self._transfers.finished, []
        return finished

    def load_in_flight(self, request_id: str) -> bool:
        """The request has a load planned or running."""
        state = self._requests.get(request_id)
        return state is not None and state.load is not None

    async def wait_for_loads(self, request_ids: Iterable[str]) -> None:
        """Wait (async engines) until none of the requests has a load in flight."""
        wanted = list(request_ids)
        self._transfers.drain()
        while any(self.load_in_flight(rid) for rid in wanted):
            await self._transfers.runtime.wait_async()
            self._transfers.drain()

    def wait_for_loads_blocking(
        self, request_ids: Iterable[str], timeout: float | None = None
    ) -> bool:
        """Block (synchronous engines) until the requests' loads ended.

        Returns:
            False when ``timeout`` seconds passed first.
        """
        wanted = list(request_ids)
        self._transfers.drain()
        while any(self.load_in_flight(rid) for rid in wanted):
            if not self._transfers.runtime.wait_blocking(timeout):
                return False
            self._transfers.drain()
        return True

    async def wait_idle(self) -> None:
        """Wait (async engines) until every started store and load ended locally."""
        self._transfers.drain()
        while self._transfers.busy():
            await self._transfers.runtime.wait_async()
            self._transfers.drain()

    def wait_idle_blocking(self, timeout: float | None = None) -> bool:
        """Block (synchronous engines) until every started transfer ended locally.

        Returns:
            False when ``timeout`` seconds passed first.
        """
        self._transfers.drain()
        while self._transfers.busy():
            if not self._transfers.runtime.wait_blocking(timeout):
                return False
            self._transfers.drain()
        return True

    def request_finished(self, request: KVCacheRequest) -> bool:
        """The request ended (finished, aborted or preempted for good).

        Returns:
            True when a load or store of it is still in flight: its state is
            kept until they end (the device blocks involved stay referenced
            by the manager meanwhile, so the engine may free them now).
        """
        self._transfers.drain()
        state = self._requests.get(request.request_id)
        self._hits.pop(request.request_id, None)
        if state is None:
            return False
        if state.load is not None and not state.load.dispatched:
            self._transfers.drop_load(state.load)
            state.load = None
        state.finished = True
        if state.busy:
            return True
        del self._requests[request.request_id]
        return False

    def _maybe_forget(self, state: RequestState) -> None:
        if state.finished and not state.busy:
            self._requests.pop(state.request_id, None)

    def has_request(self, request_id: str) -> bool:
        """The manager still tracks the request."""
        return request_id in self._requests

    # -- stats and events ----------------------------------------------------------------

    def stats(self) -> OffloadStats:
        """A snapshot of the cumulative counters."""
        self._transfers.drain()
        tiers = {name: attrs.evolve(stats) for name, stats in self._stats.tiers.items()}
        return attrs.evolve(self._stats, tiers=tiers)

    def take_events(self) -> list[KVCacheEvent]:
        """Lower tiers' ``BlockStored`` / ``BlockRemoved`` events since the last call."""
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
        """Device block ids whose store has not ended."""
        return frozenset(self._transfers.in_flight)
