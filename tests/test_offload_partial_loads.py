"""Partial loads: a bad block fails its position and the ones after it, not the whole load.

When a copy finds source blocks missing or corrupt, the load job copies the
positions before the first bad one again (the copy that failed and the ones
after it: the failed copy may have left any of its blocks unwritten) and
reports them loaded; the
engine recomputes from the first bad position on, as vLLM's scheduler does
with a connector's load errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import KVCacheBlocks
from kvtier.block import KVCacheBlock
from kvtier.errors import BlockMissingError, TierIOError
from kvtier.offload import SchedulerOutput
from kvtier.offload._state import LoadEvent, LoadOutcome, Stage, StoreOutcome
from kvtier.offload.jobs import run_load
from kvtier.tiers.base import BlockKey
from kvtier.transfer import TransferPipeline
from tests.offload_env import BS, DEADLINE, LAYOUT, Env, key, start_load, store
from tests.tier_doubles import MemoryStore


class ScriptedStore(MemoryStore):
    """A key-verifying store whose reads follow a script, one entry per call:
    None reads, an exception is raised, an event is waited for first."""

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, name="cpu")
        self.script: list[BaseException | anyio.Event | None] = []
        self.reads: list[list[int]] = []

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        self.reads.append(list(slots))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, anyio.Event):
            await step.wait()
        elif step is not None:
            raise step
        await super().read_into(slots, keys, out)


def block_key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def setup(
    positions: list[int], garbled: Sequence[int] = ()
) -> tuple[MemoryStore, ScriptedStore, LoadEvent, list[LoadOutcome]]:
    """A device, a lower tier holding one block per key (slot i: key i, rows of i+1),
    the load of every key into device block i, and the outcomes it reports."""
    n = len(positions)
    device, lower = MemoryStore(n + 1, name="gpu"), ScriptedStore(n)
    keys = [block_key(i) for i in range(n)]
    for i, k in enumerate(keys):
        lower.keys[i] = b"garbled" * 4 if i in garbled else k
        lower.data[i] = i + 1
    targets = [KVCacheBlock(i) for i in range(n)]
    event = LoadEvent(
        7, "r", targets, keys, [], first_slots=list(range(n)), positions=list(positions)
    )
    return device, lower, event, []


async def run(device: MemoryStore, lower: ScriptedStore, event: LoadEvent) -> LoadOutcome:
    seen: list[StoreOutcome | LoadOutcome] = []
    async with TransferPipeline() as pipeline:
        await run_load(pipeline, device, [lower], seen.append, event)
    [outcome] = seen
    assert isinstance(outcome, LoadOutcome)
    return outcome


def arrived(device: MemoryStore, rows: range) -> bool:
    return all(bool((device.data[i] == i + 1).all()) for i in rows)


@pytest.mark.asyncio
async def test_the_positions_before_the_first_bad_block_are_loaded_again_and_kept() -> None:
    device, lower, event, _ = setup([0, 1, 2, 3], garbled=[2])
    outcome = await run(device, lower, event)
    assert isinstance(outcome.error, BlockMissingError)
    assert outcome.cut == 2
    assert outcome.missing == ((0, block_key(2)),)
    assert lower.reads == [[0, 1, 2, 3], [0, 1]]
    assert arrived(device, range(2))


@pytest.mark.asyncio
async def test_a_bad_block_found_again_moves_the_cut_back() -> None:
    """The first copy names position 3 (injected); copying 0-2 again finds 1 garbled."""
    device, lower, event, _ = setup([0, 1, 2, 3], garbled=[1])
    lower.script = [BlockMissingError.of_slots("cpu", [3])]
    outcome = await run(device, lower, event)
    assert outcome.cut == 1
    assert outcome.missing == ((0, block_key(3)), (0, block_key(1)))
    assert lower.reads == [[0, 1, 2, 3], [0, 1, 2], [0]]
    assert arrived(device, range(1))


@pytest.mark.asyncio
async def test_a_bad_first_position_fails_everything_without_copying_again() -> None:
    device, lower, event, _ = setup([0, 1, 2], garbled=[0])
    outcome = await run(device, lower, event)
    assert isinstance(outcome.error, BlockMissingError)
    assert outcome.cut is None
    assert lower.reads == [[0, 1, 2]]


@pytest.mark.asyncio
async def test_an_io_error_while_copying_again_fails_everything() -> None:
    device, lower, event, _ = setup([0, 1, 2], garbled=[2])
    lower.script = [None, TierIOError("injected", tier="cpu")]
    outcome = await run(device, lower, event)
    assert isinstance(outcome.error, TierIOError)
    assert outcome.cut is None
    assert outcome.missing == ((0, block_key(2)),)  # still found bad: forgotten


@pytest.mark.asyncio
async def test_a_load_cancelled_while_copying_again_fails_everything() -> None:
    device, lower, event, _ = setup([0, 1, 2], garbled=[2])
    gate = anyio.Event()
    lower.script = [None, gate]
    seen: list[StoreOutcome | LoadOutcome] = []
    with anyio.fail_after(DEADLINE):
        async with TransferPipeline() as pipeline, anyio.create_task_group() as group:
            group.start_soon(run_load, pipeline, device, [lower], seen.append, event)
            while len(lower.reads) < 2:
                await anyio.sleep(0.001)
            group.cancel_scope.cancel()
            gate.set()
    [outcome] = seen
    assert isinstance(outcome, LoadOutcome)
    assert outcome.cut is None
    assert outcome.error is not None


@pytest.mark.asyncio
async def test_every_group_of_a_bad_position_fails_with_it() -> None:
    """Two KV cache groups: keys come in pairs per position; group 1's key of
    position 1 is bad, so both groups' blocks of position 1 fail."""
    device, lower, event, _ = setup([0, 0, 1, 1], garbled=[3])
    outcome = await run(device, lower, event)
    assert outcome.cut == 1
    assert lower.reads == [[0, 1, 2, 3], [0, 1]]
    assert arrived(device, range(2))


