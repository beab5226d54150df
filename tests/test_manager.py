"""KVCacheManager scenarios from vLLM's prefix-caching spec (seed 001).

Block ids, ref counts and free-queue order match vLLM v1, except that freed
blocks without a hash go to the head of the free queue (vLLM 0.33's order), so
they are reused before any cached block.
"""

from __future__ import annotations

import pytest

from kvtier import (
    InvalidRequestError,
    KVCacheBlocks,
    KVCacheConfig,
    KVCacheManager,
    PrefixCacheStats,
)
from tests.factories import free_ids, make_manager, make_request, schedule

COMMON = [i for i in range(3) for _ in range(16)]  # three full blocks


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor", "xxhash"])
def test_prefill_hits_shared_prefix_and_orders_free_queue(algorithm: str) -> None:
    manager = make_manager(11)
    req0 = make_request("0", [*COMMON, *[3] * 7], algorithm=algorithm)
    computed, num_computed = manager.get_computed_blocks(req0)
    assert len(req0.block_hashes) == 3
    assert computed.get_block_ids() == ([],)
    assert num_computed == 0
    blocks = manager.allocate_slots(req0, 55, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2, 3, 4],)
    pool = manager.block_pool
    for block_id in (1, 2, 3):
        assert pool.blocks[block_id].block_hash is not None
        assert pool.blocks[block_id].ref_cnt == 1
    assert pool.blocks[4].block_hash is None
    assert pool.blocks[4].ref_cnt == 1

    # A hit while the blocks are in use by req0.
    req1 = make_request("1", [*COMMON, *[3] * 5], algorithm=algorithm)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1, 2, 3],)
    assert num_computed == 48
    blocks = manager.allocate_slots(req1, 5, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([5],)
    assert [pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [2, 2, 2]
    assert pool.get_num_free_blocks() == 5

    manager.free(req0)
    manager.free(req1)
    assert pool.get_num_free_blocks() == 10
    # Unhashed partial blocks (4 then 5) were put at the head; cached blocks at
    # the tail, chain tail first.
    assert free_ids(manager) == [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]

    # A hit on blocks that are free: they leave the queue.
    req2 = make_request("2", [*COMMON, *[3] * 6], algorithm=algorithm)
    computed, num_computed = manager.get_computed_blocks(req2)
    assert computed.get_block_ids() == ([1, 2, 3],)
    assert num_computed == 48
    blocks = manager.allocate_slots(req2, 6, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([5],)
    assert pool.get_num_free_blocks() == 6
    assert all(b.ref_cnt == 0 for b in pool.free_block_queue.get_all_free_blocks())
    assert len(pool.free_block_queue.get_all_free_blocks()) == 6
    manager.free(req2)

    # A miss that evicts everything, in queue order.
    req3 = make_request("3", [99] * 160, algorithm=algorithm)
    computed, num_computed = manager.get_computed_blocks(req3)
    assert num_computed == 0
    blocks = manager.allocate_slots(req3, 160, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([5, 4, 6, 7, 8, 9, 10, 3, 2, 1],)
    queue = pool.free_block_queue
    assert queue.num_free_blocks == 0
    assert queue.fake_free_list_head.next_free_block is queue.fake_free_list_tail
    assert queue.fake_free_list_tail.prev_free_block is queue.fake_free_list_head


def test_decode_fills_and_caches_blocks() -> None:
    manager = make_manager(11)
    req0 = make_request("0", [*COMMON, *[3] * 7])
    blocks = schedule(manager, req0)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2, 3, 4],)
    held = manager.group_managers[0].req_to_blocks["0"]

    # Four decode tokens fit in the partial block.
    req0.num_computed_tokens = 55
    req0.append_output_token_ids([8] * 4)
    new = manager.allocate_slots(req0, 4)
    assert new is not None
    assert new.get_block_ids() == ([],)
    assert held[-1].block_hash is None

    # Nineteen more: the partial block fills (and is cached), one new block.
    req0.num_computed_tokens = 59
    req0.append_output_token_ids([7] * 19)
    new = manager.allocate_slots(req0, 19)
    assert new is not None
    assert len(new.blocks[0]) == 1
    assert held[-2].block_hash is not None
    assert held[-1].block_hash is None
    assert len(req0.block_hashes) == 4


def test_evict_order_and_touch() -> None:
    manager = make_manager(11)
    req0 = make_request("0", list(range(5 * 16 + 7)))
    blocks = schedule(manager, req0)
    assert blocks is not None
    assert len(blocks.blocks[0]) == 6
    req1 = make_request("1", list(range(87, 87 + 48)))
    blocks = schedule(manager, req1)
    assert blocks is not None
    assert len(blocks.blocks[0]) == 3
    assert manager.block_pool.get_num_free_blocks() == 1

    manager.free(req0)
    manager.free(req1)
    assert manager.block_pool.get_num_free_blocks() == 10
    assert free_ids(manager) == [6, 10, 5, 4, 3, 2, 1, 9, 8, 7]

    req2 = make_request("2", list(range(2 * 16 + 3)))
    computed, num_computed = manager.get_computed_blocks(req2)
    assert computed.get_block_ids() == ([1, 2],)
    assert num_computed == 32
    blocks = manager.allocate_slots(req2, 3, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([6],)
    assert manager.block_pool.get_num_free_blocks() == 7


def test_reused_block_loses_its_hash() -> None:
    manager = make_manager(2)
    req = make_request("0", list(range(16)))
    blocks = schedule(manager, req)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1],)
    assert manager.block_pool.blocks[1].block_hash is not None
    manager.free(req)

    req = make_request("1", list(range(15)))
    blocks = schedule(manager, req)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1],)
    assert manager.block_pool.blocks[1].block_hash is None
    assert len(manager.block_pool.cached_block_hash_to_block) == 0


