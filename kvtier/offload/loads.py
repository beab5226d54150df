"""Lookups in the lower tiers and the loads they lead to (planning only, no I/O).

:class:`LoadPlanner` answers the engine's lookup (how many tokens beyond the
device hit the lower tiers hold, as a prefix, CPU first), records where each
request's blocks were found, and, once a request's device blocks are
allocated, records them and plans its load: it pins the source blocks in
their tiers, stages blocks held only by slower tiers through the first one,
and references the target device blocks until the load ends.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence

import attrs

from kvtier.allocation import check_hashes, check_tokens
from kvtier.block import KVCacheBlock
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.hashing import BlockHash, make_block_hash_with_group_id
from kvtier.manager import KVCacheBlocks
from kvtier.offload._state import LoadEvent, Stage
from kvtier.offload.candidates import HitCounter
from kvtier.offload.plan import HitInfo
from kvtier.offload.transfers import Transfers
from kvtier.policies.base import PrefixAwarePolicy
from kvtier.policies.hints import BlockHint
from kvtier.policies.prefetch import PrefetchPolicy
from kvtier.request import KVCacheRequest, request_tag
from kvtier.tiers.base import BlockKey

__all__ = ["LoadPlanner"]


def _device_hit(group: Sequence[KVCacheBlock]) -> int:
    """Leading blocks that are null or hashed: the device hit, before the load's targets."""
    first = 0
    while first < len(group) and (group[first].is_null or group[first].block_hash):
        first += 1
    return first


def _check_cover(request: KVCacheRequest, blocks: KVCacheBlocks, count: int) -> None:
    """Every group's blocks and the request's hashes reach the load's last position.

    Raises:
        InvalidRequestError: Fewer blocks (or block hashes) than the device hit
            plus ``count``: the load would be cut short yet reported whole.
    """
    end = _device_hit(blocks.blocks[0]) + count
    short = min([len(group) for group in blocks.blocks] + [len(request.block_hashes)])
    if short < end:
        raise InvalidRequestError(
            f"request {request.request_id!r}: {count} external blocks after a device hit "
            f"of {end - count} need {end} blocks and block hashes, got {short} (pass "
            "every block of the request, as get_blocks returns them)"
        )


def _check_targets(rid: str, blocks: KVCacheBlocks, first: int, count: int) -> None:
    """The load's target positions, after the device hit, hold no hash yet.

    Blocks cached at allocation (``allocate_slots`` without
    ``delay_cache_blocks=True``) hold hashes already: the load would skip
    them, and the prefix cache would serve their unwritten bytes.

    Raises:
        InvalidRequestError: A target block already holds a hash.
    """
    group0 = blocks.blocks[0]
    hashed = [
        position
        for position in range(first, min(first + count, len(group0)))
        if not group0[position].is_null and group0[position].block_hash is not None
    ]
    if hashed:
        raise InvalidRequestError(
            f"request {rid!r}: the load's target blocks at positions {hashed[0]}..{hashed[-1]} "
            f"(after the {first} device-hit blocks of its last lookup) already hold hashes: "
            "allocate a request with external tokens with allocate_slots(..., "
            "delay_cache_blocks=True) and cache_blocks once it is loaded, and look it up "
            "again (get_num_new_matched_tokens) after each get_computed_blocks"
        )


@attrs.frozen
class _Lookup:
    """One lookup of a request, kept until its allocation counts it."""

    info: HitInfo
    missed: bool
    """The lookup stopped at a block no tier holds (before the prompt's end)."""
    hashes: Sequence[BlockHash]
    """The request's block hashes; the first ``info.device_blocks`` were the device hit
    (selective mode's popularity counter reads them, once the lookup counts)."""


