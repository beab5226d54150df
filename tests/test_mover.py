"""BlockMover: direct runs, staged leftovers, every bad source block named."""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import BlockMissingError, ConfigError, TierIOError
from kvtier.mover import BlockMover
from kvtier.tiers.base import BlockKey
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from kvtier.transfer import TransferPipeline
from tests.test_tier_gpu_cpu import NUM_BLOCKS, canonical, cross_layer_cache, per_layer_cache
from tests.tier_doubles import SMALL, FaultInjectingStore, MemoryStore, ViewStore

BB = SMALL.block_bytes
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def keys_for(*ids: int) -> list[BlockKey]:
    return [i.to_bytes(4, "big") * 8 for i in ids]


def filled(store: MemoryStore, slots: list[int], seed: int = 0) -> list[BlockKey]:
    """Random bytes and distinct keys in ``slots``; returns the keys."""
    generator = torch.Generator().manual_seed(seed)
    keys = keys_for(*(1000 + s for s in slots))
    for slot, key in zip(slots, keys, strict=True):
        store.data[slot] = torch.randint(0, 256, (BB,), dtype=torch.uint8, generator=generator)
        store.keys[slot] = key
    return keys


class CountingStore(MemoryStore):
    """A MemoryStore that counts its calls."""

    reads = 0
    writes = 0

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        self.reads += 1
        await super().read_into(slots, keys, out)

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        self.writes += 1
        await super().write_from(slots, keys, data)


@pytest.mark.asyncio
async def test_long_runs_of_the_view_side_move_directly_the_rest_is_staged() -> None:
    device, cpu = CountingStore(32, name="gpu"), ViewStore(32, name="cpu")
    src = [7, 3, 12, 0, 9, 21, 5]
    keys = filled(device, src)
    # Destination runs once sorted: 4-5-6 (three blocks), 10-11 (two), 20, 30.
    dst = [11, 5, 20, 4, 30, 10, 6]
    mover = BlockMover(direct_min_bytes=2 * BB)
    await mover.move(device, src, cpu, dst, keys)
    assert torch.equal(cpu.data[dst], device.data[src])
    assert cpu.views == 2  # one per long run
    assert device.reads == 3  # two direct gathers, one staged read of the two singletons
    assert mover.staging_rows == 2


@pytest.mark.asyncio
async def test_runs_of_the_source_scatter_straight_from_its_rows() -> None:
    cpu, device = ViewStore(32, name="cpu"), CountingStore(32, name="gpu")
    src = [9, 2, 3, 8, 4, 30]  # sorted: 2-3-4, 8-9, 30
    keys = filled(cpu, src)
    dst = [1, 17, 6, 25, 13, 0]
    mover = BlockMover(direct_min_bytes=2 * BB)
    await mover.move(cpu, src, device, dst, keys)
    assert torch.equal(device.data[dst], cpu.data[src])
    assert cpu.views == 2
    assert device.writes == 3
    assert device.keys[17] == keys[1]


class PartsStore(CountingStore):
    """A CountingStore that also moves several buffers per call (as the device tier does)."""

    parts_calls = 0

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        self.parts_calls += 1
        bad = tuple(s for s, k in zip(slots, keys, strict=True) if self.keys[s] != k)
        if bad:
            raise BlockMissingError("key mismatch", tier=self.name, slots=bad)
        at = 0
        for part in parts:
            part.copy_(self.data[list(slots[at : at + part.shape[0]])])
            at += part.shape[0]

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        self.parts_calls += 1
        at = 0
        for part in parts:
            run = list(slots[at : at + part.shape[0]])
            self.data[run] = part
            for slot, key in zip(run, keys[at : at + part.shape[0]], strict=True):
                self.keys[slot] = key
            at += part.shape[0]


