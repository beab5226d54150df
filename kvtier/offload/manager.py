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

import functools
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self, cast

import anyio
import attrs

from kvtier.block import KVCacheBlock
from kvtier.errors import ConfigError, InvalidRequestError, TierFullError
from kvtier.events import KVCacheEvent
from kvtier.hashing import BlockHash, make_block_hash_with_group_id
from kvtier.log import get_logger
from kvtier.manager import KVCacheBlocks
from kvtier.offload import jobs
from kvtier.offload._state import (
    Demotion,
    LoadEvent,
    LoadOutcome,
    RequestState,
    Stage,
    StoreEvent,
    StoreOutcome,
)
from kvtier.offload.plan import (
    FinishedLoad,
    HitInfo,
    LoadSpec,
    SchedulerOutput,
    StepPlan,
    StoreSpec,
    WriteMode,
)
from kvtier.offload.runtime import Runtime
from kvtier.offload.stats import OffloadStats, TierStats
from kvtier.pool import BlockPool
from kvtier.request import KVCacheRequest
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import Reservation, TierIndex
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
        eviction_policy: Eviction policy name of every lower tier's index.
        lazy_free_target: Lazy mode: free device blocks, from the eviction
            end of the free queue, kept safe to evict (unhashed or already
            stored below).
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
        eviction_policy: str = "lru",
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
        self.indexes = [
            TierIndex(t.name, t.num_slots, eviction_policy, block_size=block_size) for t in tiers
        ]
        self._tier_stats = [TierStats() for _ in tiers]
        self._stats = OffloadStats(tiers=dict(zip(names, self._tier_stats, strict=True)))
        self._pipeline = pipeline or TransferPipeline()
        self._runtime = Runtime()
        self._requests: dict[str, RequestState] = {}
        self._hits: dict[str, HitInfo] = {}
        self._stores: dict[int, StoreEvent] = {}
        self._loads: dict[int, LoadEvent] = {}
        self._in_flight: set[int] = set()  # device block ids being stored (seed 003)
        self._finished: list[FinishedLoad] = []
        self._hit_counts: OrderedDict[BlockHash, int] = OrderedDict()
        self._selective: list[BlockHash] = []
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
            self._runtime.bind(group)
            try:
                yield self
            finally:
                self._runtime.bind(None)

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
        self._runtime.start_thread(self._serve)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._runtime.stop_thread()
        finally:
            self._release_all()

    def _release_all(self) -> None:
        """After the jobs ended: apply their outcomes, drop what never ran."""
        self._drain()
        for store in list(self._stores.values()):
            self._end_store(store, ok=False)
        for load in list(self._loads.values()):
            self._end_load(load, error=True, missing=())

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
        self._drain()
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
            self._count_device_hits(hashes[:start])
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

    def _count_device_hits(self, hashes: Sequence[BlockHash]) -> None:
        counts = self._hit_counts
        for block_hash in hashes:
            count = counts.pop(block_hash, 0) + 1
            counts[block_hash] = count
            if count == self.selective_min_hits:
                self._selective.append(block_hash)
        while len(counts) > 4 * self.block_pool.num_gpu_blocks:
            counts.popitem(last=False)

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
        self._drain()
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
            self._unpin(event)
            if failed:  # nothing left to load: report the failure now
                self._finished.append(FinishedLoad(request.request_id, False, tuple(failed)))
            return None
        self.block_pool.touch(event.targets)
        self._loads[event.event_id] = event
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
        self._drain()
        step_id = next(self._step_ids)
        loads = [self._dispatch_load(state) for state in self._requests.values() if state.load]
        self._track_blocks(scheduler_output)
        if self.mode == "eager":
            candidates = self._eager_candidates(scheduler_output)
        elif self.mode == "lazy":
            candidates = self._lazy_candidates()
        else:
            candidates = self._selective_candidates()
        stores = self._plan_stores(step_id, candidates)
        return StepPlan(
            step_id,
            tuple(spec for spec in loads if spec is not None),
            () if stores is None else (stores,),
        )

    def step_computed(self, step_id: int) -> None:
        """The forward pass of step ``step_id`` (and of every earlier one) ended.

        Starts the stores of blocks those steps computed.
        """
        self._drain()
        for event in list(self._stores.values()):
            if not event.dispatched and event.step_id <= step_id:
                self._dispatch_store(event)

    def _track_blocks(self, out: SchedulerOutput) -> None:
        for rid in out.preempted:
            state = self._requests.get(rid)
            if state is not None:
                state.block_ids = [[] for _ in range(self.num_groups)]
                state.stored_upto = 0
        for rid, ids in out.new_requests.items():
            state = self._requests.get(rid)
            fresh = [list(group) for group in ids]
            if state is None:
                self._requests[rid] = RequestState(rid, fresh)
            else:
                state.block_ids, state.stored_upto = fresh, 0
        for rid, added in out.cached_requests.items():
            state = self._requests.get(rid)
            if state is not None and added is not None:
                for group, more in zip(state.block_ids, added, strict=True):
                    group.extend(more)

    def _eager_candidates(self, out: SchedulerOutput) -> list[tuple[list[KVCacheBlock], str]]:
        blocks = self.block_pool.blocks
        found: list[tuple[list[KVCacheBlock], str]] = []
        for rid in out.num_scheduled_tokens:
            state = self._requests.get(rid)
            if state is None or not state.block_ids:
                continue
            group0 = state.block_ids[0]
            position = state.stored_upto
            while position < len(group0):
                column = [blocks[ids[position]] for ids in state.block_ids]
                if any(b.block_hash is None and not b.is_null for b in column):
                    break  # not full, or not computed yet
                found.append((column, rid))
                position += 1
            state.stored_upto = position
        return found

    def _lazy_candidates(self) -> list[tuple[list[KVCacheBlock], str]]:
        first = self.indexes[0]
        safe = 0
        found: list[tuple[list[KVCacheBlock], str]] = []
        for block in self.block_pool.free_block_queue:
            if safe >= self.lazy_free_target:
                break
            safe += 1
            key = block.block_hash
            if key is None or block.block_id in self._in_flight or key in first:
                continue
            found.append(([block], ""))
        return found

    def _selective_candidates(self) -> list[tuple[list[KVCacheBlock], str]]:
        found: list[tuple[list[KVCacheBlock], str]] = []
        for block_hash in self._selective:
            column = self.block_pool.get_cached_block(block_hash, range(self.num_groups))
            if column is not None:
                found.append((column, ""))
        self._selective.clear()
        return found

    def _plan_stores(
        self, step_id: int, candidates: list[tuple[list[KVCacheBlock], str]]
    ) -> StoreSpec | None:
        first = self.indexes[0]
        blocks: list[KVCacheBlock] = []
        keys: list[BlockKey] = []
        owners: set[str] = set()
        seen: set[BlockKey] = set()
        for column, rid in candidates:
            for block in column:
                key = block.block_hash
                if block.is_null or key is None or block.block_id in self._in_flight:
                    continue
                if key in seen or first.slot_of(key) is not None or _reserved(first, key):
                    continue  # held below, or stored by an earlier step's event
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
            self._demotions(0, reservation),
            owners,
        )
        self.block_pool.touch(blocks)
        self._in_flight.update(block.block_id for block in blocks)
        self._stores[event.event_id] = event
        for rid in owners:
            self._requests[rid].store_events.add(event.event_id)
        if self.mode != "eager":  # blocks computed in earlier steps: their bytes exist
            self._dispatch_store(event)
        ids = tuple(block.block_id for block in blocks)
        return StoreSpec(event.event_id, self.tiers[0].name, ids, tuple(event.slots))

    def _demotions(self, level: int, reservation: Reservation) -> list[Demotion]:
        """Copy blocks evicted from ``level`` to the next tier down (if any)."""
        self._tier_stats[level].evictions += len(reservation.evicted)
        if level + 1 >= len(self.indexes) or not reservation.evicted:
            return []
        below = self.indexes[level + 1]
        wanted = [(slot, key) for slot, key in reservation.evicted if key not in below]
        room = below.num_free + below.num_evictable
        wanted = wanted[:room]
        if not wanted:
            return []
        lower = below.reserve(key for _, key in wanted)
        by_key = dict(zip(lower.keys, lower.slots, strict=True))
        moved = [(slot, key) for slot, key in wanted if key in by_key]
        demotion = Demotion(
            level, [s for s, _ in moved], [by_key[k] for _, k in moved], [k for _, k in moved]
        )
        # A chain of demotions (disk evicting to a third tier) is not followed:
        # blocks evicted from the level below are dropped.
        self._tier_stats[level + 1].evictions += len(lower.evicted)
        return [demotion]

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch_store(self, event: StoreEvent) -> None:
        event.dispatched = True
        push = self._runtime.push
        job = functools.partial(
            jobs.run_store, self._pipeline, self.device, self.tiers, event, push
        )
        self._runtime.spawn(job)

    def _dispatch_load(self, state: RequestState) -> LoadSpec | None:
        event = state.load
        if event is None or event.dispatched:
            return None
        if event.stages and not self._reserve_stages(event):
            state.load = None
            self._end_load(event, error=True, missing=())
            return None
        event.dispatched = True
        push = self._runtime.push
        self._runtime.spawn(
            functools.partial(jobs.run_load, self._pipeline, self.device, self.tiers, event, push)
        )
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

    def _reserve_stages(self, event: LoadEvent) -> bool:
        """Reserve first-tier slots for blocks staged from slower tiers."""
        first = self.indexes[0]
        keys = [key for stage in event.stages for key in stage.keys]
        if any(key in first or _reserved(first, key) for key in keys):
            return False
        try:
            reservation = first.reserve(keys)
        except TierFullError:
            return False
        by_key = dict(zip(reservation.keys, reservation.slots, strict=True))
        for stage in event.stages:
            stage.dst_slots = [by_key[key] for key in stage.keys]
        event.first_slots = [
            by_key.get(key, slot) for key, slot in zip(event.keys, event.first_slots, strict=True)
        ]
        event.demotions = self._demotions(0, reservation)
        return True

    # -- completions -------------------------------------------------------------------

    def _drain(self) -> None:
        outcomes = self._runtime.outcomes
        while outcomes:
            outcome = outcomes.popleft()
            if isinstance(outcome, StoreOutcome):
                self._on_store(outcome)
            else:
                self._on_load(outcome)

    def _on_store(self, outcome: StoreOutcome) -> None:
        event = self._stores.get(outcome.event_id)
        if event is None:
            return
        for demotion, ok in zip(event.demotions, outcome.demotions_ok, strict=True):
            below = self.indexes[demotion.level + 1]
            if ok:
                below.commit(demotion.keys)
                self._tier_stats[demotion.level + 1].demotions += len(demotion.keys)
            else:
                below.abort(demotion.keys)
        event.demotions = []
        event.local_done = True
        if outcome.error is not None:
            event.error = outcome.error
            self._end_store(event, ok=False)
            return
        event.reports += 1
        if event.reports >= self.world_size:
            self._end_store(event, ok=True)

    def report_store_done(self, event_id: int, workers: int = 1) -> None:
        """Count store completions reported by other tensor-parallel workers.

        An event ends when ``world_size`` workers (the local pipeline
        included) reported it. Unknown or ended events are ignored.
        """
        self._drain()
        event = self._stores.get(event_id)
        if event is None:
            return
        event.reports += workers
        if event.reports >= self.world_size and event.local_done:
            self._end_store(event, ok=True)

    def _end_store(self, event: StoreEvent, *, ok: bool) -> None:
        del self._stores[event.event_id]
        first = self.indexes[0]
        stats = self._tier_stats[0]
        for demotion in event.demotions:  # never ran
            self.indexes[demotion.level + 1].abort(demotion.keys)
        if ok:
            first.commit(event.keys)
            stats.stores += len(event.keys)
        else:
            first.abort(event.keys)
            stats.failed_transfers += len(event.keys)
            if event.error is not None:
                _log.warning("store_failed", task=event.event_id, error=repr(event.error))
        self._in_flight.difference_update(block.block_id for block in event.blocks)
        self.block_pool.free_blocks(event.blocks)
        for rid in event.request_ids:
            state = self._requests.get(rid)
            if state is not None:
                state.store_events.discard(event.event_id)
                self._maybe_forget(state)

    def _on_load(self, outcome: LoadOutcome) -> None:
        event = self._loads.get(outcome.event_id)
        if event is None:
            return
        self._end_load(event, error=outcome.error is not None, missing=outcome.missing)
        if outcome.error is not None:
            _log.warning("load_failed", task=event.event_id, error=repr(outcome.error))

    def _end_load(
        self, event: LoadEvent, *, error: bool, missing: tuple[tuple[int, BlockKey], ...]
    ) -> None:
        self._loads.pop(event.event_id, None)
        first = self.indexes[0]
        staged = [key for stage in event.stages for key in stage.keys if stage.dst_slots]
        if staged:
            if error:
                first.abort(staged)
            else:
                first.commit(staged)
        for demotion in event.demotions:
            self.indexes[demotion.level + 1].abort(demotion.keys)
        self._unpin(event)
        for level, key in missing:
            self.indexes[level].remove([key])
        count = len(event.keys)
        for level in {0, *(stage.level for stage in event.stages)}:
            stats = self._tier_stats[level]
            n = count if level == 0 else sum(len(s.keys) for s in event.stages if s.level == level)
            if error:
                stats.failed_transfers += n
            else:
                stats.loads += n
        self.block_pool.free_blocks(event.targets)
        ids = [block.block_id for block in event.targets] if error else []
        ids.extend(event.failed)  # positions already gone when the load was planned
        self._finished.append(FinishedLoad(event.request_id, not ids, tuple(ids)))
        self._stats.loads_finished += 1
        self._stats.loads_failed += int(bool(ids))
        state = self._requests.get(event.request_id)
        if state is not None and state.load is event:
            state.load = None
            self._maybe_forget(state)

    def _drop_load(self, event: LoadEvent) -> None:
        """Forget a load that was planned and never started."""
        self._loads.pop(event.event_id, None)
        self._unpin(event)
        self.block_pool.free_blocks(event.targets)

    @staticmethod
    def _unpin(event: LoadEvent) -> None:
        for index, key in event.pins:
            index.unpin([key])
        event.pins = []

    # -- engine-facing results -----------------------------------------------------------

    def take_finished(self) -> list[FinishedLoad]:
        """Loads that ended since the last call (each reported exactly once)."""
        self._drain()
        finished, self._finished = self._finished, []
        return finished

    def load_in_flight(self, request_id: str) -> bool:
        """The request has a load planned or running."""
        state = self._requests.get(request_id)
        return state is not None and state.load is not None

    async def wait_for_loads(self, request_ids: Iterable[str]) -> None:
        """Wait (async engines) until none of the requests has a load in flight."""
        wanted = list(request_ids)
        self._drain()
        while any(self.load_in_flight(rid) for rid in wanted):
            await self._runtime.wait_async()
            self._drain()

    def wait_for_loads_blocking(
        self, request_ids: Iterable[str], timeout: float | None = None
    ) -> bool:
        """Block (synchronous engines) until the requests' loads ended.

        Returns:
            False when ``timeout`` seconds passed first.
        """
        wanted = list(request_ids)
        self._drain()
        while any(self.load_in_flight(rid) for rid in wanted):
            if not self._runtime.wait_blocking(timeout):
                return False
            self._drain()
        return True

    def _busy(self) -> bool:
        stores = any(e.dispatched and not e.local_done for e in self._stores.values())
        return stores or any(e.dispatched for e in self._loads.values())

    async def wait_idle(self) -> None:
        """Wait (async engines) until every started store and load ended locally."""
        self._drain()
        while self._busy():
            await self._runtime.wait_async()
            self._drain()

    def wait_idle_blocking(self, timeout: float | None = None) -> bool:
        """Block (synchronous engines) until every started transfer ended locally.

        Returns:
            False when ``timeout`` seconds passed first.
        """
        self._drain()
        while self._busy():
            if not self._runtime.wait_blocking(timeout):
                return False
            self._drain()
        return True

    def request_finished(self, request: KVCacheRequest) -> bool:
        """The request ended (finished, aborted or preempted for good).

        Returns:
            True when a load or store of it is still in flight: its state is
            kept until they end (the device blocks involved stay referenced
            by the manager meanwhile, so the engine may free them now).
        """
        self._drain()
        state = self._requests.get(request.request_id)
        self._hits.pop(request.request_id, None)
        if state is None:
            return False
        if state.load is not None and not state.load.dispatched:
            self._drop_load(state.load)
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
        self._drain()
        tiers = {name: attrs.evolve(stats) for name, stats in self._stats.tiers.items()}
        return attrs.evolve(self._stats, tiers=tiers)

    def take_events(self) -> list[KVCacheEvent]:
        """Lower tiers' ``BlockStored`` / ``BlockRemoved`` events since the last call."""
        self._drain()
        return [event for index in self.indexes for event in index.take_events()]

    @property
    def in_flight_store_blocks(self) -> frozenset[int]:
        """Device block ids whose store has not ended."""
        return frozenset(self._in_flight)


def _reserved(index: TierIndex, key: BlockKey) -> bool:
    """``key`` holds a slot in ``index`` without being visible (being written)."""
    return index.holds(key) and not index.contains(key)
