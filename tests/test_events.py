"""KV cache events from the device prefix cache (seed 001's event scenarios)."""

from __future__ import annotations

import pytest

from kvtier import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheManager,
    MultiModalFeature,
)
from kvtier.errors import InvalidRequestError
from kvtier.request import Request
from tests.factories import make_manager, make_request, schedule


@pytest.mark.parametrize("blocks_to_cache", [2, 3, 10])
@pytest.mark.parametrize("lora_name", [None, "adapter"])
def test_stored_removed_and_cleared(blocks_to_cache: int, lora_name: str | None) -> None:
    manager = make_manager(blocks_to_cache + 1, events=True)
    num_tokens = 16 * blocks_to_cache
    req0 = make_request("0", list(range(num_tokens)), lora_name=lora_name)
    manager.allocate_slots(req0, num_tokens)
    events = manager.take_events()
    assert len(events) == 1
    stored = events[0]
    assert isinstance(stored, BlockStored)
    assert list(stored.block_hashes) == req0.block_hashes
    assert len(stored.block_hashes) == len(manager.block_pool.cached_block_hash_to_block)
    assert stored.parent_block_hash is None
    assert list(stored.token_ids) == req0.all_token_ids
    assert (stored.block_size, stored.lora_name, stored.medium, stored.group_idx) == (
        16,
        lora_name,
        "GPU",
        0,
    )
    assert (stored.kv_cache_spec_kind, stored.kv_cache_spec_sliding_window) == (
        "full_attention",
        None,
    )
    assert stored.lora_id is None  # the request has no integer adapter id
    assert manager.take_events() == []

    # Same tokens without looking up hits: every cached block is evicted (tail
    # first, as they were freed) and the new copies are stored.
    manager.free(req0)
    req1 = make_request("1", list(range(num_tokens)), lora_name=lora_name)
    manager.allocate_slots(req1, num_tokens)
    events = manager.take_events()
    assert len(events) == blocks_to_cache + 1
    removed = events[:-1]
    assert all(isinstance(e, BlockRemoved) and e.medium == "GPU" for e in removed)
    assert [e.block_hashes[0] for e in removed] == req0.block_hashes[::-1]  # type: ignore[union-attr]
    assert isinstance(events[-1], BlockStored)
    assert len(events[-1].block_hashes) == blocks_to_cache

    manager.free(req1)
    assert manager.reset_prefix_cache()
    assert manager.take_events() == [AllBlocksCleared(medium="GPU")]
    assert len(manager.block_pool.cached_block_hash_to_block) == 0


def test_stored_event_parent_is_the_previous_block() -> None:
    manager = make_manager(11, events=True)
    req = make_request("0", list(range(20)))
    schedule(manager, req)
    manager.take_events()
    req.num_computed_tokens = 20
    req.append_output_token_ids(list(range(12)))
    manager.allocate_slots(req, 12)
    (event,) = manager.take_events()
    assert isinstance(event, BlockStored)
    assert event.parent_block_hash == req.block_hashes[0]
    assert list(event.block_hashes) == [req.block_hashes[1]]
    assert list(event.token_ids) == req.all_token_ids[16:32]


def test_no_events_unless_enabled() -> None:
    manager = make_manager(11)
    req = make_request("0", list(range(40)))
    schedule(manager, req)
    manager.free(req)
    manager.reset_prefix_cache()
    assert manager.take_events() == []


@pytest.mark.parametrize("group_id", [0, 1, 2])
def test_events_name_their_group(group_id: int) -> None:
    spec = FullAttentionSpec(16)
    config = KVCacheConfig(40, tuple(KVCacheGroupSpec(f"layer{i}", spec) for i in range(3)))
    manager = KVCacheManager(config, 8192, enable_kv_cache_events=True)
    req = make_request("0", list(range(32)))
    blocks = manager.allocate_slots(req, 32)
    assert blocks is not None
    assert [len(group) for group in blocks.blocks] == [2, 2, 2]
    stored = [e for e in manager.take_events() if isinstance(e, BlockStored)]
    assert [e.group_idx for e in stored] == [0, 1, 2]
    assert list(stored[group_id].block_hashes) == req.block_hashes
    manager.free(req)
    manager.allocate_slots(make_request("1", [5] * 16 * 13), 16 * 13)  # all 39 blocks
    removed = [e for e in manager.take_events() if isinstance(e, BlockRemoved)]
    assert {e.group_idx for e in removed} == {0, 1, 2}
    assert sum(e.group_idx == group_id for e in removed) == 2


@pytest.mark.parametrize("blocks_to_cache", [2, 10])
def test_stored_events_carry_the_lora_id(blocks_to_cache: int) -> None:
    """vLLM's consumers read ``lora_id`` (the adapter's ``lora_int_id``) from BlockStored."""
    manager = make_manager(blocks_to_cache + 1, events=True)
    tokens = list(range(16 * blocks_to_cache))
    hasher = make_request("x", []).block_hasher
    lora = Request("lora", tokens, hasher, lora_name="test_lora", lora_id=42)
    manager.allocate_slots(lora, len(tokens))
    (stored,) = manager.take_events()
    assert isinstance(stored, BlockStored)
    assert (stored.lora_id, stored.lora_name, len(stored.block_hashes)) == (
        42,
        "test_lora",
        blocks_to_cache,
    )
    manager.free(lora)
    plain = Request("plain", tokens, hasher)
    manager.allocate_slots(plain, len(tokens))
    stored = manager.take_events()[-1]
    assert isinstance(stored, BlockStored)
    assert stored.lora_id is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "42", True])