def test_computed_blocks_are_not_evicted_for_the_same_request() -> None:
    manager = make_manager(3)
    req0 = make_request("0", list(range(16)))
    assert schedule(manager, req0).get_block_ids() == ([1],)  # type: ignore[union-attr]
    req1 = make_request("1", list(range(16, 32)))
    assert schedule(manager, req1).get_block_ids() == ([2],)  # type: ignore[union-attr]
    manager.free(req0)
    manager.free(req1)

    req2 = make_request("2", list(range(32)))
    computed, num_computed = manager.get_computed_blocks(req2)
    assert computed.get_block_ids() == ([1],)
    assert num_computed == 16
    blocks = manager.allocate_slots(req2, 16, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([2],)


def test_prefix_caching_disabled() -> None:
    manager = make_manager(5, block_size=4, enable_caching=False)
    req1 = make_request("1", list(range(10)), 4)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert (computed.get_block_ids(), num_computed) == (([],), 0)
    blocks = manager.allocate_slots(req1, 10, num_computed, computed)
    assert blocks is not None
    assert len(blocks.blocks[0]) == 3
    assert all(b.block_hash is None for b in manager.block_pool.blocks)
    manager.free(req1)

    req2 = make_request("2", list(range(16)), 4)
    computed, num_computed = manager.get_computed_blocks(req2)
    assert num_computed == 0
    blocks = manager.allocate_slots(req2, 16, num_computed, computed)
    assert blocks is not None
    assert len(blocks.blocks[0]) == 4

    req3 = make_request("3", list(range(4)), 4)
    computed, num_computed = manager.get_computed_blocks(req3)
    assert num_computed == 0
    assert manager.allocate_slots(req3, 4, num_computed, computed) is None


def test_full_prompt_hit_leaves_one_block_to_compute() -> None:
    manager = make_manager(11)
    req0 = make_request("0", COMMON)
    schedule(manager, req0)
    req1 = make_request("1", COMMON)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1, 2],)
    assert num_computed == 32


def test_not_enough_free_blocks_leaves_computed_blocks_untouched() -> None:
    manager = make_manager(11)
    req0 = make_request("0", COMMON)
    schedule(manager, req0)
    part0 = list(manager.group_managers[0].req_to_blocks["0"])

    req1 = make_request("1", COMMON * 2)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert list(computed.blocks[0]) == part0
    assert num_computed == 48
    manager.allocate_slots(req1, 48, num_computed, computed)
    part1 = list(manager.group_managers[0].req_to_blocks["1"])
    manager.free(req1)
    assert {b.ref_cnt for b in part1[:3]} == {1}
    assert {b.ref_cnt for b in part1[3:]} == {0}

    req2 = make_request("2", [7] * 32)
    schedule(manager, req2)
    assert manager.block_pool.get_num_free_blocks() == 5

    req3 = make_request("3", COMMON * 3)
    computed, num_computed = manager.get_computed_blocks(req3)
    assert list(computed.blocks[0]) == part1
    assert num_computed == 96
    queue_before = free_ids(manager)
    assert manager.allocate_slots(req3, 48, num_computed, computed) is None
    assert {b.ref_cnt for b in part1[:3]} == {1}
    assert {b.ref_cnt for b in part1[3:]} == {0}
    assert free_ids(manager) == queue_before
    assert "3" not in manager.group_managers[0].req_to_blocks


