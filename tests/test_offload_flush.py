"""flush_on_close: the CPU tier's blocks go down to disk when the manager closes cleanly."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kvtier import KVCacheBlocks
from kvtier.errors import ConfigError, TierIOError
from kvtier.offload.flush import flush_order
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline
from tests.offload_env import BS, DEADLINE, LAYOUT, Env, key, scheduled, store
from tests.tier_doubles import FaultInjectingStore


def disk_tier(path: Path, blocks: int) -> DiskTier:
    return DiskTier(path, LAYOUT, blocks * DiskTier.bytes_per_block(LAYOUT))


async def recovered(path: Path, blocks: int) -> dict[bytes, int]:
    """What a new process finds on the disk directory: key -> slot."""
    async with disk_tier(path, blocks) as disk:
        return {k: slot for slot, k in await disk.recover()}


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
    inner = disk_tier(tmp_path / "disk", 16)
    await inner.__aenter__()  # the wrapper does not open what it wraps
    disk = FaultInjectingStore(inner)
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
async def test_a_sync_engine_flushes_too(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", flush_on_close=True)
    a = env.request(2)
    with env.manager:
        blocks = env.alloc(a, 2)
        env.manager.update_state_after_alloc(a, blocks, 0)
        plan = env.manager.build_step(scheduled(new={a.request_id: blocks}))
        env.manager.step_computed(plan.step_id)
        assert env.manager.wait_idle_blocking(DEADLINE)
    assert env.manager.stats().tiers["disk"].flushed == 2
    assert set(await recovered(tmp_path / "disk", 16)) == {key(a, 0), key(a, 1)}


def test_flush_order_is_the_reverse_of_the_eviction_order_and_fits_the_room() -> None:
    upper, lower = TierIndex("cpu", 8), TierIndex("disk", 2)
    keys = [bytes([i]) * 32 for i in range(4)]
    for k in keys:  # committed oldest first: keys[3] is the most recent
        upper.commit(upper.reserve([k]).keys)
    lower.commit(lower.reserve([keys[3]]).keys)  # held below already
    upper.pin([keys[0]])  # a read makes it the most recent; pinned blocks are flushed too
    assert flush_order(upper, lower) == [keys[0], keys[2]]


def test_flush_on_close_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="flush_on_close"):
        Env(flush_on_close="yes")
