"""read_into_parts / write_from_parts: one call over several buffers, same bytes as one each."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.tiers._copy import OFFLOAD_MIN_BYTES
from kvtier.tiers._memory import any_overlap
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from tests.test_tier_gpu_cpu import (
    BB,
    CUDA,
    NUM_BLOCKS,
    SMALL,
    canonical,
    cross_layer_cache,
    keys_for,
    loop_turns_during,
    make_device_tier,
    per_layer_cache,
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
    # Parts cut from one buffer (rows of a columnar one share address ranges)
    # or a buffer each.
    one_buffer = data.draw(st.booleans(), label="one buffer")
    buffers = split(make(n), sizes) if one_buffer else [make(size) for size in sizes]
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
    slots = list(range(NUM_BLOCKS))
    out = torch.empty(NUM_BLOCKS, BB, dtype=torch.uint8)
    call = tier.read_into_parts(slots, keys_for(slots), split(out, [1] * NUM_BLOCKS))
    assert await loop_turns_during(call) >= 1  # the loop ran others while a thread copied
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


def test_row_slices_of_one_buffer_are_told_apart_exactly() -> None:
    rows = torch.zeros(10, BB, dtype=torch.uint8)
    by_column = columnar(10)  # its row slices' address ranges all intersect
    assert not any_overlap([rows[:5], rows[5:]])
    assert not any_overlap([by_column[:5], by_column[5:]])
    assert not any_overlap([by_column[:3], by_column[6:], by_column[3:6]])
    assert any_overlap([by_column[:5], by_column[4:]])
    assert any_overlap([by_column[:3], by_column[3:6], by_column[2:4]])
    assert any_overlap([rows[:5], rows[4:6]])
    # Interleaved views on one row grid share no byte: told apart exactly.
    assert not any_overlap([rows[0::2], rows[1::2]])
    assert not any_overlap([rows[:, : BB // 2], rows[:, BB // 2 :]])  # K and V halves
    assert any_overlap([rows[:, : BB // 2 + 1], rows[:, BB // 2 :]])
    straddling = rows.view(-1).as_strided((4, BB), (2 * BB, 1), BB + BB // 2)
    assert any_overlap([rows[0::2], straddling])  # each of its rows runs into the next
    # Tensors on different devices never overlap; ``meta`` stands in for one here.
    assert not any_overlap([rows, torch.empty(10, BB, dtype=torch.uint8, device="meta")])


_VIEW = st.tuples(
    st.integers(1, 4), st.integers(1, 5), st.integers(0, 12), st.integers(0, 3), st.integers(0, 60)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_VIEW, min_size=2, max_size=3))
def test_views_that_share_a_byte_are_always_found(
    views: list[tuple[int, int, int, int, int]],
) -> None:
    storage = torch.zeros(128, dtype=torch.uint8)
    tensors, addresses = [], []
    for rows, cols, row_stride, col_stride, offset in views:
        places = [
            offset + i * row_stride + j * col_stride for i in range(rows) for j in range(cols)
        ]
        if len(set(places)) != len(places):
            continue  # a view that overlaps itself is refused before this check
        tensors.append(storage.as_strided((rows, cols), (row_stride, col_stride), offset))
        addresses.append(set(places))
    shared = any(a & b for i, a in enumerate(addresses) for b in addresses[i + 1 :])
    if shared:
        assert any_overlap(tensors)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.lists(st.tuples(st.integers(1, 4), st.integers(0, 40)), min_size=2, max_size=3),
)
def test_views_on_one_row_grid_are_told_apart_exactly(
    cols: int, extra: int, views: list[tuple[int, int]]
) -> None:
    row_stride = cols + extra  # contiguous rows, apart: the grid never overlaps itself
    storage = torch.zeros(256, dtype=torch.uint8)
    tensors = [storage.as_strided((rows, cols), (row_stride, 1), at) for rows, at in views]
    addresses = [
        {at + i * row_stride + j for i in range(rows) for j in range(cols)} for rows, at in views
    ]
    shared = any(a & b for i, a in enumerate(addresses) for b in addresses[i + 1 :])
    phases = [at % row_stride for _, at in views]
    interleaved = all(  # no row of one starts within ``cols`` of a row of another
        min((p - q) % row_stride, (q - p) % row_stride) >= cols
        for i, p in enumerate(phases)
        for q in phases[i + 1 :]
    )
    assert any_overlap(tensors) == shared or (not shared and not interleaved)
    if interleaved:
        assert not any_overlap(tensors)


@pytest.mark.asyncio
async def test_parts_cut_from_one_column_major_buffer(cpu_tier: CpuTier) -> None:
    tier, cache = make_device_tier("per-layer")
    slots = [3, 1, 4, 1, 5, 9, 2, 6]
    out = columnar(8)
    await tier.read_into_parts(slots, keys_for(slots), [out[:2], out[2:7], out[7:]])
    assert torch.equal(out, canonical(cache, slots))
    with pytest.raises(InvalidRequestError, match="share memory"):
        await tier.read_into_parts(slots, keys_for(slots), [out[:4], out[3:7]])


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
@pytest.mark.parametrize("staging_bytes", [64 << 20, 3 * BB, BB // 2])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_cuda_parts_pinned_pageable_and_on_the_device(
    kind: str, staging_bytes: int, offload: bool
) -> None:
    """Pinned CPU-tier runs, device parts (plain, strided), an empty part, repeated reads.

    No ``torch.cuda.synchronize()`` before checking: the tier's own wait must
    have settled every part when the call returns. ``offload`` queues large
    batches from a worker thread; ``BB // 2`` stages one row per chunk.
    """
    cache = (
        per_layer_cache(device="cuda") if kind == "per-layer" else cross_layer_cache(device="cuda")
    )
    tier = DeviceTier(
        cache,
        SMALL,
        staging_bytes=staging_bytes,
        offload_min_bytes=0 if offload else OFFLOAD_MIN_BYTES,
    )
    rng = random.Random(f"{kind}{staging_bytes}{offload}")
    async with CpuTier(SMALL, NUM_BLOCKS) as pinned:
        assert pinned.pinned
        views = [pinned.slot_view(range(at, at + n)) for at, n in ((0, 1), (50, 9), (100, 3))]
        one, nine, three = (view for view in views if view is not None)
        on_device = torch.zeros(1, BB, dtype=torch.uint8, device="cuda")
        strided_device = torch.zeros(26, BB + 16, dtype=torch.uint8, device="cuda")[:, 8 : 8 + BB]
        empty = torch.empty(0, BB, dtype=torch.uint8)
        parts = [one, nine, empty, on_device, three, strided_device]
        slots = rng.sample(range(NUM_BLOCKS), 40)
        slots[5] = slots[0]  # reads may repeat a slot
        await tier.read_into_parts(slots, keys_for(slots), parts)
        assert torch.equal(torch.cat([part.cpu() for part in parts]), canonical(cache, slots))

        pageable = rand_bytes(9, BB)
        mixed = [one, pageable, empty, on_device, three, strided_device]
        expected = torch.cat([part.cpu() for part in mixed])
        targets = rng.sample(range(NUM_BLOCKS), 40)
        await tier.write_from_parts(targets, keys_for(targets), mixed)
        assert torch.equal(canonical(cache, targets), expected)
