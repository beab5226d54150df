"""Loads of blocks held only below the first tier: staging up, or straight to the device."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kvtier import KVCacheBlocks
from kvtier.offload import FinishedLoad, SchedulerOutput
from kvtier.offload.stats import TierStats
from tests.offload_env import BS, DEADLINE, Env, key, pattern, store


async def disk_only(env: Env):  # type: ignore[no-untyped-def]
    """Two requests of two blocks stored; with two CPU slots, the first's go down to disk."""
    a, b = env.request(2), env.request(2)
    await store(env, a, 2)
    await store(env, b, 2)
    return a, b


def plan_load(env: Env, like, num_blocks: int):  # type: ignore[no-untyped-def]
    """A request repeating ``like``: looked up, allocated, its load planned."""
    request = env.request(num_blocks, like=like)
    tokens, _ = env.manager.get_num_new_matched_tokens(request, 0)
    assert tokens == num_blocks * BS
    targets = env.fresh(num_blocks)
    env.manager.update_state_after_alloc(request, KVCacheBlocks((targets,)), tokens)
    return request, targets


@pytest.mark.asyncio
async def test_two_requests_loading_one_disk_only_prefix_in_one_step_both_succeed(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a, _ = await disk_only(env)
        first, first_targets = plan_load(env, a, 2)
        second, second_targets = plan_load(env, a, 2)
        plan = manager.build_step(SchedulerOutput())
        assert [[name for name, _ in spec.sources] for spec in plan.loads] == [["disk"] * 2] * 2
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([first.request_id, second.request_id])
        assert sorted(manager.take_finished(), key=lambda f: f.request_id) == [
            FinishedLoad(first.request_id, True),
            FinishedLoad(second.request_id, True),
        ]
        for request, targets in ((first, first_targets), (second, second_targets)):
            assert env.holds(targets[0], request, 0)
            assert env.holds(targets[1], request, 1)
        assert {key(a, 0), key(a, 1)} <= env.cpu_keys()  # staged up once, by the first
        stats = manager.stats().tiers
        assert stats["disk"].loads == 4
        assert stats["cpu"].loads == 2  # the second read disk straight into the device
        assert stats["disk"].load_seconds > 0  # each tier is timed for what it read
        assert stats["cpu"].load_seconds > 0
        for index in manager.indexes:
            assert index.num_pinned == index.num_reserved == 0
            index.check_invariants()


@pytest.mark.asyncio
async def test_a_load_from_disk_goes_straight_to_the_device_when_the_cpu_tier_has_no_room(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a, b = await disk_only(env)
        # b's load pins both CPU slots, so a's blocks cannot be staged through the CPU.
        reader_b, b_targets = plan_load(env, b, 2)
        reader_a, a_targets = plan_load(env, a, 2)
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([reader_a.request_id, reader_b.request_id])
        finished = manager.take_finished()
        assert len(finished) == 2
        assert all(f.ok for f in finished)
        assert env.holds(a_targets[0], reader_a, 0)
        assert env.holds(a_targets[1], reader_a, 1)
        assert env.holds(b_targets[1], reader_b, 1)
        assert env.cpu_keys() == {key(b, 0), key(b, 1)}  # nothing was evicted for a
        assert manager.stats().tiers["cpu"].evictions == 2  # only b's store evicted a
        for index in manager.indexes:
            assert index.num_pinned == index.num_reserved == 0


@pytest.mark.asyncio
async def test_a_corrupt_block_read_straight_from_disk_is_a_miss_and_never_reaches_the_device(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a, _ = await disk_only(env)
        victim = tmp_path / "disk" / (key(a, 1).hex() + ".kvb")
        data = bytearray(victim.read_bytes())
        data[3] ^= 0x01
        victim.write_bytes(bytes(data))
        first, _ = plan_load(env, a, 2)
        second, _ = plan_load(env, a, 2)  # shares the staging: reads disk directly
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([first.request_id, second.request_id])
        finished = manager.take_finished()
        assert [f.ok for f in finished] == [False, False]
        assert key(a, 1) not in manager.indexes[1]
        assert key(a, 1) not in manager.indexes[0]
        assert not victim.exists()  # discarded once, though both loads found it bad
        for index in manager.indexes:
            assert index.num_pinned == index.num_reserved == 0
            index.check_invariants()


def corrupt(path: Path, offset: int) -> None:
    """Flip one byte of a block file (a payload byte for a small offset)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.asyncio
async def test_a_block_found_corrupt_on_load_is_discarded_from_the_disk_tier(
    tmp_path: Path,
) -> None:
    """Not only forgotten by the index: the tier deletes its file before the slot is reused."""
    directory = tmp_path / "disk"
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=directory)
    async with env.manager as manager:
        a, _ = await disk_only(env)
        disk = manager.indexes[1]
        slot = disk.slot_of(key(a, 1))
        victim = directory / (key(a, 1).hex() + ".kvb")
        corrupt(victim, 7)
        request, _ = plan_load(env, a, 2)
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([request.request_id])
        [finished] = manager.take_finished()
        assert not finished.ok
        assert key(a, 1) not in disk
        assert slot not in {s for s, _ in disk.blocks()}  # its slot is free again
        assert not victim.exists()  # and its bytes left the tier: no capacity, no re-read
        assert (directory / (key(a, 0).hex() + ".kvb")).exists()  # the sound block stays
        assert disk.num_pinned == disk.num_reserved == 0
        disk.check_invariants()
    restarted = Env(gpu_blocks=32, cpu_blocks=2, disk=directory)
    async with restarted.manager as manager:  # a warm restart knows nothing of it
        restored = {k for _, k in manager.indexes[1].blocks()}
        assert key(a, 0) in restored
        assert key(a, 1) not in restored


@pytest.mark.asyncio
async def test_lazy_stores_start_only_once_the_step_is_computed() -> None:
    """Async scheduling: a request freed while its step's forward pass still runs.

    Its newest blocks are hashed (scheduled) and free, but their bytes are not
    written yet: a write-back copy started at ``build_step`` would store
    garbage under their hashes.
    """
    env = Env(gpu_blocks=8, mode="lazy", lazy_free_target=4)
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.pool.get_new_blocks(2)
        padded = list(blocks)
        env.pool.cache_full_blocks(req, padded, 0, 2, BS, 0)  # scheduled: hashed, not computed
        for block in blocks:
            env.cache[block.block_id] = 0xEE
        env.pool.free_blocks(reversed(blocks))  # aborted while the forward pass runs
        fillers = env.pool.get_new_blocks(5)
        plan = manager.build_step(SchedulerOutput())
        assert plan.num_store_blocks == 2
        await anyio.sleep(0.05)
        assert env.cpu_keys() == set()  # nothing copied yet
        for position, block in enumerate(blocks):  # the forward pass ends
            env.cache[block.block_id] = pattern(key(req, position))
        manager.step_computed(plan.step_id)
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()
        env.pool.free_blocks(fillers)
        again, targets = plan_load(env, req, 2)
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[0], again, 0)
        assert env.holds(targets[1], again, 1)


def test_releasing_the_stages_of_a_load_that_could_not_start_undoes_its_reservations(
    tmp_path: Path,
) -> None:
    """What ``dispatch_load`` does when starting the job fails after reserving."""
    from kvtier.offload import placement
    from kvtier.offload._state import LoadEvent, Stage
    from kvtier.tiers.index import TierIndex

    cpu, disk = TierIndex("cpu", 2, "lru"), TierIndex("disk", 8, "lru")
    resident = [b"r" * 32, b"s" * 32]
    cpu.commit(cpu.reserve(resident).keys)  # full: staging evicts and demotes them
    wanted = [b"a" * 32, b"b" * 32]
    disk.commit(disk.reserve(wanted).keys)
    disk_slots = disk.pin(wanted)
    event = LoadEvent(1, "req", [], list(wanted), [], first_slots=[-1, -1])
    event.stages.append(Stage(1, list(disk_slots), list(wanted)))
    placement.reserve_stages([cpu, disk], [TierStats(), TierStats()], event)
    assert cpu.num_reserved == 2
    assert disk.num_reserved == 2  # the demotions of r and s
    placement.release_stages([cpu, disk], event)
    assert cpu.num_reserved == disk.num_reserved == 0
    assert event.first_slots == [-1, -1]
    assert event.stages[0].dst_slots == []
    assert event.demotions == []
    assert event.staged_keys() == []
    cpu.check_invariants()
    disk.check_invariants()


@pytest.mark.asyncio
async def test_a_failed_demotion_is_counted_and_loses_only_the_evicted_blocks(
    tmp_path: Path,
) -> None:
    from kvtier.tiers.cpu import CpuTier
    from kvtier.tiers.disk import DiskTier
    from tests.offload_env import LAYOUT
    from tests.tier_doubles import GatedStore

    disk = GatedStore(DiskTier(tmp_path / "disk", LAYOUT, 16 * DiskTier.bytes_per_block(LAYOUT)))
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 2), disk])
    async with env.manager as manager:
        a, b = env.request(2), env.request(2)
        await store(env, a, 2)
        disk.fail = 1  # the next disk write: the demotion of a's blocks
        await store(env, b, 2)  # evicts a's blocks; their demotion fails
        stats = manager.stats().tiers
        assert stats["disk"].failed_transfers == 2
        assert stats["disk"].demotions == 0
        assert env.cpu_keys() == {key(b, 0), key(b, 1)}  # b's store itself landed
        assert list(manager.indexes[1].blocks()) == []
        for index in manager.indexes:
            assert index.num_reserved == 0
            index.check_invariants()
