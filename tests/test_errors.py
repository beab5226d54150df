"""Bad input raises a typed KVTierError naming the value, and changes no state."""

from __future__ import annotations

import pytest

import kvtier
from kvtier import (
    ConfigError,
    FullAttentionSpec,
    InvalidRequestError,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheManager,
    KVTierError,
)
from tests.factories import free_ids, make_manager, make_request, schedule


def snapshot(manager: KVCacheManager) -> tuple[object, ...]:
    pool = manager.block_pool
    return (
        [b.ref_cnt for b in pool.blocks],
        [b.block_hash for b in pool.blocks],
        free_ids(manager),
        {k: dict(v) for k, v in ((m.group_id, m.req_to_blocks) for m in manager.group_managers)},
    )


@pytest.mark.parametrize("num_blocks", [1, 0, -5])
def test_too_few_blocks(num_blocks: int) -> None:
    with pytest.raises(ConfigError, match=rf"num_blocks must be >= 2.*{num_blocks}"):
        KVCacheConfig.full_attention(num_blocks, 16)


@pytest.mark.parametrize("block_size", [0, -16])
def test_bad_block_size(block_size: int) -> None:
    with pytest.raises(ConfigError, match=f"block_size.*{block_size}"):
        KVCacheConfig.full_attention(10, block_size)


def test_bad_dtype_and_groups() -> None:
    with pytest.raises(ConfigError, match=r"'float64'.*known"):
        FullAttentionSpec(16, dtype="float64")
    assert FullAttentionSpec(16, dtype="torch.bfloat16").dtype == "bfloat16"
    assert (
        FullAttentionSpec(16, num_kv_heads=8, head_size=128).page_size_bytes == 2 * 16 * 8 * 128 * 2
    )
    with pytest.raises(ConfigError, match="at least one group"):
        KVCacheConfig(10, ())
    with pytest.raises(ConfigError, match="different block sizes"):
        KVCacheConfig(
            10,
            (
                KVCacheGroupSpec("a", FullAttentionSpec(16)),
                KVCacheGroupSpec("b", FullAttentionSpec(32)),
            ),
        )
    with pytest.raises(ConfigError, match="not supported"):
        KVCacheConfig(10, (KVCacheGroupSpec("a", "sliding"),))  # type: ignore[arg-type]


@pytest.mark.parametrize("max_model_len", [0, -1])
def test_bad_max_model_len(max_model_len: int) -> None:
    with pytest.raises(ConfigError, match="max_model_len"):
        KVCacheManager(KVCacheConfig.full_attention(10, 16), max_model_len)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_new_tokens": -1}, "num_new_tokens"),
        ({"num_new_tokens": 4, "num_new_computed_tokens": -16}, "num_new_computed_tokens"),
        ({"num_new_tokens": 4, "num_lookahead_tokens": -2}, "num_lookahead_tokens"),
    ],
)
def test_negative_token_counts_change_nothing(kwargs: dict[str, int], name: str) -> None:
    manager = make_manager(11)
    schedule(manager, make_request("other", list(range(40))))
    req = make_request("0", list(range(40)))
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match=f"{name}.*-"):
        manager.allocate_slots(req, **kwargs)
    assert snapshot(manager) == before


def test_computed_blocks_with_caching_off_or_for_a_running_request() -> None:
    manager = make_manager(11)
    req0 = make_request("0", list(range(40)))
    schedule(manager, req0)
    req1 = make_request("1", list(range(40)))
    computed, num_computed = manager.get_computed_blocks(req1)
    schedule(manager, req1, 40)
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match="already holds blocks"):
        manager.allocate_slots(req1, 1, num_computed, computed)
    with pytest.raises(InvalidRequestError, match="groups"):
        manager.allocate_slots(req1, 1, 0, kvtier.KVCacheBlocks(((), ())))
    assert snapshot(manager) == before

    off = make_manager(11, enable_caching=False)
    with pytest.raises(InvalidRequestError, match="prefix caching is off"):
        off.allocate_slots(make_request("2", list(range(40))), 8, 32, computed)
    assert off.block_pool.get_num_free_blocks() == 10


