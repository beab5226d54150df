"""Prefix hints (BlockHint, PrefixAwarePolicy) and the ``prefix_slru`` policy.

Known answers on hand-written sequences that would come out otherwise if the
hints were ignored, hypothesis invariants, and the hints' way through
:func:`~kvtier.policies.simulation.simulate`, the
:class:`~kvtier.tiers.index.TierIndex` and the offload manager.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import KVCacheBlocks
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.hashing import make_block_hash_with_group_id
from kvtier.policies import (
    EVICTION_POLICIES,
    BlockHint,
    EvictionPolicy,
    LRUPolicy,
    PrefixAwarePolicy,
    PrefixSLRUPolicy,
    SLRUPolicy,
    make_eviction_policy,
    register_eviction_policy,
)
from kvtier.policies.simulation import simulate
from kvtier.tiers.index import TierIndex
from tests.offload_env import BS, Env, scheduled


def k(i: int) -> bytes:
    return b"b%04d" % i


def always(_: bytes) -> bool:
    return True


def chain_hints(keys: list[bytes]) -> list[BlockHint]:
    return [BlockHint(d, len(keys), keys[d - 1] if d else None) for d in range(len(keys))]


def insert_chain(policy: PrefixSLRUPolicy, keys: list[bytes]) -> None:
    """Insert a chain tail first, with hints, as the simulator and the index do."""
    for key, hint in reversed(list(zip(keys, chain_hints(keys), strict=True))):
        policy.insert_hinted(key, hint)


class Unhinted:
    """Wraps a policy behind the plain protocol only (no ``insert_hinted``)."""

    def __init__(self, inner: EvictionPolicy) -> None:
        self.inner = inner

    def insert(self, key: bytes) -> None:
        self.inner.insert(key)

    def access(self, key: bytes) -> None:
        self.inner.access(key)

    def remove(self, key: bytes) -> None:
        self.inner.remove(key)

    def victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        return self.inner.victims(count, evictable)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self.inner


class Recording(LRUPolicy):
    """LRU that records every hinted call (a third-party prefix-aware policy)."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self.inserted: list[tuple[bytes, BlockHint | None]] = []
        self.accessed: list[tuple[bytes, BlockHint | None]] = []

    def insert_hinted(self, key: bytes, hint: BlockHint | None) -> None:
        self.inserted.append((key, hint))
        self.insert(key)

    def access_hinted(self, key: bytes, hint: BlockHint | None) -> None:
        self.accessed.append((key, hint))
        self.access(key)


# -- the hint and the protocol --------------------------------------------------------


def test_block_hint_validates_and_knows_its_tail() -> None:
    assert BlockHint(2, 3, b"p").is_tail
    assert not BlockHint(0, 3).is_tail
    with pytest.raises(ConfigError):
        BlockHint(-1, 3)
    with pytest.raises(ConfigError):
        BlockHint(3, 3)  # depth must be < length
    with pytest.raises(ConfigError):
        BlockHint(True, 3)  # type: ignore[arg-type]


def test_only_policies_with_the_hinted_methods_are_prefix_aware() -> None:
    assert isinstance(PrefixSLRUPolicy(8), PrefixAwarePolicy)
    assert isinstance(Recording(), PrefixAwarePolicy)
    for name in EVICTION_POLICIES:
        if name not in {"prefix_slru", "class_lru"}:
            assert not isinstance(make_eviction_policy(name, 8), PrefixAwarePolicy), name
    assert isinstance(make_eviction_policy("prefix_slru", 8), PrefixSLRUPolicy)
    assert isinstance(make_eviction_policy("class_lru", 8), PrefixAwarePolicy)
    assert isinstance(Unhinted(LRUPolicy()), EvictionPolicy)
    assert not isinstance(Unhinted(PrefixSLRUPolicy(8)), PrefixAwarePolicy)


# -- prefix_slru known answers ----------------------------------------------------------


def trained(capacity: int = 20) -> PrefixSLRUPolicy:
    """A policy (probation share 2) that has seen interior blocks read again, tails never."""
    policy = PrefixSLRUPolicy(capacity)
    for c in range(4):
        keys = [k(100 * c + i) for i in range(3)]
        insert_chain(policy, keys)
        for key in keys[:-1]:
            policy.access(key)  # a second request shared the prefix, not the tail
    assert policy.reuse_rate(True) < policy.reuse_rate(False)
    assert policy.tails_first
    return policy


def test_a_new_tail_enters_probation_at_its_eviction_end_once_tails_prove_unshared() -> None:
    policy = trained()
    chain = [k(900), k(901), k(902)]
    insert_chain(policy, chain)
    assert policy.victims(1, always) == [k(902)]  # the new tail, before older tails
    # Ignoring the hint (plain insert) the new tail is the most recent tail-first insert.
    plain = trained()
    for key in reversed(chain):
        plain.insert(key)
    assert plain.victims(1, always) == [k(302)]  # the trained tail at the eviction end


