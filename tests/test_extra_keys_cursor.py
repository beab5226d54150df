"""Multimodal extra keys found with a feature cursor.

:class:`BlockHasher` finds the features overlapping each block with a
:class:`FeatureCursor`, kept per request between calls, instead of scanning
every feature for every block. The hashes must be exactly those of the
documented semantics (checked against a per-block scan written here), and the
work must grow with blocks plus features, not their product (checked by
counting reads, never by timing).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier import HASH_ALGORITHMS, BlockHasher, ExtraKeys, MultiModalFeature, Request
from kvtier.errors import InvalidRequestError
from kvtier.extra_keys import FeatureCursor
from kvtier.hashing import BlockHash

ALGORITHMS = sorted(HASH_ALGORITHMS)


# --- the reference: the documented semantics, one full scan per block --------


def reference_mm(
    features: Sequence[MultiModalFeature], start: int, end: int
) -> tuple[tuple[str, int], ...]:
    """Every feature overlapping ``[start, end)``, in order, offset relative to ``start``."""
    return tuple(
        (f.identifier, f.offset - start)
        for f in features
        if f.offset < end and f.offset + f.length > start
    )


def reference_extra(
    features: Sequence[MultiModalFeature],
    start: int,
    end: int,
    lora: str | None,
    salt: str | None,
) -> ExtraKeys | None:
    mm = reference_mm(features, start, end)
    lora_name = lora if lora else None
    cache_salt = salt if salt and start == 0 else None  # first block only
    if not mm and lora_name is None and cache_salt is None:
        return None
    return ExtraKeys(lora_name=lora_name, mm=mm, cache_salt=cache_salt)


def reference_hashes(
    hasher: BlockHasher,
    tokens: Sequence[int],
    features: Sequence[MultiModalFeature],
    lora: str | None,
    salt: str | None,
    *,
    first: int = 0,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks from block ``first`` on (chained to ``parent``)."""
    size = hasher.block_size
    parent = hasher.root if parent is None else parent
    out: list[BlockHash] = []
    for index in range(first, len(tokens) // size):
        start = index * size
        extra = reference_extra(features, start, start + size, lora, salt)
        parent = hasher.algorithm.hash_block(parent, list(tokens[start : start + size]), extra)
        out.append(parent)
    return out


# --- strategies ---------------------------------------------------------------


@st.composite
def feature_lists(draw: st.DrawFn, span: int, *, sort: bool = True) -> list[MultiModalFeature]:
    """Up to 12 features inside ``[0, span)``: overlapping, nested, long or short."""
    features: list[MultiModalFeature] = []
    if span <= 0:
        return features
    for _ in range(draw(st.integers(0, 12))):
        offset = draw(st.integers(0, span - 1))
        room = span - offset
        length = draw(st.one_of(st.integers(1, min(room, 4)), st.integers(1, room)))
        features.append(MultiModalFeature(draw(st.sampled_from("abc")), offset, length))
    if sort:
        features.sort(key=lambda f: f.offset)  # stable: ties keep the drawn order
    return features


lora_names = st.sampled_from([None, "", "lora-a"])
cache_salts = st.sampled_from([None, "", "salt-1"])
chunk_sizes = st.lists(st.integers(0, 20), max_size=6)


# --- hashes equal the reference -----------------------------------------------


@given(
    algorithm=st.sampled_from(ALGORITHMS),
    block_size=st.integers(1, 8),
    prompt_len=st.integers(0, 80),
    data=st.data(),
    lora=lora_names,
    salt=cache_salts,
    chunks=chunk_sizes,
)
def test_request_hashes_match_per_block_scan_at_once_and_incrementally(
    algorithm: str,
    block_size: int,
    prompt_len: int,
    data: st.DataObject,
    lora: str | None,
    salt: str | None,
    chunks: list[int],
) -> None:
    features = tuple(data.draw(feature_lists(prompt_len)))
    hasher = BlockHasher(block_size, algorithm, seed="cursor")
    prompt = list(range(prompt_len))

    def make(request_id: str, tokens: list[int], hasher: BlockHasher) -> Request:
        return Request(
            request_id, tokens, hasher, cache_salt=salt, lora_name=lora, mm_features=features
        )

    # Two requests share the hasher and the features tuple, and decode in turns.
    first = make("first", prompt, hasher)
    second = make("second", prompt, hasher)
    expected = reference_hashes(hasher, prompt, features, lora, salt)
    assert first.block_hashes == second.block_hashes == expected
    for step, size in enumerate(chunks):
        new = [1000 + step] * size
        first.append_output_token_ids(new)
        expected = reference_hashes(hasher, first.all_token_ids, features, lora, salt)
        assert first.block_hashes == expected
        second.append_output_token_ids(new)
        assert second.block_hashes == expected
    # All at once: the whole sequence as a prompt, on a fresh hasher.
    whole = make("whole", first.all_token_ids, BlockHasher(block_size, algorithm, seed="cursor"))
    assert whole.block_hashes == first.block_hashes


class _Plain:
    """A :class:`HashableRequest` of the engine's own: no weak references."""

    __slots__ = ("all_token_ids", "block_hashes", "cache_salt", "lora_name", "mm_features")

    def __init__(
        self, features: Sequence[MultiModalFeature], lora: str | None, salt: str | None
    ) -> None:
        self.all_token_ids: list[int] = []
        self.block_hashes: list[BlockHash] = []
        self.mm_features = features
        self.lora_name = lora
        self.cache_salt = salt


class _Weak(_Plain):
    __slots__ = ("__weakref__",)


class _Unhashable(_Weak):
    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]


