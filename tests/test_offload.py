"""OffloadManager scenarios (seeds 000 and 003) on real pools, tiers and pipeline."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from kvtier import KVCacheBlocks, Request
from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.offload import FinishedLoad, OffloadManager, SchedulerOutput
from kvtier.tiers.cpu import CpuTier
from tests.offload_env import BS, LAYOUT, Env, key, scheduled, start_load, store


@pytest.mark.asyncio
async def test_eager_store_then_load_round_trip_with_verified_bytes() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        assert plan.num_store_blocks == 2
        assert len(plan.stores[0].slots) == 2
        assert manager.stats().tiers["cpu"].stores == 0  # not before the step is computed
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert manager.stats().tiers["cpu"].stores == 2

        again = env.request(2, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        plan = manager.build_step(scheduled(new={again.request_id: KVCacheBlocks((targets,))}))
        assert [spec.device_block_ids for spec in plan.loads] == [
            tuple(b.block_id for b in targets)
        ]
        await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert manager.take_finished() == []  # reported once
        assert env.holds(targets[0], again, 0)
        assert env.holds(targets[1], again, 1)
        assert manager.indexes[0].num_pinned == 0
        cpu = manager.stats().tiers["cpu"]
        assert cpu.bytes_stored == cpu.bytes_loaded == 2 * LAYOUT.block_bytes
        assert cpu.store_seconds > 0
        assert cpu.load_seconds > 0
        assert cpu.store_gbps > 0
        assert cpu.load_gbps > 0


@pytest.mark.asyncio
async def test_a_lookup_counts_once_when_its_request_is_admitted() -> None:
    """An engine looks a request up again each step it fails to allocate: one lookup."""
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        manager.step_computed(manager.build_step(scheduled(new={req.request_id: blocks})).step_id)
        await manager.wait_idle()
        before = manager.stats()
        # 2 blocks held below, a third no tier holds
        again = Request("again", [*req.all_token_ids[: 2 * BS], *range(BS + 3)], req.block_hasher)
        for _ in range(3):
            assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        gone = env.request(2, like=req)  # looked up, then finished unallocated: not counted
        manager.get_num_new_matched_tokens(gone, 0)
        manager.request_finished(gone)
        assert manager.stats() == before  # nothing counted before an allocation
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(3),)), 2 * BS)
        after = manager.stats()
        cpu, was = after.tiers["cpu"], before.tiers["cpu"]
        assert (after.lookups - before.lookups, cpu.hits - was.hits) == (1, 2)
        assert cpu.queries - was.queries == 3  # two hits and the block that missed
        assert after.tokens_to_compute - before.tokens_to_compute == BS + 3


@pytest.mark.asyncio
async def test_load_targets_cached_at_allocation_are_refused_not_skipped() -> None:
    """Without delay_cache_blocks the targets hold hashes: no load would run, no report come.

    The engine would wait for a FinishedLoad for ever, and the prefix cache
    would serve the targets' unwritten bytes.
    """
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        again = env.request(2, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        cached = env.alloc(again, 2)  # hashed at allocation, as delay_cache_blocks=False does
        with pytest.raises(
            InvalidRequestError,
            match=r"positions 0\.\.1 \(after the 0 device-hit blocks .*\) already hold hashes",
        ):
            manager.update_state_after_alloc(again, cached, 2 * BS)
        assert not manager.load_in_flight(again.request_id)
        targets = KVCacheBlocks((env.fresh(2),))  # allocated as it should be: loads
        manager.update_state_after_alloc(again, targets, 2 * BS)
        assert manager.load_in_flight(again.request_id)


@pytest.mark.asyncio
async def test_the_last_full_block_is_not_a_hit_when_the_whole_prompt_hits() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(3, extra=0)  # exactly three full blocks
        await store(env, req, env.alloc(req, 3))
        again = env.request(3, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        assert manager.get_num_new_matched_tokens(again, 2 * BS) == (0, False)
        longer = env.request(3, extra=1)  # a token past the last block: all three hit
        await store(env, longer, env.alloc(longer, 3))
        assert manager.get_num_new_matched_tokens(env.request(3, like=longer), 0) == (3 * BS, True)


@pytest.mark.asyncio
async def test_lazy_mode_stores_blocks_near_the_eviction_end_and_they_load_back() -> None:
    env = Env(gpu_blocks=8, mode="lazy", lazy_free_target=4)
    async with env.manager as manager:
        old = env.request(2)
        blocks = env.alloc(old, 2).blocks[0]
        env.pool.free_blocks(reversed(blocks))
        fillers = env.pool.get_new_blocks(5)  # the unhashed blocks go first
        plan = manager.build_step(SchedulerOutput())
        manager.step_computed(plan.step_id)
        assert sorted(plan.stores[0].device_block_ids) == sorted(b.block_id for b in blocks)
        assert all(b.ref_cnt == 1 for b in blocks)  # touched while copied
        await manager.wait_idle()
        assert all(b.ref_cnt == 0 for b in blocks)
        env.pool.free_blocks(fillers)

        again = env.request(2, like=old)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        targets = env.fresh(2)  # reuses the old blocks: their bytes are overwritten
        for target in targets:
            env.cache[target.block_id] = 0
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        plan = manager.build_step(SchedulerOutput())
        manager.step_computed(plan.step_id)
        assert plan.num_load_blocks == 2
        await manager.wait_for_loads([again.request_id])
        assert env.holds(targets[0], again, 0)
        assert env.holds(targets[1], again, 1)


@pytest.mark.asyncio
async def test_duplicate_stores_are_skipped_eager_and_lazy() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        free = manager.indexes[0].num_free
        twin = env.request(2, like=req)
        blocks = env.alloc(twin, 2)  # other device blocks, same hashes
        manager.update_state_after_alloc(twin, blocks, 0)
        plan = manager.build_step(scheduled(new={twin.request_id: blocks}))
        assert plan.stores == ()
        assert manager.indexes[0].num_free == free

    env = Env(gpu_blocks=8, mode="lazy", lazy_free_target=4)
    async with env.manager as manager:
        for _ in range(2):
            req = env.request(2, like=req if _ else None)
            blocks = env.alloc(req, 2).blocks[0]
            env.pool.free_blocks(reversed(blocks))
            fillers = env.pool.get_new_blocks(5)
            plan = manager.build_step(SchedulerOutput())
            manager.step_computed(plan.step_id)
            await manager.wait_idle()
            env.pool.free_blocks(fillers)
            assert plan.num_store_blocks == (2 if _ == 0 else 0)
        assert manager.indexes[0].num_free == 6


@pytest.mark.asyncio
async def test_lower_tier_evicts_least_recently_used_and_loads_refresh_blocks() -> None:
    env = Env(cpu_blocks=4)
    async with env.manager as manager:
        a, b = env.request(2), env.request(2)
        blocks_a, blocks_b = env.alloc(a, 2), env.alloc(b, 2)
        for req, blocks in ((a, blocks_a), (b, blocks_b)):
            manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={a.request_id: blocks_a, b.request_id: blocks_b}))
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(a, 0), key(a, 1), key(b, 0), key(b, 1)}

        # Loading a's blocks makes them most recently used (vLLM's touch).
        reader = env.request(2, like=a)
        manager.get_num_new_matched_tokens(reader, 0)
        targets = KVCacheBlocks((env.fresh(2),))
        manager.update_state_after_alloc(reader, targets, 2 * BS)
        manager.build_step(SchedulerOutput())
        await manager.wait_for_loads([reader.request_id])

        c = env.request(2)
        await store(env, c, env.alloc(c, 2))
        assert env.cpu_keys() == {key(a, 0), key(a, 1), key(c, 0), key(c, 1)}  # b was LRU
        assert manager.stats().tiers["cpu"].evictions == 2


@pytest.mark.asyncio
async def test_finishing_during_a_load_defers_cleanup_and_leaks_nothing() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        plan = manager.build_step(SchedulerOutput())
        assert plan.loads
        assert manager.indexes[0].num_pinned == 2
        assert manager.request_finished(again) is True  # deferred
        env.pool.free_blocks(targets)  # the engine frees; the manager still holds them
        assert all(t.ref_cnt == 1 for t in targets)
        assert manager.has_request(again.request_id)
        await manager.wait_idle()
        assert manager.take_finished() == []  # the engine is done with it: no report
        assert manager.stats().loads_finished == 1  # counted all the same
        assert not manager.has_request(again.request_id)
        assert manager.indexes[0].num_pinned == 0
        assert all(t.ref_cnt == 0 for t in targets)


@pytest.mark.asyncio
async def test_a_finished_requests_load_is_never_reported_to_a_new_request_of_its_id() -> None:
    """The old load ends while a new request of the same id waits, looked up but not
    allocated yet: a report then would read as the new request's load being done."""
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        old = env.request(2, like=req, request_id="reused")
        start_load(env, old, 2)
        assert manager.request_finished(old) is True
        new = env.request(2, like=req, request_id="reused")
        assert manager.get_num_new_matched_tokens(new, 0) == (2 * BS, True)
        await manager.wait_idle()  # the old load ends
        assert manager.take_finished() == []
        targets = start_load(env, new, 2)
        await manager.wait_for_loads([new.request_id])
        (done,) = manager.take_finished()  # the new request's own load
        assert (done.request_id, done.ok) == ("reused", True)
        assert all(env.holds(b, new, i) for i, b in enumerate(targets.blocks[0]))


