"""Policy replay and Belady's bound on hand-written and generated chains."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError, KVTierError
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.simulation import belady, chain_keys, simulate


def chains_of(*paths: str) -> list[list[bytes]]:
    """Chains from strings: each character one block, a prefix shared by equal heads."""
    return [[path[: i + 1].encode() for i in range(len(path))] for path in paths]


def test_lru_known_answer_evicts_tails_first() -> None:
    chains = chains_of("abc", "abd", "xy", "abc")
    # Capacity 4. abc: 0 hits. abd: a, b hit (2); cache a b c d -> 4 held.
    # xy: 0 hits; 2 evictions: the least recent, tail first -> c, then d.
    # abc: a, b hit; c was evicted (2 hits).
    result = simulate(chains, 4, LRUPolicy(4), name="lru")
    assert (result.hit_blocks, result.blocks, result.evictions) == (4, 11, 3)
    assert result.hit_ratio == pytest.approx(4 / 11)
    assert result.policy == "lru"


def test_belady_keeps_what_is_used_next() -> None:
    chains = chains_of("abc", "xy", "abc", "xy")
    assert belady(chains, 3).hit_blocks == 3  # keeps a b c; xy is never cached
    assert belady(chains, 5).hit_blocks == 5
    # LRU: xy evicts abc's tail (c, then b): the third request only hits a.
    assert simulate(chains, 3, LRUPolicy(3)).hit_blocks == 1


@st.composite
def tree_chains(draw: st.DrawFn) -> list[list[bytes]]:
    """Chains that are root paths of one random tree (prefix-consistent, like real traces)."""
    parents = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=40))
    nodes: list[list[int]] = [[0]]
    for index, pick in enumerate(parents, start=1):
        parent = nodes[pick % len(nodes)]
        nodes.append([*parent, index])
    picks = draw(st.lists(st.integers(0, len(nodes) - 1), min_size=1, max_size=60))
    return [chain_keys(nodes[i]) for i in picks]


@given(chains=tree_chains(), capacity=st.integers(1, 30))
def test_belady_is_an_upper_bound_and_capacity_is_respected(
    chains: list[list[bytes]], capacity: int
) -> None:
    bound = belady(chains, capacity)
    lru = simulate(chains, capacity, LRUPolicy(capacity))
    assert lru.hit_blocks <= bound.hit_blocks
    assert bound.blocks == lru.blocks == sum(map(len, chains))
    distinct = len({key for chain in chains for key in chain})
    assert lru.evictions >= distinct - capacity  # everything beyond capacity left at least once


def test_bad_capacity_and_bad_victims_are_errors() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        simulate([], 0, LRUPolicy(1))
    with pytest.raises(ConfigError, match="capacity"):
        belady([], True)  # type: ignore[arg-type]

    class Broken(LRUPolicy):
        def victims(self, count, evictable):  # type: ignore[no-untyped-def]
            return [b"nope"] * count

    with pytest.raises(KVTierError, match="invalid victims"):
        simulate(chains_of("abc", "xyz"), 2, Broken(2))
