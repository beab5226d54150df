"""DiskTier parts calls: blocks straight between files and several buffers, verified."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from kvtier.errors import (
    BlockMissingError,
    ClosedError,
    ConfigError,
    InvalidRequestError,
    TierIOError,
)
from kvtier.mover import BlockMover
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from tests.factories import entries
from tests.test_tier_disk import (
    LAYOUT,
    PER_BLOCK,
    _flip_payload,
    block_file,
    blocks,
    key,
    tier_at,
)

BB = LAYOUT.block_bytes
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def columnar(n: int) -> torch.Tensor:
    """``uint8 [n, BB]`` stored column by column: rows that are not contiguous."""
    return torch.zeros(BB, n, dtype=torch.uint8).t()


def padded(n: int) -> torch.Tensor:
    return torch.zeros(n, BB + 16, dtype=torch.uint8)[:, 8 : 8 + BB]


@pytest.mark.asyncio
async def test_parts_round_trip_through_files(tmp_path: Path) -> None:
    data = blocks(12, seed=3)
    slots = [5, 0, 9, 2, 14, 7, 3, 11, 1, 8, 6, 12]
    keys = [key(i) for i in range(12)]
    sources = [data[:1], padded(4), columnar(3), data[8:]]
    sources[1].copy_(data[1:5])
    sources[2].copy_(data[5:8])
    async with tier_at(tmp_path) as tier:
        await tier.write_from_parts(slots, keys, sources)
        whole = torch.empty(12, BB, dtype=torch.uint8)
        await tier.read_into(slots, keys, whole)
        assert torch.equal(whole, data)
        targets = [padded(2), torch.empty(0, BB, dtype=torch.uint8), columnar(5), padded(5)]
        await tier.read_into_parts(slots, keys, targets)
        assert torch.equal(torch.cat(targets), data)
    async with tier_at(tmp_path) as reopened:  # the same files: a warm restart serves them
        assert sorted(await reopened.recover()) == sorted(zip(slots, keys, strict=True))


@pytest.mark.asyncio
async def test_a_bad_block_is_named_and_the_other_parts_are_filled(tmp_path: Path) -> None:
    data = blocks(6, seed=4)
    slots, keys = list(range(6)), [key(i) for i in range(6)]
    async with tier_at(tmp_path) as tier:
        await tier.write_from(slots, keys, data)
        _flip_payload(block_file(tmp_path, 4))
        out = [torch.empty(3, BB, dtype=torch.uint8), torch.empty(3, BB, dtype=torch.uint8)]
        with pytest.raises(BlockMissingError) as caught:
            await tier.read_into_parts(slots, keys, out)
        assert caught.value.slots == (4,)
        assert torch.equal(out[0], data[:3])
        assert torch.equal(out[1][[0, 2]], data[[3, 5]])


@pytest.mark.asyncio
async def test_bad_parts_calls_are_refused(tmp_path: Path) -> None:
    data = blocks(4)
    keys = [key(i) for i in range(4)]
    async with tier_at(tmp_path) as tier:
        with pytest.raises(InvalidRequestError, match="parts hold 3 rows for 4 slots"):
            await tier.write_from_parts([0, 1, 2, 3], keys, [data[:1], data[2:]])
        with pytest.raises(InvalidRequestError, match="repeats a slot or a key"):
            await tier.write_from_parts([0, 1, 2, 3], [keys[0]] * 4, [data])
        with pytest.raises(InvalidRequestError, match="share memory"):
            await tier.read_into_parts([0, 1, 2, 3], keys, [data[:3], data[2:3]])
        with pytest.raises(InvalidRequestError, match="sequence of tensors"):
            await tier.read_into_parts([0, 1, 2, 3], keys, data)  # type: ignore[arg-type]
        assert await tier.recover() == []
    with pytest.raises(ClosedError):
        await tier.read_into_parts([0], keys[:1], [data[:1]])
    with pytest.raises(ClosedError):
        await tier.write_from_parts([0], keys[:1], [data[:1]])


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [1, 7, 40])
async def test_mover_moves_disk_blocks_straight_into_cpu_rows_and_back(
    tmp_path: Path, n: int
) -> None:
    """Scattered CPU slots, runs of any length, one parts call each way, no staging."""
    rng = random.Random(n)
    data = blocks(n, seed=n)
    disk_slots = rng.sample(range(64), n)
    keys = [key(i) for i in range(n)]
    cpu_slots = rng.sample(range(48), n)
    mover = BlockMover()
    async with tier_at(tmp_path, slots=64) as disk, CpuTier(LAYOUT, 48) as cpu:
        await disk.write_from(disk_slots, keys, data)
        await mover.move(disk, disk_slots, cpu, cpu_slots, keys)
        rows = cpu.slot_view(range(48))
        assert rows is not None
        assert torch.equal(rows[cpu_slots], data)
        back = rng.sample(range(64), n)
        await disk.discard(disk_slots)
        await mover.move(cpu, cpu_slots, disk, back, keys)
        out = torch.empty(n, BB, dtype=torch.uint8)
        await disk.read_into(back, keys, out)
        assert torch.equal(out, data)
    assert mover.staging_rows == 0


@pytest.mark.asyncio
async def test_a_load_gets_a_thread_between_the_calls_of_a_large_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker, calls of four blocks: a load queued during a 40-block store
    runs after the store's first call, not after the whole batch."""
    events: list[str] = []
    first_write, release = threading.Event(), threading.Event()
    real_pwritev, real_preadv = os.pwritev, os.preadv

    def pwritev(fd: int, buffers: Sequence[Any], offset: int) -> int:
        events.append("write")
        if len(events) == 1:
            first_write.set()
            release.wait(30)
        return real_pwritev(fd, buffers, offset)

    def preadv(fd: int, buffers: Sequence[Any], offset: int) -> int:
        events.append("read")
        return real_preadv(fd, buffers, offset)

    data = blocks(41, seed=7)
    tier = DiskTier(tmp_path, LAYOUT, 64 * PER_BLOCK, max_workers=1, call_bytes=4 * BB)
    async with tier:
        await tier.write_from([60], [key(60)], data[40:])
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "preadv", preadv)
        out = torch.empty(1, BB, dtype=torch.uint8)
        async with anyio.create_task_group() as group:
            keys = [key(i) for i in range(40)]
            group.start_soon(tier.write_from, list(range(40)), keys, data[:40])
            await anyio.to_thread.run_sync(first_write.wait)
            group.start_soon(tier.read_into, [60], [key(60)], out)
            limiter = tier._batches._limiter
            while limiter.statistics().tasks_waiting == 0:  # the load waits for the thread
                await anyio.sleep(0)
            release.set()
    assert torch.equal(out, data[40:])
    assert events.index("read") == 4  # after the store's first call of four blocks
    assert events.count("write") == 40


