"""Checks of :meth:`~kvtier.manager.KVCacheManager.allocate_slots`' arguments.

Every check runs before the manager changes anything, and every failure is
an :class:`~kvtier.errors.InvalidRequestError` naming the bad value.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtier.block import KVCacheBlock
from kvtier.cache_blocks import KVCacheBlocks, require_blocks
from kvtier.errors import InvalidRequestError
from kvtier.hashing import BlockHash, make_block_hash_with_group_id
from kvtier.request import KVCacheRequest, request_lora_id

if TYPE_CHECKING:
    from kvtier.manager import KVCacheManager

__all__ = [
    "check_allocation",
    "check_count",
    "check_counts",
    "check_hashes",
    "check_tokens",
    "computed_tokens",
]


def check_count(name: str, value: int) -> None:
    """``value`` is an integer (not a bool) >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be a non-negative integer, got {value!r}")


def check_tokens(name: str, value: int, block_size: int) -> None:
    """``value`` is an integer (not a bool) >= 0 and a multiple of ``block_size``.

    Raises:
        InvalidRequestError: It is not (a float or a string too: nothing changes).
    """
    check_count(name, value)
    if value % block_size:
        raise InvalidRequestError(f"{name} must be a multiple of {block_size}, got {value}")


def check_counts(new: int, new_computed: int, lookahead: int, external: int, encoder: int) -> None:
    """``allocate_slots``' token counts are integers >= 0, and encoder tokens 0."""
    if (  # the common case in one test; the details only when it fails
        type(new) is int
        and type(new_computed) is int
        and type(lookahead) is int
        and type(external) is int
        and encoder == 0
        and type(encoder) is int
        and min(new, new_computed, lookahead, external) >= 0
    ):
        return
    check_count("num_new_tokens", new)
    check_count("num_new_computed_tokens", new_computed)
    check_count("num_lookahead_tokens", lookahead)
    check_count("num_external_computed_tokens", external)
    check_count("num_encoder_tokens", encoder)
    if encoder:
        raise InvalidRequestError(
            f"num_encoder_tokens={encoder}: kvtier has no cross-attention groups"
        )


def check_hashes(request: KVCacheRequest, block_size: int) -> Sequence[BlockHash]:
    """The request's block hashes, refused when more than its full blocks of ``block_size``.

    (Or when its ``block_hasher`` has another block size. Fewer hashes than
    full blocks, or none, are fine: those blocks are not cached.)

    Hashes of another block size would give a block the hash of other
    tokens: a smaller hasher's hash of block 0 covers only its first
    tokens, so another prompt sharing them would hit it (wrong KV).
    """
    hashes = request.block_hashes
    hasher = getattr(request, "block_hasher", None)
    size = getattr(hasher, "block_size", block_size)
    if size != block_size or len(hashes) > request.num_tokens // block_size:
        raise InvalidRequestError(
            f"request {request.request_id!r}: {len(hashes)} block hashes for "
            f"{request.num_tokens} tokens (hasher block size {size}); this cache "
            f"needs one hash per full block of {block_size} tokens"
        )
    return hashes


def computed_tokens(request: KVCacheRequest) -> int:
    """The request's ``num_computed_tokens`` as an ``int`` (an engine's may be NumPy's).

    Raises:
        InvalidRequestError: It is not an integer >= 0 (a bool, a float, a
            float tensor...).
    """
    value = request.num_computed_tokens
    try:
        if isinstance(value, (bool, float)):
            raise TypeError
        held = operator.index(value)
    except TypeError:
        held = -1
    if held < 0:
        raise InvalidRequestError(
            f"request {request.request_id!r}: num_computed_tokens must be an integer >= 0, "
            f"got {value!r}"
        )
    return held


def check_allocation(
    manager: KVCacheManager,
    request: KVCacheRequest,
    new_computed_blocks: KVCacheBlocks | None,
    new: int,
    new_computed: int,
    external: int,
) -> tuple[Sequence[KVCacheBlock], ...]:
    """Validate ``allocate_slots``' request and blocks (counts: :func:`check_counts`).

    Returns:
        The hit blocks per group.
    """
    request_id = request.request_id
    groups = manager.num_groups
    if new_computed_blocks is None:
        computed: tuple[Sequence[KVCacheBlock], ...] = ((),) * groups
    else:
        computed = require_blocks(new_computed_blocks, "new_computed_blocks").blocks
        if len(computed) != groups:
            raise InvalidRequestError(
                f"new_computed_blocks has {len(computed)} groups, the cache has {groups}"
            )
    if new == 0 and new_computed == 0 and external == 0:
        raise InvalidRequestError(
            f"request {request_id!r}: allocate_slots needs new tokens or new computed "
            "tokens, got neither"
        )
    held = computed_tokens(request)
    total = held + new_computed + external + new
    if total > manager.max_model_len:
        raise InvalidRequestError(
            f"request {request_id!r}: {total} tokens computed and to compute, "
            f"more than max_model_len={manager.max_model_len}"
        )
    if manager.enable_caching:
        check_hashes(request, manager.block_size)
        if manager.block_pool.enable_kv_cache_events:  # events carry it: checked first
            request_lora_id(request)
    if new_computed or any(computed):  # hit tokens without hit blocks: refused
        _check_hits(manager, request, computed, new_computed)
    return computed


def _check_hits(
    manager: KVCacheManager,
    request: KVCacheRequest,
    computed: tuple[Sequence[KVCacheBlock], ...],
    num_new_computed_tokens: int,
) -> None:
    request_id = request.request_id
    num_hit_tokens = len(computed[0]) * manager.block_size
    if num_new_computed_tokens != num_hit_tokens or any(
        len(blocks) != len(computed[0]) for blocks in computed
    ):
        raise InvalidRequestError(
            f"num_new_computed_tokens={num_new_computed_tokens} does not match the "
            f"{len(computed[0])} hit blocks ({num_hit_tokens} tokens) in every group"
        )
    if not manager.enable_caching:
        raise InvalidRequestError("new_computed_blocks given while prefix caching is off")
    if request_id in manager.group_managers[0].num_cached_block:
        raise InvalidRequestError(
            f"request {request_id!r} already holds blocks; prefix hits are only "
            "taken when a request is first scheduled"
        )
    _check_hit_keys(manager, request, computed)


def _check_hit_keys(
    manager: KVCacheManager, request: KVCacheRequest, computed: tuple[Sequence[KVCacheBlock], ...]
) -> None:
    """Every hit block is still cached under the request's hash at its position.

    A block found by ``get_computed_blocks`` can be evicted and reused (for
    other tokens) before the request is allocated, when an engine looks up
    several requests before allocating them: taking it would hand the
    request another prompt's KV.
    """
    hashes = request.block_hashes
    for group, blocks in zip(manager.group_managers, computed, strict=True):
        for position, block in enumerate(blocks):
            if block.is_null:
                continue
            expected = (
                make_block_hash_with_group_id(hashes[position], group.group_id)
                if position < len(hashes)
                else None
            )
            if expected is None or block.block_hash != expected:
                raise InvalidRequestError(
                    f"request {request.request_id!r}: hit block {block.block_id} at position "
                    f"{position} is no longer cached under the request's hash (evicted and "
                    "reused since the lookup?): look the request up again"
                )
