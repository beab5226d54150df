"""DiskTier: closing waits for batches in flight; a restart never prefers a stale block.

``aclose`` keeps the directory locked until the worker threads of the
batches already running are done; two files claiming one slot are both
dropped at restart, and a delete that failed is retried at close; blocks of
slots beyond a smaller capacity are kept for the larger one; a socket under
a block's name is a miss, dropped at restart.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from kvtier.errors import BlockMissingError, ClosedError, ConfigError, TierIOError
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers._file_io import UntrustedFileError, open_trusted
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from tests.factories import entries

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
PER_BLOCK = DiskTier.bytes_per_block(LAYOUT)


def tier_at(path: Path, slots: int = 16) -> DiskTier:
    return DiskTier(path, LAYOUT, slots * PER_BLOCK, max_workers=1)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def key(i: int) -> bytes:
    return bytes([i]) * 32


def name(i: int) -> str:
    return key(i).hex() + ".kvb"


async def read(tier: DiskTier, slots: list[int], keys: list[bytes]) -> torch.Tensor:
    out = torch.empty((len(slots), LAYOUT.block_bytes), dtype=torch.uint8)
    await tier.read_into(slots, keys, out)
    return out


# -- aclose waits for the batches in flight ----------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("op", ["write", "read", "unlink"])
async def test_aclose_keeps_the_directory_until_the_batches_in_flight_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    old, new = blocks(2), blocks(2, seed=1)
    entered, release = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(BlockFiles, op)

    def held(self: BlockFiles, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return real(self, *args, **kwargs)

    tier = tier_at(tmp_path)
    await tier.__aenter__()
    await tier.write_from([0, 1], [key(0), key(1)], old)
    monkeypatch.setattr(BlockFiles, op, held)
    outcome: dict[str, object] = {}

    async def batch() -> None:
        if op == "write":  # recycles keys 0 and 1's files for keys 2 and 3
            await tier.write_from([0, 1], [key(2), key(3)], new)
        elif op == "read":
            outcome["read"] = await read(tier, [0, 1], [key(0), key(1)])
        else:
            await tier.discard([0, 1])
        outcome["batch"] = "done"

    async def close(scope: anyio.CancelScope) -> None:
        with scope:
            await tier.aclose()
        outcome["closed"] = True

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(batch)
        await anyio.to_thread.run_sync(entered.wait, 10)
        group.start_soon(close, scope)
        try:
            await anyio.sleep(0.1)
            scope.cancel()  # the wait is shielded: cancelling aclose does not let go early
            await anyio.sleep(0.1)
            assert "closed" not in outcome
            with pytest.raises(ClosedError):
                await read(tier, [0], [key(0)])
            with pytest.raises(ConfigError, match="in use by another open DiskTier"):
                await tier_at(tmp_path).__aenter__()
        finally:
            release.set()
    assert outcome["batch"] == "done"
    assert outcome["closed"]
    monkeypatch.undo()
    if op == "read":
        assert torch.equal(outcome["read"], old)  # type: ignore[arg-type]
    kept, data = {"write": ([key(2), key(3)], new), "unlink": ([], old[:0])}.get(
        op, ([key(0), key(1)], old)
    )
    assert sorted(p.name for p in entries(tmp_path)) == sorted(k.hex() + ".kvb" for k in kept)
    async with tier_at(tmp_path) as second:  # the batch's files, whole: nothing raced it
        assert await second.recover() == list(enumerate(kept))
        if kept:
            assert torch.equal(await read(second, [0, 1], kept), data)


# -- a delete that fails never brings back a stale block --------------------------------


def failing_unlink(monkeypatch: pytest.MonkeyPatch, doomed: bytes) -> None:
    real = BlockFiles.unlink

    def flaky(self: BlockFiles, k: bytes) -> None:
        if k == doomed:
            raise OSError(errno.EIO, "injected unlink failure")
        real(self, k)

    monkeypatch.setattr(BlockFiles, "unlink", flaky)


@pytest.mark.asyncio
async def test_a_delete_that_failed_is_retried_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = blocks(1, seed=2)
    async with tier_at(tmp_path, slots=8) as tier:
        await tier.write_from([3], [key(1)], blocks(1))
        failing_unlink(monkeypatch, key(1))
        with pytest.raises(TierIOError, match="discard failed"):
            await tier.discard([3])
        monkeypatch.undo()  # the failure was transient
        await tier.write_from([3], [key(2)], live)
        assert (tmp_path / name(1)).exists()  # the discarded block's file is still there
    assert sorted(p.name for p in entries(tmp_path)) == [name(2)]
    async with tier_at(tmp_path, slots=8) as tier:
        assert await tier.recover() == [(3, key(2))]
        assert torch.equal(await read(tier, [3], [key(2)]), live)


@pytest.mark.asyncio
async def test_two_files_claiming_one_slot_are_both_dropped_at_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tier_at(tmp_path, slots=8) as tier:
        await tier.write_from([3, 4], [key(1), key(5)], blocks(2))
        failing_unlink(monkeypatch, key(1))
        with pytest.raises(TierIOError, match="discard failed"):
            await tier.discard([3])
        await tier.write_from([3], [key(2)], blocks(1, seed=2))
        # the delete fails again at close: the discarded block outlives the tier
    monkeypatch.undo()
    assert sorted(p.name for p in entries(tmp_path)) == sorted([name(1), name(2), name(5)])
    async with tier_at(tmp_path, slots=8) as tier:
        # Neither the discarded block nor the one written after it: a miss, never a guess.
        assert await tier.recover() == [(4, key(5))]
    assert sorted(p.name for p in entries(tmp_path)) == [name(5)]


# -- a smaller capacity keeps the blocks beyond it --------------------------------------


@pytest.mark.asyncio
async def test_a_smaller_capacity_keeps_the_blocks_beyond_it_for_the_larger_one(
    tmp_path: Path,
) -> None:
    data = blocks(5)
    async with tier_at(tmp_path, slots=16) as tier:
        await tier.write_from([2, 12, 13, 14, 15], [key(i) for i in range(5)], data)
    async with tier_at(tmp_path, slots=8) as tier:
        assert await tier.recover() == [(2, key(0))]
        assert len(entries(tmp_path)) == 5  # nothing deleted
        # The smaller tier writes its own slots; the same key elsewhere replaces its file.
        await tier.write_from([5, 6], [key(9), key(4)], data[:2])
    async with tier_at(tmp_path, slots=16) as tier:
        recovered = await tier.recover()
        assert recovered == [
            (2, key(0)),
            (5, key(9)),
            (6, key(4)),
            (12, key(1)),
            (13, key(2)),
            (14, key(3)),
        ]
        slots, keys = [s for s, _ in recovered], [k for _, k in recovered]
        out = await read(tier, slots, keys)
        assert torch.equal(out, torch.stack([data[0], data[0], data[1], *data[1:4]]))


@pytest.mark.asyncio
async def test_discard_unmapped_deletes_blocks_beyond_the_capacity_and_unreadable_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a reset must delete beside the mapped blocks; a mapped block stays."""
    data = blocks(4)
    async with tier_at(tmp_path, slots=16) as tier:
        await tier.write_from([1, 12, 13, 3], [key(1), key(12), key(13), key(3)], data)
    verify = BlockFiles.verify

    def unreadable_3(self: BlockFiles, path: Path) -> Any:
        if path.name == name(3):
            raise OSError(errno.EIO, "injected: unreadable")  # skipped and kept by the scan
        return verify(self, path)

    monkeypatch.setattr(BlockFiles, "verify", unreadable_3)
    async with tier_at(tmp_path, slots=8) as tier:
        monkeypatch.undo()
        assert await tier.recover() == [(1, key(1))]
        assert len(entries(tmp_path)) == 4  # nothing deleted at open
        (tmp_path / "not-hex.kvb").write_bytes(b"")  # since: no name of ours, left alone
        assert await tier.discard_unmapped() == 3  # 12 and 13 (beyond 8) and 3
        assert await tier.discard_unmapped() == 0
        assert torch.equal(await read(tier, [1], [key(1)]), data[:1])
    assert sorted(p.name for p in entries(tmp_path)) == sorted([name(1), "not-hex.kvb"])
    async with tier_at(tmp_path, slots=16) as tier:
        assert await tier.recover() == [(1, key(1))]


