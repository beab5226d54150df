"""The offload manager's waits and dispatch never hang, and time out as a whole."""

from __future__ import annotations

import anyio
import pytest

from kvtier import KVCacheBlocks
from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.offload import FinishedLoad, SchedulerOutput
from kvtier.tiers.cpu import CpuTier
from kvtier.transfer import TransferPipeline
from tests.offload_env import BS, DEADLINE, LAYOUT, Env, scheduled
from tests.tier_doubles import GatedStore


async def _stored(env: Env, num_blocks: int = 2):  # type: ignore[no-untyped-def]
    """A request whose blocks are in the CPU tier."""
    req = env.request(num_blocks)
    blocks = env.alloc(req, num_blocks)
    env.manager.update_state_after_alloc(req, blocks, 0)
    env.manager.step_computed(
        env.manager.build_step(scheduled(new={req.request_id: blocks})).step_id
    )
    await env.manager.wait_idle()
    return req


def _stored_blocking(env: Env, num_blocks: int):  # type: ignore[no-untyped-def]
    """``_stored`` for a manager entered with ``with`` (synchronous engines)."""
    req = env.request(num_blocks)
    blocks = env.alloc(req, num_blocks)
    env.manager.update_state_after_alloc(req, blocks, 0)
    plan = env.manager.build_step(scheduled(new={req.request_id: blocks}))
    env.manager.step_computed(plan.step_id)
    assert env.manager.wait_idle_blocking(timeout=DEADLINE)
    return req


@pytest.mark.asyncio
async def test_waiting_for_a_load_that_has_not_started_is_an_error_not_a_hang() -> None:
    env = Env()
    async with env.manager as manager:
        req = await _stored(env)
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        assert manager.load_in_flight(again.request_id)
        with anyio.fail_after(DEADLINE):
            with pytest.raises(InvalidRequestError, match="build_step"):
                await manager.wait_for_loads([again.request_id])
        # Nothing changed: the load starts at the next step and ends as usual.
        manager.build_step(SchedulerOutput())
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[1], again, 1)


def test_a_blocking_wait_for_an_unstarted_load_is_an_error_not_a_hang() -> None:
    env = Env()
    with env.manager as manager:
        req = _stored_blocking(env, 2)
        again = env.request(2, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(2),)), 2 * BS)
        with pytest.raises(InvalidRequestError, match="build_step"):
            manager.wait_for_loads_blocking([again.request_id], timeout=DEADLINE)
        manager.build_step(SchedulerOutput())
        assert manager.wait_for_loads_blocking([again.request_id], timeout=DEADLINE)
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]


@pytest.mark.asyncio
async def test_waiting_for_unknown_or_loadless_requests_returns_at_once() -> None:
    env = Env()
    async with env.manager as manager:
        req = await _stored(env)
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads(["nobody", req.request_id])
            await manager.wait_for_loads([])


def test_a_blocking_timeout_bounds_the_whole_wait_not_each_outcome() -> None:
    """Outcomes of other transfers keep coming; the wait still ends at its timeout."""
    cpu = GatedStore(CpuTier(LAYOUT, 64))
    stores = 40
    env = Env(gpu_blocks=64, tiers=[cpu], pipeline=TransferPipeline(max_batch_blocks=1))
    with env.manager as manager:
        req = _stored_blocking(env, 1)
        cpu.reads_open = False  # the load below cannot end
        again = env.request(1, like=req)
        manager.get_num_new_matched_tokens(again, 0)
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(1),)), BS)
        manager.build_step(SchedulerOutput())
        try:
            cpu.write_delay = 0.05  # stores end one by one, an outcome every 50 ms
            for _ in range(stores):
                other = env.request(1)
                blocks = env.alloc(other, 1)
                manager.update_state_after_alloc(other, blocks, 0)
                plan = manager.build_step(scheduled(new={other.request_id: blocks}))
                manager.step_computed(plan.step_id)
            assert not manager.wait_for_loads_blocking([again.request_id], timeout=0.3)
            # Had every outcome restarted the timeout, all the stores would be done.
            assert manager.stats().tiers["cpu"].stores < stores + 1
        finally:  # let the load end, or leaving the manager would wait for it
            cpu.reads_open = True
            cpu.write_delay = 0.0
        assert manager.wait_for_loads_blocking([again.request_id], timeout=DEADLINE)
        assert manager.wait_idle_blocking(timeout=DEADLINE)
        assert manager.stats().tiers["cpu"].stores == stores + 1


@pytest.mark.asyncio
async def test_planning_before_the_manager_is_entered_is_refused_and_changes_nothing() -> None:
    env = Env()
    manager = env.manager
    req = env.request(2)
    blocks = env.alloc(req, 2)
    manager.update_state_after_alloc(req, blocks, 0)
    with pytest.raises(ClosedError):
        manager.build_step(scheduled(new={req.request_id: blocks}))
    with pytest.raises(ClosedError):
        manager.step_computed(1)
    assert manager.indexes[0].num_reserved == 0
    async with manager:
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        manager.step_computed(plan.step_id)
        with anyio.fail_after(DEADLINE):
            await manager.wait_idle()
        assert manager.stats().tiers["cpu"].stores == 2
    with pytest.raises(ClosedError):
        manager.build_step(SchedulerOutput())
