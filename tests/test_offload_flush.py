"""flush_on_close: the CPU tier's blocks go down to disk when the manager closes cleanly."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from kvtier import KVCacheBlocks
from kvtier.errors import ConfigError, TierIOError
from kvtier.offload.flush import flush_order, flush_targets
from kvtier.offload.runtime import current_streams
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.index import TierIndex
from kvtier.tiers.redis import RedisTier
from kvtier.transfer import TransferPipeline
from tests.offload_env import (
    BS,
    DEADLINE,
    LAYOUT,
    Env,
    disk_tier,
    key,
    pattern,
    plan_store,
    recovered,
    scheduled,
    store,
    store_blocking,
)
from tests.redis_server import RedisServer, shared_redis
from tests.test_offload_reset import PartlyWritingStore
from tests.tier_doubles import FaultInjectingStore

__all__ = ["shared_redis"]  # the fixture


@pytest.mark.asyncio
async def test_a_clean_close_flushes_the_cpu_blocks_to_disk_for_a_warm_restart(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", flush_on_close=True)
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            a = env.request(3)
            await store(env, a, 3, release=True)
            assert len(env.manager.indexes[1]) == 0  # nothing evicted: nothing on disk yet
    stats = env.manager.stats().tiers["disk"]
    assert stats.flushed == 3
    assert stats.bytes_stored == 3 * LAYOUT.block_bytes
    assert stats.demotions == 0
    on_disk = await recovered(tmp_path / "disk", 16)
    assert set(on_disk) == {key(a, i) for i in range(3)}

    # A new process restores them and loads them byte for byte.
    again = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with again.manager:
            b = again.request(3, like=a)
            assert again.manager.get_num_new_matched_tokens(b, 0) == (3 * BS, True)
            targets = KVCacheBlocks((again.fresh(3),))
            again.manager.update_state_after_alloc(b, targets, 3 * BS)
            again.manager.build_step(scheduled(new={b.request_id: targets}))
            await again.manager.wait_for_loads([b.request_id])
    assert again.manager.stats().tiers["disk"].restored_blocks == 3
    assert all(again.holds(block, b, i) for i, block in enumerate(targets.blocks[0]))


@pytest.mark.asyncio
async def test_without_flush_on_close_the_cpu_blocks_are_lost(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            await store(env, env.request(3), 3, release=True)
    assert env.manager.stats().tiers["disk"].flushed == 0
    assert await recovered(tmp_path / "disk", 16) == {}


@pytest.mark.asyncio
async def test_blocks_the_disk_holds_already_are_not_written_again(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", flush_on_close=True)
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            a, b = env.request(2), env.request(2)
            await store(env, a, 2, release=True)
            await store(env, b, 2, release=True)  # evicts a's blocks to disk
            assert env.manager.stats().tiers["disk"].demotions == 2
    stats = env.manager.stats().tiers["disk"]
    assert stats.flushed == 2  # b's, not a's again
    assert set(await recovered(tmp_path / "disk", 16)) == {
        key(r, i) for r in (a, b) for i in (0, 1)
    }


@pytest.mark.asyncio
async def test_what_does_not_fit_below_is_left_the_most_recent_blocks_kept(tmp_path: Path) -> None:
    env = Env(
        gpu_blocks=32, cpu_blocks=6, disk=tmp_path / "disk", disk_blocks=2, flush_on_close=True
    )
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            old, new = env.request(2), env.request(2)
            await store(env, old, 2, release=True)
            await store(env, new, 2, release=True)
    assert env.manager.stats().tiers["disk"].flushed == 2
    assert set(await recovered(tmp_path / "disk", 2)) == {key(new, 0), key(new, 1)}


@pytest.mark.asyncio
async def test_an_exit_by_error_does_not_flush(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", flush_on_close=True)
    crashed = pytest.RaisesGroup(
        pytest.RaisesExc(RuntimeError, match="engine crashed"),
        allow_unwrapped=True,
        flatten_subgroups=True,
    )
    with anyio.fail_after(DEADLINE), crashed:
        async with env.manager:
            await store(env, env.request(2), 2, release=True)
            raise RuntimeError("engine crashed")
    assert env.manager.stats().tiers["disk"].flushed == 0
    assert await recovered(tmp_path / "disk", 16) == {}


@pytest.mark.asyncio
async def test_a_failing_disk_stops_the_flush_and_releases_every_pin_and_reservation(
    tmp_path: Path,
) -> None:
    disk = FaultInjectingStore(disk_tier(tmp_path / "disk", 16))
    env = Env(
        gpu_blocks=32,
        tiers=[CpuTier(LAYOUT, 8), disk],
        flush_on_close=True,
        pipeline=TransferPipeline(max_batch_blocks=2),  # two copies: none after the failed one
    )
    manager = env.manager
    with anyio.fail_after(DEADLINE):
        async with manager:
            await store(env, env.request(4), 4, release=True)
            disk.write_error = TierIOError("disk full", tier="disk")
    stats = manager.stats().tiers["disk"]
    assert (stats.flushed, stats.failed_transfers) == (0, 2)  # the second copy never ran
    for index in manager.indexes:
        index.check_invariants()
        assert (index.num_pinned, index.num_reserved) == (0, 0)
    assert len(manager.indexes[0]) == 4
    assert len(manager.indexes[1]) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("written", [False, True])
async def test_a_failed_flush_leaves_no_file_the_index_does_not_hold(
    tmp_path: Path, written: bool
) -> None:
    """The flush's reservation evicts the disk's blocks; a batch that fails (having
    written its files, or nothing) must not leave files a warm restart brings back."""
    inner = disk_tier(tmp_path / "disk", 2)
    disk = PartlyWritingStore(inner) if written else FaultInjectingStore(inner)
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 2), disk], flush_on_close=True)
    manager = env.manager
    with anyio.fail_after(DEADLINE):
        async with manager:
            await store(env, env.request(2), 2, release=True)
            await store(env, env.request(2), 2, release=True)  # the first two demoted to disk
            await manager.wait_idle()
            assert len(manager.indexes[1]) == 2
            if isinstance(disk, PartlyWritingStore):
                disk.lost = {key for _, key in manager.indexes[0].blocks()}
                disk.lost.pop()  # one block of the flush is written, then the batch fails
            else:
                disk.write_error = TierIOError("disk full", tier="disk")
    assert manager.stats().tiers["disk"].failed_transfers == 2
    held = {key: slot for slot, key in manager.indexes[1].blocks()}
    assert held == {}  # evicted by the flush's reservation, which then failed
    assert await recovered(tmp_path / "disk", 2) == held


@pytest.mark.asyncio
async def test_a_sync_engine_flushes_too(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", flush_on_close=True)
    a = env.request(2)
    with env.manager:
        store_blocking(env, a, 2)
    assert env.manager.stats().tiers["disk"].flushed == 2
    assert set(await recovered(tmp_path / "disk", 16)) == {key(a, 0), key(a, 1)}


def test_flush_order_takes_upper_tiers_first_most_valuable_first_within_the_room() -> None:
    upper, middle, lower = TierIndex("cpu", 8), TierIndex("cpu2", 8), TierIndex("disk", 3)
    keys = [bytes([i]) * 32 for i in range(6)]
    for k in keys[:4]:  # committed oldest first: keys[3] is the most recent
        upper.commit(upper.reserve([k]).keys)
    for k in (keys[4], keys[5], keys[2]):  # keys[2] is in both volatile tiers
        middle.commit(middle.reserve([k]).keys)
    lower.commit(lower.reserve([keys[3]]).keys)  # held below already
    lower.pin([keys[3]])  # as the flush protects it: room for two
    upper.pin([keys[0]])  # a read makes it the most recent; pinned blocks are flushed too
    assert flush_order([upper, middle], lower) == [(0, keys[0]), (0, keys[2])]
    roomy = TierIndex("disk", 8)
    assert flush_order([upper, middle], roomy) == [
        (0, keys[0]),
        (0, keys[3]),
        (0, keys[2]),
        (0, keys[1]),
        (1, keys[5]),
        (1, keys[4]),
    ]


def test_flush_on_close_must_be_a_bool_and_have_somewhere_to_flush(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="flush_on_close"):
        Env(flush_on_close="yes")
    with pytest.raises(ConfigError, match="no tier held in memory has a tier below it that lasts"):
        Env(flush_on_close=True)  # a CPU tier alone
    two_cpu = [CpuTier(LAYOUT, 2), CpuTier(LAYOUT, 2, name="cpu2")]
    with pytest.raises(ConfigError, match="no tier held in memory"):
        Env(tiers=two_cpu, flush_on_close=True)
    assert Env(disk=tmp_path / "disk", flush_on_close=True).manager.flush_on_close


def test_a_sync_engine_left_by_an_error_does_not_flush(tmp_path: Path) -> None:
    """The background loop sees every exit as a clean one; the manager tells it apart."""
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", flush_on_close=True)
    a = env.request(2)

    def crash_after_a_store() -> None:
        with env.manager:
            store_blocking(env, a, 2)
            raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError, match="engine crashed"):
        crash_after_a_store()
    assert env.manager.stats().tiers["disk"].flushed == 0
    assert anyio.run(recovered, tmp_path / "disk", 16) == {}


@pytest.mark.asyncio
async def test_the_disk_keeps_its_copies_of_blocks_the_cpu_tier_holds_too(tmp_path: Path) -> None:
    """A block loaded back from disk is in both tiers: the flush must not evict its disk copy."""
    env = Env(
        gpu_blocks=32, cpu_blocks=3, disk=tmp_path / "disk", disk_blocks=2, flush_on_close=True
    )
    manager = env.manager
    with anyio.fail_after(DEADLINE):
        async with manager:
            a, b, c = env.request(2), env.request(1), env.request(2)
            for request, count in ((a, 2), (b, 1), (c, 2)):
                await store(env, request, count, release=True)  # c's store demotes a to disk
            again = env.request(2, like=a)
            assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
            targets = KVCacheBlocks((env.fresh(2),))
            manager.update_state_after_alloc(again, targets, 2 * BS)
            manager.build_step(scheduled(new={again.request_id: targets}))
            await manager.wait_for_loads([again.request_id])
            manager.request_finished(again)
            env.pool.free_blocks(reversed(targets.blocks[0]))
            await manager.wait_idle()
            a_keys = {key(a, 0), key(a, 1)}
            assert a_keys <= env.cpu_keys()  # staged back through the CPU tier
            assert a_keys == {k for _, k in manager.indexes[1].blocks()}
    # The disk was full of a's blocks, which the CPU tier holds too: nothing to flush.
    assert manager.stats().tiers["disk"].flushed == 0
    assert set(await recovered(tmp_path / "disk", 2)) == a_keys


@pytest.mark.asyncio
async def test_two_cpu_tiers_both_flush_into_the_disk(tmp_path: Path) -> None:
    tiers = [
        CpuTier(LAYOUT, 2),
        CpuTier(LAYOUT, 2, name="cpu2"),
        disk_tier(tmp_path / "disk", 16),
    ]
    env = Env(gpu_blocks=32, tiers=tiers, flush_on_close=True)
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            requests = [env.request(2) for _ in range(3)]
            for request in requests:  # a is demoted twice and dropped; b ends in cpu2, c in cpu
                await store(env, request, 2, release=True)
    stats = env.manager.stats().tiers
    assert (stats["cpu2"].flushed, stats["disk"].flushed) == (0, 4)
    _, b, c = requests
    assert set(await recovered(tmp_path / "disk", 16)) == {
        key(r, i) for r in (b, c) for i in (0, 1)
    }


def test_flush_targets_pair_each_run_of_memory_tiers_with_the_lasting_tier_below(
    tmp_path: Path,
) -> None:
    cpu, cpu2 = CpuTier(LAYOUT, 2), CpuTier(LAYOUT, 2, name="cpu2")
    disk, disk2 = disk_tier(tmp_path / "a", 4), disk_tier(tmp_path / "b", 4)
    assert flush_targets([cpu, disk]) == [([0], 1)]
    assert flush_targets([cpu, cpu2, disk]) == [([0, 1], 2)]
    assert flush_targets([cpu, disk, cpu2, disk2]) == [([0], 1), ([2], 3)]
    assert flush_targets([disk, cpu]) == []
    assert flush_targets([cpu]) == []


def test_current_streams_names_none_without_a_cuda_tier() -> None:
    env = Env()
    assert current_streams([env.device, *env.tiers]) == []


@pytest.mark.asyncio
async def test_a_cpu_tier_flushes_into_a_shared_redis_tier_another_engine_reads(
    shared_redis: RedisServer,
) -> None:
    def redis(name: str = "redis") -> RedisTier:
        return RedisTier(
            LAYOUT, 64, url=shared_redis.url, prefix="flush:", model="flush-test", name=name
        )

    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 4), redis()], flush_on_close=True)
    with anyio.fail_after(DEADLINE):
        async with env.manager:
            a = env.request(2)
            await store(env, a, 2, release=True)
        assert env.manager.stats().tiers["redis"].flushed == 2
        keys = [key(a, 0), key(a, 1)]
        out = torch.zeros((2, LAYOUT.block_bytes), dtype=torch.uint8)
        async with redis("reader") as other:  # another engine, same model and layout
            assert await other.contains(keys) == [True, True]
            await other.read_into([0, 1], keys, out)
    assert torch.equal(out[0], pattern(keys[0]))
    assert torch.equal(out[1], pattern(keys[1]))


@pytest.mark.asyncio
async def test_a_store_never_dispatched_leaves_no_evicted_file_at_close(tmp_path: Path) -> None:
    """step_computed never came (the forward pass failed, the engine shut down): the
    store's demotion evicted the disk's block from its slot; closing must delete it,
    or a warm restart brings back a block the index had dropped."""
    env = Env(gpu_blocks=16, cpu_blocks=1, disk=tmp_path / "disk", disk_blocks=1)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            await store(env, env.request(1), 1)
            await store(env, env.request(1), 1)  # the first one demoted to disk
            assert len(manager.indexes[1]) == 1
            plan_store(env, env.request(1), 1)  # demotes the second, evicting the first
    assert len(manager.indexes[1]) == 0
    assert await recovered(tmp_path / "disk", 1) == {}