def test_tails_are_not_placed_first_before_anything_is_known_or_where_they_are_reused() -> None:
    fresh = PrefixSLRUPolicy(100)
    assert not fresh.tails_first  # nothing measured yet
    chat = PrefixSLRUPolicy(100)
    for c in range(4):
        keys = [k(100 * c + i) for i in range(3)]
        insert_chain(chat, keys)
        for key in keys:
            chat.access(key)  # the next round read the whole prompt, tail included
    assert not chat.tails_first
    insert_chain(chat, [k(900), k(901), k(902)])
    assert list(chat.probation) == [k(902), k(901), k(900)]  # plain SLRU order, tail first


def test_a_block_stored_below_a_probation_parent_moves_the_parent_after_it() -> None:
    policy = trained()
    first = [k(900), k(901)]  # a chunk: k(901) looks like the tail
    insert_chain(policy, first)
    assert policy.victims(1, always) == [k(901)]
    policy.insert_hinted(k(902), BlockHint(2, 3, k(901)))  # the next chunk extends it
    order = list(policy.probation)  # eviction order
    assert order.index(k(902)) < order.index(k(901))  # never the parent before its child


def test_ghost_hits_count_as_reuse_of_their_kind() -> None:
    policy = PrefixSLRUPolicy(10)  # probation share 1
    insert_chain(policy, [k(1), k(2)])
    assert policy.victims(1, always) == [k(2)]
    policy.remove(k(2))
    assert k(2) in policy.ghost
    assert policy.ghost_kind[k(2)] == 1  # a tail
    before = policy.reused[1]
    policy.insert_hinted(k(2), BlockHint(1, 2, k(1)))
    assert policy.reused[1] == before + 1
    assert k(2) in policy.protected
    assert k(2) not in policy.ghost_kind


def test_prefix_slru_beats_slru_on_repeated_prompts_with_unique_tails() -> None:
    """Every prompt ends in a unique block (as in Mooncake traces). Each round a new
    prompt comes, then a repeated one, then the new one again: leaving first, the
    unique tails no longer push the new prompt out of probation before it returns."""
    chains: list[list[bytes]] = []
    serial = iter(range(10_000, 20_000))
    shared = [k(1), k(2)]
    for _ in range(12):
        new = [k(next(serial)), k(next(serial))]
        chains += [[*new, k(next(serial))], [*shared, k(next(serial))], [*new, k(next(serial))]]
    capacity = 6
    ours = simulate(chains, capacity, PrefixSLRUPolicy(capacity))
    slru = simulate(chains, capacity, SLRUPolicy(capacity))
    lru = simulate(chains, capacity, LRUPolicy())
    assert (ours.hit_blocks, slru.hit_blocks, lru.hit_blocks) == (34, 23, 24)
    # Without hints (behind the plain protocol) it is exactly SLRU.
    unhinted = simulate(chains, capacity, Unhinted(PrefixSLRUPolicy(capacity)))
    assert unhinted.hit_blocks == slru.hit_blocks


def test_the_reuse_statistics_follow_the_recent_workload() -> None:
    policy = PrefixSLRUPolicy(4)
    for c in range(10):
        insert_chain(policy, [k(10 * c), k(10 * c + 1)])
        for key in policy.victims(max(0, len(policy) - 4), always):
            policy.remove(key)
    assert sum(policy.inserted) <= 2 * policy.capacity  # halved every `capacity` blocks


# -- invariants ------------------------------------------------------------------------------

chains_strategy = st.lists(
    st.lists(st.integers(0, 40), min_size=1, max_size=8).map(lambda ids: [k(i) for i in ids]),
    min_size=1,
    max_size=40,
)


def check_structures(policy: PrefixSLRUPolicy) -> None:
    probation, protected = set(policy.probation), set(policy.protected)
    ghost = set(policy.ghost)
    assert not probation & protected
    assert not ghost & (probation | protected)
    assert set(policy.kind) <= probation
    assert set(policy.ghost_kind) <= ghost
    assert len(policy.ghost) <= policy.capacity
    assert len(policy) == len(probation) + len(protected)


@settings(max_examples=60, deadline=None)
@given(chains=chains_strategy, capacity=st.integers(1, 12))
def test_simulated_capacity_holds_and_structures_stay_disjoint(
    chains: list[list[bytes]], capacity: int
) -> None:
    policy = PrefixSLRUPolicy(capacity)
    result = simulate(chains, capacity, policy)  # raises on an invalid victim
    assert len(policy) <= capacity
    assert result.hit_blocks <= result.blocks
    check_structures(policy)