@pytest.mark.asyncio
async def test_a_load_report_not_taken_when_its_request_finishes_is_dropped() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        again = env.request(2, like=req)
        start_load(env, again, 2)
        await manager.wait_for_loads([again.request_id])  # ended: its report is queued
        assert manager.request_finished(again) is False
        assert manager.take_finished() == []
        assert manager.stats().loads_finished == 1


@pytest.mark.asyncio
async def test_finishing_during_a_store_defers_cleanup() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        assert manager.request_finished(req) is True
        env.pool.free_blocks(reversed(blocks.blocks[0]))
        assert all(b.ref_cnt == 1 for b in blocks.blocks[0])  # pinned for the copy
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert not manager.has_request(req.request_id)
        assert all(b.ref_cnt == 0 for b in blocks.blocks[0])
        assert manager.indexes[0].num_reserved == 0
        assert len(env.cpu_keys()) == 2


@pytest.mark.asyncio
async def test_a_request_finished_before_its_load_starts_releases_the_pins() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        assert manager.request_finished(again) is False
        assert manager.indexes[0].num_pinned == 0
        assert manager.build_step(SchedulerOutput()).loads == ()


@pytest.mark.asyncio
async def test_null_blocks_are_never_stored_or_loaded() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        real = env.alloc(req, 1).blocks[0][0]
        mixed = KVCacheBlocks(([real, env.pool.null_block],))
        manager.update_state_after_alloc(req, mixed, 0)
        plan = manager.build_step(scheduled(new={req.request_id: mixed}))
        assert plan.stores[0].device_block_ids == (real.block_id,)
        manager.step_computed(plan.step_id)
        await manager.wait_idle()

        again = env.request(2, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (BS, True)
        target = env.fresh(1)[0]
        manager.update_state_after_alloc(again, KVCacheBlocks(([target, env.pool.null_block],)), BS)
        plan = manager.build_step(SchedulerOutput())
        assert plan.loads[0].device_block_ids == (target.block_id,)
        await manager.wait_for_loads([again.request_id])
        assert env.holds(target, again, 0)


@pytest.mark.asyncio
async def test_chunked_prefill_stores_only_the_new_blocks_each_step() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(4)
        first = env.alloc(req, 2)
        manager.update_state_after_alloc(req, first, 0)
        plan = manager.build_step(
            scheduled(new={req.request_id: first}, tokens={req.request_id: 2 * BS})
        )
        assert plan.num_store_blocks == 2
        manager.step_computed(plan.step_id)
        more = env.pool.get_new_blocks(2)
        env.compute(req, more, first=2)
        manager.update_state_after_alloc(req, KVCacheBlocks(([*first.blocks[0], *more],)), 0)
        plan = manager.build_step(scheduled(cached={req.request_id: [b.block_id for b in more]}))
        assert plan.stores[0].device_block_ids == tuple(b.block_id for b in more)
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(req, i) for i in range(4)}


