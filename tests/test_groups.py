"""Several full-attention KV cache groups sharing one pool."""

from __future__ import annotations

from kvtier import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheManager
from tests.factories import make_request


def two_group_manager(num_blocks: int) -> KVCacheManager:
    spec = FullAttentionSpec(16)
    config = KVCacheConfig(num_blocks, (KVCacheGroupSpec("a", spec), KVCacheGroupSpec("b", spec)))
    return KVCacheManager(config, 8192)


def test_each_group_gets_blocks_and_a_hit_needs_every_group() -> None:
    manager = two_group_manager(20)
    req0 = make_request("0", list(range(50)))
    blocks = manager.allocate_slots(req0, 50)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2, 3, 4], [5, 6, 7, 8])
    # The same hash is cached once per group, under different keys.
    assert len(manager.block_pool.cached_block_hash_to_block) == 6

    req1 = make_request("1", list(range(40)))
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1, 2], [5, 6])
    assert num_computed == 32

    # Evict group b's copy of block 2 only: the hit shrinks to one block.
    manager.block_pool.maybe_evict_cached_block(manager.block_pool.blocks[6])
    computed, num_computed = manager.get_computed_blocks(req1)
    assert computed.get_block_ids() == ([1], [5])
    assert num_computed == 16
    blocks = manager.allocate_slots(req1, 40 - 16, 16, computed)
    assert blocks is not None
    assert blocks.get_block_ids() == ([9, 10], [11, 12])
    assert manager.block_pool.blocks[1].ref_cnt == 2

    manager.free(req0)
    manager.free(req1)
    assert manager.block_pool.get_num_free_blocks() == 19


def test_one_groups_allocation_never_takes_another_groups_free_hit_blocks() -> None:
    """Regression: hits of every group are referenced before any group allocates."""
    spec = FullAttentionSpec(4)
    config = KVCacheConfig(7, (KVCacheGroupSpec("a", spec), KVCacheGroupSpec("b", spec)))
    manager = KVCacheManager(config, 8192)
    req_a = make_request("A", list(range(8)), 4)
    assert manager.allocate_slots(req_a, 8).get_block_ids() == ([1, 2], [3, 4])  # type: ignore[union-attr]
    req_c = make_request("C", [99] * 4, 4)
    assert manager.allocate_slots(req_c, 4).get_block_ids() == ([5], [6])  # type: ignore[union-attr]
    manager.free(req_a)
    manager.free(req_c)
    req_b = make_request("B", [*range(8), 7], 4)
    computed, num_computed = manager.get_computed_blocks(req_b)
    assert computed.get_block_ids() == ([1, 2], [3, 4])
    new = manager.allocate_slots(req_b, 1, num_computed, computed)
    assert new is not None
    assert new.get_block_ids() == ([5], [6])
    assert manager.get_block_ids("B") == ([1, 2, 5], [3, 4, 6])
    assert all(b.ref_cnt <= 1 for b in manager.block_pool.blocks)
