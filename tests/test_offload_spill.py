"""Stores the first lower tier has no room for spill into the tiers below it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from kvtier import KVCacheBlocks, Request
from kvtier.errors import ConfigError, TierIOError
from kvtier.offload import FinishedLoad, SchedulerOutput
from kvtier.policies.base import EVICTION_POLICIES
from kvtier.policies.hints import BlockHint
from kvtier.policies.prefix_slru import PrefixSLRUPolicy
from kvtier.tiers.base import BlockKey
from kvtier.tiers.cpu import CpuTier
from tests.offload_env import (
    _HASHER,
    BS,
    DEADLINE,
    LAYOUT,
    Env,
    disk_tier,
    key,
    plan_store,
    recovered,
    store,
)
from tests.tier_doubles import FaultInjectingStore


def disk_keys(env: Env, level: int = 1) -> set[bytes]:
    return {k for _, k in env.manager.indexes[level].blocks()}


@pytest.mark.asyncio
@pytest.mark.parametrize("policies", ["lru", ["lru", "prefix_slru"]])
async def test_blocks_the_first_tier_has_no_room_for_go_to_disk_and_load_back(
    tmp_path: Path, policies: str | list[str]
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", eviction_policy=policies)
    async with env.manager as manager:
        a = env.request(4)
        blocks, plan = plan_store(env, a, 4)
        ids = [b.block_id for b in blocks.blocks[0]]
        assert (
            [(s.tier, s.device_block_ids) for s in plan.stores]
            == [
                ("cpu", tuple(ids[:2])),  # the chain's head stays in the fast tier
                ("disk", tuple(ids[2:])),
            ]
        )
        assert plan.stores[0].event_id != plan.stores[1].event_id
        assert plan.num_store_blocks == 4
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(a, 0), key(a, 1)}
        assert disk_keys(env) == {key(a, 2), key(a, 3)}
        stats = manager.stats().tiers
        assert (stats["cpu"].stores, stats["cpu"].dropped_stores) == (2, 0)
        assert (stats["disk"].stores, stats["disk"].spilled_stores) == (2, 2)
        assert stats["disk"].bytes_stored == 2 * LAYOUT.block_bytes
        assert stats["disk"].demotions == 0
        manager.request_finished(a)
        env.pool.free_blocks(reversed(blocks.blocks[0]))
        env.pool.evict_blocks(ids)  # gone from the device: only the lower tiers have them

        again = env.request(4, like=a)
        assert manager.get_num_new_matched_tokens(again, 0) == (4 * BS, True)
        targets = env.fresh(4)
        manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 4 * BS)
        plan = manager.build_step(SchedulerOutput())
        assert [name for name, _ in plan.loads[0].sources] == ["cpu", "cpu", "disk", "disk"]
        await manager.wait_for_loads([again.request_id])
        assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
        assert all(env.holds(block, again, i) for i, block in enumerate(targets))


class HintRecorder(PrefixSLRUPolicy):
    """A prefix-aware policy that records the hints its tier's stores give it."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.hints: list[tuple[BlockKey, BlockHint | None]] = []

    def insert_hinted(self, key: BlockKey, hint: BlockHint | None) -> None:
        self.hints.append((key, hint))
        super().insert_hinted(key, hint)