@pytest.mark.asyncio
async def test_partial_device_hit_loads_the_middle_positions() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(6)
        await store(env, req, env.alloc(req, 6))
        again = env.request(6, like=req)
        assert manager.get_num_new_matched_tokens(again, 2 * BS) == (4 * BS, True)
        info = manager.hit_info(again.request_id)
        assert info is not None
        assert info.device_blocks == 2
        assert info.tier_blocks == {"cpu": 4}
        device_hit = env.alloc(again, 2).blocks[0]  # | device hit (2) | external (2) | new (2) |
        external, new = env.fresh(2), env.fresh(2)
        blocks = KVCacheBlocks(([*device_hit, *external, *new],))
        manager.update_state_after_alloc(again, blocks, 2 * BS)
        plan = manager.build_step(scheduled(new={again.request_id: blocks}))
        assert plan.loads[0].device_block_ids == tuple(b.block_id for b in external)
        assert plan.loads[0].first_block == 2
        await manager.wait_for_loads([again.request_id])
        assert env.holds(external[0], again, 2)
        assert env.holds(external[1], again, 3)
        assert all(not env.holds(b, again, i + 4) for i, b in enumerate(new))


@pytest.mark.asyncio
async def test_in_flight_stores_are_not_stored_again_by_a_later_step() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        first = manager.build_step(scheduled(new={req.request_id: blocks}))
        assert first.num_store_blocks == 2
        assert manager.in_flight_store_blocks == {b.block_id for b in blocks.blocks[0]}
        # Step 2: another request hits the same device blocks before the store lands.
        hit = env.request(2, like=req)
        env.pool.touch(blocks.blocks[0])
        manager.update_state_after_alloc(hit, blocks, 0)
        second = manager.build_step(scheduled(new={hit.request_id: blocks}))
        assert second.stores == ()
        manager.step_computed(second.step_id)
        await manager.wait_idle()
        assert manager.in_flight_store_blocks == frozenset()
        assert manager.stats().tiers["cpu"].stores == 2