@pytest.mark.asyncio
async def test_discard_unmapped_leaves_a_block_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, go_on = threading.Event(), threading.Event()
    write = BlockFiles.write

    def slow_write(self: BlockFiles, *args: Any, **kwargs: Any) -> None:
        write(self, *args, **kwargs)  # the file is in place, not yet mapped
        written.set()
        go_on.wait(10)

    monkeypatch.setattr(BlockFiles, "write", slow_write)
    data = blocks(1)
    two_threads = DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK, max_workers=2)
    async with two_threads as tier, anyio.create_task_group() as group:
        group.start_soon(tier.write_from, [4], [key(4)], data)
        try:
            await anyio.to_thread.run_sync(written.wait, 10)
            assert await tier.discard_unmapped() == 0
        finally:
            go_on.set()
    async with tier_at(tmp_path) as tier:
        assert await tier.recover() == [(4, key(4))]
        assert torch.equal(await read(tier, [4], [key(4)]), data)
        assert await tier.discard_unmapped() == 0
    with pytest.raises(ClosedError):
        await tier.discard_unmapped()


# -- a socket under a block's name --------------------------------------------------------


@pytest.mark.asyncio
async def test_a_socket_under_a_block_name_is_a_miss_and_dropped_at_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1], [key(7), key(8)], blocks(2))
    monkeypatch.chdir(tmp_path)  # a relative name: AF_UNIX paths are short
    (tmp_path / name(7)).unlink()
    (tmp_path / name(8)).unlink()
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as other:
        listener.bind(name(7))
        with pytest.raises(UntrustedFileError):
            open_trusted(tmp_path / name(7), os.O_RDONLY)
        async with tier_at(tmp_path) as tier:
            assert await tier.recover() == []
            assert entries(tmp_path) == []  # dropped, as a FIFO is
            other.bind(name(8))  # one that appears while the tier serves
            with pytest.raises(BlockMissingError):
                await read(tier, [1], [key(8)])