@given(
    block_size=st.integers(1, 6),
    span=st.integers(1, 60),
    data=st.data(),
    kind=st.sampled_from([_Plain, _Weak, _Unhashable]),
    container=st.sampled_from([tuple, list]),
    sort=st.booleans(),
    lora=lora_names,
    salt=cache_salts,
    chunks=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    rewinds=st.lists(st.integers(0, 10), max_size=6),
)
def test_engine_requests_match_per_block_scan(
    block_size: int,
    span: int,
    data: st.DataObject,
    kind: type[_Plain],
    container: type[Sequence[MultiModalFeature]],
    sort: bool,
    lora: str | None,
    salt: str | None,
    chunks: list[int],
    rewinds: list[int],
) -> None:
    # Features may lie past the tokens so far, be unsorted (scanned per block,
    # as before) and come in a list; block_hashes may be cut back between calls.
    features = container(data.draw(feature_lists(span, sort=sort)))  # type: ignore[call-arg]
    hasher = BlockHasher(block_size, "xxhash", seed="cursor")
    request = kind(features, lora, salt)
    for step, size in enumerate(chunks):
        request.all_token_ids.extend([step] * size)
        if step < len(rewinds):
            del request.block_hashes[max(0, len(request.block_hashes) - rewinds[step]) :]
        request.block_hashes.extend(hasher(request))
        assert request.block_hashes == reference_hashes(
            hasher, request.all_token_ids, features, lora, salt
        )


@given(
    span=st.integers(1, 60),
    data=st.data(),
    position=st.integers(0, 70),
    widths=st.lists(st.integers(1, 9), max_size=20),
)
def test_cursor_yields_the_per_block_scan_for_any_consecutive_blocks(
    span: int, data: st.DataObject, position: int, widths: list[int]
) -> None:
    features = tuple(data.draw(feature_lists(span)))
    cursor = FeatureCursor.create(features, position)
    assert cursor is not None
    start = position
    for width in widths:
        mm = cursor.overlapping(start, start + width)
        assert mm == reference_mm(features, start, start + width)
        # Work bound: the cursor holds exactly the features of the block just
        # done, so the next block visits those plus the ones that begin in it.
        assert len(cursor._open) == len(mm)
        start += width


def test_cursor_refuses_unsorted_features_and_out_of_order_blocks() -> None:
    unsorted = (MultiModalFeature("b", 5, 2), MultiModalFeature("a", 1, 2))
    assert FeatureCursor.create(unsorted) is None
    cursor = FeatureCursor.create((MultiModalFeature("a", 1, 2),), 4)
    assert cursor is not None
    with pytest.raises(ValueError, match="starting at 4"):
        cursor.overlapping(0, 4)
    with pytest.raises(ValueError, match=r"got \[4, 4\)"):
        cursor.overlapping(4, 4)
    with pytest.raises(TypeError):
        FeatureCursor()


def test_zero_length_features_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="length"):
        MultiModalFeature("x", 3, 0)