@pytest.mark.asyncio
async def test_disk_hits_are_staged_through_cpu_and_cpu_evictions_demote_to_disk(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a, b = env.request(2), env.request(2)
        await store(env, a, env.alloc(a, 2))
        await store(env, b, env.alloc(b, 2))  # evicts a's blocks from CPU to disk
        assert env.cpu_keys() == {key(b, 0), key(b, 1)}
        stats = manager.stats()
        assert stats.tiers["cpu"].evictions == 2
        assert stats.tiers["disk"].demotions == 2
        disk = stats.tiers["disk"]  # the demotions' writes are the disk's stored traffic
        assert (disk.stores, disk.bytes_stored) == (0, 2 * LAYOUT.block_bytes)
        assert disk.store_seconds > 0
        assert {k for _, k in manager.indexes[1].blocks()} == {key(a, 0), key(a, 1)}

        again = env.request(2, like=a)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        assert manager.hit_info(again.request_id).tier_blocks == {"cpu": 0, "disk": 2}  # type: ignore[union-attr]
        assert manager.hit_info(again.request_id).levels == (1, 1)  # type: ignore[union-attr]
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        plan = manager.build_step(SchedulerOutput())
        assert [name for name, _ in plan.loads[0].sources] == ["disk", "disk"]
        await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[0], again, 0)
        assert env.holds(targets[1], again, 1)
        assert key(a, 0) in env.cpu_keys()  # promoted on the way up
        disk_keys = {k for _, k in manager.indexes[1].blocks()}
        assert {key(b, 0), key(b, 1)} <= disk_keys  # and b, evicted for it, demoted
        assert manager.indexes[1].num_pinned == 0
        assert manager.indexes[0].num_reserved == 0


@pytest.mark.asyncio
async def test_a_corrupt_block_fails_its_position_on_and_is_forgotten(tmp_path: Path) -> None:
    """The block before it is loaded again alone and arrives (staged through the CPU
    tier, which keeps it): only the corrupt position is left to recompute."""
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a, b = env.request(2), env.request(2)
        await store(env, a, env.alloc(a, 2))
        await store(env, b, env.alloc(b, 2))
        victim = tmp_path / "disk" / (key(a, 1).hex() + ".kvb")
        data = bytearray(victim.read_bytes())
        data[5] ^= 0xFF
        victim.write_bytes(bytes(data))
        again = env.request(2, like=a)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        manager.build_step(SchedulerOutput())
        await manager.wait_for_loads([again.request_id])
        [finished] = manager.take_finished()
        assert not finished.ok
        assert finished.failed_block_ids == (targets[1].block_id,)
        assert env.holds(targets[0], again, 0)
        assert key(a, 1) not in manager.indexes[1]  # doubt became a miss
        assert key(a, 0) in manager.indexes[0]  # its staged copy arrived
        assert manager.get_num_new_matched_tokens(env.request(2, like=a), 0) == (BS, True)
        stats = manager.stats()
        assert (stats.loads_failed, stats.loads_partial) == (1, 1)
        assert (stats.tiers["disk"].loads, stats.tiers["disk"].failed_transfers) == (1, 1)
        assert (stats.tiers["cpu"].loads, stats.tiers["cpu"].failed_transfers) == (1, 1)


@pytest.mark.asyncio
async def test_stores_wait_for_every_tensor_parallel_worker() -> None:
    env = Env(world_size=2)
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert manager.indexes[0].num_reserved == 2  # one worker of two reported
        manager.report_store_done(plan.stores[0].event_id)
        assert manager.indexes[0].num_reserved == 0
        assert len(env.cpu_keys()) == 2