class LoadPlanner:
    """Lookups and load planning (internal to :mod:`kvtier.offload`).

    Args:
        transfers: The manager's events in flight (and the pool, tiers,
            indexes and counters they share).
        event_ids: The manager's event id counter (shared with stores).
        block_size: Tokens per block.
        num_groups: KV cache groups.
        hit_counter: Selective mode's device-hit counter, else ``None``.
        prefetch: Decides how much of each lookup's lower-tier hit is loaded
            (the rest is left to compute), from the staging costs the
            transfers measure (``transfers.staging_costs``).
    """

    def __init__(
        self,
        transfers: Transfers,
        event_ids: Iterator[int],
        block_size: int,
        num_groups: int,
        hit_counter: HitCounter | None,
        prefetch: PrefetchPolicy,
    ) -> None:
        self.block_pool = transfers.block_pool
        self.tiers = transfers.tiers
        self.indexes = transfers.indexes
        self.stats = transfers.stats
        self.tier_stats = transfers.tier_stats
        self.transfers = transfers
        self.event_ids = event_ids
        self.block_size = block_size
        self.num_groups = num_groups
        self.hit_counter = hit_counter
        self.prefetch = prefetch
        self.hits: dict[str, HitInfo] = {}
        # The latest lookup of each request not yet allocated: counted once
        # it is (an engine asks again each step it fails to allocate).
        self.lookups: dict[str, _Lookup] = {}
        # Hints cost an object per block: built only when some policy reads them.
        self.hinted = any(isinstance(i.policy, PrefixAwarePolicy) for i in self.indexes)

    def _keys(self, block_hash: BlockHash) -> list[BlockKey]:
        return [make_block_hash_with_group_id(block_hash, g) for g in range(self.num_groups)]

    def _holder(self, keys: list[BlockKey]) -> int | None:
        """The first tier holding every key, or None."""
        for level, index in enumerate(self.indexes):
            if all(index.contains(key) for key in keys):
                return level
        return None

    def matched_tokens(self, request: KVCacheRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """See :meth:`~kvtier.offload.manager.OffloadManager.get_num_new_matched_tokens`."""
        check_tokens("num_computed_tokens", num_computed_tokens, self.block_size)
        hashes = check_hashes(request, self.block_size)
        start = num_computed_tokens // self.block_size
        limit = min(len(hashes), max(0, request.num_tokens - 1) // self.block_size)
        found: dict[str, int] = {tier.name: 0 for tier in self.tiers}
        levels: list[int] = []
        for position in range(start, limit):
            level = self._holder(self._keys(hashes[position]))
            if level is None:
                break
            found[self.tiers[level].name] += 1
            levels.append(level)
        missed = len(levels) < limit - start  # one more block was asked of every tier
        loaded = self._loadable(levels, request.num_tokens) if levels else 0
        tokens = loaded * self.block_size
        info = HitInfo(
            start,
            found,
            max(0, request.num_tokens - num_computed_tokens - tokens),
            tuple(levels),
            loaded,
        )
        self.hits[request.request_id] = info
        self.lookups[request.request_id] = _Lookup(info, missed, hashes)
        return tokens, bool(loaded)

    def _loadable(self, levels: list[int], num_tokens: int) -> int:
        """How many leading hit blocks the prefetch policy loads.

        Raises:
            ConfigError: The policy answered something other than an integer
                in ``[0, len(levels)]``.
        """
        answer = self.prefetch.loadable(levels, num_tokens, self.transfers.staging_costs)
        try:
            count = operator.index(answer)  # an int, or an integer type such as NumPy's
        except TypeError:
            count = -1
        if isinstance(answer, bool) or not 0 <= count <= len(levels):
            raise ConfigError(
                f"prefetch policy {self.prefetch!r} must return an integer in "
                f"[0, {len(levels)}] for {len(levels)} hit blocks, got {answer!r}"
            )
        return count

    def _count(self, lookup: _Lookup, external: int) -> None:
        """Add an admitted request's lookup to the counters (once, however often it was asked).

        A block found in tier ``level`` was asked of every tier down to it;
        the first block no tier holds, of every tier. ``external``: the
        blocks the engine allocated for loading (at most the lookup's
        answer; fewer leave more tokens to compute).
        """
        for level in lookup.info.levels:
            for stats in self.tier_stats[: level + 1]:
                stats.queries += 1
            self.tier_stats[level].hits += 1
        for level in lookup.info.levels[lookup.info.loaded_blocks :]:
            self.tier_stats[level].declined += 1
        if lookup.missed:
            for stats in self.tier_stats:
                stats.queries += 1
        if self.hit_counter is not None:
            self.hit_counter.record(lookup.hashes[: lookup.info.device_blocks])
        self.stats.lookups += 1
        self.stats.device_hit_blocks += lookup.info.device_blocks
        unloaded = (lookup.info.loaded_blocks - external) * self.block_size
        self.stats.tokens_to_compute += lookup.info.tokens_to_compute + unloaded

    def after_alloc(
        self, request: KVCacheRequest, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """See :meth:`~kvtier.offload.manager.OffloadManager.update_state_after_alloc`."""
        if len(blocks.blocks) != self.num_groups:
            raise InvalidRequestError(
                f"expected {self.num_groups} KV cache group(s), got {len(blocks.blocks)}"
            )
        check_tokens("num_external_tokens", num_external_tokens, self.block_size)
        rid = request.request_id
        state = self.transfers.requests.get(rid)
        # A finished request's load is its own: a new request may reuse its id
        # (see RequestBook.track).
        load = None if state is None or state.finished else state.load
        if num_external_tokens and load is not None:
            # Its load still writes the blocks of the earlier allocation: a new
            # one would be reported loaded when the old load ends, unwritten.
            raise InvalidRequestError(
                f"request {rid!r} already has a load in flight (wait for its "
                "FinishedLoad before allocating external tokens again)"
            )
        lookup = self.lookups.get(rid)
        external = num_external_tokens // self.block_size
        if lookup is not None and external > lookup.info.loaded_blocks:
            raise InvalidRequestError(
                f"request {rid!r}: {num_external_tokens} external tokens, more than the "
                f"{lookup.info.loaded_blocks * self.block_size} its last lookup answered "
                "(get_num_new_matched_tokens, after the prefetch policy)"
            )
        if external and lookup is not None:
            _check_targets(rid, blocks, lookup.info.device_blocks, external)
        if external:
            _check_cover(request, blocks, external)
        if lookup is not None:  # every check passed: the lookup counts now
            del self.lookups[rid]
            self._count(lookup, external)
        ids = [[block.block_id for block in group] for group in blocks.blocks]
        state = self.transfers.track(rid, ids)
        state.tag = request_tag(request)
        if num_external_tokens:
            state.load = self.plan_load(request, blocks, num_external_tokens // self.block_size)

    def plan_load(
        self, request: KVCacheRequest, blocks: KVCacheBlocks, count: int
    ) -> LoadEvent | None:
        """Pin the sources of ``count`` blocks after the device hit; the event, or None.

        Positions whose source was evicted since the lookup (and every one
        after them) fail; when nothing is left to load, the failure is
        reported at once and None returned.
        """
        group0 = blocks.blocks[0]
        first = _device_hit(group0)
        hashes = request.block_hashes
        end = first + count  # within the blocks and hashes (_check_cover)
        event = LoadEvent(next(self.event_ids), request.request_id, [], [], [], first_block=first)
        failed: list[int] = []
        planned: list[tuple[int, BlockKey, KVCacheBlock, BlockHint | None, int]] = []
        parents: list[BlockKey | None] = [None] * self.num_groups
        tag = request_tag(request)
        if first and self.hinted:
            parents = list(self._keys(hashes[first - 1]))
        for position in range(first, end):
            keys = self._keys(hashes[position])
            level = self._holder(keys)
            targets = [blocks.blocks[g][position] for g in range(self.num_groups)]
            if level is None or failed:  # evicted since the lookup: this and the rest fail
                failed.extend(b.block_id for b in targets if not b.is_null)
                continue
            for key, target, parent in zip(keys, targets, parents, strict=True):
                if target.is_null or target.block_hash is not None:
                    continue  # nothing to load, or it already holds computed bytes
                hint = BlockHint(position, len(hashes), parent, tag) if self.hinted else None
                planned.append((level, key, target, hint, position))
            if self.hinted:
                parents = list(keys)
        # One pin call per tier with the chain's keys in order: the index tells
        # the policy of them tail first, so a recency policy keeps the head.
        by_level: dict[int, tuple[list[BlockKey], list[BlockHint | None]]] = {}
        for level, key, _, hint, _ in planned:
            keys, hints = by_level.setdefault(level, ([], []))
            keys.append(key)
            hints.append(hint)
        slots = {
            level: iter(self.indexes[level].pin(keys, hints if self.hinted else None))
            for level, (keys, hints) in by_level.items()
        }
        for level, key, target, _, position in planned:
            slot = next(slots[level])
            event.pins.append((self.indexes[level], key))
            event.targets.append(target)
            event.keys.append(key)
            event.positions.append(position)
            event.first_slots.append(slot if level == 0 else -1)
            if level:
                self._stage(event, level, slot, key)
        event.failed = failed
        if not event.targets:
            self.transfers.unpin(event)
            if failed:  # nothing left to load: report the failure now
                self.transfers.report_load(request.request_id, failed)
            return None
        self.block_pool.touch(event.targets)
        self.transfers.loads[event.event_id] = event
        return event

    @staticmethod
    def _stage(event: LoadEvent, level: int, slot: int, key: BlockKey) -> None:
        for stage in event.stages:
            if stage.level == level:
                stage.src_slots.append(slot)
                stage.keys.append(key)
                return
        event.stages.append(Stage(level, [slot], [key]))
