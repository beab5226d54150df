"""Lazy write-back keeps the eviction end safe against its own reservations.

Seen in review: the walk counted a block safe, then the same step's reservation
evicted that block's first-tier copy, and the walk recorded the tier's drop
count as seen: the next allocations took the block with its KV on no tier. And
with the first tier full, the walk took the same unwritten blocks every step,
counted them as dropped again and put them back at the tail.
"""

from __future__ import annotations

import pytest

from kvtier.block import KVCacheBlock
from kvtier.offload import OffloadManager, SchedulerOutput
from tests.offload_env import Env, key


async def step(manager: OffloadManager) -> int:
    """One step with nothing scheduled, computed at once; the blocks it stored."""
    plan = manager.build_step(SchedulerOutput())
    manager.step_computed(plan.step_id)
    await manager.wait_idle()
    return plan.num_store_blocks


def unwritten_at_eviction_end(env: Env) -> list[KVCacheBlock]:
    """The hashed blocks the first tier neither holds nor is writing, among the free
    blocks up to the ``lazy_free_target``-th safe one (what the next allocations take)."""
    first = env.manager.indexes[0]
    safe, unwritten = 0, []
    for block in env.pool.free_block_queue:
        if safe >= env.manager.lazy_free_target:
            break
        if block.block_hash is None or first.contains(block.block_hash):
            safe += 1
        elif not first.holds(block.block_hash):
            unwritten.append(block)
    return unwritten


@pytest.mark.asyncio
async def test_a_lazy_step_rewrites_what_its_own_reservation_evicted_before_allocations() -> None:
    """C's store evicts A's copies while A's device blocks wait at the eviction end:
    the same step writes A again (evicting B, which the device no longer holds)."""
    env = Env(gpu_blocks=8, cpu_blocks=4, mode="lazy", lazy_free_target=2)
    async with env.manager as manager:
        a, b, c = (env.request(2, extra=0) for _ in range(3))
        blocks = {}
        for request in (a, b, c):
            blocks[request.request_id] = env.pool.get_new_blocks(2)
            env.compute(request, blocks[request.request_id])
        for request in (a, b):
            env.pool.free_blocks(reversed(blocks[request.request_id]))
            assert await step(manager) == 2
        env.pool.evict_blocks(block.block_id for block in blocks[b.request_id])  # B: CPU only
        env.pool.free_blocks(reversed(blocks[c.request_id]))
        assert await step(manager) == 4  # C, then A again
        assert unwritten_at_eviction_end(env) == []
        env.pool.get_new_blocks(2)  # up to lazy_free_target allocations lose nothing
        assert all(key(a, i) in manager.indexes[0] for i in range(2))
        stats = manager.stats().tiers["cpu"]
        assert (stats.evictions, stats.dropped_stores) == (4, 0)


@pytest.mark.asyncio
async def test_blocks_left_unwritten_for_want_of_room_at_the_eviction_end_are_counted() -> None:
    """A first tier too small for the device's free blocks cannot keep the eviction end
    safe; the blocks left unwritten there are counted as dropped stores, not lost silently."""
    env = Env(gpu_blocks=8, cpu_blocks=4, mode="lazy", lazy_free_target=2)
    async with env.manager as manager:
        for _ in range(3):  # two full blocks and a partial one each
            request = env.request(2, extra=3)
            blocks = env.pool.get_new_blocks(3)
            env.compute(request, blocks)
            env.pool.free_blocks(reversed(blocks))
            await step(manager)
            unwritten = unwritten_at_eviction_end(env)
            assert manager.stats().tiers["cpu"].dropped_stores >= len(unwritten)
        assert manager.stats().tiers["cpu"].dropped_stores > 0


@pytest.mark.asyncio
async def test_the_eviction_end_stays_safe_or_counted_while_the_first_tier_evicts() -> None:
    """About as many CPU slots as device blocks: stores keep evicting blocks the device
    still holds free. After every step, nothing unwritten is among the blocks the next
    allocations take, except blocks counted as dropped."""
    env = Env(gpu_blocks=16, cpu_blocks=16, mode="lazy", lazy_free_target=3)
    async with env.manager as manager:
        lost = 0
        for i in range(60):
            size = 1 + (i * 7) % 4
            request = env.request(size, extra=3)
            blocks = env.pool.get_new_blocks(size + 1)
            env.compute(request, blocks)
            env.pool.free_blocks(reversed(blocks))
            await step(manager)
            unwritten = unwritten_at_eviction_end(env)
            lost += len(unwritten)
            assert manager.stats().tiers["cpu"].dropped_stores >= len(unwritten)
            env.pool.free_blocks(env.pool.get_new_blocks(3))  # the next allocations
        stats = manager.stats().tiers["cpu"]
        assert stats.evictions > 0
        assert lost == 0


@pytest.mark.asyncio
async def test_a_full_first_tier_counts_each_unwritten_block_once_and_keeps_the_queue() -> None:
    """Every CPU slot pinned: the walk takes nothing, so the free queue keeps its order,
    and the two blocks waiting at the eviction end count as dropped once, however many
    steps they wait. Once the pins go, they are written (evicting A's copies)."""
    env = Env(gpu_blocks=7, cpu_blocks=2, mode="lazy", lazy_free_target=3)
    async with env.manager as manager:
        first = manager.indexes[0]
        a = env.request(2, extra=3)
        blocks = env.pool.get_new_blocks(3)
        env.compute(a, blocks)
        env.pool.free_blocks(reversed(blocks))
        await step(manager)
        held = [key(a, 0), key(a, 1)]
        first.pin(held)  # a load reads them: the CPU tier has no room
        b = env.request(2, extra=3)
        blocks = env.pool.get_new_blocks(3)
        env.compute(b, blocks)
        env.pool.free_blocks(reversed(blocks))
        env.pool.get_new_blocks(2)  # the unhashed blocks: the queue is [a…, b…]
        order = [block.block_id for block in env.pool.free_block_queue]
        for _ in range(4):
            assert await step(manager) == 0
            assert [block.block_id for block in env.pool.free_block_queue] == order
            assert manager.stats().tiers["cpu"].dropped_stores == 2
        first.unpin(held)
        assert await step(manager) == 2
        assert all(key(b, i) in first for i in range(2))