@pytest.mark.asyncio
async def test_a_local_store_failure_still_waits_for_the_other_workers() -> None:
    from kvtier.errors import TierIOError
    from tests.tier_doubles import FaultInjectingStore, MemoryStore

    cpu = FaultInjectingStore(MemoryStore(4, LAYOUT, name="cpu"))
    env = Env(tiers=[cpu], world_size=2)
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        spec = plan.stores[0]
        cpu.write_error = TierIOError("injected", tier="cpu")
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        # The other worker may still be copying these blocks into these slots.
        assert manager.indexes[0].num_reserved == 2
        assert [env.pool.blocks[i].ref_cnt for i in spec.device_block_ids] == [2, 2]
        assert set(spec.device_block_ids) <= manager.in_flight_store_blocks
        manager.report_store_done(spec.event_id)
        assert manager.indexes[0].num_reserved == 0  # then aborted: nothing was stored
        assert env.cpu_keys() == set()
        assert [env.pool.blocks[i].ref_cnt for i in spec.device_block_ids] == [1, 1]
        assert manager.stats().tiers["cpu"].failed_transfers == 2


@pytest.mark.asyncio
async def test_a_load_whose_sources_went_away_before_allocation_is_reported_and_counted() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        await store(env, req, env.alloc(req, 2))
        again = env.request(2, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        manager.indexes[0].remove([key(req, 0), key(req, 1)])  # e.g. found corrupt meanwhile
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        finished = manager.take_finished()
        assert [(f.request_id, f.ok) for f in finished] == [(again.request_id, False)]
        assert sorted(finished[0].failed_block_ids) == sorted(b.block_id for b in targets)
        stats = manager.stats()
        assert (stats.loads_finished, stats.loads_failed) == (1, 1)


@pytest.mark.asyncio
async def test_blocking_waits_under_async_with_raise_instead_of_stalling_the_loop() -> None:
    from kvtier.errors import ClosedError

    env = Env()
    async with env.manager as manager:
        assert manager.wait_idle_blocking(0.1)  # nothing in flight: nothing to wait for
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        manager.step_computed(plan.step_id)  # the store job runs only when this loop does
        with pytest.raises(ClosedError, match="await wait_for_loads"):
            manager.wait_idle_blocking(0.1)
        assert manager.wait_idle_blocking(0) is False  # a poll: it cannot stall the loop
        await manager.wait_idle()
        assert manager.wait_idle_blocking(0.1)
        assert env.cpu_keys() == {key(req, 0), key(req, 1)}


@pytest.mark.asyncio
async def test_selective_mode_stores_blocks_after_enough_hits() -> None:
    env = Env(mode="selective", selective_min_hits=2)
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        for round_ in range(2):
            reader = env.request(2, like=req)
            for _ in range(3):  # looked up again each step it fails to allocate: one hit
                manager.get_num_new_matched_tokens(reader, 2 * BS)  # a device hit of 2 blocks
                plan = manager.build_step(SchedulerOutput())
                assert plan.num_store_blocks == 0
            manager.update_state_after_alloc(reader, blocks, 0)  # admitted: its hit counts
            plan = manager.build_step(SchedulerOutput())
            assert plan.num_store_blocks == (0 if round_ == 0 else 2)
        # A hit block may not be computed yet (hits count from allocation on):
        # nothing is copied before the engine says the step's bytes exist.
        await anyio.sleep(0.05)
        assert env.cpu_keys() == set()
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(req, 0), key(req, 1)}


@pytest.mark.asyncio
async def test_a_second_allocation_during_a_load_is_refused_not_credited() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        manager.step_computed(manager.build_step(scheduled(new={req.request_id: blocks})).step_id)
        await manager.wait_idle()
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        # The old load would end "ok" for blocks it never wrote: refused,
        # and its lookup is not counted (nothing changed).
        manager.get_num_new_matched_tokens(again, 0)
        before = manager.stats()
        with pytest.raises(InvalidRequestError, match="already has a load in flight"):
            manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(2),)), 2 * BS)
        assert manager.stats() == before
        manager.build_step(SchedulerOutput())
        await manager.wait_idle()
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[1], again, 1)


def test_synchronous_engines_run_the_pipeline_on_a_background_thread() -> None:
    env = Env()
    with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        manager.step_computed(plan.step_id)
        assert manager.wait_idle_blocking(timeout=30)
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        manager.build_step(SchedulerOutput())
        assert manager.wait_for_loads_blocking([again.request_id], timeout=30)
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[1], again, 1)