@pytest.mark.asyncio
async def test_a_tier_taking_parts_gets_every_long_run_in_one_call() -> None:
    device, cpu = PartsStore(32, name="gpu"), ViewStore(32, name="cpu")
    src = [7, 3, 12, 0, 9, 21, 5]
    keys = filled(device, src)
    dst = [11, 5, 20, 4, 30, 10, 6]  # runs 4-5-6 and 10-11 direct; 20 and 30 staged
    mover = BlockMover(direct_min_bytes=2 * BB)
    await mover.move(device, src, cpu, dst, keys)
    assert torch.equal(cpu.data[dst], device.data[src])
    assert (device.parts_calls, cpu.views, device.reads) == (1, 2, 1)
    # Back the other way: the CPU side's runs scatter into the device in one call.
    back = [1, 2, 13, 14, 15, 16, 17]
    await mover.move(cpu, dst, device, back, keys)
    assert torch.equal(device.data[back], device.data[src])
    assert (device.parts_calls, device.writes) == (2, 1)
    assert device.keys[1] == keys[0]


@pytest.mark.asyncio
async def test_missing_blocks_of_a_parts_call_are_named_with_the_staged_ones() -> None:
    disk, cpu = PartsStore(32, name="disk"), ViewStore(32, name="cpu")
    src = [1, 2, 3, 4, 5, 6]
    keys = filled(disk, src)
    disk.keys[2] = keys_for(99)[0]  # in a direct run
    disk.keys[6] = keys_for(98)[0]  # in the staged leftovers
    dst = [10, 11, 20, 21, 22, 30]
    mover = BlockMover(direct_min_bytes=2 * BB)
    with pytest.raises(BlockMissingError) as caught:
        await mover.move(disk, src, cpu, dst, keys)
    assert caught.value.slots == (2, 6)
    assert disk.parts_calls == 1


class IOStore(CountingStore):
    """A tier whose calls are I/O (like disk or Redis): not ``in_memory``."""

    in_memory = False


@pytest.mark.asyncio
async def test_a_tier_doing_io_gets_the_whole_batch_in_one_call() -> None:
    disk, cpu = IOStore(32, name="disk"), ViewStore(32, name="cpu")
    src = [7, 3, 12, 0, 9, 21, 5]
    keys = filled(disk, src)
    dst = [11, 5, 20, 4, 30, 10, 6]  # long runs, as in the first test
    mover = BlockMover(direct_min_bytes=2 * BB)
    await mover.move(disk, src, cpu, dst, keys)
    assert torch.equal(cpu.data[dst], disk.data[src])
    assert (disk.reads, cpu.views, mover.staging_rows) == (1, 0, 7)
    await mover.move(cpu, dst, disk, [1, 2, 3, 4, 5, 6, 8], keys)
    assert disk.writes == 1  # the whole batch in one call
    # One ascending run still moves in place, whatever the other tier.
    await mover.move(disk, [1, 2], cpu, [14, 15], keys[:2])
    assert cpu.views == 1


class IOPartsStore(PartsStore):
    """An I/O tier (like disk) that also takes several buffers per call."""

    in_memory = False


@pytest.mark.asyncio
async def test_an_io_tier_taking_parts_gets_every_run_in_one_call_and_nothing_is_staged() -> None:
    disk, cpu = IOPartsStore(32, name="disk"), ViewStore(32, name="cpu")
    src = [7, 3, 12, 0, 9, 21, 5]
    keys = filled(disk, src)
    dst = [11, 5, 20, 4, 30, 10, 6]  # runs 4-5-6, 10-11, 20, 30: short ones included
    mover = BlockMover()  # 1 MiB: far more than any run here
    await mover.move(disk, src, cpu, dst, keys)
    assert torch.equal(cpu.data[dst], disk.data[src])
    assert (disk.parts_calls, disk.reads, cpu.views, mover.staging_rows) == (1, 0, 4, 0)
    back = [1, 2, 13, 14, 15, 16, 17]
    await mover.move(cpu, dst, disk, back, keys)
    assert (disk.parts_calls, disk.writes, mover.staging_rows) == (2, 0, 0)
    assert torch.equal(disk.data[back], disk.data[src])


