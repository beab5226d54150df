"""Request tags in hints, the reuse statistics and the ``class_lru`` policy.

Known answers that would come out otherwise if a rule were missing, the
two-proportion test on hand-computed cases, and hypothesis invariants of the
policy's structures under hinted and plain operations with pins.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.block_hasher import BlockHasher
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.policies import (
    BlockHint,
    ClassLRUPolicy,
    LRUPolicy,
    PrefixAwarePolicy,
    make_eviction_policy,
)
from kvtier.policies.reuse import ReuseRates, less_reused
from kvtier.policies.simulation import simulate
from kvtier.replay.workloads import Workload, trace_workload
from kvtier.request import Request, request_tag
from kvtier.traces import TraceRequest, bundled_trace_path, read_mooncake_trace


def k(i: int) -> bytes:
    return b"c%05d" % i


def always(_: bytes) -> bool:
    return True


def store_chain(policy: ClassLRUPolicy, keys: list[bytes], tag: int | str | None = None) -> None:
    """Store a chain tail first with hints, as the simulator and the tier index do."""
    for depth in range(len(keys) - 1, -1, -1):
        hint = BlockHint(depth, len(keys), keys[depth - 1] if depth else None, tag)
        if keys[depth] in policy:
            policy.access_hinted(keys[depth], hint)
        else:
            policy.insert_hinted(keys[depth], hint)


# -- the tag in a hint -------------------------------------------------------------------


def test_a_hint_carries_an_int_or_str_tag_or_none() -> None:
    assert BlockHint(0, 1).tag is None
    assert BlockHint(0, 1, None, 7).tag == 7
    assert BlockHint(0, 1, None, "app-a").tag == "app-a"
    for bad in (True, 1.5, b"x", ("a",)):
        with pytest.raises(ConfigError, match="tag must be an int, a str or None"):
            BlockHint(0, 1, None, bad)  # type: ignore[arg-type]


def test_simulate_needs_one_tag_per_chain() -> None:
    with pytest.raises(ConfigError, match="one per chain: 1 for 2 chains"):
        simulate([[k(1)], [k(2)]], 2, ClassLRUPolicy(2), tags=[1])


# -- the statistics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 100), (50, 100), True),  # 0 % against 50 % on 100 each: far beyond 2 s.e.
        ((50, 100), (0, 100), False),  # a is reused *more*
        ((45, 100), (50, 100), False),  # 5 points on 100 each: within chance
        ((0, 3), (2, 3), False),  # too few blocks to tell
        ((0, 0), (50, 100), False),  # a never seen
        ((30, 100), (30, 100), False),  # equal
        ((300, 1000), (350, 1000), True),  # 5 points on 1,000 each: z = 2.4
    ],
)
def test_less_reused_is_a_two_proportion_test(
    a: tuple[int, int], b: tuple[int, int], expected: bool
) -> None:
    assert less_reused(a[0], a[1], b[0], b[1]) is expected


def test_reuse_rates_halve_every_window_and_forget_kinds_no_longer_seen() -> None:
    rates: ReuseRates[str] = ReuseRates(4)
    for _ in range(3):
        rates.first_seen("x")
    rates.reuse("x")
    assert rates.rate("x") == pytest.approx(1 / 3)
    rates.first_seen("y")  # the fourth: counts halve
    assert rates.seen == {"x": 1.5, "y": 0.5}
    assert rates.reused == {"x": 0.5}
    assert (rates.total_seen, rates.total_reused) == (2.0, 0.5)
    for _ in range(4 * 12):
        rates.first_seen("y")
    assert "x" not in rates.seen
    assert "x" not in rates.reused
    assert rates.rate("x") == 0.0
    with pytest.raises(ConfigError, match="window must be an integer >= 1"):
        ReuseRates(0)


def test_below_rest_compares_a_kind_with_all_the_others() -> None:
    rates: ReuseRates[int] = ReuseRates(10_000)
    for kind, reused in ((1, 0), (2, 60), (3, 60)):
        for i in range(100):
            rates.first_seen(kind)
            if i < reused:
                rates.reuse(kind)
    assert rates.below_rest(1)
    assert not rates.below_rest(2)
    assert not rates.below_rest(3)
    assert rates.below(1, 2)
    assert not rates.below(2, 3)


# -- class_lru known answers -------------------------------------------------------------


def test_without_hints_it_is_lru() -> None:
    policy, lru = ClassLRUPolicy(4), LRUPolicy()
    for i in (1, 2, 3, 4, 2, 5, 1, 6):
        for p in (policy, lru):
            if i in (2, 1) and k(i) in p:
                p.access(k(i))
            else:
                p.insert(k(i))
    assert list(policy) == list(lru)
    assert policy.victims(3, always) == lru.victims(3, always)


def test_a_cold_class_is_learned_and_its_new_blocks_leave_first() -> None:
    policy = ClassLRUPolicy(1000)
    # Tag "chat" prompts come back, tag "batch" prompts never do.
    for i in range(60):
        store_chain(policy, [k(10 * i), k(10 * i + 1)], "chat")
        store_chain(policy, [k(5000 + 10 * i), k(5000 + 10 * i + 1)], "batch")
        store_chain(policy, [k(10 * i), k(10 * i + 1)], "chat")  # read again
    assert policy.class_is_cold("batch")
    assert not policy.class_is_cold("chat")
    assert policy.classes.rate("chat") == 1.0
    assert policy.classes.rate("batch") == 0.0
    store_chain(policy, [k(9000), k(9001), k(9002)], "batch")
    store_chain(policy, [k(9100), k(9101)], "chat")
    # The new batch chain queues to leave before every LRU block, tail first;
    # the chat chain joined LRU.
    assert list(policy.cold)[-3:] == [k(9002), k(9001), k(9000)]
    cold = len(policy.cold)
    assert policy.victims(cold + 1, always) == [*policy.cold, next(iter(policy.order))]
    assert k(9100) in policy.order
    assert k(9101) in policy.order


def test_an_untagged_or_unknown_tag_is_not_cold() -> None:
    policy = ClassLRUPolicy(1000)
    for i in range(60):
        store_chain(policy, [k(i)], "batch")
    store_chain(policy, [k(900)], None)
    store_chain(policy, [k(901)], "new")
    assert not policy.class_is_cold("new")  # no other tag to compare with
    assert k(900) in policy.order
    assert k(901) in policy.order


def test_unreused_tails_are_learned_and_new_tails_leave_first() -> None:
    policy = ClassLRUPolicy(1000)
    for i in range(40):  # two prompts share a 2-block head; their tails are unique
        head = [k(3 * i), k(3 * i + 1)]
        store_chain(policy, [*head, k(2000 + 2 * i)])
        store_chain(policy, [*head, k(2000 + 2 * i + 1)])
    assert policy.tails_first
    assert policy.tails.rate(True) == 0.0
    assert policy.tails.rate(False) == 1.0
    store_chain(policy, [k(500), k(501), k(502)])
    assert list(policy.cold)[-1] == k(502)  # after the tails learned cold before it
    assert policy.victims(len(policy.cold), always) == list(policy.cold)
    assert k(500) in policy.order
    assert k(501) in policy.order


def test_a_cold_block_read_again_joins_lru_and_counts_as_reused() -> None:
    policy = ClassLRUPolicy(1000)
    for i in range(40):
        store_chain(policy, [k(3 * i), k(3 * i + 1), k(5000 + i)])
        store_chain(policy, [k(3 * i), k(3 * i + 1)])  # interior reused, tail not
    assert policy.tails_first
    store_chain(policy, [k(700), k(701)])
    assert k(701) in policy.cold
    before = policy.tails.reused.get(True, 0.0)
    policy.access(k(701))
    assert k(701) in policy.order
    assert k(701) not in policy.cold
    assert list(policy.order)[-1] == k(701)  # the most recent
    assert policy.tails.reused[True] == before + 1


def test_a_ghost_key_stored_again_enters_lru() -> None:
    policy = ClassLRUPolicy(4)
    store_chain(policy, [k(1)])
    policy.remove(k(1))
    assert k(1) in policy.ghost
    assert k(1) not in policy
    policy.insert_hinted(k(1), BlockHint(0, 1))
    assert k(1) in policy.order
    assert k(1) not in policy.ghost


def test_a_root_counts_once_for_the_tag_that_stored_it() -> None:
    policy = ClassLRUPolicy(8)
    store_chain(policy, [k(1)], "a")
    for tag in ("b", "a", None):
        store_chain(policy, [k(1)], tag)
    assert policy.classes.seen == {"a": 1.0}
    assert policy.classes.reused == {"a": 1.0}
    for i in range(2, 12):
        store_chain(policy, [k(i)], "a")
    assert len(policy.roots) == 8  # the last ``capacity`` prompts


def test_class_lru_is_registered_and_prefix_aware() -> None:
    policy = make_eviction_policy("class_lru", 16)
    assert isinstance(policy, ClassLRUPolicy)
    assert isinstance(policy, PrefixAwarePolicy)
    with pytest.raises(ConfigError, match="capacity >= 1"):
        ClassLRUPolicy(0)


def test_in_simulation_a_cold_class_stops_pushing_out_a_reused_one() -> None:
    # Eight "hot" prompts of four blocks come back every round; between
    # rounds a "scan" of unique prompts would flush them from a 40-block LRU.
    hot = [[k(100 * p + d) for d in range(4)] for p in range(8)]
    chains: list[list[bytes]] = []
    tags: list[str] = []
    for r in range(30):
        chains += hot
        tags += ["hot"] * len(hot)
        scan = [[k(100_000 + 100 * (8 * r + s) + d) for d in range(4)] for s in range(8)]
        chains += scan
        tags += ["scan"] * len(scan)
    lru = simulate(chains, 40, LRUPolicy()).hit_ratio
    learned = simulate(chains, 40, ClassLRUPolicy(40), tags=tags).hit_ratio
    untagged = simulate(chains, 40, ClassLRUPolicy(40)).hit_ratio
    assert lru == pytest.approx(0.0)  # each scan flushes the hot prompts
    assert untagged == lru  # no tags, no class rule; tails are reused like the rest
    assert learned > 0.4  # the hot half of the blocks hits once "scan" is learned cold


# -- class_lru invariants ----------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "plain", "access", "remove", "victims", "pin", "unpin"]),
        st.integers(0, 15),
        st.integers(1, 4),
        st.sampled_from([None, 0, 1, "x"]),
    ),
    max_size=150,
)


def check_structures(policy: ClassLRUPolicy) -> None:
    assert not set(policy.order) & set(policy.cold)
    assert not (set(policy.order) | set(policy.cold)) & set(policy.ghost)
    assert len(policy.ghost) <= policy.capacity
    assert len(policy.roots) <= policy.capacity
    assert set(policy.is_tail) <= set(policy.order) | set(policy.cold) | set(policy.ghost)


@settings(max_examples=80, deadline=None)
@given(ops=operations, capacity=st.integers(1, 10))
def test_victims_are_tracked_distinct_and_evictable_and_structures_agree(
    ops: list[tuple[str, int, int, int | str | None]], capacity: int
) -> None:
    policy = ClassLRUPolicy(capacity)
    tracked: set[bytes] = set()
    pinned: set[bytes] = set()
    for op, i, length, tag in ops:
        key = k(i)
        depth = i % length
        hint = BlockHint(depth, length, k(i - 1) if depth else None, tag)
        if op == "insert" and key not in tracked:
            policy.insert_hinted(key, hint)
            tracked.add(key)
        elif op == "plain" and key not in tracked:
            policy.insert(key)
            tracked.add(key)
        elif op == "access" and key in tracked:
            policy.access_hinted(key, hint)
        elif op == "remove":
            policy.remove(key)
            tracked.discard(key)
            pinned.discard(key)
        elif op == "pin" and key in tracked:
            pinned.add(key)
        elif op == "unpin":
            pinned.discard(key)
        elif op == "victims":
            victims = policy.victims(length, lambda key: key not in pinned)
            assert len(victims) == len(set(victims))
            assert len(victims) == min(length, len(tracked - pinned))
            assert set(victims) <= tracked - pinned
            cold_first = [v for v in victims if v in policy.cold]
            assert victims[: len(cold_first)] == cold_first  # the cold queue goes first
        assert len(policy) == len(tracked)
        assert set(policy) == tracked
        check_structures(policy)


# -- tags from requests and workloads ----------------------------------------------------


def test_a_request_tag_is_validated_and_read_where_present() -> None:
    hasher = BlockHasher(4, "sha256")
    assert Request("a", [1, 2, 3, 4], hasher).tag is None
    tagged = Request("b", [1, 2, 3, 4], hasher, tag="app")
    assert request_tag(tagged) == "app"
    untagged = Request("c", [1, 2, 3, 4], hasher, tag=None)
    assert tagged.block_hashes == untagged.block_hashes  # never part of the hash
    for bad in (True, 2.5, ["x"]):
        with pytest.raises(InvalidRequestError, match="tag must be an int, a str or None"):
            Request("d", [1], hasher, tag=bad)  # type: ignore[arg-type]

    class EngineRequest:  # an engine's own request class, without a tag
        request_id = "e"

    assert request_tag(EngineRequest()) is None  # type: ignore[arg-type]
    EngineRequest.tag = 1.5  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="'e': tag must be"):
        request_tag(EngineRequest())  # type: ignore[arg-type]


@pytest.mark.parametrize(("output", "tag"), [(0, -1), (1, 0), (2, 1), (3, 1), (255, 7), (256, 8)])
def test_a_trace_request_is_tagged_with_its_output_length_bucket(output: int, tag: int) -> None:
    assert TraceRequest(0.0, 10, output, (1,)).tag == tag


def test_a_trace_workload_tags_each_request_and_tags_are_one_per_prompt() -> None:
    workload = trace_workload(bundled_trace_path(), limit=5)
    rows = read_mooncake_trace(bundled_trace_path(), limit=5)
    assert workload.tags == [row.output_length.bit_length() - 1 for row in rows]
    assert workload.tag(3) == workload.tags[3]
    assert Workload("w", [[1]]).tag(0) is None
    with pytest.raises(ConfigError, match="workload w: 1 tags for 2 prompts"):
        Workload("w", [[1], [2]], tags=[1])
