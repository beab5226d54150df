"""kvtier.stack: a tier stack and an offload manager built from a TOML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier import KVCacheConfig, KVCacheManager
from kvtier.config import KvtierConfig, load_config, parse_config
from kvtier.errors import ConfigError
from kvtier.policies.prefetch import BestEffort, Timeout, WaitComplete
from kvtier.stack import lower_tiers, offload_manager
from kvtier.tiers import BlockLayout, CpuTier, DeviceTier, DiskTier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
SMALL = {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8}


def _config(*tiers: dict[str, object], offload: dict[str, object] | None = None) -> KvtierConfig:
    return parse_config({"layout": SMALL, "offload": offload or {}, "tiers": list(tiers)})


def test_the_bundled_examples_build_their_lower_tiers_unopened(tmp_path: Path) -> None:
    tiers = lower_tiers(load_config(EXAMPLES / "device-cpu-disk.toml"), workdir=tmp_path)
    assert [(type(t).__name__, t.name) for t in tiers] == [("CpuTier", "cpu"), ("DiskTier", "disk")]
    cpu, disk = tiers
    assert isinstance(cpu, CpuTier)
    assert isinstance(disk, DiskTier)
    assert cpu.num_slots == (16 << 30) // cpu.layout.block_bytes
    assert disk.path == Path("/var/cache/kvtier")  # the config's path wins over workdir
    for name in ("cpu-only.toml", "device-cpu.toml", "device-cpu-redis.toml"):
        assert lower_tiers(load_config(EXAMPLES / name), workdir=tmp_path)


def test_repeated_kinds_are_numbered_and_pathless_disks_live_in_the_workdir(
    tmp_path: Path,
) -> None:
    config = _config(
        {"kind": "cpu", "capacity": "1MiB"},
        {"kind": "disk", "capacity": "1MiB", "model": "llama-3-8b"},
        {"kind": "disk", "capacity": "2MiB", "path": str(tmp_path / "fixed")},
    )
    assert [t.model for t in config.tiers] == ["", "llama-3-8b", ""]
    tiers = lower_tiers(config, workdir=tmp_path / "work")
    assert [t.name for t in tiers] == ["cpu", "disk", "disk2"]
    disks = [t for t in tiers if isinstance(t, DiskTier)]
    assert [d.path for d in disks] == [tmp_path / "work" / "disk", tmp_path / "fixed"]
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.path: a disk tier needs a path"):
        lower_tiers(config)
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.model: 3 is not a string"):
        _config({"kind": "disk", "capacity": "1MiB", "model": 3})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model"):
        _config({"kind": "cpu", "capacity": "1MiB", "model": "x"})


@pytest.mark.asyncio
async def test_an_offload_manager_from_a_config_uses_its_policies_and_mode(
    tmp_path: Path,
) -> None:
    config = _config(
        {"kind": "device", "capacity": "64KiB"},
        {"kind": "cpu", "capacity": "32KiB", "eviction": "arc"},
        {"kind": "disk", "capacity": "1MiB", "eviction": "s3fifo"},
        offload={"write_mode": "lazy", "lazy_free_target": 3, "max_probe_blocks": 0},
    )
    layout = config.layout
    kv = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    device = DeviceTier(torch.zeros(8, layout.block_bytes, dtype=torch.uint8), layout)
    manager = offload_manager(config, kv.block_pool, device, workdir=tmp_path)
    assert manager.mode == "lazy"
    assert manager.lazy_free_target == 3
    assert [type(index.policy).__name__ for index in manager.indexes] == [
        "ARCPolicy",
        "S3FIFOPolicy",
    ]
    async with manager:
        assert [t.name for t in manager.tiers] == ["cpu", "disk"]
    other = BlockLayout(num_layers=2, block_size=16, num_kv_heads=1, head_size=8)
    wrong = DeviceTier(torch.zeros(8, other.block_bytes, dtype=torch.uint8), other)
    with pytest.raises(ConfigError, match="layout"):
        offload_manager(config, kv.block_pool, wrong, workdir=tmp_path)
    with pytest.raises(ConfigError, match="1 tiers given for the config's 2 lower tiers"):
        offload_manager(config, kv.block_pool, device, tiers=manager.tiers[:1])


@pytest.mark.parametrize(
    ("offload", "spills"),
    [
        ({"spill_stores": True}, True),
        ({"spill_stores": False, "prefetch": "wait_complete"}, False),
        ({}, False),  # best_effort, the default, never loads from below the CPU tier
        ({"prefetch": "wait_complete"}, True),
    ],
)
def test_the_manager_spills_stores_as_the_config_says(
    tmp_path: Path, offload: dict[str, object], spills: bool
) -> None:
    config = _config(
        {"kind": "cpu", "capacity": "32KiB"},
        {"kind": "disk", "capacity": "1MiB"},
        offload=offload,
    )
    kv = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    device = DeviceTier(torch.zeros(8, config.layout.block_bytes, dtype=torch.uint8), config.layout)
    manager = offload_manager(config, kv.block_pool, device, workdir=tmp_path)
    assert manager.spill_stores is offload.get("spill_stores")
    assert manager.spills is spills


@pytest.mark.parametrize(
    ("offload", "policy"),
    [
        ({}, BestEffort()),  # the config's default
        ({"prefetch": "wait_complete"}, WaitComplete()),
        (
            {"prefetch": "timeout", "prefetch_timeout": "20ms"},
            Timeout(timeout=0.02, timeout_per_1k_tokens=0.005),
        ),
        (
            {"prefetch": "timeout", "prefetch_timeout_per_1k_tokens": "1ms"},
            Timeout(timeout=0.05, timeout_per_1k_tokens=0.001),
        ),
    ],
)
def test_an_offload_manager_from_a_config_applies_its_prefetch_policy(
    offload: dict[str, object], policy: object, tmp_path: Path
) -> None:
    config = _config(
        {"kind": "cpu", "capacity": "32KiB"}, {"kind": "disk", "capacity": "1MiB"}, offload=offload
    )
    kv = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    device = DeviceTier(torch.zeros(8, config.layout.block_bytes, dtype=torch.uint8), config.layout)
    manager = offload_manager(config, kv.block_pool, device, workdir=tmp_path)
    assert manager.prefetch == policy


@pytest.mark.asyncio
async def test_a_disk_tier_built_from_a_config_keeps_its_model_apart(tmp_path: Path) -> None:
    config = _config({"kind": "disk", "capacity": "1MiB", "model": "llama-3-8b"})
    (disk,) = lower_tiers(config, workdir=tmp_path)
    async with disk:
        pass
    with pytest.raises(ConfigError, match="another block layout or model"):
        async with DiskTier(tmp_path / "disk", config.layout, 1 << 20, model="qwen"):
            pass


def test_tensor_parallel_workers_get_their_own_redis_shards() -> None:
    """With world_size > 1 each rank's names differ: none loads another rank's shard."""
    pytest.importorskip("redis")
    redis = {"kind": "redis", "capacity": "1MiB", "model": "m", "world_size": 2}
    config = _config(redis)
    kv = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    device = DeviceTier(torch.zeros(8, config.layout.block_bytes, dtype=torch.uint8), config.layout)
    namespaces = set()
    for rank in (0, 1):
        manager = offload_manager(config, kv.block_pool, device, world_size=2, rank=rank)
        (store,) = manager.tiers
        namespaces.add(store.keys.name(b"k" * 32))  # type: ignore[attr-defined]
    assert len(namespaces) == 2
    unsharded = _config({**redis, "world_size": 1})
    with pytest.raises(ConfigError, match=r"tiers\[0\].world_size: 1, but the manager has"):
        offload_manager(unsharded, kv.block_pool, device, world_size=2)
    for rank in (2, -1, True):
        with pytest.raises(ConfigError, match=r"rank must be an integer in \[0, 2\)"):
            lower_tiers(config, rank=rank)  # type: ignore[arg-type]


def test_a_tier_whose_index_does_not_fit_in_host_memory_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk of small blocks needs its index's slot tables up front: refused with a
    message naming the capacity, not killed for memory with none."""
    from kvtier.tiers import _host
    from kvtier.tiers.index import TierIndex
    from kvtier.tiers.slots import SLOT_TABLE_BYTES

    monkeypatch.setattr(_host, "available_host_bytes", lambda: 64 << 20)  # a 64 MiB machine
    config = _config(
        {"kind": "device", "capacity": "64KiB"},
        {"kind": "cpu", "capacity": "32KiB"},
        {"kind": "disk", "capacity": "1GiB"},  # 4 KiB files: 262,144 slots, 12 MiB of index
        {"kind": "disk", "capacity": "4GiB"},  # 48 MiB more: 60 MiB, over 90 % of 64 MiB
    )
    kv = KVCacheManager(KVCacheConfig.full_attention(8, 16), 1024)
    device = DeviceTier(torch.zeros(8, config.layout.block_bytes, dtype=torch.uint8), config.layout)
    with pytest.raises(ConfigError, match=r"^tiers\[3\]\.capacity: .*\(with the tiers above it\)"):
        offload_manager(config, kv.block_pool, device, workdir=tmp_path)
    with pytest.raises(ConfigError, match="tier 'big': its index of 2000000 slots needs about"):
        TierIndex("big", 2_000_000)  # 96 MB
    TierIndex("fits", 500_000)  # 24 MB of a 64 MiB machine (10 % kept free)
    assert SLOT_TABLE_BYTES * 500_000 < (64 << 20) * 0.9
