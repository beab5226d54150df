"""ARC, S3-FIFO and LFU-DA: known answers, invariants under hypothesis, the registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError
from kvtier.policies import (
    EVICTION_POLICIES,
    ARCPolicy,
    EvictionPolicy,
    LFUPolicy,
    S3FIFOPolicy,
    make_eviction_policy,
)
from kvtier.tiers.index import TierIndex


def k(i: int) -> bytes:
    return bytes([i])


def everything(_: bytes) -> bool:
    return True


# -- ARC ----------------------------------------------------------------------------


def test_arc_prefers_once_seen_keys_and_adapts_on_ghost_hits() -> None:
    arc = ARCPolicy(4)
    for i in range(4):
        arc.insert(k(i))
    arc.access(k(0))  # 0 moves to T2 (seen twice)
    assert arc.victims(2, everything) == [k(1), k(2)]  # T1 first, least recent first
    arc.remove(k(1))
    assert k(1) in arc.b1
    assert k(1) not in arc
    before = arc.p
    arc.insert(k(1))  # a B1 ghost hit: recency deserved more room
    assert arc.p > before
    assert k(1) in arc.t2


def test_arc_victims_skip_pinned_keys_and_stop_at_what_exists() -> None:
    arc = ARCPolicy(3)
    for i in range(3):
        arc.insert(k(i))
    assert arc.victims(5, lambda key: key != k(0)) == [k(1), k(2)]
    assert arc.victims(0, everything) == []


def test_arc_rejects_a_bad_capacity() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        ARCPolicy(0)


# -- S3-FIFO ------------------------------------------------------------------------


def test_s3fifo_one_hit_wonders_leave_through_the_small_queue() -> None:
    s3 = S3FIFOPolicy(10, small_fraction=0.2)  # small target 2
    for i in range(3):
        s3.insert(k(i))
    s3.access(k(0))  # read once: it will move to main, not be evicted
    victims = s3.victims(1, everything)
    assert victims == [k(1)]
    assert k(0) in s3.main
    s3.remove(k(1))
    assert k(1) in s3.ghost
    s3.insert(k(1))  # back from the ghost queue: straight into main
    assert k(1) in s3.main


def test_s3fifo_victims_pass_over_pinned_keys_and_keep_them_tracked() -> None:
    s3 = S3FIFOPolicy(4, small_fraction=0.5)
    for i in range(4):
        s3.insert(k(i))
    victims = s3.victims(2, lambda key: key != k(0))
    assert victims == [k(1), k(2)]
    assert len(s3) == 4  # chosen keys stay tracked until removed
    assert set(s3.small) | set(s3.main) == {k(i) for i in range(4)}


def test_s3fifo_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        S3FIFOPolicy(0)
    with pytest.raises(ConfigError, match="small_fraction"):
        S3FIFOPolicy(4, small_fraction=1.0)


# -- LFU-DA -------------------------------------------------------------------------


def test_lfu_evicts_the_least_used_and_ages() -> None:
    lfu = LFUPolicy()
    for i in range(3):
        lfu.insert(k(i))
    lfu.access(k(0))
    lfu.access(k(0))
    lfu.access(k(2))
    assert lfu.victims(3, everything) == [k(1), k(2), k(0)]
    lfu.remove(k(1))
    assert lfu.age == 1  # the evicted key's priority
    lfu.insert(k(9))  # a newcomer starts at age + 1 = 2: level with k(2)
    assert lfu.priority(k(9)) == 2
    assert lfu.victims(1, everything) == [k(2)]  # equal priority: reached it first


def test_lfu_victims_skip_pinned_and_stale_entries() -> None:
    lfu = LFUPolicy()
    for i in range(4):
        lfu.insert(k(i))
    for _ in range(3):
        lfu.access(k(1))  # leaves stale heap entries behind
    assert lfu.victims(2, lambda key: key != k(0)) == [k(2), k(3)]
    assert len(lfu) == 4


# -- every policy: the protocol's invariants ----------------------------------------

NAMES = sorted(EVICTION_POLICIES)
operations = st.lists(
    st.tuples(st.sampled_from(["insert", "access", "remove", "victims"]), st.integers(0, 11)),
    max_size=120,
)


@pytest.mark.parametrize("name", NAMES)
@given(script=operations, capacity=st.integers(1, 8))
def test_policy_tracks_exactly_what_is_inserted_and_never_returns_pinned_keys(
    name: str, script: list[tuple[str, int]], capacity: int
) -> None:
    policy = make_eviction_policy(name, capacity)
    assert isinstance(policy, EvictionPolicy)
    model: set[bytes] = set()
    for op, i in script:
        key = k(i)
        if op == "insert":
            policy.insert(key)
            model.add(key)
        elif op == "access":
            policy.access(key)
        elif op == "remove":
            policy.remove(key)
            model.discard(key)
        else:
            pinned = {k(j) for j in range(0, 12, 3)}
            victims = policy.victims(i, lambda key, pinned=pinned: key not in pinned)
            assert len(victims) == len(set(victims))
            assert set(victims) <= model - pinned
            assert len(victims) == min(i, len(model - pinned))
        assert len(policy) == len(model)
        assert all(key in policy for key in model)
        if isinstance(policy, ARCPolicy):
            lists = [policy.t1, policy.t2, policy.b1, policy.b2]
            assert sum(len(x) for x in lists) == len(set().union(*lists))  # disjoint
            assert 0 <= policy.p <= capacity
            assert len(policy.t1) + len(policy.b1) <= max(capacity, len(policy.t1))
            assert sum(len(x) for x in lists) <= 2 * capacity + len(policy)
        if isinstance(policy, S3FIFOPolicy):
            assert not set(policy.small) & set(policy.main)
            assert len(policy.ghost) <= capacity


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_runs_a_tier_index(name: str) -> None:
    index = TierIndex("cpu", 4, name)
    for round_ in range(3):
        keys = [bytes([round_, i]) for i in range(3)]
        reservation = index.reserve(keys)
        index.commit(reservation.keys)
        index.check_invariants()
    assert index.num_resident == 4


def test_s3fifo_finds_the_victim_behind_a_pinned_key_promoted_from_probation() -> None:
    # Found by hypothesis: both keys read while in S move to M and need several
    # passes there before the unpinned one runs out of reads.
    policy = S3FIFOPolicy(1)
    for key in (b"\x00", b"\x00", b"\x01", b"\x01", b"\x01"):
        policy.insert(key)
    assert policy.victims(1, lambda key: key != b"\x00") == [b"\x01"]


def test_lfu_ages_only_on_evictions_not_on_other_removals() -> None:
    """A hot block dropped as corrupt must not lift the age past every resident key."""
    from kvtier.policies.lfu import LFUPolicy

    policy = LFUPolicy()
    for key in (b"warm", b"hot", b"cold"):
        policy.insert(key)
    for _ in range(5):
        policy.access(b"warm")
    for _ in range(99):
        policy.access(b"hot")
    policy.remove(b"hot")  # found corrupt: not an eviction
    assert policy.age == 0
    policy.insert(b"new")
    assert policy.victims(3, lambda key: True) == [b"cold", b"new", b"warm"]
    (victim,) = policy.victims(1, lambda key: True)
    policy.remove(victim)  # an eviction: the cache ages
    assert policy.age == 1
