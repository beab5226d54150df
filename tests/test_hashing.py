"""Block hashing: algorithms, root seeds, extra keys, incremental hashing."""

from __future__ import annotations

import hashlib
import struct

import cbor2
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from kvtier import (
    HASH_ALGORITHMS,
    BlockHasher,
    ExtraKeys,
    InvalidRequestError,
    MultiModalFeature,
    RandomRootHashWarning,
    Request,
    UnknownNameError,
    hash_block_tokens,
    root_hash,
)
from kvtier.errors import ConfigError
from kvtier.hashing import get_block_hash, get_group_id, make_block_hash_with_group_id
from tests.factories import make_manager, make_request, schedule

ALGORITHMS = sorted(HASH_ALGORITHMS)


def _le_i64(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}q", *tokens)


def test_sha256_layout_is_stable() -> None:
    """The binary layout is a storage format: lower tiers persist these hashes."""
    root = hashlib.sha256(b"kvtier.root\x00seed").digest()
    assert root_hash("sha256", "seed") == root
    tokens = [1, -2, 3, 2**40]
    expected = hashlib.sha256(root + struct.pack("<I", 4) + _le_i64(tokens)).digest()
    assert hash_block_tokens("sha256", None, tokens, seed="seed") == expected
    extra = ExtraKeys(lora_name="ad", mm=(("img", -3),), cache_salt="s")
    with_extra = hashlib.sha256(
        root
        + struct.pack("<I", 4)
        + _le_i64(tokens)
        + cbor2.dumps(["ad", [["img", -3]], "s"], canonical=True)
    ).digest()
    assert hash_block_tokens("sha256", root, tokens, extra) == with_extra  # type: ignore[arg-type]


def test_xxhash_layout_is_stable() -> None:
    root = xxhash.xxh3_128_digest(b"kvtier.root\x00seed")
    assert root_hash("xxhash", b"seed") == root
    expected = xxhash.xxh3_128_digest(root + struct.pack("<I", 2) + _le_i64([7, 8]))
    assert hash_block_tokens("xxhash", None, [7, 8], seed="seed") == expected
    assert len(expected) == 16


def test_sha256_cbor_is_reproducible_from_its_documented_encoding() -> None:
    root = hashlib.sha256(cbor2.dumps(["kvtier.root", b"seed"], canonical=True)).digest()
    assert root_hash("sha256_cbor", "seed") == root
    expected = hashlib.sha256(cbor2.dumps([root, [5, 6], None], canonical=True)).digest()
    assert hash_block_tokens("sha256_cbor", None, [5, 6], seed="seed") == expected
    extra = ExtraKeys(cache_salt="t")
    expected = hashlib.sha256(cbor2.dumps([root, [5, 6], [None, [], "t"]], canonical=True)).digest()
    assert hash_block_tokens("sha256_cbor", None, [5, 6], extra, seed="seed") == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_root_is_deterministic_per_seed(algorithm: str) -> None:
    assert root_hash(algorithm, "a") == root_hash(algorithm, b"a")
    assert root_hash(algorithm, "a") != root_hash(algorithm, "b")


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor"])
def test_collision_resistant_algorithms_default_to_a_fixed_root(algorithm: str) -> None:
    assert root_hash(algorithm) == root_hash(algorithm, "kvtier")


def test_xxhash_without_seed_is_random_per_process_and_warns() -> None:
    with pytest.warns(RandomRootHashWarning, match="random"):
        first = root_hash("xxhash")
    with pytest.warns(RandomRootHashWarning):
        second = BlockHasher(16, "xxhash").root
    assert first == second  # one root per process
    assert first != root_hash("xxhash", "kvtier")


