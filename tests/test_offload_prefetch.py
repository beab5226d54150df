"""The manager's prefetch policy: how much of a lower-tier hit a lookup loads.

Real CPU and disk tiers; the staging costs the timeout policy weighs are
learned from the disk reads of finished loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from kvtier import KVCacheBlocks, Request
from kvtier.errors import ConfigError, InvalidRequestError, UnknownNameError
from kvtier.offload import FinishedLoad, SchedulerOutput
from kvtier.policies.prefetch import BestEffort, StagingCostModel, Timeout, WaitComplete
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from tests.offload_env import BS, DEADLINE, LAYOUT, Env, key, store
from tests.tier_doubles import FaultInjectingStore


async def half_on_disk(env: Env) -> Request:
    """A request of four blocks whose first two stay in the CPU tier, the last two on disk.

    Four CPU slots: storing two more blocks evicts the tail of the first
    request (the index keeps a chain's head) down to disk.
    """
    first = env.request(4)
    await store(env, first, 4, release=True)
    await store(env, env.request(2), 2, release=True)
    return first


async def load(env: Env, like: Request, tokens: int) -> tuple[Request, list[object]]:
    """Look ``like`` up again, allocate ``tokens``' blocks and load them; the request
    and its targets."""
    again = env.request(len(like.block_hashes), like=like)
    found, _ = env.manager.get_num_new_matched_tokens(again, 0)
    assert found == tokens
    targets = env.fresh(tokens // BS)
    env.manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), tokens)
    env.manager.build_step(SchedulerOutput())
    with anyio.fail_after(DEADLINE):
        await env.manager.wait_for_loads([again.request_id])
    return again, list(targets)


def disk_env(tmp_path: Path, **options: object) -> Env:
    return Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk", **options)


@pytest.mark.asyncio
async def test_best_effort_loads_the_first_tiers_prefix_and_leaves_the_disk_hit_to_compute(
    tmp_path: Path,
) -> None:
    env = disk_env(tmp_path, prefetch="best_effort")
    assert env.manager.prefetch == BestEffort()
    async with env.manager as manager:
        first = await half_on_disk(env)
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        info = manager.hit_info(again.request_id)
        assert info is not None
        assert info.levels == (0, 0, 1, 1)  # found: two in CPU, two on disk
        assert (info.loaded_blocks, info.declined_blocks) == (2, 2)
        assert info.tokens_to_compute == 2 * BS + 3  # the declined blocks and the tail
        targets = env.fresh(2)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
        plan = manager.build_step(SchedulerOutput())
        assert [name for name, _ in plan.loads[0].sources] == ["cpu", "cpu"]
        with anyio.fail_after(DEADLINE):
            await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert env.holds(targets[0], again, 0)
        assert env.holds(targets[1], again, 1)
        stats = manager.stats()
        assert (stats.tiers["disk"].hits, stats.tiers["disk"].declined) == (2, 2)
        assert stats.tiers["disk"].loads == 0
        assert stats.tiers["cpu"].declined == 0
        assert stats.tokens_to_compute == info.tokens_to_compute


@pytest.mark.asyncio
async def test_a_hit_held_only_on_disk_is_no_load_at_all_under_best_effort(
    tmp_path: Path,
) -> None:
    env = disk_env(tmp_path, prefetch="best_effort")
    async with env.manager as manager:
        first = await half_on_disk(env)
        await store(env, env.request(2), 2, release=True)  # the first's head goes down too
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (0, False)
        info = manager.hit_info(again.request_id)
        assert info is not None
        assert info.levels == (1, 1, 1, 1)
        assert info.declined_blocks == 4
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(5),)), 0)
        assert manager.stats().tiers["disk"].declined == 4
        assert manager.build_step(SchedulerOutput()).loads == ()


@pytest.mark.asyncio
async def test_a_declined_disk_hit_once_recomputed_is_copied_into_the_cpu_tier(
    tmp_path: Path,
) -> None:
    """By design (docs/offload.md, Write modes): a store skips what the first tier holds
    or is writing, not what only a slower tier holds. The first tier is where
    ``best_effort`` loads from: the recomputed blocks are hits next time. Their disk
    copies stay, and evicting them from the CPU tier writes nothing to disk again."""
    env = disk_env(tmp_path, prefetch="best_effort")
    async with env.manager as manager:
        cpu, disk = manager.indexes
        first = await half_on_disk(env)
        await store(env, env.request(2), 2, release=True)  # the first's head goes down too
        assert not any(key(first, i) in cpu for i in range(4))
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (0, False)  # all declined
        await store(env, again, 4, release=True)  # recomputed, stored by eager mode
        assert all(key(first, i) in cpu and key(first, i) in disk for i in range(4))
        assert manager.get_num_new_matched_tokens(env.request(4, like=first), 0) == (
            4 * BS,
            True,
        )
        demoted = manager.stats().tiers["disk"].demotions
        await store(env, env.request(4), 4, release=True)  # evicts them from the CPU tier
        assert not any(key(first, i) in cpu for i in range(4))
        assert all(key(first, i) in disk for i in range(4))
        assert manager.stats().tiers["disk"].demotions == demoted


@pytest.mark.asyncio
async def test_the_default_policy_loads_every_hit_however_deep(tmp_path: Path) -> None:
    env = disk_env(tmp_path)
    assert env.manager.prefetch == WaitComplete()
    async with env.manager as manager:
        first = await half_on_disk(env)
        again, targets = await load(env, first, 4 * BS)
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert all(env.holds(block, again, i) for i, block in enumerate(targets))  # type: ignore[arg-type]
        stats = manager.stats().tiers
        assert (stats["cpu"].loads, stats["disk"].loads) == (4, 2)  # staged up through the CPU
        assert stats["disk"].declined == 0


@pytest.mark.asyncio
async def test_the_timeout_policy_learns_the_disk_cost_from_finished_loads(
    tmp_path: Path,
) -> None:
    """The first staged load is free (nothing measured yet); once its disk read is
    measured, a zero budget declines every disk block, and a large one loads them."""
    env = disk_env(
        tmp_path,
        prefetch=Timeout(timeout=0.0, timeout_per_1k_tokens=0.0),
        staging_costs=StagingCostModel(half_life=math.inf),
    )
    async with env.manager as manager:
        assert manager.staging_costs.seconds_per_block(1) == 0.0
        first = await half_on_disk(env)
        before = manager.stats().tiers["disk"]
        await load(env, first, 4 * BS)
        learned = manager.staging_costs.seconds_per_block(1)
        assert learned > 0.0
        after = manager.stats().tiers["disk"]
        # The CPU tier was full: making room for the two staged blocks demoted
        # two others to disk first, and the request waited for that too.
        assert after.demotions == before.demotions + 2
        demoted = after.store_seconds - before.store_seconds
        assert demoted > 0.0
        assert learned == pytest.approx((after.load_seconds + demoted) / 2)

        second = await half_on_disk(env)
        again = env.request(4, like=second)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        assert manager.hit_info(again.request_id).declined_blocks == 2  # type: ignore[union-attr]
        manager.prefetch = Timeout(timeout=1000.0)  # an engine may swap the policy between steps
        assert manager.get_num_new_matched_tokens(again, 0) == (4 * BS, True)


@pytest.mark.asyncio
async def test_a_failed_disk_read_teaches_the_cost_model_nothing(tmp_path: Path) -> None:
    disk = FaultInjectingStore(
        DiskTier(tmp_path / "disk", LAYOUT, 16 * DiskTier.bytes_per_block(LAYOUT))
    )
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 4), disk])  # type: ignore[list-item]
    async with env.manager as manager:
        first = await half_on_disk(env)
        disk.read_error = OSError(5, "injected EIO")
        again, _ = await load(env, first, 4 * BS)
        [finished] = manager.take_finished()
        assert finished.request_id == again.request_id
        assert not finished.ok
        assert manager.staging_costs.seconds_per_block(1) == 0.0  # still the prior


class _FirstBlockOnly:
    """A plug-in policy (not registered): loads at most one block."""

    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        return min(1, len(levels))


class _Overreaching:
    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        return len(levels) + 1


@pytest.mark.asyncio
async def test_a_policy_object_is_used_as_given(tmp_path: Path) -> None:
    env = disk_env(tmp_path, prefetch=_FirstBlockOnly())
    async with env.manager as manager:
        first = await half_on_disk(env)
        again, targets = await load(env, first, BS)
        assert env.holds(targets[0], again, 0)  # type: ignore[arg-type]
        assert manager.stats().tiers["cpu"].declined == 1
        assert manager.stats().tiers["disk"].declined == 2


@pytest.mark.asyncio
async def test_a_policy_answering_outside_the_hit_is_a_config_error(tmp_path: Path) -> None:
    env = disk_env(tmp_path, prefetch=_Overreaching())
    async with env.manager as manager:
        first = await half_on_disk(env)
        with pytest.raises(ConfigError, match=r"integer in \[0, 4\] for 4 hit blocks, got 5"):
            manager.get_num_new_matched_tokens(env.request(4, like=first), 0)
        # a lookup with nothing found never asks the policy
        assert manager.get_num_new_matched_tokens(env.request(2), 0) == (0, False)


class _NotCallable:
    loadable = 3


@pytest.mark.parametrize("bad", [42, BestEffort, _NotCallable()])
def test_bad_prefetch_arguments_are_typed_errors(bad: object, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="eventually"):
        disk_env(tmp_path, prefetch="eventually")
    with pytest.raises(ConfigError, match="prefetch must be a policy name or a PrefetchPolicy"):
        disk_env(tmp_path, prefetch=bad)
    manager = disk_env(tmp_path).manager
    with pytest.raises(ConfigError, match="prefetch must be"):
        manager.prefetch = bad  # type: ignore[assignment]
    assert manager.prefetch == WaitComplete()  # unchanged
    with pytest.raises(ConfigError, match="staging_costs must be a StagingCostModel"):
        disk_env(tmp_path, staging_costs=0.01)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_disk_env(tmp_path: Path) -> tuple[Env, _FakeClock, StagingCostModel]:
    """A disk stack under a 1 s timeout budget whose cost model (weight 1, half-life
    10 s) runs on a fake clock."""
    clock = _FakeClock()
    costs = StagingCostModel(weight=1.0, half_life=10.0, clock=clock)
    env = disk_env(
        tmp_path, prefetch=Timeout(timeout=1.0, timeout_per_1k_tokens=0.0), staging_costs=costs
    )
    return env, clock, costs


@pytest.mark.asyncio
async def test_a_tier_declined_after_one_slow_read_is_measured_again_once_it_relaxes(
    tmp_path: Path,
) -> None:
    env, clock, costs = timed_disk_env(tmp_path)
    async with env.manager as manager:
        first = await half_on_disk(env)
        costs.observe(1, 1, 8.0)  # one stalled read: 8 s a block, far over the 1 s budget
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        clock.now += 40.0  # four half-lives: 0.5 s a block relaxed, 8 s as measured
        # One exploratory disk block, not the whole hit (8 s a block, as last measured).
        again, _ = await load(env, first, 3 * BS)
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert manager.stats().tiers["disk"].loads == 1
        assert costs.measured(1) < 1.0  # measured anew: a healthy disk
        again, _ = await load(env, first, 4 * BS)  # the whole hit fits again
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]


class _NumpyCount:
    def loadable(self, levels: Sequence[int], num_tokens: int, costs: StagingCostModel) -> int:
        return np.int64(len(levels))  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_an_integer_of_another_type_is_taken_as_the_count(tmp_path: Path) -> None:
    env = disk_env(tmp_path, prefetch=_NumpyCount())
    async with env.manager as manager:
        first = await half_on_disk(env)
        found = manager.get_num_new_matched_tokens(env.request(4, like=first), 0)
        assert found == (4 * BS, True)
        assert type(found[0]) is int


@pytest.mark.asyncio
async def test_allocating_more_external_tokens_than_answered_is_refused(tmp_path: Path) -> None:
    env = disk_env(tmp_path, prefetch="best_effort")
    async with env.manager as manager:
        first = await half_on_disk(env)
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
        targets = KVCacheBlocks((env.fresh(4),))
        with pytest.raises(InvalidRequestError, match="more than the 32 its last lookup answered"):
            manager.update_state_after_alloc(again, targets, 4 * BS)
        assert manager.stats().lookups == 0  # refused: not counted, nothing planned
        assert manager.indexes[1].num_pinned == 0
        manager.update_state_after_alloc(again, targets, 2 * BS)  # the answer is accepted
        assert manager.stats().lookups == 1


@pytest.mark.asyncio
async def test_allocating_fewer_external_tokens_leaves_the_rest_to_compute(
    tmp_path: Path,
) -> None:
    env = disk_env(tmp_path)
    async with env.manager as manager:
        first = await half_on_disk(env)
        again = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(again, 0) == (4 * BS, True)
        manager.update_state_after_alloc(again, KVCacheBlocks((env.fresh(5),)), 1 * BS)
        assert manager.stats().tokens_to_compute == 3 * BS + 3


@pytest.mark.asyncio
async def test_every_lookup_that_finds_a_tier_stale_explores_it_by_one_block(
    tmp_path: Path,
) -> None:
    """No lookup leaves state behind: an engine retrying a waiting request gets the same
    answer, and a request that is dropped blocks no other."""
    env, clock, costs = timed_disk_env(tmp_path)
    async with env.manager as manager:
        first = await half_on_disk(env)
        costs.observe(1, 1, 8.0)  # 8 s a block as last measured
        clock.now += 40.0  # relaxed to 0.5 s and stale: one exploratory disk block
        waiting = env.request(4, like=first)
        assert manager.get_num_new_matched_tokens(waiting, 0) == (3 * BS, True)
        assert manager.get_num_new_matched_tokens(waiting, 0) == (3 * BS, True)  # next step
        manager.request_finished(waiting)  # dropped before it was allocated
        again, _ = await load(env, first, 3 * BS)
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert costs.measured(1) < 1.0  # the exploration measured a healthy disk
