"""Replay block chains through an eviction policy, and Belady's offline bound.

A workload is a sequence of *chains*: each request's prompt blocks, head
first (a block's key depends on every block before it, so a request hits the
longest prefix of its chain that is cached). At a capacity in blocks, each
request:

1. hits the longest cached prefix of its chain;
2. touches its chain from the tail to the head: missing blocks are inserted,
   cached ones accessed. Touching the head last makes it the most recent, so
   recency-based policies evict chain tails before their heads, as an engine
   freeing a request's blocks tail first does;
3. the cache shrinks back to its capacity: the policy chooses the victims
   among every block, the ones just inserted included, so choosing a new
   block is declining to keep it (admission).

:func:`simulate` drives any :class:`~kvtier.policies.base.EvictionPolicy`; a
:class:`~kvtier.policies.base.PrefixAwarePolicy` is told each block's place
in its chain (a :class:`~kvtier.policies.hints.BlockHint`: its depth, the
chain's length, its parent);
:func:`belady` computes the offline optimum for the same chains and capacity:
on each eviction it drops the block whose next use is furthest away (never
used again first), the deepest block among ties, so a prefix is never evicted
before its extension.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import attrs

from kvtier.errors import ConfigError, KVTierError
from kvtier.policies.base import EvictionPolicy, PrefixAwarePolicy
from kvtier.policies.hints import BlockHint, Tag

__all__ = ["SimulationResult", "belady", "chain_keys", "simulate"]

Chain = Sequence[bytes]


def chain_keys(hash_ids: Sequence[int]) -> list[bytes]:
    """Keys for a trace's chain of hash ids (ids are already prefix-unique in Mooncake traces)."""
    return [hash_id.to_bytes(8, "big") for hash_id in hash_ids]


@attrs.frozen
class SimulationResult:
    """Hit counts of one replay.

    Attributes:
        policy: The policy's name.
        capacity: Capacity in blocks.
        requests: Requests replayed.
        blocks: Blocks requested (sum of chain lengths).
        hit_blocks: Blocks served from the cache (prefix hits).
        evictions: Blocks evicted.
    """

    policy: str
    capacity: int
    requests: int
    blocks: int
    hit_blocks: int
    evictions: int

    @property
    def hit_ratio(self) -> float:
        """``hit_blocks / blocks`` (0.0 for no blocks)."""
        return self.hit_blocks / self.blocks if self.blocks else 0.0


def _check_capacity(capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"capacity must be an integer >= 1, got {capacity!r}")


def _prefix_hits(chain: Chain, cached: Callable[[bytes], bool]) -> int:
    hits = 0
    for key in chain:
        if not cached(key):
            break
        hits += 1
    return hits


def simulate(
    chains: Sequence[Chain],
    capacity: int,
    policy: EvictionPolicy,
    *,
    name: str = "",
    tags: Sequence[Tag | None] | None = None,
) -> SimulationResult:
    """Replay ``chains`` through ``policy`` at ``capacity`` blocks.

    Args:
        chains: Each request's block keys, head first.
        capacity: The cache's size in blocks.
        policy: A fresh policy.
        name: The result's policy name (default: the policy's class name).
        tags: Each request's tag (:attr:`~kvtier.policies.hints.BlockHint.tag`),
            given to a prefix-aware policy in its hints; None: untagged.

    Raises:
        ConfigError: ``capacity`` is not a positive integer, or ``tags`` is not
            one per chain.
        KVTierError: The policy returned an invalid victim.
    """
    _check_capacity(capacity)
    if tags is not None and len(tags) != len(chains):
        raise ConfigError(f"tags must be one per chain: {len(tags)} for {len(chains)} chains")
    resident: set[bytes] = set()
    hits = blocks = evictions = 0
    prefix = policy if isinstance(policy, PrefixAwarePolicy) else None
    for number, chain in enumerate(chains):
        blocks += len(chain)
        hits += _prefix_hits(chain, resident.__contains__)
        mine = list(dict.fromkeys(chain))
        if prefix is not None:
            _touch_hinted(mine, resident, prefix, None if tags is None else tags[number])
        else:
            for key in reversed(mine):
                if key in resident:
                    policy.access(key)
                else:
                    resident.add(key)
                    policy.insert(key)
        excess = len(resident) - capacity
        if excess > 0:
            victims = policy.victims(excess, _always)
            if len(victims) != excess or any(v not in resident for v in victims):
                raise KVTierError(f"policy {policy!r} returned invalid victims {victims!r}")
            for victim in victims:
                resident.remove(victim)
                policy.remove(victim)
            evictions += excess
    return SimulationResult(
        name or type(policy).__name__, capacity, len(chains), blocks, hits, evictions
    )


def _touch_hinted(
    chain: list[bytes], resident: set[bytes], policy: PrefixAwarePolicy, tag: Tag | None
) -> None:
    """Touch a chain tail first, telling the policy each block's place in it."""
    length = len(chain)
    for depth in range(length - 1, -1, -1):
        key = chain[depth]
        hint = BlockHint(depth, length, chain[depth - 1] if depth else None, tag)
        if key in resident:
            policy.access_hinted(key, hint)
        else:
            resident.add(key)
            policy.insert_hinted(key, hint)


def _always(_: bytes) -> bool:
    return True


def belady(chains: Sequence[Chain], capacity: int) -> SimulationResult:
    """Belady's offline optimum for ``chains`` at ``capacity`` blocks (see the module doc).

    Raises:
        ConfigError: ``capacity`` is not a positive integer.
    """
    _check_capacity(capacity)
    never = len(chains)
    # next_use[i][j]: the next request after i that holds chain i's j-th distinct key.
    last: dict[bytes, int] = {}
    next_use: list[list[int]] = [[] for _ in chains]
    for index in range(len(chains) - 1, -1, -1):
        mine = list(dict.fromkeys(chains[index]))
        next_use[index] = [last.get(key, never) for key in mine]
        for key in mine:
            last[key] = index
    resident: dict[bytes, tuple[int, int]] = {}  # key -> (next use, depth)
    heap: list[tuple[int, int, bytes]] = []  # (-next use, -depth, key); stale entries skipped
    hits = blocks = evictions = 0
    for index, chain in enumerate(chains):
        blocks += len(chain)
        hits += _prefix_hits(chain, resident.__contains__)
        mine = list(dict.fromkeys(chain))
        for depth, (key, use) in enumerate(zip(mine, next_use[index], strict=True)):
            resident[key] = (use, depth)
            heapq.heappush(heap, (-use, -depth, key))
        while len(resident) > capacity:
            negative_use, negative_depth, key = heapq.heappop(heap)
            if resident.get(key) == (-negative_use, -negative_depth):
                del resident[key]
                evictions += 1
    return SimulationResult("belady", capacity, len(chains), blocks, hits, evictions)