@pytest.mark.asyncio
async def test_closing_with_work_pending_releases_everything() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        manager.build_step(scheduled(new={req.request_id: blocks}))  # never step_computed
        other = env.request(1)
        await store(env, other, env.alloc(other, 1))
        again = env.request(1, like=other)
        manager.get_num_new_matched_tokens(again, 0)
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(1),)), BS)
    index = manager.indexes[0]
    assert index.num_reserved == 0
    assert index.num_pinned == 0
    assert all(b.ref_cnt == 1 for b in blocks.blocks[0])  # the engine's own reference
    assert manager.in_flight_store_blocks == frozenset()
    index.check_invariants()


def test_lazy_mode_over_a_first_tier_smaller_than_the_device_is_logged() -> None:
    with capture_logs() as logs:
        Env(gpu_blocks=16, cpu_blocks=8, mode="lazy", lazy_free_target=4)
        Env(gpu_blocks=16, cpu_blocks=15, mode="lazy", lazy_free_target=4)  # room enough
        Env(gpu_blocks=16, cpu_blocks=8, mode="eager")  # stores only what is computed
    warned = [log for log in logs if log["event"] == "lazy_first_tier_smaller_than_device"]
    assert [(log["tier_blocks"], log["device_blocks"]) for log in warned] == [(8, 15)]


@pytest.mark.asyncio
async def test_bad_arguments_are_typed_errors() -> None:
    env = Env()
    with pytest.raises(ConfigError, match="at least one lower tier"):
        Env(tiers=[])
    with pytest.raises(ConfigError, match="mode"):
        Env(mode="sometimes")  # type: ignore[arg-type]
    other = CpuTier(LAYOUT.__class__(1, BS, 1, 8, "float16"), 4)
    with pytest.raises(ConfigError, match="layout"):
        Env(tiers=[other])
    with pytest.raises(ConfigError, match="lazy_free_target=16 > the 15 device blocks"):
        Env(gpu_blocks=16, mode="lazy", lazy_free_target=16)  # it could never be met
    Env(gpu_blocks=16, mode="lazy", lazy_free_target=15)
    Env(gpu_blocks=16, mode="eager", lazy_free_target=99)  # not read outside lazy mode
    async with env.manager as manager:
        req = env.request(2)
        with pytest.raises(InvalidRequestError, match="multiple of 16"):
            manager.get_num_new_matched_tokens(req, 5)
        with pytest.raises(InvalidRequestError, match="multiple of 16"):
            manager.update_state_after_alloc(req, env.alloc(req, 2), 7)


@pytest.mark.asyncio
async def test_a_preempted_request_resumes_with_new_blocks_and_stores_only_what_is_missing() -> (
    None
):
    env = Env()
    async with env.manager as manager:
        req = env.request(4)
        first = env.alloc(req, 2)
        manager.update_state_after_alloc(req, first, 0)
        plan = manager.build_step(scheduled(new={req.request_id: first}))
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        # Preempted: its blocks are freed; it comes back as a new request.
        env.pool.free_blocks(reversed(first.blocks[0]))
        manager.build_step(SchedulerOutput(preempted=frozenset({req.request_id})))
        resumed = KVCacheBlocks((env.pool.get_new_blocks(4),))
        env.compute(req, list(resumed.blocks[0]))
        manager.update_state_after_alloc(req, resumed, 0)
        plan = manager.build_step(scheduled(new={req.request_id: resumed}))
        stored = plan.stores[0].device_block_ids
        assert stored == tuple(b.block_id for b in resumed.blocks[0][2:])  # 0 and 1 are held
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(req, i) for i in range(4)}


@pytest.mark.asyncio
async def test_lazy_mode_keeps_the_eviction_end_safe_step_after_step() -> None:
    """No allocation of up to ``lazy_free_target`` blocks ever takes an unwritten block."""
    env = Env(gpu_blocks=64, cpu_blocks=512, mode="lazy", lazy_free_target=8)
    async with env.manager as manager:
        first = manager.indexes[0]
        for step in range(40):
            manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
            await manager.wait_idle()
            head = list(env.pool.free_block_queue)[:8]
            unsafe = [b for b in head if b.block_hash is not None and b.block_hash not in first]
            assert not unsafe, f"step {step}: unwritten blocks at the eviction end"
            # A request computes some blocks and ends: they are freed, hashed, at the tail.
            req = env.request(1 + step % 5)
            blocks = env.alloc(req, 1 + step % 5).blocks[0]
            env.pool.free_blocks(reversed(blocks))
        assert manager.stats().tiers["cpu"].stores > 0


