"""KV-cache events: what a tier stored, removed or cleared.

Events use vLLM's names and fields so that routers and indexers that consume
vLLM's KV events (for example for KV-aware routing) can consume kvtier's.
Every event names its ``medium``: ``"GPU"`` for the device prefix cache (vLLM's
value), the tier's name (``"cpu"``, ``"disk"``…) for lower tiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from kvtier.hashing import BlockHash

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KVCacheEvent"]


@attrs.frozen
class BlockStored:
    """A run of consecutive full blocks was cached.

    Attributes:
        block_hashes: The hashes of the newly cached blocks, in chain order.
        parent_block_hash: The hash of the block before the first one, or
            ``None`` when the run starts at the beginning of the sequence.
        token_ids: The tokens of all the blocks, concatenated.
        block_size: Tokens per block.
        lora_name: The LoRA adapter the blocks were computed with, if any.
        medium: The tier that stored the blocks.
        group_idx: The KV cache group the blocks belong to.
        lora_id: The LoRA adapter's integer id (vLLM's ``lora_int_id``), if
            the request has one.
        kv_cache_spec_kind: The group's attention kind (``"full_attention"``)
            for blocks of the device prefix cache; None for lower tiers.
        kv_cache_spec_sliding_window: The group's sliding window in tokens;
            None for full attention.
        extra_keys: What besides its tokens went into each block's hash, one
            entry per ``block_hashes`` entry, in vLLM's (untagged) form: the
            LoRA name, then ``(identifier, offset)`` per multimodal feature
            overlapping the block (the offset relative to the block's first
            token), then the cache salt (first block only); None for a block
            without any. A router recomputing a request's hashes needs them.
            None for lower tiers, which do not know the tokens.
    """

    block_hashes: Sequence[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_name: str | None
    medium: str
    group_idx: int
    lora_id: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None


@attrs.frozen
class BlockRemoved:
    """Blocks were evicted from a tier.

    Attributes:
        block_hashes: The hashes of the evicted blocks.
        medium: The tier that evicted them.
        group_idx: The KV cache group the blocks belonged to.
    """

    block_hashes: Sequence[BlockHash]
    medium: str
    group_idx: int


@attrs.frozen
class AllBlocksCleared:
    """Every cached block of a tier was dropped (a prefix-cache reset).

    Attributes:
        medium: The tier that was cleared, or ``None`` when not known.
    """

    medium: str | None = None


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
"""Any event kvtier emits."""