def test_free_is_idempotent() -> None:
    manager = make_manager(11)
    req = make_request("0", list(range(40)))
    schedule(manager, req)
    manager.free(req)
    after_first = snapshot(manager)
    manager.free(req)
    manager.free(make_request("never-seen", [1, 2, 3]))
    assert snapshot(manager) == after_first
    assert manager.block_pool.get_num_free_blocks() == 10


def test_every_error_is_a_kvtier_error() -> None:
    for name in ("ConfigError", "InvalidRequestError", "NoFreeBlocksError", "UnknownNameError"):
        assert issubclass(getattr(kvtier, name), KVTierError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(InvalidRequestError, ValueError)


def test_public_api_is_sorted_and_complete() -> None:
    assert kvtier.__all__ == sorted(kvtier.__all__)
    for name in kvtier.__all__:
        assert hasattr(kvtier, name), name


def test_the_tiers_package_names_what_an_engine_plugs_in_with() -> None:
    import importlib

    from kvtier import tiers

    assert tiers.__all__ == sorted(tiers.__all__)
    for name in tiers.__all__:
        value = getattr(tiers, name)
        module = importlib.import_module(f"kvtier.tiers.{tiers._MODULES[name]}")
        assert value is getattr(module, name), name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tiers.Nope  # noqa: B018
    assert {"RedisTier", *tiers.__all__} <= set(dir(tiers))


def test_redis_tier_without_redis_py_is_an_import_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from kvtier import tiers

    namespace: dict[str, object] = {}
    monkeypatch.delitem(sys.modules, "kvtier.tiers.redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # as when redis-py is not installed
    exec("from kvtier.tiers import *", namespace)  # works without the extra
    assert "RedisTier" not in namespace
    assert "DiskTier" in namespace
    with pytest.raises(ImportError, match=r"pip install 'kvtier\[redis\]'"):
        tiers.RedisTier  # noqa: B018


def test_cache_blocks_rejects_unknown_requests_and_overreach() -> None:
    manager = make_manager(11, block_size=4)
    req = make_request("0", list(range(12)), 4)
    manager.allocate_slots(req, 4, delay_cache_blocks=True)
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match="holds 1"):
        manager.cache_blocks(req, 12)
    with pytest.raises(InvalidRequestError, match="holds no blocks"):
        manager.cache_blocks(make_request("x", [1, 2, 3, 4], 4), 4)
    assert snapshot(manager) == before
    manager.cache_blocks(req, 4)
    assert len(manager.block_pool.cached_block_hash_to_block) == 1


def test_empty_prompt_misses_and_zero_token_allocation_is_rejected() -> None:
    manager = make_manager(11)
    empty = make_request("e", [])
    assert manager.get_computed_blocks(empty)[1] == 0
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match="neither"):
        manager.allocate_slots(empty, 0)
    assert snapshot(manager) == before
    assert "e" not in manager.group_managers[0].req_to_blocks


def test_hit_blocks_must_match_the_hit_token_count() -> None:
    manager = make_manager(11)
    schedule(manager, make_request("0", list(range(40))))
    req = make_request("1", list(range(40)))
    computed, num_computed = manager.get_computed_blocks(req)
    assert num_computed == 32
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match="does not match"):
        manager.allocate_slots(req, 40, 0, computed)
    assert snapshot(manager) == before
    with pytest.raises(InvalidRequestError, match="must be KVCacheBlocks, got list"):
        manager.allocate_slots(req, 8, 32, [list(computed.blocks[0])])  # type: ignore[arg-type]
    assert snapshot(manager) == before


def test_hit_tokens_without_hit_blocks_are_refused() -> None:
    """Claimed hits with no blocks would cache fresh, never-computed blocks as the prefix."""
    manager = make_manager(11, events=True)
    req = make_request("a", list(range(53)))
    before = snapshot(manager)
    for blocks in (None, manager.empty_blocks()):
        with pytest.raises(InvalidRequestError, match="does not match the 0 hit blocks"):
            manager.allocate_slots(req, 5, 48, blocks)
        assert snapshot(manager) == before
    assert manager.take_events() == []
    assert manager.get_computed_blocks(make_request("b", list(range(53))))[1] == 0