operations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "plain", "access", "remove", "victims", "pin", "unpin"]),
        st.integers(0, 15),
        st.integers(1, 4),
        st.integers(0, 4),
    ),
    max_size=120,
)


@settings(max_examples=80, deadline=None)
@given(ops=operations, capacity=st.integers(1, 10))
def test_victims_are_tracked_distinct_and_evictable_and_len_agrees(
    ops: list[tuple[str, int, int, int]], capacity: int
) -> None:
    policy = PrefixSLRUPolicy(capacity)
    tracked: set[bytes] = set()
    pinned: set[bytes] = set()
    for op, i, length, count in ops:
        key = k(i)
        if op == "insert" and key not in tracked:
            depth = min(i % length, length - 1)
            policy.insert_hinted(key, BlockHint(depth, length, k(i - 1) if depth else None))
            tracked.add(key)
        elif op == "plain" and key not in tracked:
            policy.insert(key)
            tracked.add(key)
        elif op == "access" and key in tracked:
            policy.access_hinted(key, None)
        elif op == "remove":
            policy.remove(key)
            tracked.discard(key)
            pinned.discard(key)
        elif op == "pin" and key in tracked:
            pinned.add(key)
        elif op == "unpin":
            pinned.discard(key)
        elif op == "victims":
            victims = policy.victims(count, lambda key: key not in pinned)
            assert len(victims) == len(set(victims))
            assert len(victims) == min(count, len(tracked - pinned))
            assert set(victims) <= tracked - pinned
        assert len(policy) == len(tracked)
        assert all(key in policy for key in tracked)
        assert k(99) not in policy
        check_structures(policy)


# -- through the tier index --------------------------------------------------------------------


def committed(index: TierIndex, keys: list[bytes], hints: list[BlockHint | None] | None) -> None:
    index.reserve(keys)
    index.commit(keys, hints)


def test_the_index_passes_hints_tail_first_on_commit_and_pin() -> None:
    policy = Recording()
    index = TierIndex("cpu", 8, policy)
    keys = [k(1), k(2), k(3)]
    hints = chain_hints(keys)
    committed(index, keys, list(hints))
    assert policy.inserted == list(reversed(list(zip(keys, hints, strict=True))))
    index.pin(keys, list(hints))
    assert policy.accessed == list(reversed(list(zip(keys, hints, strict=True))))
    index.unpin(keys)
    committed(index, [k(4)], None)  # no hints: the plain call
    assert [key for key, _ in policy.inserted] == [k(3), k(2), k(1)]
    assert list(policy) == [k(3), k(2), k(1), k(4)]
    index.check_invariants()


def test_hints_that_do_not_match_the_keys_are_refused_and_change_nothing() -> None:
    policy = Recording()
    index = TierIndex("cpu", 8, policy)
    index.reserve([k(1), k(2)])
    with pytest.raises(InvalidRequestError):
        index.commit([k(1), k(2)], [BlockHint(0, 2)])
    with pytest.raises(InvalidRequestError):
        index.commit([k(1), k(2)], [BlockHint(0, 2), "nope"])  # type: ignore[list-item]
    assert not index.contains(k(1))
    assert policy.inserted == []
    index.commit([k(1), k(2)])
    with pytest.raises(InvalidRequestError):
        index.pin([k(1)], [])
    assert index.num_pinned == 0


def test_a_policy_without_the_hint_protocol_still_works_through_index_and_simulate() -> None:
    policy = Unhinted(LRUPolicy())
    index = TierIndex("cpu", 2, policy)
    keys = [k(1), k(2)]
    committed(index, keys, list(chain_hints(keys)))  # hints are dropped, not an error
    assert index.pin(keys, list(chain_hints(keys))) == [0, 1]
    index.unpin(keys)
    reservation = index.reserve([k(3)])
    assert [key for _, key in reservation.evicted] == [k(2)]  # the tail, LRU
    index.commit([k(3)], [BlockHint(0, 1)])
    index.check_invariants()
    chains = [[k(1), k(2)], [k(1), k(3)], [k(1), k(2)]]
    assert (
        simulate(chains, 2, Unhinted(LRUPolicy())).hit_blocks
        == simulate(chains, 2, LRUPolicy()).hit_blocks
    )


def test_prefix_slru_runs_in_a_tier_index_with_pins() -> None:
    index = TierIndex("cpu", 4, "prefix_slru")
    assert isinstance(index.policy, PrefixSLRUPolicy)
    first = [k(1), k(2), k(3)]
    committed(index, first, list(chain_hints(first)))
    index.pin([k(1)])
    reservation = index.reserve([k(4), k(5)])
    assert k(1) not in {key for _, key in reservation.evicted}  # pinned
    index.commit([k(4), k(5)], list(chain_hints([k(4), k(5)])))
    index.unpin([k(1)])
    index.check_invariants()