def test_unknown_algorithm_names_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as info:
        BlockHasher(16, "md5")
    message = str(info.value)
    assert "'md5'" in message
    for name in ALGORITHMS:
        assert name in message
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_block_size(size: object) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        BlockHasher(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chain_and_only_full_blocks(algorithm: str) -> None:
    hasher = BlockHasher(4, algorithm, seed="x")
    req = Request("r", list(range(10)), hasher)
    assert len(req.block_hashes) == 2
    first = hash_block_tokens(algorithm, None, [0, 1, 2, 3], seed="x")
    assert req.block_hashes[0] == first
    assert req.block_hashes[1] == hash_block_tokens(algorithm, first, [4, 5, 6, 7])
    # Same tokens, other parent: another hash.
    assert hash_block_tokens(algorithm, req.block_hashes[1], [4, 5, 6, 7]) != req.block_hashes[1]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(
    prompt=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40),
    steps=st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=9), max_size=6),
    salt=st.none() | st.text(min_size=1, max_size=3),
    lora=st.none() | st.text(min_size=1, max_size=3),
)
def test_incremental_hashing_equals_one_shot(
    algorithm: str, prompt: list[int], steps: list[list[int]], salt: str | None, lora: str | None
) -> None:
    hasher = BlockHasher(4, algorithm, seed="p")
    grown = Request("a", prompt, hasher, cache_salt=salt, lora_name=lora)
    for step in steps:
        grown.append_output_token_ids(step)
    whole = Request("b", grown.all_token_ids, hasher, cache_salt=salt, lora_name=lora)
    assert grown.block_hashes == whole.block_hashes
    assert len(whole.block_hashes) == len(whole.all_token_ids) // 4
    # The fast path and the per-block path agree.
    parent = hasher.root
    for index, block_hash in enumerate(whole.block_hashes):
        tokens = whole.all_token_ids[index * 4 : index * 4 + 4]
        extra = None
        if lora or (salt and index == 0):
            extra = ExtraKeys(lora_name=lora, cache_salt=salt if index == 0 else None)
        parent = hash_block_tokens(algorithm, parent, tokens, extra)
        assert block_hash == parent


def test_single_token_append() -> None:
    req = make_request("a", [1, 2, 3], 4)
    req.append_output_token_ids(4)
    assert req.output_token_ids == [4]
    assert len(req.block_hashes) == 1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1])
def test_token_out_of_range_is_rejected_and_request_unchanged(algorithm: str, bad: int) -> None:
    with pytest.raises(InvalidRequestError, match="64 bits"):
        make_request("a", [1, 2, 3, bad], 4, algorithm=algorithm)
    req = make_request("a", [1, 2, 3], 4, algorithm=algorithm)
    with pytest.raises(InvalidRequestError):
        req.append_output_token_ids([bad, 5])
    assert req.all_token_ids == [1, 2, 3]
    assert req.output_token_ids == []
    assert req.block_hashes == []


def test_multimodal_extra_keys_use_offsets_relative_to_the_block() -> None:
    """Spec scenario test_mm_prefix_caching."""
    common = list(range(10)) + [-1] * 6 + [-1] * 4 + list(range(10, 20)) + [-1] * 2 + [-1] * 16
    features = (
        MultiModalFeature("aaa", 11, 10),
        MultiModalFeature("bbb", 30, 18),
        MultiModalFeature("ccc", 48, 7),
    )
    tokens = [*common, *[-1] * 7, *[100] * 4]
    manager = make_manager(11)
    req0 = make_request("0", tokens, mm_features=features)
    hashes = req0.block_hashes
    assert len(hashes) == 3
    h0 = hash_block_tokens("sha256", None, tokens[:16], ExtraKeys(mm=(("aaa", 11),)), seed="tests")
    h1 = hash_block_tokens("sha256", h0, tokens[16:32], ExtraKeys(mm=(("aaa", -5), ("bbb", 14))))
    h2 = hash_block_tokens("sha256", h1, tokens[32:48], ExtraKeys(mm=(("bbb", -2),)))
    assert hashes == [h0, h1, h2]

    blocks = schedule(manager, req0)
    assert blocks is not None
    assert blocks.get_block_ids() == ([1, 2, 3, 4],)
    req0.num_computed_tokens = 59
    req0.append_output_token_ids([8] * 5)
    assert manager.allocate_slots(req0, 5).get_block_ids() == ([],)  # type: ignore[union-attr]
    h3 = hash_block_tokens("sha256", h2, [*tokens[48:], *[8] * 5], ExtraKeys(mm=(("ccc", 0),)))
    assert req0.block_hashes[3] == h3

    req1 = make_request("1", [*common, *[-1] * 7, *[200] * 5], mm_features=features)
    computed, num_computed = manager.get_computed_blocks(req1)
    assert len(computed.blocks[0]) == 3
    assert num_computed == 48
    # Another image in the same place misses from the block it touches.
    other = (*features[:1], MultiModalFeature("zzz", 30, 18), features[2])
    req2 = make_request("2", [*common, *[-1] * 7, *[200] * 5], mm_features=other)
    assert manager.get_computed_blocks(req2)[1] == 16