def test_a_failed_call_leaves_no_stale_cursor() -> None:
    # The bad token sits in the second new block: the kept cursor has moved
    # past both blocks when packing fails, and the retry must not reuse it.
    features = (MultiModalFeature("long", 0, 30), MultiModalFeature("tail", 8, 2))
    hasher = BlockHasher(4, "sha256", seed="cursor")
    request = _Weak(features, None, None)
    request.all_token_ids.extend(range(8))
    request.block_hashes.extend(hasher(request))
    request.all_token_ids.extend([1, 2, 3, 4, 5, 6, 7, 2**70])
    with pytest.raises(InvalidRequestError, match="64 bits"):
        hasher(request)
    request.all_token_ids[-1] = 8
    request.block_hashes.extend(hasher(request))
    assert request.block_hashes == reference_hashes(
        hasher, request.all_token_ids, features, None, None
    )


def test_a_kept_cursor_is_rebuilt_when_it_does_not_fit() -> None:
    hasher = BlockHasher(4, "sha256", seed="cursor")
    old = (MultiModalFeature("a", 0, 30), MultiModalFeature("b", 9, 6))
    request = _Weak(old, "lora", None)
    request.all_token_ids.extend(range(12))
    request.block_hashes.extend(hasher(request))
    # block_hashes cut back: the hasher resumes at block 1, the cursor is at 3.
    del request.block_hashes[1:]
    request.all_token_ids.extend(range(4))
    request.block_hashes.extend(hasher(request))
    assert request.block_hashes == reference_hashes(
        hasher, request.all_token_ids, old, "lora", None
    )
    # Other features (a new tuple) where the cursor stopped.
    new = (MultiModalFeature("c", 2, 20),)
    request.mm_features = new
    request.all_token_ids.extend(range(8))
    done = list(request.block_hashes)
    request.block_hashes.extend(hasher(request))
    assert request.block_hashes == done + reference_hashes(
        hasher, request.all_token_ids, new, "lora", None, first=len(done), parent=done[-1]
    )
    # A list may change in place between calls: it is never trusted.
    features = [MultiModalFeature("d", 1, 2)]
    listed = _Weak(features, None, None)
    listed.all_token_ids.extend(range(8))
    listed.block_hashes.extend(hasher(listed))
    features.append(MultiModalFeature("e", 9, 2))
    listed.all_token_ids.extend(range(8))
    listed.block_hashes.extend(hasher(listed))
    assert listed.block_hashes == reference_hashes(
        hasher, listed.all_token_ids, features, None, None
    )


def test_hashers_copy_and_pickle_without_their_cursors() -> None:
    features = (MultiModalFeature("img", 2, 9),)
    hasher = BlockHasher(4, "sha256", seed="cursor")
    request = Request("r", list(range(12)), hasher, mm_features=features)
    for clone in (pickle.loads(pickle.dumps(request)), copy.deepcopy(request)):
        assert clone.block_hasher is not None
        assert clone.block_hasher.root == hasher.root
        clone.append_output_token_ids([7] * 9)
        request_tokens = clone.all_token_ids
        assert clone.block_hashes == reference_hashes(hasher, request_tokens, features, None, None)


# --- work grows with blocks plus features -------------------------------------


class _CountingFeature(MultiModalFeature):
    """Counts reads of :attr:`end`, which any overlap test of a feature needs."""

    __slots__ = ()
    reads: ClassVar[int] = 0

    @property
    def end(self) -> int:
        _CountingFeature.reads += 1
        return self.offset + self.length


def test_each_feature_is_read_once_not_once_per_block() -> None:
    block_size, num_blocks, num_features = 4, 400, 100
    step = num_blocks * block_size // num_features
    features = tuple(_CountingFeature(f"img{i}", i * step, step // 2) for i in range(num_features))
    hasher = BlockHasher(block_size, "xxhash", seed="cursor")
    _CountingFeature.reads = 0
    request = Request("r", list(range(num_blocks * block_size + 2)), hasher, mm_features=features)
    assert len(request.block_hashes) == num_blocks
    # A per-block scan reads ``end`` of every begun feature for each block
    # (about 20,000 reads here); the cursor reads each feature once.
    assert _CountingFeature.reads <= 2 * num_features
    after_prompt = _CountingFeature.reads
    # Decode: one call per token, 50 more blocks, none re-reads the features.
    for token in range(50 * block_size):
        request.append_output_token_ids(token)
    assert len(request.block_hashes) == num_blocks + 50
    assert _CountingFeature.reads == after_prompt
    plain = [(f.identifier, f.offset, f.length) for f in features]
    assert request.block_hashes == reference_hashes(
        hasher,
        request.all_token_ids,
        tuple(MultiModalFeature(*args) for args in plain),
        None,
        None,
    )