@pytest.mark.asyncio
async def test_a_spilled_block_brings_its_chain_place_to_the_tier_below(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the disk's policy reads hints: they are made for the blocks that spill there."""
    monkeypatch.setitem(EVICTION_POLICIES, "recording", HintRecorder)
    env = Env(
        gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", eviction_policy=["lru", "recording"]
    )
    async with env.manager as manager:
        a = env.request(4)
        await store(env, a, 4)
        policy = manager.indexes[1].policy
        assert isinstance(policy, HintRecorder)
        got = {key: (hint.depth, hint.length, hint.parent) for key, hint in policy.hints if hint}
        assert got == {key(a, 2): (2, 4, key(a, 1)), key(a, 3): (3, 4, key(a, 2))}


@pytest.mark.asyncio
async def test_without_spilling_those_blocks_are_dropped(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", spill_stores=False)
    async with env.manager as manager:
        a = env.request(4)
        _blocks, plan = plan_store(env, a, 4)
        assert [s.tier for s in plan.stores] == ["cpu"]
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert disk_keys(env) == set()
        stats = manager.stats().tiers
        assert (stats["cpu"].stores, stats["cpu"].dropped_stores) == (2, 2)
        assert stats["disk"].stores == 0


@pytest.mark.asyncio
async def test_with_no_room_below_either_the_rest_is_dropped(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", disk_blocks=3)
    async with env.manager as manager:
        a = env.request(6)
        await store(env, a, 6)
        stats = manager.stats().tiers
        assert (stats["cpu"].stores, stats["disk"].spilled_stores) == (2, 3)
        assert stats["cpu"].dropped_stores == 1
        assert disk_keys(env) == {key(a, 2), key(a, 3), key(a, 4)}  # in chain order


@pytest.mark.asyncio
async def test_blocks_a_lower_tier_holds_or_is_writing_are_neither_spilled_nor_dropped(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        a = env.request(4)
        blocks = await store(env, a, 4)  # a0 a1 in CPU, a2 a3 spilled to disk
        b = env.request(2)
        _b_blocks, held = plan_store(env, b, 2)
        # Not computed yet: b's CPU slots stay reserved (no room left there), and
        # a0 a1, evicted for them, are being demoted to disk (reserved there).
        assert [s.tier for s in held.stores] == ["cpu"]
        assert env.cpu_keys() == set()
        hit = env.request(4, like=a)
        env.pool.touch(blocks.blocks[0])
        _, plan = plan_store(env, hit, blocks)
        assert plan.stores == ()
        assert manager.stats().tiers["cpu"].dropped_stores == 0
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert disk_keys(env) == {key(a, i) for i in range(4)}
        assert manager.stats().tiers["disk"].spilled_stores == 2  # a2 a3 only, once


@pytest.mark.asyncio
async def test_a_spill_that_evicts_demotes_one_tier_further_down(tmp_path: Path) -> None:
    cpu, cpu2 = CpuTier(LAYOUT, 2, name="cpu"), CpuTier(LAYOUT, 4, name="cpu2")
    env = Env(gpu_blocks=32, tiers=[cpu, cpu2, disk_tier(tmp_path / "disk")])
    async with env.manager as manager:
        a, b, c, d = (env.request(2) for _ in range(4))
        await store(env, a, 2)
        await store(env, b, 2)  # a demoted to cpu2
        _c_blocks, first = plan_store(env, c, 2)
        # c holds the CPU tier (reserved, not computed); b is being demoted to cpu2.
        _d_blocks, plan = plan_store(env, d, 2)
        assert [s.tier for s in plan.stores] == ["cpu2"]  # evicting a, demoted to disk
        manager.step_computed(plan.step_id)
        assert plan.step_id > first.step_id
        await manager.wait_idle()
        assert env.cpu_keys() == {key(c, 0), key(c, 1)}
        assert disk_keys(env) == {key(b, 0), key(b, 1), key(d, 0), key(d, 1)}
        assert disk_keys(env, 2) == {key(a, 0), key(a, 1)}
        stats = manager.stats().tiers
        assert (stats["cpu2"].spilled_stores, stats["cpu2"].demotions) == (2, 4)
        assert (stats["disk"].demotions, stats["cpu2"].evictions) == (2, 2)
        for request in (a, d):  # both load back, byte for byte
            again = env.request(2, like=request)
            assert manager.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
            targets = env.fresh(2)
            manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), 2 * BS)
            manager.build_step(SchedulerOutput())
            await manager.wait_for_loads([again.request_id])
            assert manager.take_finished() == [FinishedLoad(again.request_id, True)]
            assert all(env.holds(block, again, i) for i, block in enumerate(targets))


@pytest.mark.asyncio
async def test_a_failed_spill_is_aborted_and_discarded_and_the_rest_is_kept(
    tmp_path: Path,
) -> None:
    disk = FaultInjectingStore(disk_tier(tmp_path / "disk"))
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 2), disk])
    async with env.manager as manager:
        a = env.request(4)
        blocks, plan = plan_store(env, a, 4)
        assert manager.request_finished(a) is True  # cleanup waits for both stores
        env.pool.free_blocks(reversed(blocks.blocks[0]))
        disk.write_error = TierIOError("injected", tier="disk")
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(a, 0), key(a, 1)}
        assert disk_keys(env) == set()
        assert manager.indexes[1].num_reserved == 0
        assert disk.discards == 1  # its slots, which the failed batch may have written
        assert list((tmp_path / "disk").glob("*.kvb")) == []
        stats = manager.stats().tiers
        assert (stats["disk"].failed_transfers, stats["disk"].stores) == (2, 0)
        assert stats["cpu"].stores == 2
        assert all(b.ref_cnt == 0 for b in blocks.blocks[0])
        assert not manager.has_request(a.request_id)
        assert manager.in_flight_store_blocks == frozenset()


def test_tensor_parallelism_needs_one_lower_tier(tmp_path: Path) -> None:
    """The manager's own moves between tiers (demotions, staging, the flush) are not in
    the plan other workers follow: their tiers would drift and serve other blocks."""
    with pytest.raises(ConfigError, match="world_size=2 needs one lower tier, not 2"):
        Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", world_size=2)
    assert Env(world_size=2).manager.world_size == 2  # one CPU tier