def test_hit_blocks_evicted_and_reused_since_the_lookup_are_refused() -> None:
    """An engine that looks up several requests before allocating them.

    Between b's lookup and its allocation, c's allocation evicts b's second
    hit block and caches c's own tokens in it: b must not take it.
    """
    manager = make_manager(7, 4)
    schedule(manager, make_request("a", list(range(9)), 4))
    manager.free(make_request("a", list(range(9)), 4))
    b = make_request("b", list(range(9)), 4)
    hits, num_hits = manager.get_computed_blocks(b)
    assert num_hits == 8
    c = make_request("c", [7] * 20, 4)
    assert schedule(manager, c) is not None
    assert hits.blocks[0][1].block_id in manager.get_block_ids("c")[0]
    manager.free(c)
    before = snapshot(manager)
    with pytest.raises(InvalidRequestError, match="no longer cached under the request's hash"):
        manager.allocate_slots(b, 1, num_hits, hits)
    assert snapshot(manager) == before
    assert schedule(manager, b) is not None  # a fresh lookup works
    assert manager.get_block_ids("b")[0][0] == hits.blocks[0][0].block_id  # block 0 still hit


def test_evict_blocks_rejects_ids_out_of_range_or_not_integers() -> None:
    manager = make_manager(5)
    schedule(manager, make_request("0", list(range(40))))
    for bad in (-1, 5, 2.0, "2", None, True):  # checked before block 1 is evicted
        with pytest.raises(InvalidRequestError, match=r"is not an integer in \[0, 5\)"):
            manager.block_pool.evict_blocks([1, bad])  # type: ignore[list-item]
    assert len(manager.block_pool.cached_block_hash_to_block) == 2


def test_hashes_of_another_block_size_are_refused_not_hit() -> None:
    """A hasher of 8 tokens gives block 0 a hash of its first 8 tokens only.

    Another prompt sharing those 8 tokens would hit block 0 and read the KV of
    tokens it does not have.
    """
    manager = make_manager(11)
    a = [1] * 8 + [2] * 8 + [9] * 5
    b = [1] * 8 + [7] * 8 + [9] * 5  # block 0 differs from a's in its last 8 tokens
    before = snapshot(manager)
    for call in (
        lambda: manager.get_computed_blocks(make_request("a", a, 8)),
        lambda: manager.allocate_slots(make_request("a", a, 8), 21),
    ):
        with pytest.raises(InvalidRequestError, match="hasher block size 8"):
            call()
        assert snapshot(manager) == before
    schedule(manager, make_request("a", a))  # the cache's own block size works
    assert manager.get_computed_blocks(make_request("b", b))[1] == 0
    off = make_manager(11, enable_caching=False)  # hashes unused: nothing to refuse
    assert off.allocate_slots(make_request("a", a, 8), 21) is not None


def test_more_tokens_than_max_model_len_are_refused_before_any_block_is_taken() -> None:
    manager = make_manager(11, max_model_len=32)
    before = snapshot(manager)
    req = make_request("r", list(range(64)))
    with pytest.raises(InvalidRequestError, match=r"64 tokens .* more than max_model_len=32"):
        manager.allocate_slots(req, 64)
    assert snapshot(manager) == before
    blocks = manager.allocate_slots(req, 32)  # up to the limit
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2],)


def test_a_missing_block_error_names_its_slots() -> None:
    from kvtier.errors import BlockMissingError

    error = BlockMissingError.of_slots("disk", [7, 3, 7])
    assert (error.tier, error.slots) == ("disk", (3, 7))
    assert str(error) == "tier disk: 2 block(s) missing or failed verification (slots 3, 7)"
    many = BlockMissingError.of_slots("cpu", range(20, 0, -1))
    assert many.slots == tuple(range(1, 21))
    assert str(many).endswith("(slots 1, 2, 3, 4, 5, 6, 7, 8, …)")