@pytest.mark.asyncio
async def test_an_unexpected_failure_in_a_worker_is_a_tier_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an OSError (the kernel's MemoryError, a row refusing bytes): still a TierIOError."""
    async with tier_at(tmp_path, slots=8) as tier:
        await tier.write_from([0, 1], [key(0), key(1)], blocks(2))

        def out_of_memory(*_: object) -> int:
            raise MemoryError("no memory for the read")

        monkeypatch.setattr(os, "preadv", out_of_memory)
        monkeypatch.setattr(os, "pwritev", out_of_memory)
        out = [torch.empty(1, BB, dtype=torch.uint8), torch.empty(1, BB, dtype=torch.uint8)]
        with pytest.raises(TierIOError, match="no memory"):
            await tier.read_into_parts([0, 1], [key(0), key(1)], out)
        with pytest.raises(TierIOError, match="no memory"):
            await tier.write_from_parts([2, 3], [key(2), key(3)], out)
        monkeypatch.undo()
    # The failed writes left no file behind (no block, no temp file).
    names = {path.name for path in entries(tmp_path)}
    assert names == {block_file(tmp_path, 0).name, block_file(tmp_path, 1).name}


@pytest.mark.asyncio
async def test_a_bad_buffer_is_reported_before_bad_keys(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        wrong = torch.empty(2, BB + 1, dtype=torch.uint8)
        with pytest.raises(InvalidRequestError, match="buffer must be uint8"):
            await tier.write_from([0, 1], [key(0), key(0)], wrong)
        with pytest.raises(InvalidRequestError, match="part 0 must be uint8"):
            await tier.read_into_parts([0, 1], [b"", key(1)], [wrong])


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_call_bytes_must_be_a_positive_integer(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="call_bytes"):
        DiskTier(tmp_path, LAYOUT, 4 * PER_BLOCK, call_bytes=value)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "where",
    [
        "padded",
        "columnar",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, NEEDS_CUDA],
        ),
    ],
)
async def test_a_missing_block_still_fills_the_others(tmp_path: Path, where: str) -> None:
    """Strided rows are read one by one; a device part is filled from a host copy."""
    data = blocks(3, seed=8)
    keys = [key(i) for i in range(3)]
    if where == "padded":
        part = torch.zeros(3, BB + 2, dtype=torch.uint8)[:, 1 : 1 + BB]
    elif where == "columnar":
        part = columnar(3)
    else:
        part = torch.zeros(3, BB, dtype=torch.uint8, device="cuda")
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1, 2], keys, data)
        _flip_payload(block_file(tmp_path, 1))
        with pytest.raises(BlockMissingError):
            await tier.read_into_parts([0, 1, 2], keys, [part])
        assert torch.equal(part[[0, 2]].cpu(), data[[0, 2]])