@pytest.mark.asyncio
async def test_selective_mode_spills_too(tmp_path: Path) -> None:
    env = Env(
        gpu_blocks=32,
        cpu_blocks=1,
        disk=tmp_path / "disk",
        mode="selective",
        selective_min_hits=1,
    )
    async with env.manager as manager:
        a = env.request(3)
        blocks = env.alloc(a, 3)
        reader = env.request(3, like=a)
        manager.get_num_new_matched_tokens(reader, 3 * BS)  # a device hit of 3 blocks
        manager.update_state_after_alloc(reader, blocks, 0)  # admitted: its hit counts
        plan = manager.build_step(SchedulerOutput())
        assert [(s.tier, len(s.slots)) for s in plan.stores] == [("cpu", 1), ("disk", 2)]
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert env.cpu_keys() == {key(a, 0)}
        assert disk_keys(env) == {key(a, 1), key(a, 2)}
        assert manager.stats().tiers["disk"].spilled_stores == 2


def longer(
    env: Env, request: Request, blocks: KVCacheBlocks, more: int
) -> tuple[Request, KVCacheBlocks]:
    """A request of ``request``'s full blocks and ``more`` new ones after them: its blocks
    (``blocks``, touched, then new ones, computed)."""
    full = len(blocks.blocks[0])
    tokens = list(request.all_token_ids[: full * BS]) + list(
        range(9_000_000, 9_000_000 + more * BS + 3)
    )
    longer = Request(f"{request.request_id}+{more}", tokens, _HASHER)
    env.pool.touch(blocks.blocks[0])
    new = env.pool.get_new_blocks(more)
    env.compute(longer, new, first=full)
    return longer, KVCacheBlocks((list(blocks.blocks[0]) + new,))


@pytest.mark.asyncio
async def test_a_spill_never_evicts_a_block_of_the_step_its_tier_keeps(tmp_path: Path) -> None:
    """The disk holds a0-a2; a longer prompt's a3 must not take a2's slot: the chain
    would lose a2 and a3 would sit behind the hole, where no lookup reaches it."""
    env = Env(gpu_blocks=32, cpu_blocks=1, disk=tmp_path / "disk", disk_blocks=3)
    async with env.manager as manager:
        a = env.request(3)
        blocks = await store(env, a, 3)  # a0 in CPU, a1 a2 spilled to disk
        b = env.request(1)
        b_blocks, _ = plan_store(env, b, 1)  # holds the CPU tier
        assert all(manager.indexes[1].holds(key(a, i)) for i in range(3))  # a0: demoted
        more, more_blocks = longer(env, a, blocks, 1)
        _, plan = plan_store(env, more, more_blocks)
        assert plan.stores == ()  # no room for a3 that is not a2's, a1's or a0's
        assert manager.stats().tiers["cpu"].dropped_stores == 1
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        assert disk_keys(env) == {key(a, i) for i in range(3)}
        assert manager.stats().tiers["disk"].evictions == 0
        manager.request_finished(b)
        env.pool.free_blocks(b_blocks.blocks[0])
        lookup = Request("lookup", list(more.all_token_ids), _HASHER)
        assert manager.get_num_new_matched_tokens(lookup, 0)[0] == 3 * BS


@pytest.mark.asyncio
@pytest.mark.parametrize("spill", [True, False])
async def test_a_demotion_never_evicts_a_block_of_the_step_the_tier_below_keeps(
    tmp_path: Path, spill: bool
) -> None:
    """The CPU tier takes a0 by evicting v, demoted to disk: the disk must not give it a1's
    slot (its least recent block), which would leave a2, kept there, behind a hole."""
    env = Env(
        gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", disk_blocks=3, spill_stores=spill
    )
    async with env.manager as manager:
        cpu, disk = manager.indexes
        a = env.request(3)
        blocks = env.alloc(a, 3)
        # The state set with the indexes' own calls, as stores leave it: the CPU tier
        # holds v and writes r; the disk holds a1 (least recent) and a2, and writes x.
        v, r, x = b"v" * 40, b"r" * 40, b"x" * 40
        for index, done, writing in ((cpu, [v], r), (disk, [key(a, 1), key(a, 2)], x)):
            for block in done:
                index.reserve([block])
                index.commit([block])
            index.reserve([writing])
        _, plan = plan_store(env, a, blocks)
        assert [(s.tier, len(s.slots)) for s in plan.stores] == [("cpu", 1)]  # a0
        assert all(disk.contains(key(a, i)) for i in (1, 2))
        assert manager.stats().tiers["cpu"].evictions == 1  # v, lost: no room below
        # Spilling or not, a1 and a2 are kept on disk: not dropped.
        assert manager.stats().tiers["cpu"].dropped_stores == 0
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        cpu.abort([r])
        disk.abort([x])
        lookup = Request("lookup", list(a.all_token_ids), _HASHER)
        assert manager.get_num_new_matched_tokens(lookup, 0)[0] == 3 * BS


