"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path

from kvtier import BlockHasher, KVCacheConfig, KVCacheManager, MultiModalFeature, Request
from kvtier.tiers.disk_dir import LAYOUT_SUFFIX


def make_manager(
    num_blocks: int,
    block_size: int = 16,
    *,
    enable_caching: bool = True,
    log_stats: bool = True,
    events: bool = False,
    max_model_len: int = 8192,
) -> KVCacheManager:
    return KVCacheManager(
        KVCacheConfig.full_attention(num_blocks, block_size),
        max_model_len,
        enable_caching=enable_caching,
        log_stats=log_stats,
        enable_kv_cache_events=events,
    )


def make_request(
    request_id: str,
    tokens: list[int],
    block_size: int = 16,
    *,
    algorithm: str = "sha256",
    cache_salt: str | None = None,
    lora_name: str | None = None,
    mm_features: tuple[MultiModalFeature, ...] = (),
) -> Request:
    return Request(
        request_id,
        tokens,
        BlockHasher(block_size, algorithm, seed="tests"),
        cache_salt=cache_salt,
        lora_name=lora_name,
        mm_features=mm_features,
    )


def free_ids(manager: KVCacheManager) -> list[int]:
    return [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]


def schedule(manager: KVCacheManager, request: Request, num_tokens: int | None = None):  # type: ignore[no-untyped-def]
    """First scheduling of a request: look up hits, allocate the rest."""
    computed, num_computed = manager.get_computed_blocks(request)
    total = request.num_tokens if num_tokens is None else num_tokens
    return manager.allocate_slots(request, total - num_computed, num_computed, computed)


def entries(root: Path) -> list[Path]:
    """A disk tier directory's entries but its layout mark (blocks, temp files, strays)."""
    return [path for path in root.iterdir() if path.suffix != LAYOUT_SUFFIX]