def test_a_bad_lora_id_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="lora_id must be a positive integer"):
        Request("r", [1, 2], lora_id=bad)  # type: ignore[arg-type]


def test_an_engine_request_of_its_own_lora_id_type_allocates_without_events() -> None:
    """SGLang's requests carry a string ``lora_id``: only events read it."""
    manager = make_manager(5)
    req = make_request("r", list(range(32)))
    object.__setattr__(req, "lora_id", "my-adapter")
    assert manager.allocate_slots(req, 32) is not None


def test_an_engine_request_with_a_bad_lora_id_changes_nothing() -> None:
    """An engine's own request type is checked when events would carry its id."""
    manager = make_manager(5, events=True)
    req = make_request("r", list(range(32)))
    object.__setattr__(req, "lora_id", "adapter-7")  # as a foreign request type might
    with pytest.raises(InvalidRequestError, match="'adapter-7'"):
        manager.allocate_slots(req, 32)
    assert manager.block_pool.get_num_free_blocks() == 4
    assert manager.take_events() == []


def _stored(manager: KVCacheManager, request: Request, tokens: int) -> BlockStored:
    manager.allocate_slots(request, tokens)
    (stored,) = [e for e in manager.take_events() if isinstance(e, BlockStored)]
    return stored


def test_stored_events_carry_each_blocks_extra_keys_as_vllm_publishes_them() -> None:
    """One entry per block, untagged: LoRA name, (identifier, offset) pairs, salt (first only)."""
    manager = make_manager(16, events=True)
    tokens = list(range(64))
    plain = _stored(manager, make_request("plain", tokens), 64)
    assert plain.extra_keys == [None] * 4
    salted = _stored(manager, make_request("salted", tokens, cache_salt="tenant-a"), 64)
    assert salted.extra_keys == [("tenant-a",), None, None, None]
    image = MultiModalFeature("img-1", offset=10, length=12)  # tokens 10-21: blocks 0 and 1
    both = make_request("mm", [t + 100 for t in tokens], lora_name="ad", mm_features=(image,))
    assert _stored(manager, both, 64).extra_keys == [
        ("ad", ("img-1", 10)),
        ("ad", ("img-1", -6)),  # began 6 tokens before the block
        ("ad",),
        ("ad",),
    ]


def test_extra_keys_follow_the_blocks_an_event_stores() -> None:
    """A later step's event lists only its new blocks' keys (the salt was the first's)."""
    manager = make_manager(16, events=True)
    request = make_request("r", list(range(64)), cache_salt="s")
    manager.allocate_slots(request, 32)
    assert [e.extra_keys for e in manager.take_events()] == [[("s",), None]]  # type: ignore[union-attr]
    request.num_computed_tokens = 32  # the first chunk ran
    manager.allocate_slots(request, 32)
    assert [e.extra_keys for e in manager.take_events()] == [[None, None]]  # type: ignore[union-attr]


class _EngineRequest:
    """An engine's own request type with malformed multimodal features."""

    def __init__(self, inner: Request) -> None:
        self._inner = inner
        self.mm_features = ["not a feature"]

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_malformed_mm_features_of_an_engine_request_are_refused_before_any_change() -> None:
    manager = make_manager(16, events=True)
    inner = make_request("r", list(range(32)))
    with pytest.raises(InvalidRequestError, match="mm_features"):
        manager.allocate_slots(_EngineRequest(inner), 32)  # type: ignore[arg-type]
    assert len(manager.block_pool.cached_block_hash_to_block) == 0
    assert manager.take_events() == []


@pytest.mark.parametrize("seed", range(20))
def test_event_extra_keys_walk_the_features_once_and_match_the_per_block_scan(seed: int) -> None:
    """The one-pass cursor (sorted features) and the per-block scan (unsorted) agree."""
    import random

    from kvtier.extra_keys import block_extra_keys, event_extra_keys

    rng = random.Random(seed)
    features = sorted(
        (
            MultiModalFeature(f"f{i}", offset=rng.randrange(0, 200), length=rng.randrange(1, 40))
            for i in range(rng.randrange(1, 12))
        ),
        key=lambda feature: feature.offset,
    )
    tokens = list(range(256))
    first = rng.randrange(0, 8)
    blocks = range(first, 16)
    for order in (features, features[::-1]):  # reversed: not sorted, scanned per block
        request = make_request("r", tokens, cache_salt="s", lora_name="l", mm_features=())
        object.__setattr__(request, "mm_features", tuple(order))
        expected = []
        for index in blocks:
            keys = block_extra_keys(
                index * 16, index * 16 + 16, lora_name="l", mm_features=order, cache_salt="s"
            )
            assert keys is not None  # the LoRA name is on every block
            salt = ("s",) if index == 0 else ()
            expected.append(("l", *keys.mm, *salt))
        assert event_extra_keys(request, blocks, 16) == expected