@pytest.mark.asyncio
async def test_a_corrupt_disk_block_costs_only_its_position_and_the_ones_after(
    tmp_path: Path,
) -> None:
    env = Env(gpu_blocks=32, cpu_blocks=4, disk=tmp_path / "disk")
    with anyio.fail_after(DEADLINE):
        async with env.manager as manager:
            a, b = env.request(4), env.request(4)
            await store(env, a, 4, release=True)
            await store(env, b, 4, release=True)  # a's blocks go down to disk
            victim = tmp_path / "disk" / (key(a, 2).hex() + ".kvb")
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF  # a payload byte
            victim.write_bytes(bytes(data))
            again = env.request(4, like=a)
            targets = start_load(env, again, 4).blocks[0]
            await manager.wait_for_loads([again.request_id])
            [finished] = manager.take_finished()
            assert not finished.ok
            assert finished.failed_block_ids == (targets[2].block_id, targets[3].block_id)
            assert all(env.holds(targets[i], again, i) for i in range(2))
            cpu, disk = manager.indexes
            assert {key(a, 0), key(a, 1)} <= {k for _, k in cpu.blocks()}  # staged, kept
            assert key(a, 2) not in cpu
            assert key(a, 2) not in disk
            assert key(a, 3) not in cpu
            assert key(a, 3) in disk
            for index in manager.indexes:
                index.check_invariants()
                assert (index.num_pinned, index.num_reserved) == (0, 0)
            stats = manager.stats()
            assert (stats.loads_finished, stats.loads_failed, stats.loads_partial) == (1, 1, 1)
            assert (stats.tiers["disk"].loads, stats.tiers["disk"].failed_transfers) == (2, 2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    evicted=st.integers(0, 6),
    bad=st.sets(st.integers(0, 5), max_size=3),
)
def test_any_bad_blocks_cost_exactly_the_positions_from_the_first_one(
    n: int, evicted: int, bad: set[int]
) -> None:
    """A request's blocks split between a first tier and a slower one (staged
    through the first), some found bad: the load keeps exactly the positions
    before the first bad one, with their bytes, and leaks nothing."""
    evicted = min(evicted, n)
    bad = {p for p in bad if p < n}
    fast = MemoryStore(n, LAYOUT, name="cpu")
    slow = MemoryStore(16, LAYOUT, name="slow")
    env = Env(gpu_blocks=48, tiers=[fast, slow])

    async def main() -> None:
        with anyio.fail_after(DEADLINE):
            async with env.manager as manager:
                a = env.request(n)
                await store(env, a, n, release=True)
                if evicted:  # evicts a's last blocks (a chain's tail first) to the slow tier
                    await store(env, env.request(evicted), evicted, release=True)
                for position in bad:
                    for index, tier in zip(manager.indexes, (fast, slow), strict=True):
                        slot = index.slot_of(key(a, position))
                        if slot is not None:
                            tier.keys[slot] = b"garbled" * 4
                again = env.request(n, like=a)
                assert manager.get_num_new_matched_tokens(again, 0) == (n * BS, True)
                targets = env.fresh(n)
                manager.update_state_after_alloc(again, KVCacheBlocks((targets,)), n * BS)
                manager.build_step(SchedulerOutput())
                await manager.wait_for_loads([again.request_id])
                [finished] = manager.take_finished()
                cut = min(bad, default=n)
                assert finished.ok is (cut == n)
                assert finished.failed_block_ids == tuple(t.block_id for t in targets[cut:])
                assert all(env.holds(targets[i], again, i) for i in range(cut))
                for position in bad:
                    assert not any(key(a, position) in index for index in manager.indexes)
                for index in manager.indexes:
                    index.check_invariants()
                    assert (index.num_pinned, index.num_reserved) == (0, 0)
                stats = manager.stats()
                assert stats.loads_failed == int(cut < n)
                assert stats.loads_partial == int(0 < cut < n)

    anyio.run(main)


@pytest.mark.asyncio
async def test_copying_again_skips_the_staging_that_already_arrived() -> None:
    """Keys 2 and 3 are staged from a slower tier into the first one, then all four
    go to the device; that last copy finds 3 bad: only it runs again (for 0-2)."""
    device = MemoryStore(5, name="gpu")
    first, slow = ScriptedStore(4), ScriptedStore(2)
    slow.name = "slow"
    keys = [block_key(i) for i in range(4)]
    for slot, k in enumerate(keys[:2]):
        first.keys[slot], first.data[slot] = k, slot + 1
    for slot, k in enumerate(keys[2:]):
        slow.keys[slot], slow.data[slot] = k, slot + 3
    event = LoadEvent(
        9,
        "r",
        [KVCacheBlock(i) for i in range(4)],
        keys,
        [],
        first_slots=[0, 1, 2, 3],
        stages=[Stage(1, [0, 1], keys[2:], dst_slots=[2, 3])],
        positions=[0, 1, 2, 3],
    )
    first.script = [BlockMissingError.of_slots("cpu", [3])]
    seen: list[StoreOutcome | LoadOutcome] = []
    async with TransferPipeline() as pipeline:
        await run_load(pipeline, device, [first, slow], seen.append, event)
    [outcome] = seen
    assert isinstance(outcome, LoadOutcome)
    assert outcome.cut == 3
    assert slow.reads == [[0, 1]]  # staged once
    assert first.reads == [[0, 1, 2, 3], [0, 1, 2]]
    assert arrived(device, range(3))
