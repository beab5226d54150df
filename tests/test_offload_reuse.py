"""A request id reused while the transfers of the request that had it still run.

An engine finishes request ``r``; the manager keeps its state until its
stores or loads end (``request_finished`` returns True). A new request named
``r`` may arrive before then (vLLM engines reuse ids in some setups). Seen in
review: the new request took over the old one's state, so the old one's
deferred cleanup forgot the new request (its later blocks were never stored),
the old load was reported as the new request's, and a new load was refused.
"""

from __future__ import annotations

import anyio
import pytest

from kvtier import KVCacheBlocks, Request
from kvtier.offload import FinishedLoad, SchedulerOutput
from tests.offload_env import BS, DEADLINE, Env, key, scheduled, store


def check_released(env: Env) -> None:
    """Nothing is left held: no device reference, pin or reservation."""
    assert all(block.ref_cnt == 0 for block in env.pool.blocks[1:])
    for index in env.manager.indexes:
        assert index.num_pinned == index.num_reserved == 0
        index.check_invariants()


def finished_while_loading(env: Env, like: Request) -> Request:
    """A request whose load of ``like``'s two blocks started, then it finished (aborted)."""
    manager = env.manager
    old = env.request(2, like=like)
    assert manager.get_num_new_matched_tokens(old, 0) == (2 * BS, True)
    old_targets = env.fresh(2)
    manager.update_state_after_alloc(old, KVCacheBlocks((old_targets,)), 2 * BS)
    assert len(manager.build_step(SchedulerOutput()).loads) == 1  # started, not run yet
    assert manager.request_finished(old) is True  # its load is in flight
    env.pool.free_blocks(old_targets)
    return old


@pytest.mark.parametrize("told", [True, False], ids=["after-alloc", "scheduler-output-only"])
@pytest.mark.asyncio
async def test_the_old_requests_deferred_cleanup_leaves_the_new_ones_stores_alone(
    told: bool,
) -> None:
    env = Env(gpu_blocks=16, cpu_blocks=8)
    async with env.manager as manager:
        old = env.request(2)
        old_blocks = env.alloc(old, 2)
        manager.update_state_after_alloc(old, old_blocks, 0)
        old_plan = manager.build_step(scheduled(new={old.request_id: old_blocks}))
        assert manager.request_finished(old) is True  # its store has not run yet
        env.pool.free_blocks(reversed(old_blocks.blocks[0]))

        new = env.request(3, request_id=old.request_id)  # another prompt, the same id
        assert new.request_id == old.request_id
        assert manager.get_num_new_matched_tokens(new, 0) == (0, False)
        blocks = env.alloc(new, 2)  # a chunked prefill: two blocks now, one later
        if told:  # else the new request is first met in the step's scheduler output
            manager.update_state_after_alloc(new, blocks, 0)
        plan = manager.build_step(scheduled(new={new.request_id: blocks}))
        assert plan.num_store_blocks == 2
        manager.step_computed(plan.step_id)  # the old store (an earlier step) starts too
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()
        assert old_plan.num_store_blocks == 2
        assert manager.has_request(new.request_id)  # the old cleanup did not forget it

        [third] = env.pool.get_new_blocks(1)
        env.compute(new, [third], first=2)
        plan = manager.build_step(scheduled(cached={new.request_id: [third.block_id]}))
        assert plan.num_store_blocks == 1  # still tracked: its next block is stored
        manager.step_computed(plan.step_id)
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()
        assert env.cpu_keys() == {key(old, 0), key(old, 1), *(key(new, p) for p in range(3))}
        assert manager.request_finished(new) is False
        assert not manager.has_request(new.request_id)
        env.pool.free_blocks([third, *reversed(blocks.blocks[0])])
        assert manager.take_finished() == []
        check_released(env)


@pytest.mark.asyncio
async def test_a_new_request_may_load_while_the_old_ones_load_of_that_id_runs() -> None:
    env = Env(gpu_blocks=16, cpu_blocks=8)
    async with env.manager as manager:
        a, b = env.request(2), env.request(2)
        await store(env, a, 2, release=True)
        await store(env, b, 2, release=True)

        old = finished_while_loading(env, a)

        new = env.request(2, like=b, request_id=old.request_id)
        assert manager.get_num_new_matched_tokens(new, 0) == (2 * BS, True)
        targets = env.fresh(2)
        manager.update_state_after_alloc(new, KVCacheBlocks((targets,)), 2 * BS)
        assert manager.load_in_flight(new.request_id)
        plan = manager.build_step(SchedulerOutput())
        assert [spec.device_block_ids for spec in plan.loads] == [
            tuple(t.block_id for t in targets)
        ]
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([new.request_id])
            await manager.wait_idle()
        # Reported once, for the new request: the old load's end is not its.
        assert manager.take_finished() == [FinishedLoad(new.request_id, True)]
        assert env.holds(targets[0], new, 0)
        assert env.holds(targets[1], new, 1)
        assert manager.has_request(new.request_id)
        assert manager.request_finished(new) is False
        env.pool.free_blocks(targets)
        check_released(env)


@pytest.mark.asyncio
async def test_the_old_load_ending_neither_reports_to_nor_forgets_the_new_request() -> None:
    env = Env(gpu_blocks=16, cpu_blocks=8)
    async with env.manager as manager:
        a = env.request(2)
        await store(env, a, 2, release=True)
        old = finished_while_loading(env, a)

        new = env.request(1, request_id=old.request_id)  # nothing to load
        assert manager.get_num_new_matched_tokens(new, 0) == (0, False)
        blocks = env.alloc(new, 1)
        manager.update_state_after_alloc(new, blocks, 0)
        assert not manager.load_in_flight(new.request_id)  # the old load is not its
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()  # the old load ends
        assert manager.take_finished() == []  # and is not reported as the new one's
        assert manager.has_request(new.request_id)
        plan = manager.build_step(scheduled(new={new.request_id: blocks}))
        assert plan.num_store_blocks == 1
        manager.step_computed(plan.step_id)
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()
        assert key(new, 0) in env.cpu_keys()
        assert manager.request_finished(new) is False
        env.pool.free_blocks(blocks.blocks[0])
        check_released(env)


@pytest.mark.asyncio
async def test_a_finished_requests_unread_load_report_goes_when_its_id_is_reused() -> None:
    env = Env(gpu_blocks=16, cpu_blocks=8)
    async with env.manager as manager:
        a = env.request(2)
        await store(env, a, 2, release=True)
        old = finished_while_loading(env, a)
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()  # the old load ended; its report is not taken yet
        assert not manager.has_request(old.request_id)

        new = env.request(2, like=a, request_id=old.request_id)
        assert manager.get_num_new_matched_tokens(new, 0) == (2 * BS, True)
        targets = env.fresh(2)
        manager.update_state_after_alloc(new, KVCacheBlocks((targets,)), 2 * BS)
        # The report left would be taken for the new request's, whose load has not run.
        assert manager.take_finished() == []
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([new.request_id])
        assert manager.take_finished() == [FinishedLoad(new.request_id, True)]
        assert env.holds(targets[1], new, 1)
        assert manager.request_finished(new) is False
        env.pool.free_blocks(targets)
        check_released(env)
