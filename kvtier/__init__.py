"""kvtier: keep KV-cache blocks across memory tiers for LLM inference engines."""

from kvtier.block import KVCacheBlock
from kvtier.block_hasher import BlockHasher
from kvtier.block_map import BlockHashToBlockMap
from kvtier.errors import (
    ConfigError,
    InvalidRequestError,
    KVTierError,
    NoFreeBlocksError,
    UnknownNameError,
)
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from kvtier.extra_keys import ExtraKeys, MultiModalFeature
from kvtier.free_queue import FreeKVCacheBlockQueue
from kvtier.hashing import (
    HASH_ALGORITHMS,
    BlockHash,
    BlockHashWithGroupId,
    RandomRootHashWarning,
    hash_block_tokens,
    root_hash,
)
from kvtier.manager import KVCacheBlocks, KVCacheManager
from kvtier.pool import BlockPool
from kvtier.request import KVCacheRequest, Request
from kvtier.spec import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from kvtier.stats import PrefixCacheStats

__version__ = "0.1.0"

__all__ = [
    "AllBlocksCleared",
    "BlockHash",
    "BlockHashToBlockMap",
    "BlockHashWithGroupId",
    "BlockHasher",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "ConfigError",
    "ExtraKeys",
    "FreeKVCacheBlockQueue",
    "FullAttentionSpec",
    "HASH_ALGORITHMS",
    "InvalidRequestError",
    "KVCacheBlock",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheEvent",
    "KVCacheGroupSpec",
    "KVCacheManager",
    "KVCacheRequest",
    "KVTierError",
    "MultiModalFeature",
    "NoFreeBlocksError",
    "PrefixCacheStats",
    "RandomRootHashWarning",
    "Request",
    "UnknownNameError",
    "__version__",
    "hash_block_tokens",
    "root_hash",
]
