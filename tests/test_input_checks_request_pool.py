"""Malformed token ids and ``cache_full_blocks`` arguments: typed errors, nothing changed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kvtier import (
    BlockHasher,
    BlockPool,
    BlockStored,
    KVCacheBlock,
    KVCacheConfig,
    KVCacheManager,
    Request,
)
from kvtier.errors import InvalidRequestError

ALGORITHMS = ["sha256", "sha256_cbor", "xxhash"]

BAD_TOKENS: list[Any] = [
    1.5,
    None,
    "x",
    b"\x01",
    2**63,
    -(2**63) - 1,
    2**70,
    [1.5],
    [None],
    [4, "x"],
    [2**63],
    [-(2**63) - 1],
    "12",
    b"\x01\x02",
    bytearray(b"\x01\x02"),
    object(),
]


def label(value: Any) -> str:
    return "object()" if type(value) is object else repr(value)


def hasher(algorithm: str = "sha256", block_size: int = 4) -> BlockHasher:
    return BlockHasher(block_size, algorithm, seed="input-checks")


def request_state(req: Request) -> tuple[list[Any], ...]:
    return (
        list(req.prompt_token_ids),
        list(req.all_token_ids),
        list(req.output_token_ids),
        list(req.block_hashes),
    )


# -- Request: token ids ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", BAD_TOKENS, ids=label)
def test_a_bad_appended_token_id_is_refused_and_the_request_can_still_grow(
    algorithm: str, bad: Any
) -> None:
    req = Request("r", [1, 2, 3, 4, 5], hasher(algorithm))
    before = request_state(req)
    with pytest.raises(InvalidRequestError):
        req.append_output_token_ids(bad)
    assert request_state(req) == before
    # Valid tokens that fill blocks are hashed as if the bad call never happened.
    req.append_output_token_ids([6, 7, 8, 9])
    req.append_output_token_ids(10)
    twin = Request("t", list(range(1, 11)), hasher(algorithm))
    assert req.all_token_ids == twin.all_token_ids
    assert req.output_token_ids == [6, 7, 8, 9, 10]
    assert req.block_hashes == twin.block_hashes
    assert len(req.block_hashes) == 2


@pytest.mark.parametrize("with_hasher", [True, False])
@pytest.mark.parametrize(
    "bad",
    [[1, 2, 1.5], [1, None], ["1"], [2**63], [1, -(2**63) - 1], "abc", b"ab", [1] * 20 + [0.5]],
    ids=repr,
)
def test_a_bad_prompt_is_refused_even_where_it_is_never_hashed(with_hasher: bool, bad: Any) -> None:
    # [1, 2, 1.5] is a partial block: hashing never sees it, the check must.
    with pytest.raises(InvalidRequestError):
        Request("r", bad, hasher() if with_hasher else None)


def test_long_token_lists_are_checked_to_the_last_id() -> None:
    tokens = list(range(1000))  # 250 full blocks of 4: the two-pass path
    assert Request("r", tokens, hasher()).all_token_ids == tokens
    for index, bad in ((999, 1.5), (998, 2**63), (0, -(2**63) - 1), (500, None), (7, "7")):
        wrong: list[Any] = list(tokens)
        wrong[index] = bad
        with pytest.raises(InvalidRequestError, match=f"got {bad!r} .* at index {index}"):
            Request("r", wrong, hasher())
        req = Request("r", [7] * 3, hasher())
        before = request_state(req)
        with pytest.raises(InvalidRequestError, match=f"at index {index}"):
            req.append_output_token_ids(wrong)
        assert request_state(req) == before


def test_the_64_bit_bounds_are_accepted() -> None:
    req = Request("r", [-(2**63), 2**63 - 1], hasher())
    req.append_output_token_ids(2**63 - 1)
    req.append_output_token_ids([-(2**63)])
    assert req.all_token_ids == [-(2**63), 2**63 - 1, 2**63 - 1, -(2**63)]
    assert len(req.block_hashes) == 1


def test_text_is_refused_with_a_clear_message() -> None:
    with pytest.raises(InvalidRequestError, match=r"got str .*not the text"):
        Request("r", "hello", hasher())  # type: ignore[arg-type]
    req = Request("r", [1], hasher())
    with pytest.raises(InvalidRequestError, match=r"got bytes .*not the text"):
        req.append_output_token_ids(b"hi")
    assert request_state(req) == ([1], [1], [], [])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("prompt_len", [6, 30])  # the short loop and the two-pass check
def test_numpy_token_ids_are_taken_as_ints(algorithm: str, prompt_len: int) -> None:
    np = pytest.importorskip("numpy")
    total = prompt_len + 4
    req = Request("r", np.arange(1, prompt_len + 1), hasher(algorithm))
    req.append_output_token_ids(np.int64(prompt_len + 1))
    req.append_output_token_ids(np.array(range(prompt_len + 2, total + 1), dtype=np.int32))
    twin = Request("t", list(range(1, total + 1)), hasher(algorithm))
    assert req.all_token_ids == twin.all_token_ids
    assert {type(token) for token in req.all_token_ids} == {int}
    assert {type(token) for token in req.prompt_token_ids} == {int}
    assert req.block_hashes == twin.block_hashes
    mixed: list[Any] = list(range(1, 41))
    mixed[20] = np.int64(21)  # one NumPy integer in a long list of ints
    assert {type(t) for t in Request("m", mixed, hasher(algorithm)).all_token_ids} == {int}
    before = request_state(req)
    for bad in (np.float64(11.0), np.True_, np.array([11.5]), np.uint64(2**63), [np.nan] * 20):
        with pytest.raises(InvalidRequestError):
            req.append_output_token_ids(bad)
        assert request_state(req) == before


class FloatWithIndex(float):
    """A float that also claims to be an integer."""

    def __index__(self) -> int:
        return 1


class AddsAsFloat:
    """An integer-like object whose sum with a float is a plain float."""

    def __index__(self) -> int:
        return 7

    def __radd__(self, other: float) -> float:
        return other + 7.0


class RaisesOnAdd:
    """An integer-like whose arithmetic fails with something else than TypeError."""

    def __index__(self) -> int:
        return 3

    def __radd__(self, other: object) -> object:
        raise ValueError("no adding")


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor", "xxhash"])
@pytest.mark.parametrize("prompt_len", [3, 40])
def test_integer_lookalikes_hash_as_their_index_whatever_the_prompt_length(
    algorithm: str, prompt_len: int
) -> None:
    """Kept or converted, a look-alike must never jam a hash later (sha256_cbor refused them)."""
    for odd, value in ((FloatWithIndex(1.5), 1), (AddsAsFloat(), 7), (RaisesOnAdd(), 3)):
        prompt: list[Any] = [*range(prompt_len - 1), odd]
        req = Request("r", prompt, hasher(algorithm))
        twin = Request("t", [*range(prompt_len - 1), value], hasher(algorithm))
        assert req.block_hashes == twin.block_hashes
        req.append_output_token_ids([odd] * 20)  # the request still grows
        twin.append_output_token_ids([value] * 20)
        assert req.block_hashes == twin.block_hashes


def test_small_numpy_integers_summing_past_their_type_raise_no_warning() -> None:
    """(pytest turns warnings into errors here, as a strict engine may.)"""
    prompt = list(np.full(40_000, 60_000, dtype=np.int32))  # sums past 2**31
    req = Request("r", prompt, hasher("sha256"))
    assert {type(token) for token in req.prompt_token_ids} == {int}
    req.append_output_token_ids(list(np.full(20, 60_000, dtype=np.uint16)))


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor", "xxhash"])
def test_bools_hash_as_ones_and_zeros_under_every_algorithm(algorithm: str) -> None:
    bools = Request("b", [True, False] * 20, hasher(algorithm))
    assert bools.block_hashes == Request("i", [1, 0] * 20, hasher(algorithm)).block_hashes


class AddsAsInt:
    """An integer-like object that even adds as an int: kept as given, hashed as its index."""

    def __index__(self) -> int:
        return 7

    def __radd__(self, other: int) -> int:
        return other + 7


@pytest.mark.parametrize("algorithm", ["sha256", "sha256_cbor", "xxhash"])
def test_an_integer_lookalike_that_passes_the_fast_check_hashes_as_its_index(
    algorithm: str,
) -> None:
    odd: list[Any] = [*range(39), AddsAsInt()]
    plain = [*range(39), 7]
    req = Request("r", odd, hasher(algorithm))
    assert req.block_hashes == Request("t", plain, hasher(algorithm)).block_hashes
    req.append_output_token_ids([AddsAsInt()] * 20)  # and the request still grows
    assert req.block_hashes == Request("u", plain + [7] * 20, hasher(algorithm)).block_hashes


def test_a_numpy_prompt_is_read_in_one_call() -> None:
    """``list(array)`` gives NumPy scalars, each converted on its own: tolist() gives ints."""
    prompt = np.arange(100_000, dtype=np.int64)
    req = Request("r", prompt, hasher("sha256"))
    assert {type(token) for token in req.prompt_token_ids} == {int}
    assert req.block_hashes == Request("t", prompt.tolist(), hasher("sha256")).block_hashes
    with pytest.raises(InvalidRequestError, match="fit in 64 bits"):
        Request("f", np.arange(40, dtype=np.float64) + 0.5, hasher("sha256"))
    with pytest.raises(InvalidRequestError, match="fit in 64 bits"):
        Request("u", np.array([1, 2**63], dtype=np.uint64), hasher("sha256"))


@pytest.mark.parametrize("prompt_len", [3, 40])
def test_bools_are_taken_as_packing_takes_them(prompt_len: int) -> None:
    # kvtier.hashing packs ids with struct format "q", which takes True as 1
    # and False as 0: a request may hold them, and hashes them like 1 and 0.
    flags = [index % 2 == 0 for index in range(prompt_len)]
    req = Request("r", flags, hasher())
    req.append_output_token_ids(True)
    req.append_output_token_ids([False, True])
    twin = Request("t", [int(flag) for flag in [*flags, True, False, True]], hasher())
    assert req.all_token_ids == twin.all_token_ids
    assert req.block_hashes == twin.block_hashes


# -- BlockPool.cache_full_blocks ----------------------------------------------------------


def pool_state(pool: BlockPool) -> tuple[Any, ...]:
    index = pool.cached_block_hash_to_block
    return (
        [block.block_hash for block in pool.blocks],
        {key: [block.block_id for block in index.get_blocks(key)] for key in index},
        list(pool.kv_event_queue),
        [block.ref_cnt for block in pool.blocks],
        pool.get_num_free_blocks(),
    )


def pool_with_one_cached_block() -> tuple[BlockPool, Request, list[KVCacheBlock]]:
    pool = BlockPool(8, enable_kv_cache_events=True)
    req = Request("r", list(range(12)), hasher())  # 3 full blocks of 4
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(req, blocks, 0, 1, 4, 0)
    return pool, req, blocks


@pytest.mark.parametrize(
    ("num_blocks", "args", "message"),
    [
        (2, (0, 3, 4, 0), "only 2 blocks"),
        (2, (1, 3, 4, 0), "only 2 blocks"),
        (3, (-1, 1, 4, 0), "0 <= num_cached_blocks <= num_full_blocks"),
        (3, (-2, 3, 4, 0), "0 <= num_cached_blocks <= num_full_blocks"),
        (3, (2, 1, 4, 0), "0 <= num_cached_blocks <= num_full_blocks"),
        (3, (False, 2, 4, 0), "num_cached_blocks must be an int"),
        (3, (1, True, 4, 0), "num_full_blocks must be an int"),
        (3, (1, 3.0, 4, 0), "num_full_blocks must be an int"),
        (3, (1, "3", 4, 0), "num_full_blocks must be an int"),
        (3, (1, 3, 0, 0), "block_size must be > 0"),
        (3, (1, 3, -4, 0), "block_size must be > 0"),
        (3, (1, 3, 4.0, 0), "block_size must be an int"),
        (3, (1, 3, 4, -1), "kv_cache_group_id must be in"),
        (3, (1, 3, 4, 2**32), "kv_cache_group_id must be in"),
        (3, (1, 3, 4, True), "kv_cache_group_id must be an int"),
    ],
)
def test_cache_full_blocks_refuses_bad_arguments_and_changes_nothing(
    num_blocks: int, args: tuple[Any, ...], message: str
) -> None:
    pool, req, blocks = pool_with_one_cached_block()
    before = pool_state(pool)
    request_before = request_state(req)
    with pytest.raises(InvalidRequestError, match=message):
        pool.cache_full_blocks(req, blocks[:num_blocks], *args)
    assert pool_state(pool) == before
    assert request_state(req) == request_before
    # The pool still caches the rest, with one event chained to block 0.
    pool.cache_full_blocks(req, blocks, 1, 3, 4, 0)
    assert len(pool.cached_block_hash_to_block) == 3
    events = pool.take_events()
    assert len(events) == 2
    stored = events[1]
    assert isinstance(stored, BlockStored)
    assert list(stored.block_hashes) == req.block_hashes[1:]
    assert stored.parent_block_hash == req.block_hashes[0]
    assert list(stored.token_ids) == list(range(4, 12))


def test_cache_full_blocks_without_enough_hashes_is_a_typed_error() -> None:
    pool, _, blocks = pool_with_one_cached_block()
    short = Request("s", list(range(9)), hasher(block_size=8))  # 1 hash
    before = pool_state(pool)
    with pytest.raises(InvalidRequestError, match="1 block hashes, 2 needed"):
        pool.cache_full_blocks(short, blocks, 0, 2, 4, 0)
    assert pool_state(pool) == before


def test_cache_full_blocks_with_nothing_new_is_a_no_op() -> None:
    pool, req, blocks = pool_with_one_cached_block()
    before = pool_state(pool)
    pool.cache_full_blocks(req, blocks, 1, 1, 4, 0)
    pool.cache_full_blocks(req, [], 0, 0, 4, 0)
    assert pool_state(pool) == before


class EngineRequest:
    """An engine's own request type: kvtier's Request with another num_computed_tokens."""

    def __init__(self, inner: Request, num_computed_tokens: object) -> None:
        self._inner = inner
        self.num_computed_tokens = num_computed_tokens

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def test_an_engine_count_that_is_a_numpy_integer_is_taken_and_a_float_refused_first() -> None:
    manager = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    hasher = BlockHasher(16, "sha256", seed="x")
    free = manager.block_pool.get_num_free_blocks()
    bad = EngineRequest(Request("f", list(range(40)), hasher), 1.5)
    with pytest.raises(InvalidRequestError, match="num_computed_tokens must be an integer"):
        manager.allocate_slots(bad, 40)  # type: ignore[arg-type]
    assert manager.block_pool.get_num_free_blocks() == free  # refused before allocating
    for odd in (torch.tensor(0.5), torch.tensor(0.0), FloatWithIndex(0.0), True, None):
        bad = EngineRequest(Request("f", list(range(40)), hasher), odd)
        with pytest.raises(InvalidRequestError, match="num_computed_tokens must be an integer"):
            manager.allocate_slots(bad, 40)  # type: ignore[arg-type]
        assert manager.block_pool.get_num_free_blocks() == free
        assert "f" not in manager.group_managers[0].req_to_blocks
    for index, count in enumerate((np.int64(0), np.uint64(0), np.uint16(0))):
        good = EngineRequest(Request(f"n{index}", list(range(40)), hasher), count)
        assert manager.allocate_slots(good, 40) is not None  # type: ignore[arg-type]
        assert len(manager.block_pool.cached_block_hash_to_block) == 2
        manager.free(good)  # type: ignore[arg-type]
