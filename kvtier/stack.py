"""A tier stack from a TOML configuration: the lower tiers and the offload manager.

What ``kvtier replay`` builds from a config, for an engine to build too::

    config = load_config("stack.toml")
    device = DeviceTier(kv_caches, config.layout)       # the engine's own cache
    manager = offload_manager(config, kv_cache_manager.block_pool, device,
                              workdir=Path("/var/cache/kvtier"))
    async with manager:
        ...

The tiers are returned unopened: the offload manager opens them on entry
(a disk tier restores what it finds, a Redis tier connects). Settings the
manager does not take (``hash``, ``hash_seed``) stay with the engine (see
the Configuration page).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvtier.config import KvtierConfig, TierConfig
from kvtier.config_redis import RedisOptions
from kvtier.errors import ConfigError
from kvtier.offload import OffloadManager
from kvtier.policies.prefetch import make_prefetch_policy
from kvtier.pool import BlockPool
from kvtier.tiers.base import BlockStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.slots import slot_table_shortfall
from kvtier.transfer import TransferPipeline

__all__ = ["lower_tiers", "offload_manager"]


def lower_tiers(
    config: KvtierConfig, *, workdir: Path | None = None, rank: int | None = None
) -> list[BlockStore]:
    """The config's lower tiers, fastest first, unopened.

    Tiers are named by kind (``cpu``, ``disk``, ``redis``; ``disk2``… for a
    kind's second tier and on): the names of events and statistics.

    Args:
        config: A validated configuration (:func:`~kvtier.config.load_config`).
        workdir: Where a disk tier without ``path`` keeps its directory
            (``workdir / name``).
        rank: This worker's tensor-parallel rank, for the redis tiers
            (instead of their ``rank``): one config file then serves every
            worker, each reading and writing its own shards only.

    Raises:
        ConfigError: A disk tier has no ``path`` and no ``workdir`` was
            given, a redis tier is configured without redis-py installed, or
            ``rank`` is not in ``[0, world_size)`` of a redis tier.
    """
    layout = config.layout
    seen: dict[str, int] = {}
    tiers: list[BlockStore] = []
    for index, tier in enumerate(config.tiers):
        if tier.kind == "device":
            continue
        seen[tier.kind] = seen.get(tier.kind, 0) + 1
        name = tier.kind if seen[tier.kind] == 1 else f"{tier.kind}{seen[tier.kind]}"
        if tier.kind == "cpu":
            tiers.append(
                CpuTier(layout, config.blocks_of(tier), name=name, pin_memory=tier.pin_memory)
            )
        elif tier.kind == "redis":
            tiers.append(_redis_tier(config, tier, name, rank))
        else:
            if tier.path is None and workdir is None:
                raise ConfigError(
                    f"tiers[{index}].path: a disk tier needs a path (or pass workdir=)"
                )
            path = tier.path if tier.path is not None else Path(str(workdir)) / name
            tiers.append(
                DiskTier(
                    path,
                    layout,
                    tier.capacity_bytes,
                    name=name,
                    direct_io=tier.direct_io,
                    max_workers=tier.max_workers,
                    model=tier.model,
                )
            )
    return tiers


def offload_manager(
    config: KvtierConfig,
    block_pool: BlockPool,
    device: BlockStore,
    *,
    workdir: Path | None = None,
    tiers: Sequence[BlockStore] | None = None,
    num_groups: int = 1,
    world_size: int = 1,
    rank: int | None = None,
    pipeline: TransferPipeline | None = None,
) -> OffloadManager:
    """An :class:`~kvtier.offload.OffloadManager` over the config's lower tiers.

    Takes the lower tiers (:func:`lower_tiers`) with their eviction
    policies, the write mode and its knobs, ``max_probe_blocks``,
    ``flush_on_close`` and the prefetch policy with its budget.

    Args:
        config: A validated configuration.
        block_pool: The device prefix cache's pool (``KVCacheManager.block_pool``).
        device: The engine's KV cache as a tier (a
            :class:`~kvtier.tiers.gpu.DeviceTier` of ``config.layout``).
        workdir: Where disk tiers without ``path`` live.
        tiers: The lower tiers to use instead of building them (say, the
            built ones wrapped for fault injection), one per lower tier of
            the config, in its order.
        num_groups: KV cache groups of the engine (see ``OffloadManager``).
        world_size: Tensor-parallel workers reporting store completions. Above
            1, each redis tier's ``world_size`` must be the same: its blocks
            are this worker's shards, which another rank must never read.
        rank: This worker's rank, for the redis tiers (see :func:`lower_tiers`).
        pipeline: The transfer pipeline (default: a new one).

    Raises:
        ConfigError: As :func:`lower_tiers`, the device's layout is not the
            config's, ``tiers`` is not one per lower tier, or a redis tier's
            ``world_size`` is not ``world_size`` (above 1).
    """
    if device.layout != config.layout:
        raise ConfigError(
            f"the device tier's layout {device.layout} is not the config's {config.layout}"
        )
    for index, tier in enumerate(config.tiers):
        shards = (tier.redis or RedisOptions()).world_size
        if tier.kind == "redis" and world_size > 1 and shards != world_size:
            raise ConfigError(
                f"tiers[{index}].world_size: {shards}, but the manager has world_size="
                f"{world_size}: every rank would read and write the same names, and load "
                "another rank's shards as its own (set world_size, and each worker's rank)"
            )
    policies = [tier.eviction for tier in config.tiers if tier.kind != "device"]
    stores = lower_tiers(config, workdir=workdir, rank=rank) if tiers is None else list(tiers)
    if len(stores) != len(policies):
        raise ConfigError(f"{len(stores)} tiers given for the config's {len(policies)} lower tiers")
    _check_index_memory(config, stores)
    return OffloadManager(
        block_pool,
        device,
        stores,
        block_size=config.layout.block_size,
        mode=config.offload.write_mode,  # type: ignore[arg-type]
        eviction_policy=policies,
        lazy_free_target=config.offload.lazy_free_target,
        selective_min_hits=config.offload.selective_min_hits,
        num_groups=num_groups,
        world_size=world_size,
        pipeline=pipeline,
        max_probe_blocks=config.offload.max_probe_blocks,
        flush_on_close=config.offload.flush_on_close,
        spill_stores=config.offload.spill_stores,
        prefetch=make_prefetch_policy(
            config.offload.prefetch,
            timeout=config.offload.prefetch_timeout,
            timeout_per_1k_tokens=config.offload.prefetch_timeout_per_1k_tokens,
        ),
    )


def _check_index_memory(config: KvtierConfig, stores: Sequence[BlockStore]) -> None:
    """Refuse, naming its capacity, the first tier whose index (with those above) does not fit.

    Each tier's index allocates its slot tables up front: a disk tier of small
    blocks needs more host memory for them than a machine may have, and the
    process would be killed for it with no message.
    """
    lower = [index for index, tier in enumerate(config.tiers) if tier.kind != "device"]
    slots = 0
    for index, store in zip(lower, stores, strict=True):
        slots += store.num_slots
        shortfall = slot_table_shortfall(slots)
        if shortfall is not None:
            above = " (with the tiers above it)" if slots != store.num_slots else ""
            raise ConfigError(
                f"tiers[{index}].capacity: {config.tiers[index].capacity_bytes} bytes in "
                f"{store.num_slots} blocks{above}: {shortfall}: lower it, or use larger blocks"
            )


def _redis_tier(config: KvtierConfig, tier: TierConfig, name: str, rank: int | None) -> BlockStore:
    """A :class:`~kvtier.tiers.redis.RedisTier` (needs ``pip install 'kvtier[redis]'``)."""
    try:
        from kvtier.tiers.redis import RedisTier  # noqa: PLC0415 - an optional dependency
    except ImportError as exc:
        raise ConfigError(
            f"tier {name}: a redis tier needs redis-py: pip install 'kvtier[redis]'"
        ) from exc
    options = tier.redis if tier.redis is not None else RedisOptions()
    if rank is not None and not (
        isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < options.world_size
    ):
        raise ConfigError(
            f"tier {name}: rank must be an integer in [0, {options.world_size}) "
            f"(its world_size), got {rank!r}"
        )
    return RedisTier(
        config.layout,
        config.blocks_of(tier),
        url=options.url,
        name=name,
        prefix=options.prefix,
        model=options.model,
        rank=options.rank if rank is None else rank,
        world_size=options.world_size,
        ttl=options.ttl,
        batch_size=options.batch_size,
        connect_timeout=options.connect_timeout,
        timeout=options.timeout,
        username=options.username,
        password=options.password(),
        tls=options.tls,
        tls_ca_file=options.tls_ca_file,
        tls_cert_file=options.tls_cert_file,
        tls_key_file=options.tls_key_file,
        tls_verify=options.tls_verify,
        cluster=options.cluster,
        scan_on_open=options.scan_on_open,
    )