@pytest.mark.asyncio
async def test_one_run_still_moves_with_one_call_and_no_staging() -> None:
    device, cpu = CountingStore(32, name="gpu"), ViewStore(32, name="cpu")
    keys = filled(device, [5, 1])
    mover = BlockMover()  # 1 MiB: far more than these two blocks
    await mover.move(device, [5, 1], cpu, [8, 9], keys)
    assert (device.reads, cpu.views, mover.staging_rows) == (1, 1, 0)
    assert torch.equal(cpu.data[8:10], device.data[[5, 1]])


@pytest.mark.asyncio
async def test_below_the_threshold_everything_is_staged_in_bounded_chunks() -> None:
    device, cpu = CountingStore(32, name="gpu"), ViewStore(32, name="cpu")
    src = list(range(10))
    keys = filled(device, src)
    dst = [20, 21, 22, 0, 1, 2, 10, 11, 12, 30]
    mover = BlockMover(staging_bytes=4 * BB, direct_min_bytes=4 * BB)
    await mover.move(device, src, cpu, dst, keys)
    assert torch.equal(cpu.data[dst], device.data[src])
    assert cpu.views == 0
    assert mover.staging_rows == 4
    assert device.reads == 3  # ten blocks in chunks of four


@pytest.mark.asyncio
async def test_a_source_slot_read_twice_breaks_the_run_and_both_copies_arrive() -> None:
    cpu, device = ViewStore(16, name="cpu"), MemoryStore(16, name="gpu")
    (key,) = filled(cpu, [4])
    other = filled(cpu, [5], seed=1)
    mover = BlockMover(direct_min_bytes=BB)
    await mover.move(cpu, [4, 5, 4], device, [0, 1, 2], [key, *other, key])
    assert torch.equal(device.data[[0, 1, 2]], cpu.data[[4, 5, 4]])


@pytest.mark.asyncio
async def test_missing_blocks_in_several_runs_are_all_named_and_the_rest_copied() -> None:
    disk, cpu = MemoryStore(32, name="disk"), ViewStore(32, name="cpu")
    src = [1, 2, 3, 4, 5, 6]
    keys = filled(disk, src)
    disk.keys[2] = keys_for(99)[0]  # in a direct run
    disk.keys[6] = keys_for(98)[0]  # in the staged leftovers
    dst = [10, 11, 20, 21, 22, 30]  # runs 10-11, 20-21-22 (direct), 30 (staged)
    mover = BlockMover(direct_min_bytes=2 * BB)
    with pytest.raises(BlockMissingError) as caught:
        await mover.move(disk, src, cpu, dst, keys)
    assert caught.value.slots == (2, 6)
    assert caught.value.tier == "disk"
    # The run without a bad block was copied; a failed run's rows are undefined.
    assert torch.equal(cpu.data[20:23], disk.data[[3, 4, 5]])


@pytest.mark.asyncio
async def test_an_io_error_stops_the_batch_at_once() -> None:
    device = FaultInjectingStore(MemoryStore(32, name="gpu"))
    cpu = ViewStore(32, name="cpu")
    keys = filled(device.inner, [0, 1, 2, 3])  # type: ignore[arg-type]
    device.read_error = TierIOError("the device fell over", tier="gpu")
    mover = BlockMover(direct_min_bytes=2 * BB)
    with pytest.raises(TierIOError):
        await mover.move(device, [0, 1, 2, 3], cpu, [1, 2, 8, 9], keys)
    assert device.reads == 1


