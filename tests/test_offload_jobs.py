"""Offload jobs: what they do before they report.

Seen in review: a cancelled job pushed its outcome at once, while the copy it
had posted kept running in the pipeline's task group; the manager then freed
the device blocks and slots the copy was still reading or writing. And a load
that found blocks corrupt left them in their tier (only the index forgot them).
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import torch

from kvtier.block import KVCacheBlock
from kvtier.errors import BlockMissingError, TierIOError, TransferCancelledError
from kvtier.offload._state import (
    Demotion,
    LoadEvent,
    LoadOutcome,
    Stage,
    StoreEvent,
    StoreOutcome,
)
from kvtier.offload.jobs import run_load, run_store
from kvtier.tiers.base import ProbingStore
from kvtier.transfer import TransferPipeline
from tests.tier_doubles import GatedStore, MemoryStore


@pytest.mark.asyncio
async def test_a_cancelled_store_reports_after_its_copy_ends() -> None:
    device, lower = MemoryStore(4, name="gpu"), MemoryStore(4, name="cpu")
    device.data[:] = torch.arange(4, dtype=torch.uint8)[:, None]
    gated = GatedStore(lower)
    gated.open = False  # the copy waits inside the pipeline
    keys = [bytes([i]) * 32 for i in (1, 2)]
    device.keys[1:3] = keys  # the device double verifies keys too
    event = StoreEvent(7, 0, (1, 2), keys, [0, 1], [], {"r"})
    seen: list[tuple[bool, StoreOutcome | LoadOutcome]] = []

    def push(outcome: StoreOutcome | LoadOutcome) -> None:
        seen.append((gated.open, outcome))  # was the copy allowed to finish yet?

    job = anyio.CancelScope()

    async def store(pipeline: TransferPipeline) -> None:
        with job:
            await run_store(pipeline, device, [gated], push, event)

    async with TransferPipeline() as pipeline, anyio.create_task_group() as jobs:
        jobs.start_soon(store, pipeline)
        await anyio.sleep(0.05)  # the store is in the pipeline, waiting at the gate
        job.cancel()
        await anyio.sleep(0.05)
        assert seen == []  # cancelled, but the copy has not ended: nothing reported
        gated.open = True
    assert len(seen) == 1
    copy_ended, outcome = seen[0]
    assert copy_ended
    assert isinstance(outcome, StoreOutcome)
    assert isinstance(outcome.error, TransferCancelledError)
    assert torch.equal(lower.data[:2], device.data[1:3])  # the copy ran to its end


class DiscardingStore(MemoryStore):
    """Records the slots it was told to discard, and what it held then; may fail."""

    def __init__(self, num_slots: int, name: str, *, fail: bool = False) -> None:
        super().__init__(num_slots, name=name)
        self.fail = fail
        self.discarded: list[tuple[list[int], list[bytes | None]]] = []

    async def discard(self, slots: Sequence[int]) -> None:
        self.discarded.append((list(slots), [self.keys[s] for s in slots]))
        if self.fail:
            raise TierIOError("injected", tier=self.name)
        await super().discard(slots)


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.asyncio
async def test_a_load_discards_the_blocks_it_found_corrupt_before_it_reports(fail: bool) -> None:
    device, lower = MemoryStore(4, name="gpu"), DiscardingStore(4, "cpu", fail=fail)
    keys = [bytes([i]) * 32 for i in (1, 2)]
    lower.keys[:2] = [keys[0], b"garbled" * 4]  # slot 1 fails verification
    event = LoadEvent(
        3, "r", [KVCacheBlock(1), KVCacheBlock(2)], keys, [], first_slots=[0, 1], positions=[0, 1]
    )
    seen: list[tuple[int, StoreOutcome | LoadOutcome]] = []

    def push(outcome: StoreOutcome | LoadOutcome) -> None:
        seen.append((len(lower.discarded), outcome))  # discarded before reporting?

    async with TransferPipeline() as pipeline:
        await run_load(pipeline, device, [lower], push, event)
    [(discards, outcome)] = seen
    assert discards == 1
    assert lower.discarded == [([1], [b"garbled" * 4])]  # only the bad block, while held
    assert isinstance(outcome, LoadOutcome)
    assert isinstance(outcome.error, BlockMissingError)  # a failed discard changes nothing
    assert outcome.missing == ((0, keys[1]),)
    assert outcome.cut == 1  # position 0 was loaded again, alone, and arrived


class SharedStore(DiscardingStore):
    """A discarding store that other engines write too (it answers ``contains``)."""

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [key in self.keys for key in keys]

    def adopt(self, slots: Sequence[int], keys: Sequence[bytes]) -> None:
        for slot, key in zip(slots, keys, strict=True):
            self.keys[slot] = key


@pytest.mark.asyncio
async def test_a_load_miss_on_a_shared_tier_deletes_nothing() -> None:
    """Another engine may have stored the missing block afresh since: keep its name."""
    device, shared = MemoryStore(4, name="gpu"), SharedStore(4, "redis")
    assert isinstance(shared, ProbingStore)
    keys = [bytes([i]) * 32 for i in (1, 2)]
    shared.keys[:2] = [keys[0], None]  # slot 1 is gone (evicted)
    event = LoadEvent(
        3, "r", [KVCacheBlock(1), KVCacheBlock(2)], keys, [], first_slots=[0, 1], positions=[0, 1]
    )
    seen: list[StoreOutcome | LoadOutcome] = []
    async with TransferPipeline() as pipeline:
        await run_load(pipeline, device, [shared], seen.append, event)
    [outcome] = seen
    assert isinstance(outcome, LoadOutcome)
    assert outcome.missing == ((0, keys[1]),)  # the index forgets it, as before
    assert shared.discarded == []


async def _not_ready() -> None:
    raise TierIOError("the engine's work failed", tier="gpu")


@pytest.mark.asyncio
async def test_a_store_that_never_ran_discards_its_slots_and_its_demotions_slots() -> None:
    """Slots reserved for a copy that never ran may still hold the blocks evicted from them.

    The index frees them uncounted; on a disk tier, a file left there would
    outlive a reset and come back at the next warm restart.
    """
    device = MemoryStore(4, name="gpu")
    cpu, disk = DiscardingStore(4, "cpu"), DiscardingStore(4, "disk")
    old = [bytes([i]) * 32 for i in (7, 8, 9)]
    cpu.keys[0] = old[0]  # evicted to make room; demoted to disk slot 2 (which held old[1])
    disk.keys[2], disk.keys[3] = old[1], old[2]
    keys = [bytes([i]) * 32 for i in (1, 2)]
    demotion = Demotion(0, [0], [2], [old[0]])
    store = StoreEvent(5, 0, (1, 2), keys, [0, 1], [demotion], {"r"})
    spill = StoreEvent(6, 0, (3,), [bytes([3]) * 32], [3], [], {"r"}, level=1)
    outcomes: list[StoreOutcome | LoadOutcome] = []
    async with TransferPipeline() as pipeline:
        for event in (store, spill):
            await run_store(pipeline, device, [cpu, disk], outcomes.append, event, ready=_not_ready)
    assert [type(outcome.error) for outcome in outcomes] == [TierIOError, TierIOError]
    assert cpu.discarded == [([0, 1], [old[0], None])]
    assert disk.discarded == [([2], [old[1]]), ([3], [old[2]])]
    assert outcomes[0].demotions == ()  # never ran: settled uncounted


@pytest.mark.asyncio
async def test_a_load_that_never_ran_discards_its_demotions_slots() -> None:
    device = MemoryStore(4, name="gpu")
    cpu, disk = DiscardingStore(4, "cpu"), DiscardingStore(4, "disk")
    old = [bytes([i]) * 32 for i in (7, 8)]
    cpu.keys[0], disk.keys[1] = old
    key = bytes([1]) * 32
    disk.keys[0] = key
    event = LoadEvent(
        4,
        "r",
        [KVCacheBlock(1)],
        [key],
        [],
        first_slots=[-1],
        stages=[Stage(1, [0], [key], [0])],
        demotions=[Demotion(0, [0], [1], [old[0]])],
        positions=[0],
    )
    outcomes: list[StoreOutcome | LoadOutcome] = []
    async with TransferPipeline() as pipeline:
        await run_load(pipeline, device, [cpu, disk], outcomes.append, event, ready=_not_ready)
    [outcome] = outcomes
    assert isinstance(outcome.error, TierIOError)
    assert disk.discarded == [([1], [old[1]])]  # the demotion's slot, as it stood
    assert cpu.discarded == [([0], [old[0]])]  # the staged copy's slot