def test_cache_salt_separates_tenants_on_the_first_block_only() -> None:
    """Spec scenario test_cache_key_salting."""
    common = [i for i in range(3) for _ in range(16)]
    tokens = [*common, *[3] * 11]
    manager = make_manager(11)
    req0 = make_request("0", tokens, cache_salt="salt1")
    h0 = hash_block_tokens("sha256", None, tokens[:16], ExtraKeys(cache_salt="salt1"), seed="tests")
    h1 = hash_block_tokens("sha256", h0, tokens[16:32])
    h2 = hash_block_tokens("sha256", h1, tokens[32:48])
    assert req0.block_hashes == [h0, h1, h2]
    schedule(manager, req0)
    req0.num_computed_tokens = 59
    req0.append_output_token_ids([8] * 5)
    manager.allocate_slots(req0, 5)
    assert req0.block_hashes[3] == hash_block_tokens("sha256", h2, [*tokens[48:], *[8] * 5])

    same = make_request("1", [*common, *[4] * 11], cache_salt="salt1")
    assert manager.get_computed_blocks(same)[1] == 48
    other = make_request("2", [*common, *[4] * 11], cache_salt="salt2")
    assert manager.get_computed_blocks(other)[1] == 0
    unsalted = make_request("3", [*common, *[4] * 11])
    assert manager.get_computed_blocks(unsalted)[1] == 0
    assert other.block_hashes[0] == hash_block_tokens(
        "sha256", None, tokens[:16], ExtraKeys(cache_salt="salt2"), seed="tests"
    )
    assert other.block_hashes[1] == hash_block_tokens(
        "sha256", other.block_hashes[0], tokens[16:32]
    )


def test_lora_name_is_on_every_block() -> None:
    tokens = list(range(32))
    a = make_request("a", tokens, lora_name="adapter-a")
    b = make_request("b", tokens, lora_name="adapter-b")
    plain = make_request("c", tokens)
    for index in range(2):
        assert len({a.block_hashes[index], b.block_hashes[index], plain.block_hashes[index]}) == 3
    assert a.block_hashes[1] == hash_block_tokens(
        "sha256", a.block_hashes[0], tokens[16:], ExtraKeys(lora_name="adapter-a")
    )


def test_bad_multimodal_features_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="past the prompt"):
        make_request("a", [0] * 10, mm_features=(MultiModalFeature("x", 5, 6),))
    with pytest.raises(InvalidRequestError, match="sorted"):
        make_request(
            "a", [0] * 20, mm_features=(MultiModalFeature("x", 5, 2), MultiModalFeature("y", 1, 2))
        )
    with pytest.raises(InvalidRequestError, match="offset"):
        MultiModalFeature("x", -1, 2)
    with pytest.raises(InvalidRequestError, match="length"):
        MultiModalFeature("x", 0, 0)
    for offset in (1.5, "a", True, None):  # not a token index: refused, never hashed
        with pytest.raises(InvalidRequestError, match="offset must be an integer >= 0"):
            MultiModalFeature("x", offset, 2)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="mm_features must be MultiModalFeature"):
        make_request("a", [0] * 20, mm_features=((1, 2),))  # type: ignore[arg-type]


def test_wrongly_typed_request_input_is_a_typed_error_and_changes_nothing() -> None:
    hasher = make_request("x", []).block_hasher
    with pytest.raises(InvalidRequestError, match="iterable of integers, got NoneType"):
        Request("r", None, hasher)  # type: ignore[arg-type]
    for name in ("num_computed_tokens", "num_preemptions"):
        with pytest.raises(InvalidRequestError, match=f"{name} must be an integer >= 0"):
            Request("r", [1] * 16, hasher, **{name: "x"})  # type: ignore[arg-type]
    req = make_request("r", [1] * 15, 16)
    for bad in (2.0, None):
        with pytest.raises(InvalidRequestError, match="iterable of integers"):
            req.append_output_token_ids(bad)  # type: ignore[arg-type]
    assert (req.all_token_ids, req.output_token_ids, req.block_hashes) == ([1] * 15, [], [])
    req.append_output_token_ids(7)
    assert len(req.block_hashes) == 1


def test_numpy_integers_are_taken_as_ints() -> None:
    np = pytest.importorskip("numpy")
    feature = MultiModalFeature("img", np.int64(3), np.int32(8))
    assert (type(feature.offset), type(feature.length)) == (int, int)
    assert feature == MultiModalFeature("img", 3, 8)  # hashed alike
    req = make_request("r", [1] * 20)
    req.num_computed_tokens = np.int64(16)  # type: ignore[assignment]
    assert type(req.num_computed_tokens) is int
    with pytest.raises(InvalidRequestError, match="num_computed_tokens must be an integer"):
        req.num_computed_tokens = np.float64(16.0)  # type: ignore[assignment]


def test_group_id_is_part_of_the_key() -> None:
    block_hash = hash_block_tokens("sha256", None, [1])
    key0 = make_block_hash_with_group_id(block_hash, 0)
    key7 = make_block_hash_with_group_id(block_hash, 7)
    assert key0 != key7
    assert get_block_hash(key7) == block_hash
    assert get_group_id(key7) == 7
