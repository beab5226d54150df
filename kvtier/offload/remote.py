"""Lookups in shared tiers: blocks that other engines stored after this one opened.

A shared tier (Redis) is written by every engine that uses it. Its index in
this process knows only what this process stored there, or found when it
opened (``scan_on_open``). :class:`RemoteProbe` closes the gap at lookup time:
before the engine's lookup it asks each *probing* tier (one that implements
:class:`~kvtier.tiers.base.ProbingStore`), in one call per tier (Redis: a
round trip per 1,024 blocks), which of the blocks after those the tiers
already know of it holds now, and enters the longest held prefix into that
tier's index as resident. The lookup that follows counts them as hits; the
load reads and verifies each block as any other, so a block gone since the
probe (Redis evicted it) is a failed load, recomputed by the engine, never
wrong bytes.

The probe is split so that bookkeeping stays on the engine's thread: the
engine's thread plans (:meth:`RemoteProbe.plan`) and adopts
(:meth:`RemoteProbe.adopt`); only :meth:`RemoteProbe.ask` awaits the network,
on the loop the tiers run on.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import attrs

from kvtier.allocation import check_tokens
from kvtier.errors import TierFullError
from kvtier.hashing import BlockHash, make_block_hash_with_group_id
from kvtier.log import get_logger
from kvtier.offload.stats import TierStats
from kvtier.request import KVCacheRequest
from kvtier.tiers.base import BlockKey, BlockStore, ProbingStore
from kvtier.tiers.index import TierIndex

__all__ = ["ProbePlan", "RemoteProbe"]

_log = get_logger("kvtier.offload")


@attrs.frozen
class ProbePlan:
    """What one probe asks: the positions after those some tier already holds.

    Attributes:
        request_id: The request probed.
        first: The position of the first block no tier's index holds.
        keys: Per position from ``first`` on, one key per KV cache group.
        levels: The tiers asked (indexes into the manager's stack).
        held: The keys of the positions before ``first`` (after the device
            hit) that some index holds: the request's own lower-tier hits,
            which adopting blocks must not evict.
    """

    request_id: str
    first: int
    keys: tuple[tuple[BlockKey, ...], ...]
    levels: tuple[int, ...]
    held: tuple[BlockKey, ...] = ()


class RemoteProbe:
    """Finds and adopts blocks that shared tiers gained behind this process's back.

    Args:
        tiers: The manager's lower tiers, fastest first.
        indexes: Their indexes.
        stats: Their counters.
        block_size: Tokens per block.
        num_groups: KV cache groups.
        max_blocks: Most blocks one probe asks about (0: never probe).
    """

    def __init__(
        self,
        tiers: Sequence[BlockStore],
        indexes: Sequence[TierIndex],
        stats: Sequence[TierStats],
        *,
        block_size: int,
        num_groups: int,
        max_blocks: int,
    ) -> None:
        self.tiers = list(tiers)
        self.indexes = list(indexes)
        self.stats = list(stats)
        self.block_size = block_size
        self.num_groups = num_groups
        self.max_blocks = max_blocks
        self.levels = tuple(
            level
            for level, tier in enumerate(self.tiers)
            if max_blocks and isinstance(tier, ProbingStore)
        )

    def plan(self, request: KVCacheRequest, num_computed_tokens: int) -> ProbePlan | None:
        """The blocks to ask about, or None when there is nothing to ask.

        Positions run from the first block after the device hit that no
        tier's index holds, up to the last block a lookup may hit (one prompt
        token is always computed), at most ``max_blocks`` of them.

        Raises:
            InvalidRequestError: ``num_computed_tokens`` is not a multiple of
                the block size >= 0.
        """
        check_tokens("num_computed_tokens", num_computed_tokens, self.block_size)
        if not self.levels:
            return None
        hashes = request.block_hashes
        limit = min(len(hashes), max(0, request.num_tokens - 1) // self.block_size)
        position = num_computed_tokens // self.block_size
        held: list[BlockKey] = []
        while position < limit and self._held(found := self._keys(hashes[position])):
            held.extend(found)
            position += 1
        end = min(limit, position + self.max_blocks)
        if position >= end:
            return None
        keys = tuple(tuple(self._keys(hashes[p])) for p in range(position, end))
        return ProbePlan(request.request_id, position, keys, self.levels, tuple(held))

    async def ask(self, plan: ProbePlan) -> dict[int, list[bool]]:
        """Ask every probing tier of the plan at once; ``level -> held?`` per position.

        A tier that fails or times out answers nothing (logged): its blocks
        count as absent, as a lookup that misses.
        """
        flat = [key for keys in plan.keys for key in keys]
        answers: dict[int, list[bool]] = {}

        async def one(level: int) -> None:
            tier = self.tiers[level]
            if not isinstance(tier, ProbingStore):  # the plan names probing tiers only
                return
            try:
                held = await tier.contains(flat)
            except Exception as exc:  # a lookup never fails the engine: it misses
                self.stats[level].failed_probes += 1
                _log.warning("probe_failed", tier=tier.name, n_blocks=len(flat), error=str(exc))
                return
            groups = self.num_groups
            answers[level] = [all(held[i : i + groups]) for i in range(0, len(held), groups)]

        async with anyio.create_task_group() as group:
            for level in plan.levels:
                group.start_soon(one, level)
        return answers

    def adopt(self, plan: ProbePlan, answers: dict[int, list[bool]]) -> int:
        """Enter the longest prefix the tiers hold into their indexes; how many positions.

        Each position goes to the first (fastest) probing tier that holds all
        of its keys. The prefix ends at the first position no tier holds, or
        that some index holds by now (a store got there first). Each tier's
        run of positions is entered in one reservation, so its policy hears of
        the chain tail first, as for a store; a tier without room for all of
        its run (slots pinned or reserved) enters what fits and ends the prefix.
        """
        runs: list[tuple[int, list[BlockKey]]] = []
        for position, keys in enumerate(plan.keys):
            level = next((lvl for lvl in plan.levels if _says(answers, lvl, position)), None)
            if level is None or self._held(list(keys)):
                break
            if not runs or runs[-1][0] != level:
                runs.append((level, []))
            runs[-1][1].extend(keys)
        adopted = 0
        for level, run in runs:
            entered = self._enter(level, run, plan.held)
            adopted += entered
            if entered * self.num_groups < len(run):
                break
        if adopted:
            _log.debug("probe_adopted", request=plan.request_id, n_blocks=adopted)
        return adopted

    # -- internals ---------------------------------------------------------------------

    def _keys(self, block_hash: BlockHash) -> list[BlockKey]:
        return [make_block_hash_with_group_id(block_hash, g) for g in range(self.num_groups)]

    def _held(self, keys: list[BlockKey]) -> bool:
        """Some index holds every key (visible, or being written there)."""
        return any(all(index.holds(key) for key in keys) for index in self.indexes)

    def _enter(self, level: int, keys: list[BlockKey], held: Sequence[BlockKey]) -> int:
        """Enter as many whole positions of ``keys`` as fit; how many positions.

        The request's own blocks this index holds (``held``) are pinned
        meanwhile, so making room never evicts the prefix the adopted blocks
        extend.
        """
        index = self.indexes[level]
        protect = [key for key in held if index.contains(key)]
        if protect:
            index.pin(protect, access=False)  # kept, not read
        try:
            return self._reserve(level, keys)
        finally:
            if protect:
                index.unpin(protect)

    def _reserve(self, level: int, keys: list[BlockKey]) -> int:
        index, tier, stats = self.indexes[level], self.tiers[level], self.stats[level]
        room = (index.num_free + index.num_evictable) // self.num_groups * self.num_groups
        keys = keys[:room]
        if not keys:
            return 0
        try:
            reservation = index.reserve(keys)
        except TierFullError:  # not expected after the room check; a miss all the same
            return 0
        index.commit(reservation.keys)
        stats.evictions += len(reservation.evicted)
        stats.probed_blocks += len(reservation.keys)
        if isinstance(tier, ProbingStore):
            tier.adopt(reservation.slots, reservation.keys)
        return len(keys) // self.num_groups


def _says(answers: dict[int, list[bool]], level: int, position: int) -> bool:
    """Tier ``level`` answered that it holds every key of ``position``."""
    held = answers.get(level)
    return held is not None and position < len(held) and held[position]
