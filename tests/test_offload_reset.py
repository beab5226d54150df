"""reset_cache: the lower tiers forget and delete every block (after new weights, say).

The "new weights" are played by writing other bytes into the device blocks of
the same tokens: after a reset, a load must return those, never the old ones,
and a new process on the disk directory must find none of the old blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import torch
from structlog.testing import capture_logs

from kvtier import KVCacheBlocks, Request
from kvtier.errors import ClosedError, InvalidRequestError, TierIOError
from kvtier.events import AllBlocksCleared
from kvtier.offload import SchedulerOutput
from kvtier.offload.reset import ResetsRunning
from kvtier.tiers.base import BlockKey, ProbingStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.index import TierIndex
from tests.offload_env import (
    _HASHER,
    BS,
    DEADLINE,
    LAYOUT,
    Env,
    disk_tier,
    key,
    pattern,
    recovered,
    scheduled,
    start_load,
    store,
    store_blocking,
)
from tests.tier_doubles import FaultInjectingStore, MemoryStore


def new_weights(key: bytes) -> torch.Tensor:
    """The bytes a block of ``key`` holds once the weights changed."""
    return pattern(key) ^ 0x5A


def recompute(env: Env, request: Request, num_blocks: int) -> KVCacheBlocks:
    """New device blocks for the request's first blocks, holding the new weights' bytes."""
    blocks = env.alloc(request, num_blocks)
    for position, block in enumerate(blocks.blocks[0]):
        env.cache[block.block_id] = new_weights(key(request, position))
    return blocks


async def load(env: Env, request: Request, num_blocks: int) -> list[torch.Tensor]:
    """Look the request up, load ``num_blocks`` into fresh blocks; their bytes."""
    targets = start_load(env, request, num_blocks)
    await env.manager.wait_for_loads([request.request_id])
    (finished,) = env.manager.take_finished()
    assert not finished.failed_block_ids
    return [env.cache[block.block_id].clone() for block in targets.blocks[0]]


def assert_empty(index: TierIndex) -> None:
    assert (len(index), index.num_free, index.num_pinned) == (0, index.num_slots, 0)
    index.check_invariants()


class SharedStore(MemoryStore):
    """A tier other engines write too (a :class:`ProbingStore`), in host memory."""

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [k in self.keys for k in keys]

    def adopt(self, slots: Sequence[int], keys: Sequence[BlockKey]) -> None:
        for slot, k in zip(slots, keys, strict=True):
            self.keys[slot] = k


@pytest.mark.asyncio
async def test_a_reset_forgets_and_deletes_every_cpu_and_disk_block(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a, b = env.request(2), env.request(2)
            await store(env, a, 2, release=True)
            await store(env, b, 2, release=True)  # a's blocks go down to disk
            assert [len(index) for index in manager.indexes] == [2, 2]
            manager.take_events()
            assert env.pool.reset_prefix_cache()
            with capture_logs() as logs:
                assert await manager.reset_cache() is True
            for index in manager.indexes:
                assert_empty(index)
            for request in (a, b):
                again = env.request(2, like=request)
                assert manager.get_num_new_matched_tokens(again, 0) == (0, False)
            events = manager.take_events()
            assert events == [AllBlocksCleared(medium="cpu"), AllBlocksCleared(medium="disk")]
            (reset,) = [log for log in logs if log["event"] == "cache_reset"]
            assert (reset["tiers"], reset["n_blocks"]) == (["cpu", "disk"], 4)
    assert set(await recovered(tmp_path / "disk")) == set()


@pytest.mark.asyncio
async def test_after_a_reset_loads_return_the_new_bytes_never_the_old(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a, b = env.request(2), env.request(2)
            await store(env, a, 2, release=True)
            await store(env, b, 2, release=True)
            assert env.pool.reset_prefix_cache()
            assert await manager.reset_cache()
            # The same prompts, computed with the new weights: a ends on disk again.
            for request in (a, b):
                again = env.request(2, like=request)
                await store(env, again, recompute(env, again, 2), release=True)
            assert env.pool.reset_prefix_cache()
            for request, level in ((a, 1), (b, 0)):
                assert all(key(request, i) in manager.indexes[level] for i in range(2))
            for request in (a, b):
                data = await load(env, env.request(2, like=request), 2)
                assert all(torch.equal(data[i], new_weights(key(request, i))) for i in range(2))
    # A new process finds the blocks written since the reset (a's load staged
    # them through the CPU tier, which sent b's down), with the new bytes.
    assert set(await recovered(tmp_path / "disk")) == {key(r, i) for r in (a, b) for i in range(2)}
    again = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with again.manager:
            data = await load(again, again.request(2, like=a), 2)
    assert all(torch.equal(data[i], new_weights(key(a, i))) for i in range(2))


@pytest.mark.asyncio
async def test_a_reset_is_refused_while_a_load_is_planned_or_running() -> None:
    env = Env(gpu_blocks=32, cpu_blocks=8)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a = env.request(2)
            await store(env, a, 2, release=True)
            again = env.request(2, like=a)
            assert manager.get_num_new_matched_tokens(again, 0)[0] == 2 * BS
            targets = KVCacheBlocks((env.fresh(2),))
            manager.update_state_after_alloc(again, targets, 2 * BS)
            with capture_logs() as logs:
                assert await manager.reset_cache() is False  # planned: its sources are pinned
            assert [log["loads"] for log in logs if log["event"] == "reset_cache_refused"] == [1]
            manager.build_step(scheduled(new={again.request_id: targets}))
            assert await manager.reset_cache() is False  # running
            await manager.wait_for_loads([again.request_id])
            assert len(manager.indexes[0]) == 2  # nothing was forgotten
            assert all(env.holds(block, again, i) for i, block in enumerate(targets.blocks[0]))
            assert await manager.reset_cache() is True
            assert_empty(manager.indexes[0])


@pytest.mark.asyncio
async def test_a_reset_is_refused_while_a_store_is_planned_and_not_yet_computed() -> None:
    env = Env(gpu_blocks=32, cpu_blocks=8)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            await store(env, env.request(1), 1, release=True)
            b = env.request(2)
            blocks = env.alloc(b, 2)
            manager.update_state_after_alloc(b, blocks, 0)
            plan = manager.build_step(scheduled(new={b.request_id: blocks}))
            assert plan.num_store_blocks == 2
            assert await manager.reset_cache() is False  # the step's stores hold reservations
            manager.step_computed(plan.step_id)
            await manager.wait_idle()
            assert len(manager.indexes[0]) == 3
            assert await manager.reset_cache() is True
            assert_empty(manager.indexes[0])


@pytest.mark.asyncio
async def test_a_shared_tier_must_be_kept_explicitly_and_is_left_as_it_is() -> None:
    shared = SharedStore(16, LAYOUT, name="shared")
    assert isinstance(shared, ProbingStore)
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 2), shared])
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a, b = env.request(2), env.request(2)
            await store(env, a, 2, release=True)
            await store(env, b, 2, release=True)  # a's blocks go to the shared tier
            assert [len(index) for index in manager.indexes] == [2, 2]
            with pytest.raises(InvalidRequestError, match="keep_shared=True"):
                await manager.reset_cache()
            assert [len(index) for index in manager.indexes] == [2, 2]  # nothing changed
            manager.take_events()
            assert await manager.reset_cache(keep_shared=True) is True
            assert_empty(manager.indexes[0])
            assert len(manager.indexes[1]) == 2
            assert manager.take_events() == [AllBlocksCleared(medium="cpu")]
            assert {k for k in shared.keys if k is not None} == {key(a, 0), key(a, 1)}
            # The shared tier still serves a's old KV; requests of the new weights,
            # salted with their version, compute under keys no old block matches.
            old = env.request(2, like=a)
            assert manager.get_num_new_matched_tokens(old, 0) == (2 * BS, True)
            manager.request_finished(old)
            tokens = list(a.all_token_ids)
            salted = Request("new-weights", tokens, _HASHER, cache_salt="weights-v2")
            assert manager.get_num_new_matched_tokens(salted, 0) == (0, False)


@pytest.mark.asyncio
async def test_a_delete_that_fails_is_logged_and_the_blocks_are_forgotten_all_the_same(
    tmp_path: Path,
) -> None:
    disk = FaultInjectingStore(disk_tier(tmp_path / "disk"))
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 1), disk])
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            requests = [env.request(1) for _ in range(3)]
            for request in requests:  # each sends the one before down to disk
                await store(env, request, 1, release=True)
            assert len(manager.indexes[1]) == 2
            disk.discard_error = TierIOError("injected: unlink failed", tier="disk")
            with capture_logs() as logs:
                assert await manager.reset_cache() is True
            (failed,) = [log for log in logs if log["event"] == "reset_discard_failed"]
            assert (failed["tier"], failed["n_blocks"]) == ("disk", 2)
            for index in manager.indexes:
                assert_empty(index)
            for request in requests:  # the slots serve new blocks
                again = env.request(1, like=request)
                await store(env, again, recompute(env, again, 1), release=True)
            assert len(manager.indexes[1]) == 2
            assert env.pool.reset_prefix_cache()
            (data,) = await load(env, env.request(1, like=requests[0]), 1)
    assert torch.equal(data, new_weights(key(requests[0], 0)))


@pytest.mark.asyncio
async def test_a_cancelled_reset_finishes_its_deletes_and_frees_the_slots(tmp_path: Path) -> None:
    disk = FaultInjectingStore(disk_tier(tmp_path / "disk"))
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 1), disk])
    outcome: list[bool] = []
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            requests = [env.request(1) for _ in range(3)]
            for request in requests:  # each sends the one before down to disk
                await store(env, request, 1, release=True)
            disk.discard_gate = anyio.Event()
            scope = anyio.CancelScope()

            async def reset() -> None:
                with scope:
                    outcome.append(await manager.reset_cache())  # over once deleted
                    await anyio.sleep(1)  # the cancellation lands at the next await

            async with anyio.create_task_group() as group:
                group.start_soon(reset)
                await disk.discard_started.wait()
                scope.cancel()
                try:
                    await anyio.sleep(0.01)
                    # Deleting: the blocks are invisible, their slots still held.
                    disk_index = manager.indexes[1]
                    counts = (len(disk_index), disk_index.num_pinned, disk_index.num_free)
                    assert counts == (2, 2, 14)
                    for request in requests:
                        again = env.request(1, like=request)
                        assert manager.get_num_new_matched_tokens(again, 0)[0] == 0
                    assert outcome == []
                finally:
                    disk.discard_gate.set()
            assert outcome == [True]
            assert scope.cancelled_caught
            for index in manager.indexes:
                assert_empty(index)
    assert set(await recovered(tmp_path / "disk")) == set()


@pytest.mark.asyncio
async def test_a_block_computed_while_the_deletes_run_is_not_stored_then_stored_after() -> None:
    """Eager: the step skips a key whose old bytes are being deleted; a later
    computation of it is stored once the reset ended."""
    cpu = FaultInjectingStore(CpuTier(LAYOUT, 8))
    env = Env(gpu_blocks=32, tiers=[cpu])
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a = env.request(2)
            await store(env, a, 2, release=True)
            cpu.discard_gate = anyio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(manager.reset_cache)
                await cpu.discard_started.wait()
                try:
                    during = env.request(2, like=a)
                    await store(env, during, recompute(env, during, 2), release=True)
                    assert manager.stats().tiers["cpu"].stores == 2  # a's first ones only
                finally:
                    cpu.discard_gate.set()
            assert_empty(manager.indexes[0])
            assert env.pool.reset_prefix_cache()
            after = env.request(2, like=a)
            await store(env, after, recompute(env, after, 2), release=True)
            data = await load(env, env.request(2, like=a), 2)
    assert all(torch.equal(data[i], new_weights(key(a, i))) for i in range(2))


@pytest.mark.asyncio
async def test_lazy_mode_writes_the_device_blocks_again_after_a_reset_during_steps() -> None:
    """Lazy mode, lower tiers reset with the device cache kept: the freed device
    blocks whose copies were deleted are written again, even when a step ran
    while the deletes did (its walk passed them: they were being deleted)."""
    cpu = FaultInjectingStore(CpuTier(LAYOUT, 16))
    env = Env(gpu_blocks=16, tiers=[cpu], mode="lazy", lazy_free_target=4)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a = env.request(4, extra=0)
            blocks = env.pool.get_new_blocks(4)
            env.compute(a, blocks)
            env.pool.free_blocks(reversed(blocks))
            assert await step(manager) == 4
            cpu.discard_gate = anyio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(manager.reset_cache)
                await cpu.discard_started.wait()
                try:
                    assert await step(manager) == 0  # being deleted: not written yet
                finally:
                    cpu.discard_gate.set()
            assert await step(manager) == 4
            assert all(key(a, i) in manager.indexes[0] for i in range(4))


async def step(manager: object) -> int:
    """One step with nothing scheduled, computed at once; the blocks it stored."""
    plan = manager.build_step(SchedulerOutput())  # type: ignore[attr-defined]
    manager.step_computed(plan.step_id)  # type: ignore[attr-defined]
    await manager.wait_idle()  # type: ignore[attr-defined]
    return int(plan.num_store_blocks)


def test_the_blocking_reset_needs_the_manager_entered_with_with(tmp_path: Path) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk")
    with pytest.raises(ClosedError):
        env.manager.reset_cache_blocking()
    with env.manager as manager:
        a, b = env.request(2), env.request(2)
        store_blocking(env, a, 2)
        store_blocking(env, b, 2)
        assert [len(index) for index in manager.indexes] == [2, 2]
        assert manager.reset_cache_blocking() is True
        for index in manager.indexes:
            assert_empty(index)
    assert set(anyio.run(recovered, tmp_path / "disk")) == set()


@pytest.mark.asyncio
async def test_the_blocking_reset_refuses_under_async_with_and_changes_nothing() -> None:
    env = Env(gpu_blocks=32, cpu_blocks=8)
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            await store(env, env.request(2), 2, release=True)
            with pytest.raises(ClosedError, match="await reset_cache"):
                manager.reset_cache_blocking()
            assert len(manager.indexes[0]) == 2
    with pytest.raises(ClosedError):
        await env.manager.reset_cache()  # left: not running


class PartlyWritingStore(FaultInjectingStore):
    """Writes every block of a batch but ``lost`` keys', then fails it (a disk
    full for one file): the written blocks stay in the tier."""

    def __init__(self, inner: DiskTier) -> None:
        super().__init__(inner)
        self.lost: set[bytes] = set()

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        rows = [i for i, k in enumerate(keys) if k not in self.lost]
        if len(rows) == len(keys):
            await self.inner.write_from(slots, keys, data)
            return
        if rows:
            await self.inner.write_from(
                [slots[i] for i in rows], [keys[i] for i in rows], data[rows]
            )
        raise TierIOError("injected: no space left for one block", tier=self.name)


@pytest.mark.asyncio
async def test_blocks_a_failed_write_left_on_disk_do_not_outlive_a_reset(tmp_path: Path) -> None:
    """A demotion batch fails for one block: the index forgets the whole batch, so
    the block written beside it must go too, or a warm restart after the reset
    (and the weight change) would serve it."""
    disk = PartlyWritingStore(disk_tier(tmp_path / "disk"))
    env = Env(gpu_blocks=32, tiers=[CpuTier(LAYOUT, 2), disk])
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            old = env.request(2)
            await store(env, old, 2, release=True)
            disk.lost = {key(old, 1)}
            await store(env, env.request(2), 2, release=True)  # old's demotion fails
            assert len(manager.indexes[1]) == 0
            assert manager.stats().tiers["disk"].failed_transfers == 2
            assert env.pool.reset_prefix_cache()
            assert await manager.reset_cache()
    assert set(await recovered(tmp_path / "disk")) == set()


@pytest.mark.asyncio
async def test_blocks_a_larger_capacity_left_on_disk_do_not_outlive_a_reset(
    tmp_path: Path,
) -> None:
    """The disk tier keeps blocks of slots beyond its capacity for the larger one;
    a reset deletes them too, or reopening with that capacity would serve them."""
    old = Request("old", list(range(100, 100 + 4 * BS)), _HASHER)
    data = torch.stack([pattern(key(old, i)) for i in range(4)])
    async with disk_tier(tmp_path / "disk", 16) as big:
        await big.write_from([3, 12, 13, 14], [key(old, i) for i in range(4)], data)
    env = Env(gpu_blocks=32, cpu_blocks=2, disk=tmp_path / "disk", disk_blocks=8)
    with anyio.fail_after(DEADLINE), capture_logs() as logs:
        async with env.manager as manager:
            assert len(manager.indexes[1]) == 1  # slot 3; 12-14 kept for the larger tier
            assert env.pool.reset_prefix_cache()
            assert await manager.reset_cache()
    assert [log["n_blocks"] for log in logs if log["event"] == "reset_swept"] == [3]
    assert await recovered(tmp_path / "disk", 16) == {}


@pytest.mark.asyncio
async def test_leaving_the_manager_while_a_reset_deletes_waits_for_the_deletes(
    tmp_path: Path,
) -> None:
    """Two disk tiers; the first one's deletes are slow, and the engine leaves the
    manager from another task meanwhile: the second tier must not close first."""
    nvme = FaultInjectingStore(disk_tier(tmp_path / "nvme", 1, name="nvme"))
    hdd = disk_tier(tmp_path / "hdd", name="hdd")
    env = Env(gpu_blocks=32, tiers=[nvme, hdd])
    outcome: list[bool] = []
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as group:
            async with env.manager as manager:
                for _ in range(3):  # one block each: each sends the one before to hdd
                    await store(env, env.request(1), 1, release=True)
                assert [len(index) for index in manager.indexes] == [1, 2]
                nvme.discard_gate = anyio.Event()

                async def reset() -> None:
                    outcome.append(await manager.reset_cache())

                group.start_soon(reset)
                await nvme.discard_started.wait()
                group.start_soon(open_later, nvme.discard_gate)
            assert outcome == [True]
    assert set(await recovered(tmp_path / "hdd", name="hdd")) == set()


async def open_later(gate: anyio.Event) -> None:
    """Open ``gate`` in a while, or at once if cancelled (a shielded wait on it would hang)."""
    try:
        await anyio.sleep(0.05)
    finally:
        gate.set()


def test_the_async_reset_refuses_a_manager_entered_with_with() -> None:
    env = Env(gpu_blocks=32, cpu_blocks=8)
    with env.manager as manager:
        store_blocking(env, env.request(2), 2)
        with pytest.raises(ClosedError, match="reset_cache_blocking"):
            anyio.run(manager.reset_cache)
        assert len(manager.indexes[0]) == 2
    with pytest.raises(ClosedError, match="not running"):  # left: not a hint to use the other
        anyio.run(env.manager.reset_cache)


@pytest.mark.asyncio
async def test_a_failed_store_into_a_disk_first_tier_leaves_no_block_behind(
    tmp_path: Path,
) -> None:
    disk = PartlyWritingStore(disk_tier(tmp_path / "disk"))
    env = Env(gpu_blocks=32, tiers=[disk])
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            request = env.request(2)
            disk.lost = {key(request, 1)}
            await store(env, request, 2, release=True)
            assert len(manager.indexes[0]) == 0  # the whole store failed
            assert manager.stats().tiers["disk"].failed_transfers == 2
    assert set(await recovered(tmp_path / "disk")) == set()


def test_leaving_waits_for_overlapping_resets_to_end_whatever_their_order() -> None:
    """ResetsRunning counts 2 -> 1 -> 0: the wait ends at 0, not before, and does end.

    Run on a thread of its own: the wait is shielded, so a lost wake-up would
    hang the test's event loop rather than fail it.
    """
    resets = ResetsRunning()

    async def scenario() -> list[int]:
        gates = [anyio.Event(), anyio.Event()]
        waited: list[int] = []

        async def hold(gate: anyio.Event) -> None:
            with resets.running():
                await gate.wait()

        async def leave() -> None:
            await resets.wait()
            waited.append(resets.count)

        async with anyio.create_task_group() as group:
            for gate in gates:
                group.start_soon(hold, gate)
            await anyio.sleep(0.01)
            group.start_soon(leave)
            await anyio.sleep(0.01)
            gates[0].set()
            await anyio.sleep(0.01)
            assert waited == []  # one still deleting
            gates[1].set()
        return waited

    results: list[list[int]] = []
    thread = threading.Thread(target=lambda: results.append(anyio.run(scenario)), daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert results == [[0]], "the wait for running resets never ended"