@pytest.mark.asyncio
async def test_a_second_aclose_waits_for_the_first_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first close retries a failed delete in a worker: the second kept the lock for none."""
    tier = tier_at(tmp_path)
    await tier.__aenter__()
    await tier.write_from([0], [key(0)], blocks(1))
    entered, release = threading.Event(), threading.Event()
    real = BlockFiles.unlink
    failing = [True]

    def unlink(self: BlockFiles, k: bytes) -> None:
        if failing[0]:
            raise PermissionError(errno.EACCES, "injected")
        entered.set()
        release.wait(10)
        real(self, k)

    monkeypatch.setattr(BlockFiles, "unlink", unlink)
    with pytest.raises(TierIOError):
        await tier.discard([0])  # the file stays: deleted again at close
    failing[0] = False
    closed: list[str] = []

    async def close(who: str) -> None:
        with anyio.move_on_after(0.05 if who == "second" else 60):  # shielded all the same
            await tier.aclose()
        closed.append(who)

    async with anyio.create_task_group() as group:
        group.start_soon(close, "first")
        await anyio.to_thread.run_sync(entered.wait, 10)  # the first deletes in a worker
        group.start_soon(close, "second")
        await anyio.sleep(0.1)
        try:
            assert closed == []  # the second waits too
            with pytest.raises(ConfigError, match="in use by another open DiskTier"):
                await tier_at(tmp_path).__aenter__()
        finally:
            release.set()
    assert sorted(closed) == ["first", "second"]
    assert not (tmp_path / name(0)).exists()
    async with tier_at(tmp_path) as again:
        assert await again.recover() == []


@pytest.mark.asyncio
async def test_aclose_while_opening_waits_for_the_scan_and_the_open_raises_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
    entered, release = threading.Event(), threading.Event()
    real = DiskTier._open

    def held(self: DiskTier) -> Any:
        entered.set()
        release.wait(10)
        return real(self)

    monkeypatch.setattr(DiskTier, "_open", held)
    tier = tier_at(tmp_path)
    outcome: dict[str, object] = {}

    async def open_() -> None:
        try:
            await tier.__aenter__()
        except ClosedError as exc:
            outcome["open"] = exc

    async def close() -> None:
        await tier.aclose()
        outcome["closed"] = True

    async with anyio.create_task_group() as group:
        group.start_soon(open_)
        await anyio.to_thread.run_sync(entered.wait, 10)  # the scan runs in a worker
        group.start_soon(close)
        await anyio.sleep(0.1)
        try:
            assert "closed" not in outcome  # the scan still holds the directory
        finally:
            release.set()
    assert isinstance(outcome["open"], ClosedError)
    monkeypatch.setattr(DiskTier, "_open", real)
    async with tier_at(tmp_path) as again:  # the lock was released, not leaked
        assert await again.recover() == [(0, key(0))]