@pytest.mark.asyncio
async def test_lazy_mode_spreads_a_burst_of_freed_blocks_over_steps_and_loses_none() -> None:
    """Blocks freed together are written back over several steps, within the budget."""
    env = Env(gpu_blocks=64, cpu_blocks=512, mode="lazy", lazy_free_target=4)
    async with env.manager as manager:
        first = manager.indexes[0]
        for _ in range(12):  # idle steps: the rate of arrivals decays
            manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
            await manager.wait_idle()
        burst = []
        for _ in range(8):  # eight requests of five blocks end at once
            req = env.request(5)
            blocks = env.alloc(req, 5).blocks[0]
            burst.extend(blocks)
            env.pool.free_blocks(reversed(blocks))
        keys = {block.block_hash for block in burst}
        counts = []
        for _ in range(10):
            plan = manager.build_step(SchedulerOutput())
            manager.step_computed(plan.step_id)
            counts.append(plan.num_store_blocks)
            assert plan.num_store_blocks <= manager.lazy_store_budget
            head = list(env.pool.free_block_queue)[:4]
            assert all(b.block_hash is None or b.block_hash in first for b in head)
            await manager.wait_idle()
        assert sum(counts) == len(keys) == 40
        assert max(counts) < 40
        assert len([n for n in counts if n]) >= 2
        assert all(key in first for key in keys)
        # Everything free is taken: no hashed block leaves the device unwritten.
        taken = env.pool.get_new_blocks(len(env.pool.free_block_queue))
        assert manager.stats().tiers["cpu"].stores == 40
        env.pool.free_blocks(taken)


@pytest.mark.asyncio
async def test_lazy_mode_writes_what_nears_eviction_whatever_the_budget() -> None:
    """Safety is not bounded by the budget: every unwritten block at the eviction end goes."""
    env = Env(gpu_blocks=32, cpu_blocks=512, mode="lazy", lazy_free_target=30)
    async with env.manager as manager:
        manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
        await manager.wait_idle()
        req = env.request(31)
        blocks = env.alloc(req, 31).blocks[0]  # the whole pool
        env.pool.free_blocks(reversed(blocks))
        plan = manager.build_step(SchedulerOutput())
        manager.step_computed(plan.step_id)
        assert plan.num_store_blocks == 31  # past the budget of 30
        await manager.wait_idle()
        assert all(block.block_hash in manager.indexes[0] for block in blocks)


@pytest.mark.asyncio
async def test_lazy_mode_restarts_its_walk_when_the_cursor_block_was_taken_and_freed_again() -> (
    None
):
    """A prefix hit on the walk's last block, freed again before the next step, moved the
    resumed walk to the tail: the unwritten blocks in between reached the eviction end."""
    env = Env(gpu_blocks=40, cpu_blocks=512, mode="lazy", lazy_free_target=2)
    async with env.manager as manager:
        first = manager.indexes[0]
        written = env.request(3)  # three blocks written below, then freed
        env.pool.free_blocks(reversed(env.alloc(written, 3).blocks[0]))
        for _ in range(3):
            manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
            await manager.wait_idle()
        n = len(env.pool.free_block_queue) - 3
        req = env.request(n)
        blocks = env.pool.get_new_blocks(n)  # the unhashed ones: the queue is [written…, req…]
        env.compute(req, blocks)
        env.pool.free_blocks(reversed(blocks))
        manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
        cursor = manager._lazy._cursor  # the last block the walk passed
        assert cursor is not None
        assert cursor.block_hash is not None
        env.pool.touch([cursor])  # another request's prefix hit
        env.pool.free_blocks([cursor])  # that request ends: the block is at the tail now
        manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
        await manager.wait_idle()
        for step in range(5):
            env.pool.get_new_blocks(2)  # up to lazy_free_target allocations
            manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
            await manager.wait_idle()
            head = list(env.pool.free_block_queue)[:2]
            unsafe = [b for b in head if b.block_hash is not None and b.block_hash not in first]
            assert not unsafe, f"step {step}: unwritten blocks at the eviction end"
        lost = [
            i
            for i in range(n)
            if key(req, i) not in first
            and env.pool.get_cached_block(req.block_hashes[i], [0]) is None
        ]
        assert lost == []


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [16.0, True, 16.5, "16"])
async def test_token_counts_that_are_not_integers_are_refused_and_change_nothing(
    bad: object,
) -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(3)
        await store(env, req, 3, release=True)
        again = env.request(3, like=req)
        with pytest.raises(InvalidRequestError, match="num_computed_tokens"):
            manager.get_num_new_matched_tokens(again, bad)  # type: ignore[arg-type]
        targets = env.fresh(3)
        with pytest.raises(InvalidRequestError, match="num_external_tokens"):  # no lookup first
            manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), bad)  # type: ignore[arg-type]
        assert not manager.has_request(again.request_id)
        assert manager.indexes[0].num_pinned == 0