@pytest.mark.parametrize("name", ["staging_bytes", "direct_min_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_sizes_must_be_positive_integers(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name):
        BlockMover(**{name: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=name):
        TransferPipeline(**{name: value})  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 24),
    threshold=st.integers(1, 6),
    staging=st.integers(1, 6),
    view_side=st.sampled_from(["dst", "src", "none"]),
    parts=st.booleans(),
)
def test_any_slots_any_threshold_copy_exactly_the_source_bytes(
    data: st.DataObject, n: int, threshold: int, staging: int, view_side: str, parts: bool
) -> None:
    src_slots = data.draw(st.lists(st.integers(0, 31), min_size=n, max_size=n, unique=True))
    dst_slots = data.draw(st.lists(st.integers(0, 31), min_size=n, max_size=n, unique=True))
    other = PartsStore if parts else MemoryStore  # the side without views
    src = ViewStore(32, name="src") if view_side == "src" else other(32, name="src")
    dst = ViewStore(32, name="dst") if view_side == "dst" else other(32, name="dst")
    keys = filled(src, sorted(src_slots))
    by_slot = dict(zip(sorted(src_slots), keys, strict=True))
    mover = BlockMover(staging_bytes=staging * BB, direct_min_bytes=threshold * BB)
    anyio.run(mover.move, src, src_slots, dst, dst_slots, [by_slot[s] for s in src_slots])
    assert torch.equal(dst.data[dst_slots], src.data[src_slots])
    untouched = sorted(set(range(32)) - set(dst_slots))
    assert not dst.data[untouched].any()
    assert mover.staging_rows <= staging


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["per-layer", "cross-layer"])
@pytest.mark.parametrize("direct_blocks", [1, 3, 10_000])
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]
)
async def test_real_tiers_round_trip_scattered_slots(
    kind: str, direct_blocks: int, device: str
) -> None:
    """Device -> CPU -> device with both sides scattered, for each way of moving runs."""
    rng = random.Random(direct_blocks)
    cache = (
        per_layer_cache(device=device) if kind == "per-layer" else cross_layer_cache(device=device)
    )
    out_of = rng.sample(range(NUM_BLOCKS), 40)
    # CPU slots: runs of 1 to 6 consecutive slots, shuffled.
    cpu_slots: list[int] = []
    start = 0
    while len(cpu_slots) < 40:
        length = rng.randint(1, 6)
        cpu_slots.extend(range(start, start + length))
        start += length + rng.randint(1, 3)
    cpu_slots = cpu_slots[:40]
    rng.shuffle(cpu_slots)
    keys = [slot.to_bytes(8, "little") for slot in out_of]
    original = canonical(cache, out_of)
    mover = BlockMover(staging_bytes=4 * BB, direct_min_bytes=direct_blocks * BB)
    async with DeviceTier(cache, SMALL) as gpu, CpuTier(SMALL, 200, device=device) as cpu:
        await mover.move(gpu, out_of, cpu, cpu_slots, keys)
        back = rng.sample(range(NUM_BLOCKS), 40)
        await mover.move(cpu, cpu_slots, gpu, back, keys)
        assert torch.equal(canonical(cache, back), original)
    assert mover.staging_rows <= 4


@pytest.mark.cuda
@needs_cuda
@pytest.mark.asyncio
async def test_pinned_staging_is_allocated_once_at_its_full_size() -> None:
    """torch's caching host allocator keeps every pinned block it gave out: a staging
    buffer grown batch by batch would pin several times ``staging_bytes``."""
    cache = per_layer_cache(device="cuda")
    mover = BlockMover(staging_bytes=4 * BB, direct_min_bytes=10_000 * BB)
    async with DeviceTier(cache, SMALL) as gpu, CpuTier(SMALL, 200, device="cuda") as cpu:
        keys = [i.to_bytes(8, "little") for i in range(6)]
        await mover.move(gpu, [0, 1], cpu, [9, 7], keys[:2])  # two blocks, not a run: staged
        assert mover._staging is not None
        assert mover._staging.is_pinned()
        first = mover._staging.data_ptr()
        assert mover.staging_rows == 4
        await mover.move(gpu, [1, 2, 3, 4, 5, 6], cpu, [9, 3, 11, 1, 13, 15], keys)
        assert (mover.staging_rows, mover._staging.data_ptr()) == (4, first)