def test_reset_prefix_cache_only_when_idle() -> None:
    manager = make_manager(11)
    req0 = make_request("0", [*COMMON, *[3] * 7])
    blocks = manager.allocate_slots(req0, 55)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2, 3, 4],)
    req1 = make_request("1", [*COMMON, *[4] * 7])
    computed, num_computed = manager.get_computed_blocks(req1)
    assert len(computed.blocks[0]) == 3
    blocks = manager.allocate_slots(req1, 7, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([5],)

    assert not manager.reset_prefix_cache()
    assert manager.block_pool.cached_block_hash_to_block

    manager.free(req0)
    manager.free(req1)
    assert manager.reset_prefix_cache()
    assert not manager.block_pool.cached_block_hash_to_block
    assert all(b.block_hash is None for b in manager.block_pool.blocks)
    stats = manager.prefix_cache_stats
    assert stats is not None
    assert stats.reset


def test_prefix_cache_stats_disabled() -> None:
    manager = make_manager(11, log_stats=False)
    assert manager.prefix_cache_stats is None
    req = make_request("0", list(range(16)))
    schedule(manager, req)
    manager.reset_prefix_cache()
    assert manager.prefix_cache_stats is None
    assert manager.make_prefix_cache_stats() is None


def test_prefix_cache_stats_count_queries_and_hits() -> None:
    manager = make_manager(11)
    schedule(manager, make_request("0", [*COMMON, 5]))
    schedule(manager, make_request("1", [*COMMON, 6]))
    preempted = make_request("2", [*COMMON, 7])
    preempted.num_preemptions = 1
    schedule(manager, preempted)
    stats = manager.make_prefix_cache_stats()
    assert stats == PrefixCacheStats(
        requests=2,
        queries=98,
        hits=48,
        preempted_requests=1,
        preempted_queries=49,
        preempted_hits=48,
    )
    assert stats.hit_rate == pytest.approx(48 / 98)
    assert manager.prefix_cache_stats == PrefixCacheStats()
    assert PrefixCacheStats().hit_rate == 0.0


def test_skip_reading_prefix_cache_misses_but_still_caches() -> None:
    manager = make_manager(11)
    schedule(manager, make_request("0", [*COMMON, 5]))
    req = make_request("1", [*COMMON, 5])
    req.skip_reading_prefix_cache = True
    computed, num_computed = manager.get_computed_blocks(req)
    assert num_computed == 0
    blocks = manager.allocate_slots(req, req.num_tokens, num_computed, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([5, 6, 7, 8],)
    # Both copies of each block are cached under the same key.
    cache = manager.block_pool.cached_block_hash_to_block
    assert len(cache) == 3
    assert all(len(cache.get_blocks(key)) == 2 for key in cache)


def test_usage_and_lookahead_and_max_model_len() -> None:
    manager = make_manager(11, max_model_len=40)
    assert manager.usage == 0.0
    req = make_request("0", list(range(20)))
    blocks = manager.allocate_slots(req, 20, num_lookahead_tokens=30)
    # 20 + 30 tokens capped at max_model_len 40 -> 3 blocks.
    assert blocks is not None
    assert len(blocks.blocks[0]) == 3
    assert manager.usage == pytest.approx(0.3)
    assert manager.get_block_ids("0") == ([1, 2, 3],)
    manager.free(req)
    assert manager.usage == 0.0
    assert manager.get_block_ids("0") == ([],)


def test_delay_cache_blocks_then_cache_blocks() -> None:
    manager = make_manager(11)
    req = make_request("0", [*COMMON, 1])
    blocks = manager.allocate_slots(req, 49, delay_cache_blocks=True)
    assert blocks is not None
    assert len(manager.block_pool.cached_block_hash_to_block) == 0
    manager.cache_blocks(req, 49)
    assert len(manager.block_pool.cached_block_hash_to_block) == 3


def test_request_without_hasher_is_never_cached() -> None:
    from kvtier import Request

    manager = make_manager(11)
    req = Request("0", list(range(40)))
    blocks = schedule(manager, req)
    assert blocks is not None
    assert len(blocks.blocks[0]) == 3
    assert len(manager.block_pool.cached_block_hash_to_block) == 0


def test_kv_cache_blocks_helpers() -> None:
    manager = make_manager(11)
    req = make_request("0", [*COMMON, 1])
    blocks = schedule(manager, req)
    assert blocks is not None
    assert blocks.get_unhashed_block_ids() == [4]
    assert (blocks + blocks.new_empty()).get_block_ids() == blocks.get_block_ids()
    assert isinstance(manager.empty_blocks(), KVCacheBlocks)
    assert manager.empty_blocks().get_block_ids() == ([],)


@pytest.mark.parametrize(("num_tokens", "hit_blocks"), [(48, 1), (37, 1), (16, 0), (80, 3)])
def test_eagle_drops_the_last_hit_block(num_tokens: int, hit_blocks: int) -> None:
    """Seed test_eagle_*: the lookup's own cap, then one block fewer for EAGLE."""
    manager = KVCacheManager(KVCacheConfig.full_attention(10, 16), 8192, use_eagle=True)
    plain = make_manager(10)
    tokens = [0] * num_tokens
    for cache in (manager, plain):
        schedule(cache, make_request("prime", tokens))
        cache.free(make_request("prime", tokens))
    computed, num_computed = manager.get_computed_blocks(make_request("eagle", tokens))
    assert (len(computed.blocks[0]), num_computed) == (hit_blocks, 16 * hit_blocks)
    without = plain.get_computed_blocks(make_request("plain", tokens))[1]
    assert without == (16 * (hit_blocks + 1) if num_tokens > 16 else 0)  # EAGLE's one block


def test_get_block_ids_allow_none() -> None:
    manager = make_manager(5)
    empty = manager.empty_blocks()
    assert empty.get_block_ids() == ([],)
    assert empty.get_block_ids(allow_none=True) is None
    blocks = schedule(manager, make_request("0", list(range(20))))
    assert blocks is not None
    assert blocks.get_block_ids(allow_none=True) == ([1, 2],)


def test_common_prefix_blocks_are_those_every_holder_shares() -> None:
    manager = make_manager(20)
    shared = list(range(48))  # three full blocks
    schedule(manager, make_request("a", [*shared, 1, 2]))
    assert manager.get_num_common_prefix_blocks("a") == [4]  # alone: all its blocks
    schedule(manager, make_request("b", [*shared, 7, 8, 9]))
    assert manager.get_num_common_prefix_blocks("a") == [3]
    # An offload store references a's private block too: still not shared by b.
    private = manager.get_blocks("a").blocks[0][3]
    manager.block_pool.touch([private])
    assert private.ref_cnt == 2
    assert manager.get_num_common_prefix_blocks("a") == [3]
    manager.block_pool.free_blocks([private])
    assert manager.get_num_common_prefix_blocks("b") == [3]
    schedule(manager, make_request("c", [*shared[:16], 5]))
    assert manager.get_num_common_prefix_blocks("b") == [1]
    manager.free(make_request("c", []))
    assert manager.get_num_common_prefix_blocks("b") == [3]
    with pytest.raises(InvalidRequestError, match="'c' holds no blocks"):
        manager.get_num_common_prefix_blocks("c")


def test_vllm_schedulers_allocate_call_with_external_tokens() -> None:
    """vLLM's keywords: external (loaded) tokens sit between the hit and the new tokens."""
    manager = make_manager(20)
    shared = list(range(32))
    schedule(manager, make_request("a", [*shared, 1]))
    req = make_request("b", [*shared, *range(100, 164), 7])  # 2 hit + 4 external + 1 new
    computed, num_computed = manager.get_computed_blocks(req)
    assert num_computed == 32
    blocks = manager.allocate_slots(
        req,
        1,
        num_new_computed_tokens=num_computed,
        new_computed_blocks=computed,
        num_lookahead_tokens=0,
        num_external_computed_tokens=64,
        delay_cache_blocks=True,
        num_encoder_tokens=0,
    )
    assert blocks is not None
    assert len(blocks.blocks[0]) == 5  # the 4 external blocks and the new one
    assert all(block.block_hash is None for block in blocks.blocks[0])  # loaded later
    assert len(manager.get_block_ids("b")[0]) == 7
    manager.cache_blocks(req, 96)  # once the load is reported
    assert sum(b.block_hash is not None for b in manager.get_blocks("b").blocks[0]) == 6
    with pytest.raises(InvalidRequestError, match="no cross-attention"):
        manager.allocate_slots(make_request("c", [1] * 8), 8, num_encoder_tokens=4)
    with pytest.raises(InvalidRequestError, match="num_external_computed_tokens must be"):
        manager.allocate_slots(make_request("c", [1] * 8), 8, num_external_computed_tokens=-1)