# -- through the offload manager --------------------------------------------------------------


@pytest.fixture
def recording() -> Iterator[list[Recording]]:
    made: list[Recording] = []

    def factory(capacity: int) -> Recording:
        made.append(Recording(capacity))
        return made[-1]

    register_eviction_policy("recording-test", factory)
    try:
        yield made
    finally:
        EVICTION_POLICIES.pop("recording-test", None)


@pytest.mark.asyncio
@pytest.mark.parametrize(("store_tag", "load_tag"), [(None, None), ("app-a", 7)])
async def test_the_offload_manager_hints_its_stores_and_loads(
    recording: list[Recording], store_tag: str | None, load_tag: int | None
) -> None:
    env = Env(eviction_policy="recording-test")
    (policy,) = recording
    async with env.manager as manager:
        req = env.request(3, tag=store_tag)
        blocks = env.alloc(req, 3)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        keys = [make_block_hash_with_group_id(req.block_hashes[p], 0) for p in range(3)]
        expected = [BlockHint(d, 3, keys[d - 1] if d else None, store_tag) for d in range(3)]
        assert policy.inserted == list(reversed(list(zip(keys, expected, strict=True))))

        again = env.request(3, like=req, tag=load_tag)  # the loading request's tag
        expected = [BlockHint(d, 3, keys[d - 1] if d else None, load_tag) for d in range(3)]
        assert manager.get_num_new_matched_tokens(again, 0) == (3 * BS, True)
        targets = env.fresh(3)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 3 * BS)
        manager.build_step(scheduled(new={again.request_id: KVCacheBlocks((targets,))}))
        await manager.wait_for_loads([again.request_id])
        assert policy.accessed == list(reversed(list(zip(keys, expected, strict=True))))
        assert env.holds(targets[2], again, 2)


@pytest.mark.asyncio
async def test_the_offload_manager_runs_prefix_slru() -> None:
    env = Env(eviction_policy="prefix_slru", cpu_blocks=4)
    async with env.manager as manager:
        for _ in range(3):
            req = env.request(3)
            blocks = env.alloc(req, 3)
            manager.update_state_after_alloc(req, blocks, 0)
            plan = manager.build_step(scheduled(new={req.request_id: blocks}))
            manager.step_computed(plan.step_id)
            await manager.wait_idle()
            manager.request_finished(req)
            env.pool.free_blocks(blocks.blocks[0])
        index = manager.indexes[0]
        assert isinstance(index.policy, PrefixSLRUPolicy)
        assert len(index.policy) == len(index) <= 4
        index.check_invariants()


@pytest.mark.asyncio
async def test_demotions_carry_the_blocks_hints_to_the_tier_below(
    recording: list[Recording], tmp_path: Path
) -> None:
    env = Env(eviction_policy="recording-test", cpu_blocks=3, disk=tmp_path / "disk")
    cpu_policy, disk_policy = recording
    async with env.manager as manager:
        first = env.request(3, tag="app")
        for req in (first, env.request(3)):  # the second store evicts the first's blocks
            blocks = env.alloc(req, 3)
            manager.update_state_after_alloc(req, blocks, 0)
            plan = manager.build_step(scheduled(new={req.request_id: blocks}))
            manager.step_computed(plan.step_id)
            await manager.wait_idle()
        keys = [make_block_hash_with_group_id(first.block_hashes[p], 0) for p in range(3)]
        expected = [BlockHint(d, 3, keys[d - 1] if d else None, "app") for d in range(3)]
        assert manager.stats().tiers["disk"].demotions == 3
        # Tail first, with the hints the CPU tier was given, in every eviction order.
        assert disk_policy.inserted == list(reversed(list(zip(keys, expected, strict=True))))
        assert cpu_policy.inserted[:3] == disk_policy.inserted
        manager.indexes[0].check_invariants()
        manager.indexes[1].check_invariants()


def test_an_index_forgets_the_hints_of_blocks_that_leave() -> None:
    index = TierIndex("cpu", 2, "prefix_slru")
    hints = [BlockHint(0, 2, None, 1), BlockHint(1, 2, k(1), 1)]
    index.commit(index.reserve([k(1), k(2)]).keys, hints)
    evicting = index.reserve([k(3)])
    assert [key for _, key in evicting.evicted] == [k(2)]  # the tail first
    assert evicting.evicted_hints == (hints[1],)
    index.commit(evicting.keys)
    index.remove([k(1)])
    assert index.reserve([k(4), k(5)]).evicted_hints == (None,)  # k(3) came without one
    plain = TierIndex("cpu", 1, "lru")  # a policy without hints keeps none
    plain.commit(plain.reserve([k(1)]).keys, hints[:1])
    assert plain.reserve([k(2)]).evicted_hints == ()