@pytest.mark.asyncio
async def test_fewer_blocks_than_the_external_tokens_are_refused() -> None:
    env = Env()
    async with env.manager as manager:
        req = env.request(3)
        await store(env, req, 3, release=True)
        again = env.request(3, like=req)
        assert manager.get_num_new_matched_tokens(again, 0) == (3 * BS, True)
        short = env.fresh(2)  # one block short of the three external blocks
        with pytest.raises(InvalidRequestError, match="need 3 blocks"):
            manager.update_state_after_alloc(again, KVCacheBlocks((short,)), 3 * BS)
        assert not manager.has_request(again.request_id)
        assert manager.indexes[0].num_pinned == 0
        targets = [*short, *env.fresh(1)]  # the engine retries with every block: it loads
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 3 * BS)
        manager.build_step(SchedulerOutput())
        await manager.wait_for_loads([again.request_id])
        (finished,) = manager.take_finished()
        assert finished.ok


def test_a_block_size_other_than_the_device_layout_is_refused() -> None:
    env = Env()  # lookups would count two blocks' tokens for each block a tier holds
    with pytest.raises(
        ConfigError, match=f"block_size={2 * BS}, but the device's blocks hold {BS}"
    ):
        OffloadManager(env.pool, env.device, [CpuTier(LAYOUT, 4)], block_size=2 * BS)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [0, -1, 0.5, True])
async def test_report_store_done_refuses_a_worker_count_that_is_not_a_positive_integer(
    workers: object,
) -> None:
    env = Env(world_size=2)
    async with env.manager as manager:
        with pytest.raises(InvalidRequestError, match="workers must be an integer >= 1"):
            manager.report_store_done(1, workers)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_lazy_mode_restarts_its_walk_when_its_cursor_block_returned_at_the_head() -> None:
    """The cursor block, hit, evicted from the prefix cache while held and freed, is
    prepended: resuming from it counted the safe blocks twice and left an unwritten
    block among the next allocations."""
    env = Env(gpu_blocks=14, cpu_blocks=512, mode="lazy", lazy_free_target=3)
    async with env.manager as manager:
        first = manager.indexes[0]
        spare = env.pool.get_new_blocks(11)
        written = env.request(2)
        env.pool.free_blocks(reversed(env.alloc(written, 2).blocks[0]))
        for _ in range(3):
            manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
            await manager.wait_idle()
        cursor = manager._lazy._cursor  # the last block the walk passed
        assert cursor is not None
        req = env.request(10)
        env.compute(req, spare[:10])
        env.pool.touch([cursor])  # a prefix hit on it
        env.pool.evict_blocks([cursor.block_id])  # dropped from the prefix cache while held
        env.pool.free_blocks([cursor])  # freed without a hash: to the head of the queue
        env.pool.free_blocks(reversed(spare[:10]))  # ten unwritten blocks at the tail
        manager.step_computed(manager.build_step(SchedulerOutput()).step_id)
        await manager.wait_idle()
        head = list(env.pool.free_block_queue)[:3]
        assert all(b.block_hash is None or b.block_hash in first for b in head)
        env.pool.get_new_blocks(3)  # up to lazy_free_target allocations lose nothing
        assert all(
            key(req, i) in first or env.pool.get_cached_block(req.block_hashes[i], [0])
            for i in range(10)
        )


@pytest.mark.asyncio
async def test_transfers_cancelled_by_an_interrupt_log_no_failure() -> None:
    """Ctrl-C while a store is planned: its cancellation is expected, not a warning
    (a replay interrupted printed one ``store_failed`` line per transfer)."""
    env = Env(gpu_blocks=32)

    async def interrupted() -> None:
        async with env.manager as manager:
            request = env.request(2)
            blocks = env.alloc(request, 2)
            manager.update_state_after_alloc(request, blocks, 0)
            manager.step_computed(
                manager.build_step(scheduled(new={request.request_id: blocks})).step_id
            )
            raise KeyboardInterrupt

    with capture_logs() as logs, pytest.raises(KeyboardInterrupt):
        await interrupted()
    levels = {log["event"]: log["log_level"] for log in logs}
    assert levels.get("store_cancelled") == "debug"
    assert not [log for log in logs if log["log_level"] in ("warning", "error")]
