"""Checks of :meth:`~kvtier.manager.KVCacheManager.allocate_slots`' arguments.

Every check runs before the manager changes anything, and every failure is
an :class:`~kvtier.errors.InvalidRequestError` naming the bad value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from kvtier.block import KVCacheBlock
from kvtier.cache_blocks import KVCacheBlocks, require_blocks
from kvtier.errors import InvalidRequestError
from kvtier.hashing import BlockHash
from kvtier.request import KVCacheRequest, request_lora_id

if TYPE_CHECKING:
    from kvtier.manager import KVCacheManager

__all__ = ["Counts", "check_allocation", "check_count", "check_hashes"]


def check_count(name: str, value: int) -> None:
    """``value`` is an integer (not a bool) >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be a non-negative integer, got {value!r}")


@attrs.frozen
class Counts:
    """``allocate_slots``' token counts (see its arguments)."""

    new: int
    new_computed: int
    lookahead: int
    external: int
    encoder: int

    def check(self) -> None:
        """Each count is an integer >= 0; encoder tokens are 0."""
        check_count("num_new_tokens", self.new)
        check_count("num_new_computed_tokens", self.new_computed)
        check_count("num_lookahead_tokens", self.lookahead)
        check_count("num_external_computed_tokens", self.external)
        check_count("num_encoder_tokens", self.encoder)
        if self.encoder:
            raise InvalidRequestError(
                f"num_encoder_tokens={self.encoder}: kvtier has no cross-attention groups"
            )


def check_hashes(request: KVCacheRequest, block_size: int) -> Sequence[BlockHash]:
    """The request's block hashes, checked to be one per full block of ``block_size``.

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


def check_allocation(
    manager: KVCacheManager,
    request: KVCacheRequest,
    counts: Counts,
    new_computed_blocks: KVCacheBlocks | None,
) -> tuple[Sequence[KVCacheBlock], ...]:
    """Validate ``allocate_slots``' arguments; return the hit blocks per group."""
    counts.check()
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
    if counts.new == 0 and counts.new_computed == 0 and counts.external == 0:
        raise InvalidRequestError(
            f"request {request_id!r}: allocate_slots needs new tokens or new computed "
            "tokens, got neither"
        )
    total = request.num_computed_tokens + counts.new_computed + counts.external + counts.new
    if total > manager.max_model_len:
        raise InvalidRequestError(
            f"request {request_id!r}: {total} tokens computed and to compute, "
            f"more than max_model_len={manager.max_model_len}"
        )
    if manager.enable_caching:
        check_hashes(request, manager.block_size)
        if manager.block_pool.enable_kv_cache_events:  # events carry it: checked first
            request_lora_id(request)
    if any(computed):
        _check_hits(manager, request_id, computed, counts.new_computed)
    return computed


def _check_hits(
    manager: KVCacheManager,
    request_id: str,
    computed: tuple[Sequence[KVCacheBlock], ...],
    num_new_computed_tokens: int,
) -> None:
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