@pytest.mark.asyncio
async def test_a_block_removed_below_while_pinned_is_not_kept_there(tmp_path: Path) -> None:
    """A load found a1 bad on disk while another load held it: its slot waits for the last
    unpin, but the block is gone. It is not stored there (nor kept): it counts as dropped."""
    env = Env(gpu_blocks=32, cpu_blocks=1, disk=tmp_path / "disk", disk_blocks=8)
    async with env.manager as manager:
        cpu, disk = manager.indexes
        a = env.request(3)
        blocks = env.alloc(a, 3)
        r = b"r" * 40
        cpu.reserve([r])  # the CPU tier is being written: no room
        disk.reserve([key(a, 1)])
        disk.commit([key(a, 1)])
        disk.pin([key(a, 1)])
        disk.remove([key(a, 1)])  # removed while pinned: awaiting its last unpin
        _, plan = plan_store(env, a, blocks)
        assert [(s.tier, len(s.slots)) for s in plan.stores] == [("disk", 2)]  # a0, a2
        assert manager.stats().tiers["cpu"].dropped_stores == 1  # a1: counted, not lost silently
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
        disk.unpin([key(a, 1)])
        cpu.abort([r])
        assert disk_keys(env) == {key(a, 0), key(a, 2)}


@pytest.mark.asyncio
async def test_the_first_tier_never_evicts_a_block_of_the_step_it_keeps() -> None:
    """Without a tier below, an eviction loses the block: a0 a1 must not give their slots
    to c2 c3, which would sit behind the hole."""
    env = Env(gpu_blocks=32, cpu_blocks=2)
    async with env.manager as manager:
        a = env.request(2)
        blocks = await store(env, a, 2)
        more, more_blocks = longer(env, a, blocks, 2)
        _, plan = plan_store(env, more, more_blocks)
        assert plan.stores == ()
        assert manager.stats().tiers["cpu"].dropped_stores == 2
        assert env.cpu_keys() == {key(a, 0), key(a, 1)}
        assert manager.indexes[0].num_pinned == 0  # kept only while reserving
        lookup = Request("lookup", list(more.all_token_ids), _HASHER)
        assert manager.get_num_new_matched_tokens(lookup, 0)[0] == 2 * BS


@pytest.mark.asyncio
async def test_spilling_follows_the_prefetch_policy_unless_set(tmp_path: Path) -> None:
    """best_effort never loads from below the first tier: blocks spilled there would
    only be written. Unless spill_stores says otherwise, they are dropped then."""
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", prefetch="best_effort")
    assert env.manager.spill_stores is None
    assert env.manager.spills is False
    async with env.manager as manager:
        a = env.request(4)
        _blocks, plan = plan_store(env, a, 4)
        assert [s.tier for s in plan.stores] == ["cpu"]
        manager.prefetch = "wait_complete"  # an engine may switch between lookups
        assert manager.spills is True
        b = env.request(4)
        _b_blocks, plan = plan_store(env, b, 4)
        assert [s.tier for s in plan.stores] == ["disk"]  # the CPU tier is all a's
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
    forced = Env(cpu_blocks=2, disk=tmp_path / "d2", prefetch="best_effort", spill_stores=True)
    assert forced.manager.spills is True
    assert Env(cpu_blocks=2, disk=tmp_path / "d3", spill_stores=False).manager.spills is False
    assert Env(spill_stores=True).manager.spills is False  # no tier below the first
    lazy = Env(mode="lazy", disk=tmp_path / "d4", lazy_free_target=4)
    assert lazy.manager.spills is False  # lazy mode never spills
    with pytest.raises(ConfigError, match="does not apply to lazy mode"):  # as the config says
        Env(mode="lazy", disk=tmp_path / "d5", lazy_free_target=4, spill_stores=True)


@pytest.mark.asyncio
async def test_a_store_other_workers_never_reported_leaves_no_file_behind(
    tmp_path: Path,
) -> None:
    """Closing aborts it; a file its local copy wrote would come back on a warm restart."""
    env = Env(gpu_blocks=32, tiers=[disk_tier(tmp_path / "disk")], world_size=2)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a = env.request(2)
            _blocks, plan = plan_store(env, a, 2)
            manager.step_computed(plan.step_id)
            await manager.wait_idle()
            assert len(list((tmp_path / "disk").glob("*.kvb"))) == 2  # copied here
        assert manager.stats().tiers["disk"].failed_transfers == 2
    assert await recovered(tmp_path / "disk") == {}
    assert list((tmp_path / "disk").glob("*.kvb")) == []


def test_spill_stores_must_be_a_bool_or_none() -> None:
    with pytest.raises(ConfigError, match="spill_stores must be true or false, got 'yes'"):
        Env(spill_stores="yes")
