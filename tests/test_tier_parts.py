"""read_into_parts / write_from_parts: one call over several buffers, same bytes as one each."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
import pytest_asyncio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from tests.test_tier_gpu_cpu import (
    BB,
    CUDA,
    NUM_BLOCKS,
    SMALL,
    canonical,
    cuda_tier,
    keys_for,
    make_device_tier,
    rand_bytes,
)

KINDS = ["per-layer", "cross-layer"]


def split(rows: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """``rows`` cut into consecutive parts of ``sizes`` rows (views)."""
    parts, at = [], 0
    for size in sizes:
        parts.append(rows[at : at + size])
        at += size
    return parts


def strided(n: int) -> torch.Tensor:
    """``uint8 [n, BB]`` whose rows are 16 bytes apart from the next row's end."""
    return torch.zeros(n, BB + 16, dtype=torch.uint8)[:, 8 : 8 + BB]


def columnar(n: int) -> torch.Tensor:
    """``uint8 [n, BB]`` stored column by column: no row is contiguous, so copies stage."""
    return torch.zeros(BB, n, dtype=torch.uint8).t()


def cut(n: int, rng: random.Random) -> list[int]:
    """Sizes of a random cut of ``n`` rows into parts (empty parts included)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(rng.choice([0, 1, 1, 2, 5, 40]), n - sum(sizes)))
    return sizes


def torch_zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, BB, dtype=torch.uint8)


@pytest_asyncio.fixture
async def cpu_tier() -> AsyncIterator[CpuTier]:
    async with CpuTier(SMALL, NUM_BLOCKS) as tier:
        yield tier


# -- bytes ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("staging_bytes", [64 << 20, 3 * BB])
async def test_device_parts_into_cpu_tier_rows_match_reference(
    cpu_tier: CpuTier, kind: str, offload: bool, staging_bytes: int
) -> None:
    """Parts that are CPU-tier runs, strided and columnar buffers and plain tensors, mixed."""
    tier, cache = make_device_tier(
        kind, offload_min_bytes=0 if offload else 1 << 30, staging_bytes=staging_bytes
    )
    rng = random.Random(f"{kind}{offload}{staging_bytes}")
    slots = rng.sample(range(NUM_BLOCKS), 60)
    sizes = [3, 1, 0, 7, 1, 20, 2, 4, 9, 13]
    kinds = [
        "run",
        "strided",
        "plain",
        "run",
        "run",
        "columnar",
        "plain",
        "columnar",
        "run",
        "strided",
    ]
    runs = iter(range(0, NUM_BLOCKS, 40))
    parts: list[torch.Tensor] = []
    for size, what in zip(sizes, kinds, strict=True):
        if what == "run":
            start = next(runs)
            view = cpu_tier.slot_view(range(start, start + size))
            parts.append(view if view is not None else torch.empty(0, BB, dtype=torch.uint8))
        elif what == "strided":
            parts.append(strided(size))
        elif what == "columnar":
            parts.append(columnar(size))
        else:
            parts.append(torch.zeros(size, BB, dtype=torch.uint8))
    await tier.read_into_parts(slots, keys_for(slots), parts)
    assert torch.equal(torch.cat(parts), canonical(cache, slots))

    # And back into other device blocks: the same bytes land there.
    targets = rng.sample(sorted(set(range(NUM_BLOCKS)) - set(slots)), 60)
    await tier.write_from_parts(targets, keys_for(targets), parts)
    assert torch.equal(canonical(cache, targets), canonical(cache, slots))


@pytest.mark.asyncio
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
@pytest.mark.parametrize("kind", [*KINDS, "cpu"])
async def test_parts_equal_one_call_per_part(
    cpu_tier: CpuTier, kind: str, data: st.DataObject
) -> None:
    """Whatever the cut, a parts call moves exactly what one call per part would."""
    if kind == "cpu":
        tier: DeviceTier | CpuTier = cpu_tier
        await cpu_tier.write_from(range(NUM_BLOCKS), [b""] * NUM_BLOCKS, rand_bytes(NUM_BLOCKS, BB))
    else:
        tier, _ = make_device_tier(kind, staging_bytes=data.draw(st.sampled_from([BB, 4 * BB])))
    n = data.draw(st.integers(0, 50), label="n")
    # Reads may repeat a slot; writes may not.
    slots = data.draw(st.lists(st.integers(0, NUM_BLOCKS - 1), min_size=n, max_size=n))
    sizes = cut(n, random.Random(data.draw(st.integers(0, 1 << 16), label="cut")))
    make = data.draw(st.sampled_from([strided, columnar, torch_zeros]), label="buffers")
    # One buffer per part: parts cut from one columnar buffer interleave, which
    # the overlap check refuses (conservatively) for reads.
    buffers = [make(size) for size in sizes]
    expected = torch.empty(n, BB, dtype=torch.uint8)
    for part_slots, part in zip(
        split(torch.tensor(slots), sizes), split(expected, sizes), strict=True
    ):
        await tier.read_into(part_slots.tolist(), keys_for(part_slots.tolist()), part)
    await tier.read_into_parts(slots, keys_for(slots), buffers)
    assert torch.equal(torch.cat([*buffers, torch.empty(0, BB, dtype=torch.uint8)]), expected)

    targets = data.draw(st.permutations(range(NUM_BLOCKS)))[:n]
    fresh = rand_bytes(n, BB)
    sources = [make(size) for size in sizes]
    for source, rows in zip(sources, split(fresh, sizes), strict=True):
        source.copy_(rows)
    await tier.write_from_parts(targets, keys_for(targets), sources)
    back = torch.empty(n, BB, dtype=torch.uint8)
    await tier.read_into(targets, keys_for(targets), back)
    assert torch.equal(back, fresh)


@pytest.mark.asyncio
async def test_other_slots_stay_untouched(cpu_tier: CpuTier) -> None:
    tier, cache = make_device_tier("per-layer")
    before = canonical(cache, range(NUM_BLOCKS))
    targets = [5, 9, 100, 101, 7]
    data = rand_bytes(5, BB)
    await tier.write_from_parts(targets, keys_for(targets), [data[:2], data[2:4], data[4:]])
    after = canonical(cache, range(NUM_BLOCKS))
    others = [s for s in range(NUM_BLOCKS) if s not in targets]
    assert torch.equal(after[others], before[others])
    assert torch.equal(after[targets], data)


@pytest.mark.asyncio
async def test_empty_batches_and_parts_are_no_ops(cpu_tier: CpuTier) -> None:
    tier, cache = make_device_tier("cross-layer")
    before = canonical(cache, range(NUM_BLOCKS))
    await tier.read_into_parts([], [], [])
    await tier.write_from_parts([], [], [torch.empty(0, BB, dtype=torch.uint8)])
    await cpu_tier.read_into_parts([], [], ())
    assert torch.equal(canonical(cache, range(NUM_BLOCKS)), before)


@pytest.mark.asyncio
async def test_large_parts_calls_run_off_the_event_loop() -> None:
    tier, cache = make_device_tier("per-layer", offload_min_bytes=0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    slots = list(range(NUM_BLOCKS))
    out = torch.empty(NUM_BLOCKS, BB, dtype=torch.uint8)
    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await anyio.sleep(0)
        before = ticks
        await tier.read_into_parts(slots, keys_for(slots), split(out, [1] * NUM_BLOCKS))
        during = ticks - before
        group.cancel_scope.cancel()
    assert during >= 1  # the loop ran the ticker while a worker thread copied
    assert torch.equal(out, canonical(cache, slots))


# -- bad requests ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [*KINDS, "cpu"])
async def test_bad_parts_raise_and_change_nothing(cpu_tier: CpuTier, kind: str) -> None:
    if kind == "cpu":
        tier: DeviceTier | CpuTier = cpu_tier
        reference: torch.Tensor | list[torch.Tensor] = cpu_tier.slot_view(range(NUM_BLOCKS))  # type: ignore[assignment]
    else:
        tier, reference = make_device_tier(kind)
    before = canonical(reference, range(NUM_BLOCKS))
    good = rand_bytes(4, BB)
    slots = [1, 2, 3, 4]
    keys = keys_for(slots)
    cases: dict[str, tuple[list[int], list[bytes], object]] = {
        "sequence of tensors": (slots, keys, good),
        "expected a tensor": (slots, keys, [good[:2], "rows"]),
        "part 1 must be uint8": (slots, keys, [good[:2], good[2:].view(torch.int16)]),
        "part 0 must be uint8 ": (slots, keys, [good.reshape(-1)]),
        "part 1 must be uint8  ": (slots, keys, [good[:2], good[2:, :100]]),
        "parts hold 3 rows for 4 slots": (slots, keys, [good[:1], good[2:]]),
        "parts hold 5 rows": (slots, keys, [good, good[:1]]),
        "4 slots but 3 keys": (slots, keys[:3], [good]),
        "out of range": ([1, 2, 3, NUM_BLOCKS], keys, [good]),
        "part 0 rows overlap": (slots, keys, [good[:1].expand(4, BB)]),
    }
    for message, (bad_slots, bad_keys, parts) in cases.items():
        with pytest.raises(InvalidRequestError, match=message.strip()):
            await tier.write_from_parts(bad_slots, bad_keys, parts)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=message.strip()):
            await tier.read_into_parts(bad_slots, bad_keys, parts)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="appears twice"):
        await tier.write_from_parts([1, 2, 1], keys_for([1, 2, 1]), [good[:1], good[1:3]])
    with pytest.raises(InvalidRequestError, match="share memory"):
        await tier.read_into_parts(slots, keys, [good[:3], good[2:3]])
    # Overlapping parts are fine to read from: nothing is written into them.
    await tier.write_from_parts(slots, keys, [good[:3], good[2:3]])
    expected = before.clone()
    expected[slots] = torch.cat([good[:3], good[2:3]])
    assert torch.equal(canonical(reference, range(NUM_BLOCKS)), expected)


@pytest.mark.asyncio
async def test_parts_inside_the_tiers_own_memory_are_refused(cpu_tier: CpuTier) -> None:
    own = cpu_tier.slot_view(range(10, 14))
    assert own is not None
    with pytest.raises(InvalidRequestError, match="overlaps the tier's own memory"):
        await cpu_tier.read_into_parts([1, 2, 3, 4], keys_for([1, 2, 3, 4]), [own[:2], own[2:]])
    tier, cache = make_device_tier("cross-layer")
    assert isinstance(cache, torch.Tensor)
    rows = cache.view(NUM_BLOCKS, -1).view(torch.uint8)
    with pytest.raises(InvalidRequestError, match="overlaps the tier's own memory"):
        await tier.write_from_parts([0, 1], keys_for([0, 1]), [rows[5:6], rows[8:9]])


@pytest.mark.asyncio
async def test_closed_tiers_refuse_parts() -> None:
    tier, _ = make_device_tier("per-layer")
    await tier.aclose()
    part = torch.zeros(1, BB, dtype=torch.uint8)
    with pytest.raises(ClosedError):
        await tier.read_into_parts([0], [b""], [part])
    with pytest.raises(ClosedError):
        await tier.write_from_parts([0], [b""], [part])
    cpu = CpuTier(SMALL, 4)
    with pytest.raises(ClosedError, match="not open"):
        await cpu.read_into_parts([0], [b""], [part])
    async with cpu:
        pass
    with pytest.raises(ClosedError):
        await cpu.write_from_parts([0], [b""], [part])


# -- CUDA ------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("staging_bytes", [64 << 20, 3 * BB])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cuda_parts_through_pinned_cpu_tier_runs(kind: str, staging_bytes: int) -> None:
    """Device gathers once per chunk, one DMA per pinned part; pageable parts work too."""
    tier, cache = cuda_tier(kind, staging_bytes=staging_bytes)
    rng = random.Random(kind)
    async with CpuTier(SMALL, NUM_BLOCKS) as pinned:
        assert pinned.pinned
        slots = rng.sample(range(NUM_BLOCKS), 40)
        sizes = [1, 9, 1, 3, 26]
        starts = [0, 50, 100, 150, 200]
        parts = []
        for start, size in zip(starts, sizes, strict=True):
            view = pinned.slot_view(range(start, start + size))
            assert view is not None
            parts.append(view)
        await tier.read_into_parts(slots, keys_for(slots), parts)
        assert torch.equal(torch.cat([p.clone() for p in parts]), canonical(cache, slots))
        mixed = [parts[0], torch.zeros(9, BB, dtype=torch.uint8), *parts[2:]]
        targets = rng.sample(sorted(set(range(NUM_BLOCKS)) - set(slots)), 40)
        await tier.write_from_parts(targets, keys_for(targets), mixed)
        torch.cuda.synchronize()
        assert torch.equal(canonical(cache, targets[:1]), canonical(cache, slots[:1]))
        assert torch.equal(canonical(cache, targets[10:]), canonical(cache, slots[10:]))
