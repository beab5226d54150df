"""BlockPool, its free queue and its hash index (seed 001's pool scenarios)."""

from __future__ import annotations

import pytest

from kvtier import (
    BlockHashToBlockMap,
    BlockPool,
    BlockStored,
    ConfigError,
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    KVTierError,
    NoFreeBlocksError,
)
from kvtier.hashing import BlockHash, BlockHashWithGroupId, make_block_hash_with_group_id
from tests.factories import make_request


def key(name: str, group: int = 0) -> BlockHashWithGroupId:
    return make_block_hash_with_group_id(BlockHash(name.encode()), group)


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor"])
def test_cache_full_blocks_from_start_and_from_the_middle(algorithm: str) -> None:
    pool = BlockPool(5)
    req = make_request("0", list(range(14)), 4, algorithm=algorithm)
    blocks = [KVCacheBlock(i) for i in range(2)]
    pool.cache_full_blocks(req, blocks, 0, 2, 4, 0)
    assert len(pool.cached_block_hash_to_block) == 2
    assert all(b.block_hash is not None for b in blocks)
    blocks.append(KVCacheBlock(2))
    pool.cache_full_blocks(req, blocks, 2, 3, 4, 0)
    assert len(pool.cached_block_hash_to_block) == 3
    assert pool.cached_block_hash_to_block.get_one_block(blocks[2].block_hash) is blocks[2]  # type: ignore[arg-type]


def test_cache_full_blocks_needs_the_hashes() -> None:
    pool = BlockPool(5)
    req = make_request("0", list(range(5)), 4)
    with pytest.raises(KVTierError, match="block hashes"):
        pool.cache_full_blocks(req, pool.get_new_blocks(2), 0, 2, 4, 0)


def test_maybe_evict_cached_block_keeps_duplicates() -> None:
    pool = BlockPool(4)
    keys = [key("10"), key("20"), key("30"), key("10")]
    for block, block_key in zip(pool.blocks, keys, strict=True):
        block.block_hash = block_key
        pool.cached_block_hash_to_block.insert(block_key, block)
    block0, block1, block2, block3 = pool.blocks
    cache = pool.cached_block_hash_to_block
    assert cache.get_blocks(keys[0]) == [block0, block3]
    assert len(cache) == 3

    assert pool.maybe_evict_cached_block(block1)
    assert set(cache) == {keys[0], keys[2]}
    assert pool.maybe_evict_cached_block(block0)
    assert cache.get_blocks(keys[0]) == [block3]  # the duplicate survives
    assert pool.maybe_evict_cached_block(block2)
    assert set(cache) == {keys[0]}
    assert pool.maybe_evict_cached_block(block3)
    assert len(cache) == 0
    assert not pool.maybe_evict_cached_block(block3)
    assert all(b.block_hash is None for b in pool.blocks)


def test_null_parent_block_hash_in_events() -> None:
    pool = BlockPool(8, enable_kv_cache_events=True)
    req = make_request("n", [10, 11, 12, 13], 1)
    assert len(req.block_hashes) == 4
    new = pool.get_new_blocks(3)
    blocks = [new[0], pool.null_block, new[1], new[2]]
    pool.cache_full_blocks(req, blocks, 2, 4, 1, 0)
    events = pool.take_events()
    assert events == [
        BlockStored(
            block_hashes=req.block_hashes[2:4],
            parent_block_hash=req.block_hashes[1],  # the logical parent, not the null block
            token_ids=[12, 13],
            block_size=1,
            lora_name=None,
            medium="GPU",
            group_idx=0,
            extra_keys=[None, None],
        )
    ]
    assert pool.null_block.block_hash is None
    assert new[1].block_hash is not None
    assert new[2].block_hash is not None


def test_null_block_is_never_handed_out_freed_or_hashed() -> None:
    pool = BlockPool(3)
    assert pool.null_block.is_null
    assert pool.null_block.block_id == 0
    assert pool.get_num_free_blocks() == 2
    taken = pool.get_new_blocks(2)
    assert ids(taken) == [1, 2]
    pool.touch([pool.null_block])
    pool.free_blocks([pool.null_block, *taken])
    assert pool.get_num_free_blocks() == 2
    assert 0 not in ids(pool.free_block_queue.get_all_free_blocks())
    req = make_request("r", list(range(4)), 1)
    pool.cache_full_blocks(req, [pool.null_block, *pool.get_new_blocks(2)], 0, 3, 1, 0)
    assert pool.null_block.block_hash is None


def test_get_new_blocks_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    with pytest.raises(NoFreeBlocksError, match="asked for 4"):
        pool.get_new_blocks(4)
    with pytest.raises(ValueError, match="asked for 4"):  # as vLLM's pool raises
        pool.get_new_blocks(4)
    assert pool.get_num_free_blocks() == 3
    assert ids(pool.get_new_blocks(0)) == []


def test_double_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(5)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([c])
    before = [blk.ref_cnt for blk in pool.blocks], ids(pool.free_block_queue.get_all_free_blocks())
    with pytest.raises(KVTierError, match="already free"):
        pool.free_blocks([a, b, c])
    after = [blk.ref_cnt for blk in pool.blocks], ids(pool.free_block_queue.get_all_free_blocks())
    assert before == after


