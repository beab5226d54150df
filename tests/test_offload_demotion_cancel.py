"""A demotion whose copy was posted counts as run, even when its job is cancelled meanwhile.

The copy itself cannot be interrupted (a worker thread's write): the job waits
for it, then reports. A failed copy is a failed transfer of the tier below; a
copy that succeeded is committed there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import torch

from kvtier.tiers.base import BlockKey
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from tests.offload_env import LAYOUT, Env, scheduled
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
