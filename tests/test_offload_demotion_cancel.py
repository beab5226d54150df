"""A demotion whose copy was posted counts as run, even when its job is cancelled meanwhile.

The copy itself cannot be interrupted (a worker thread's write): the job waits
for it, then reports. A failed copy is a failed transfer of the tier below; a
copy that succeeded is committed there. What never ran counts nowhere: a
demotion, and (seen in review: counted as failed transfers on close) a store
or a load that never started before the manager closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import torch

from kvtier import KVCacheBlocks
from kvtier.offload import FinishedLoad
from kvtier.tiers.base import BlockKey
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from tests.offload_env import BS, LAYOUT, Env, scheduled, store
from tests.tier_doubles import FaultInjectingStore


class UninterruptibleWrites(FaultInjectingStore):
    """Writes take a while and run to their end even when cancelled (a worker thread's)."""

    def __init__(self, inner: DiskTier) -> None:
        super().__init__(inner)
        self.slow = False
        self.started = anyio.Event()

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        if not self.slow:
            await super().write_from(slots, keys, data)
            return
        self.started.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)
            await super().write_from(slots, keys, data)


def plan_store(env: Env) -> None:
    req = env.request(2)
    blocks = env.alloc(req, 2)
    env.manager.update_state_after_alloc(req, blocks, 0)
    plan = env.manager.build_step(scheduled(new={req.request_id: blocks}))
    env.manager.step_computed(plan.step_id)


@pytest.mark.asyncio
@pytest.mark.parametrize("copy_fails", [False, True])
async def test_a_demotion_copy_that_ran_when_its_job_was_cancelled_is_settled_by_its_outcome(
    tmp_path: Path, copy_fails: bool
) -> None:
    disk = DiskTier(tmp_path / "disk", LAYOUT, 16 * DiskTier.bytes_per_block(LAYOUT))
    below = UninterruptibleWrites(disk)
    env = Env(tiers=[CpuTier(LAYOUT, 2), below])
    manager = env.manager
    with anyio.CancelScope() as owner:
        async with manager:
            plan_store(env)  # fills the CPU tier
            with anyio.fail_after(10):
                await manager.wait_idle()
            below.slow = True
            if copy_fails:
                below.write_error = OSError(28, "No space left on device")
            plan_store(env)  # evicts both CPU blocks: one demotion of two blocks
            assert manager.indexes[1].num_reserved == 2
            await below.started.wait()
            owner.cancel()  # the engine shuts down while the demotion copies
            await anyio.sleep_forever()
    stats = manager.stats().tiers["disk"]
    assert manager.indexes[1].num_reserved == 0
    held = len(list(manager.indexes[1].blocks()))
    if copy_fails:
        assert (stats.failed_transfers, stats.demotions, held) == (2, 0, 0)
    else:
        assert (stats.failed_transfers, stats.demotions, held) == (0, 2, 2)


@pytest.mark.asyncio
async def test_a_store_that_never_started_is_released_on_close_uncounted() -> None:
    env = Env()
    manager = env.manager
    async with manager:
        req = env.request(2)
        blocks = env.alloc(req, 2)
        manager.update_state_after_alloc(req, blocks, 0)
        plan = manager.build_step(scheduled(new={req.request_id: blocks}))
        assert plan.num_store_blocks == 2  # planned; the step is never computed
    stats = manager.stats().tiers["cpu"]
    assert (stats.stores, stats.failed_transfers) == (0, 0)
    assert manager.indexes[0].num_reserved == 0
    assert [block.ref_cnt for block in blocks.blocks[0]] == [1, 1]  # the engine's own


@pytest.mark.asyncio
async def test_a_load_that_never_started_is_released_on_close_uncounted() -> None:
    env = Env()
    manager = env.manager
    async with manager:
        first = env.request(2)
        await store(env, first, 2, release=True)
        again = env.request(2, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        # no build_step: the load never starts
    stats = manager.stats()
    assert (stats.loads_finished, stats.loads_failed) == (0, 0)
    assert (stats.tiers["cpu"].loads, stats.tiers["cpu"].failed_transfers) == (0, 0)
    assert manager.indexes[0].num_pinned == 0
    assert [block.ref_cnt for block in targets] == [1, 1]  # the engine's own
    ids = tuple(block.block_id for block in targets)
    assert manager.take_finished() == [FinishedLoad(again.request_id, False, ids)]