def test_touch_pulls_free_cached_blocks_out_of_the_queue() -> None:
    pool = BlockPool(5)
    req = make_request("r", list(range(8)), 4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(req, blocks, 0, 2, 4, 0)
    pool.free_blocks(reversed(blocks))
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [3, 4, 2, 1]
    pool.touch(blocks)
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert ids(pool.free_block_queue.get_all_free_blocks()) == [3, 4]
    pool.touch(blocks)  # a second holder: no queue change
    assert [b.ref_cnt for b in blocks] == [2, 2]
    assert pool.get_num_free_blocks() == 2


def test_taking_a_cached_free_block_evicts_its_hash() -> None:
    pool = BlockPool(2, enable_kv_cache_events=True)
    req = make_request("r", list(range(4)), 4)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks(req, [block], 0, 1, 4, 0)
    pool.free_blocks([block])
    pool.take_events()
    (again,) = pool.get_new_blocks(1)
    assert again is block
    assert block.block_hash is None
    assert len(pool.cached_block_hash_to_block) == 0
    (event,) = pool.take_events()
    assert event.block_hashes == [req.block_hashes[0]]  # type: ignore[union-attr]


def test_evict_blocks_by_id() -> None:
    pool = BlockPool(5)
    req = make_request("r", list(range(8)), 4)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(req, blocks, 0, 2, 4, 0)
    assert pool.evict_blocks([1, 2, 3]) == 2
    assert len(pool.cached_block_hash_to_block) == 0
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]  # still allocated


def test_usage() -> None:
    pool = BlockPool(5)
    assert pool.get_usage() == 0.0
    pool.get_new_blocks(2)
    assert pool.get_usage() == 0.5


@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, True])
def test_pool_size_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_gpu_blocks"):
        BlockPool(bad)  # type: ignore[arg-type]


def test_free_queue_operations() -> None:
    blocks = [KVCacheBlock(i) for i in range(6)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert len(queue) == 6
    queue.remove(blocks[2])
    assert ids(queue.get_all_free_blocks()) == [0, 1, 3, 4, 5]
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(blocks[2])
    assert queue.popleft() is blocks[0]
    assert ids(queue.popleft_n(2)) == [1, 3]
    queue.append(blocks[0])
    queue.prepend_n([blocks[1], blocks[2]])
    queue.append_n([blocks[3]])
    assert ids(list(queue)) == [1, 2, 4, 5, 0, 3]
    assert queue.num_free_blocks == 6
    assert ids(queue.popleft_n(6)) == [1, 2, 4, 5, 0, 3]
    assert queue.fake_free_list_head.next_free_block is queue.fake_free_list_tail
    with pytest.raises(NoFreeBlocksError):
        queue.popleft()
    queue.prepend_n([blocks[5]])
    assert ids(list(queue)) == [5]
    assert all(b.prev_free_block is None for b in blocks[:5])


def test_block_map_single_block_per_key() -> None:
    cache = BlockHashToBlockMap()
    k0, k1, k2 = key("hash0"), key("hash1"), key("hash2")
    b0, b1 = KVCacheBlock(0), KVCacheBlock(1)
    assert cache.get_one_block(k0) is None
    cache.insert(k0, b0)
    cache.insert(k1, b1)
    cache.insert(k1, b1)  # re-inserting the same block is a no-op
    assert (cache.get_one_block(k0), cache.get_one_block(k1), cache.get_one_block(k2)) == (
        b0,
        b1,
        None,
    )
    assert cache.pop(k0, 100) is None
    assert cache.get_one_block(k0) is b0
    assert cache.pop(k0, 0) is b0
    assert cache.get_one_block(k0) is None
    assert cache.pop(k0, 1) is None
    assert cache.pop(k1, 1) is b1
    assert not cache
    assert k1 not in cache


def test_block_map_several_blocks_per_key() -> None:
    cache = BlockHashToBlockMap()
    k0, k1 = key("hash0"), key("hash1")
    b00, b01, b10, b11 = KVCacheBlock(0), KVCacheBlock(1), KVCacheBlock(10), KVCacheBlock(11)
    for block_key, block in ((k0, b00), (k0, b01), (k1, b10), (k1, b11)):
        cache.insert(block_key, block)
    cache.insert(k0, KVCacheBlock(2))
    assert cache.get_blocks(k0) == [b00, b01, cache.get_blocks(k0)[2]]
    assert cache.pop(k0, 2) is not None
    assert cache.get_one_block(k0) is b00
    assert cache.pop(k0, 0) is b00
    assert cache.get_one_block(k0) is b01
    assert cache.pop(k0, 7) is None
    assert cache.pop(k0, 1) is b01
    assert cache.get_one_block(k0) is None
    assert cache.pop(k0, 2) is None
    assert cache.get_one_block(k1) is b10
    assert cache.pop(k1, 10) is b10
    assert cache.get_one_block(k1) is b11
    assert cache.pop(k1, 11) is b11
    assert cache.get_blocks(k1) == []
    assert len(cache) == 0


def test_get_cached_block_needs_every_group() -> None:
    pool = BlockPool(4)
    block_hash = BlockHash(b"h")
    pool.cached_block_hash_to_block.insert(key("h", 0), pool.blocks[1])
    assert pool.get_cached_block(block_hash, [0]) == [pool.blocks[1]]
    assert pool.get_cached_block(block_hash, [0, 1]) is None
