"""DiskTier on a real file system: verification, permissions, faults, warm restart."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import BlockMissingError, ConfigError, InvalidRequestError, TierIOError
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_format import (
    MAX_KEY_BYTES,
    TRAILER,
    checksum,
    decode_trailer,
    encode_trailer,
    file_bytes,
)
from kvtier.tiers.index import TierIndex
from tests.factories import entries

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
PER_BLOCK = DiskTier.bytes_per_block(LAYOUT)


def tier_at(path: Path, slots: int = 16, layout: BlockLayout = LAYOUT) -> DiskTier:
    return DiskTier(path, layout, slots * PER_BLOCK)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def key(i: int) -> bytes:
    return bytes([i]) * 36  # like a sha256 hash + group id


def block_file(root: Path, i: int) -> Path:
    return root / (key(i).hex() + ".kvb")


def bad_sector(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make every read of ``path``'s file fail with EIO, as a bad sector does."""
    import errno

    inode = path.stat().st_ino
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.fstat(fd).st_ino == inode:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)


async def read(tier: DiskTier, slots: list[int], keys: list[bytes]) -> torch.Tensor:
    out = torch.empty((len(slots), LAYOUT.block_bytes), dtype=torch.uint8)
    await tier.read_into(slots, keys, out)
    return out


@pytest.mark.asyncio
async def test_permissions_and_names(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    async with tier_at(loose) as tier:
        await tier.write_from([0, 1], [key(1), key(2)], blocks(2))
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    names = sorted(p.name for p in entries(loose))
    assert names == sorted(k.hex() + ".kvb" for k in (key(1), key(2)))
    for path in loose.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh = tmp_path / "a" / "b"
    os.chmod(tmp_path, 0o755)
    umask = os.umask(0o022)  # the usual umask: parents made by mkdir(parents=True) get 0755
    try:
        async with tier_at(fresh):
            pass
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700  # missing parents: 0700 too
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # an existing parent: left alone
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        async with tier_at(tmp_path / "file"):
            pass
    with pytest.raises(TierIOError, match="Not a directory"):
        async with tier_at(tmp_path / "file" / "below"):
            pass
    # Group and other bits go; the owner's are never added.
    for before, after in ((0o750, 0o700), (0o555, 0o500), (0o500, 0o500)):
        os.chmod(loose, before)
        async with tier_at(loose) as tier:
            assert torch.equal(await read(tier, [0], [key(1)]), blocks(2)[:1])
        assert stat.S_IMODE(loose.stat().st_mode) == after, oct(before)
        os.chmod(loose, 0o700)


def _flip_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[LAYOUT.block_bytes + 20] ^= 0x40  # inside the trailer's fingerprint
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", [_flip_payload, _flip_header, _truncate, _delete])
async def test_damaged_blocks_are_misses_and_the_rest_still_serve(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    data = blocks(3, 1)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1, 2], [key(0), key(1), key(2)], data)
        damage(block_file(tmp_path, 1))
        out = torch.zeros((3, LAYOUT.block_bytes), dtype=torch.uint8)
        with pytest.raises(BlockMissingError) as info:
            await tier.read_into([0, 1, 2], [key(0), key(1), key(2)], out)
        assert info.value.slots == (1,)
        assert "(slots 1)" in str(info.value)
        assert torch.equal(await read(tier, [0, 2], [key(0), key(2)]), data[[0, 2]])


@pytest.mark.asyncio
async def test_wrong_key_or_slot_is_a_miss(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([3], [key(3)], blocks(1))
        with pytest.raises(BlockMissingError):
            await read(tier, [3], [key(4)])  # another key: no such file
        with pytest.raises(BlockMissingError):
            await read(tier, [5], [key(3)])  # the block was written to slot 3


@pytest.mark.asyncio
async def test_another_layout_refuses_the_directory_and_its_blocks_survive(
    tmp_path: Path,
) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
    other = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="bfloat16")
    marks = {p.name for p in tmp_path.iterdir()} - {p.name for p in entries(tmp_path)}
    assert marks == {LAYOUT.fingerprint().hex() + ".layout"}
    assert stat.S_IMODE((tmp_path / marks.pop()).stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="holds the blocks of another block layout or model"):
        async with tier_at(tmp_path, layout=other):
            pass
    async with tier_at(tmp_path / "other", layout=other):  # its own directory: fine
        pass
    async with tier_at(tmp_path) as tier:  # nothing was lost
        assert list(await tier.recover()) == [(0, key(0))]
        assert torch.equal(await read(tier, [0], [key(0)]), blocks(1))


@pytest.mark.asyncio
async def test_a_model_name_separates_directories_and_blocks_of_equal_layouts(
    tmp_path: Path,
) -> None:
    from kvtier.tiers.disk import namespace_fingerprint

    def tier(model: str) -> DiskTier:
        return DiskTier(tmp_path, LAYOUT, 4 * PER_BLOCK, model=model)

    async with tier("llama-3-8b") as base:
        await base.write_from([0], [key(0)], blocks(1))
    marks = {p.name for p in tmp_path.iterdir()} - {p.name for p in entries(tmp_path)}
    assert marks == {namespace_fingerprint(LAYOUT, "llama-3-8b").hex() + ".layout"}
    for other in ("llama-3-8b-finetune", ""):  # same layout, another model (or none)
        with pytest.raises(ConfigError, match="another block layout or model"):
            async with tier(other):
                pass
    async with tier("llama-3-8b") as again:
        assert list(await again.recover()) == [(0, key(0))]
        assert torch.equal(await read(again, [0], [key(0)]), blocks(1))
    assert namespace_fingerprint(LAYOUT, "") == LAYOUT.fingerprint()  # older directories
    with pytest.raises(ConfigError, match="model must be a string"):
        DiskTier(tmp_path, LAYOUT, PER_BLOCK, model=3)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_an_unmarked_directory_is_marked_and_foreign_blocks_are_dropped(
    tmp_path: Path,
) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
    for mark in set(tmp_path.iterdir()) - set(entries(tmp_path)):
        mark.unlink()  # as an older kvtier left it
    other = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="bfloat16")
    async with tier_at(tmp_path, layout=other) as tier:
        assert list(await tier.recover()) == []  # blocks of another layout never verify
    assert not any(entries(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [other.fingerprint().hex() + ".layout"]


@pytest.mark.asyncio
async def test_overwriting_a_slot_replaces_its_block(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1, 1))
        new = blocks(1, 2)
        await tier.write_from([0], [key(9)], new)
        assert not block_file(tmp_path, 0).exists()
        assert torch.equal(await read(tier, [0], [key(9)]), new)
        await tier.discard([0])
        assert not any(entries(tmp_path))


@pytest.mark.asyncio
async def test_warm_restart_recovers_valid_blocks_and_drops_the_rest(tmp_path: Path) -> None:
    data = blocks(4, 3)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([2, 5, 7, 9], [key(2), key(5), key(7), key(9)], data)
    _flip_payload(block_file(tmp_path, 7))  # corrupted while closed
    (tmp_path / ".tmp-deadbeef").write_bytes(b"half a block")  # a crash mid-write
    (tmp_path / ("ab" * 36 + ".kvb")).write_bytes(b"torn")

    async with tier_at(tmp_path) as tier:
        recovered = list(await tier.recover())
        assert recovered == [(2, key(2)), (5, key(5)), (9, key(9))]
        index = TierIndex("disk", tier.num_slots)
        index.restore(recovered)
        slots = index.pin([key(2), key(5), key(9)])
        assert torch.equal(await read(tier, slots, [key(2), key(5), key(9)]), data[[0, 1, 3]])
    assert sorted(p.name for p in entries(tmp_path)) == sorted(
        block_file(tmp_path, i).name for i in (2, 5, 9)
    )


@pytest.mark.asyncio
async def test_a_broken_directory_raises_tier_io_errors(tmp_path: Path) -> None:
    root = tmp_path / "blocks"
    async with tier_at(root) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
        shutil.rmtree(root)
        root.write_bytes(b"not a directory")  # a real ENOTDIR for every path below it
        with pytest.raises(TierIOError, match="writing slot 1"):
            await tier.write_from([1], [key(1)], blocks(1))
        with pytest.raises(TierIOError, match="reading slot 0"):
            await read(tier, [0], [key(0)])


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no block"):
        DiskTier(tmp_path, LAYOUT, PER_BLOCK - 1)
    with pytest.raises(ConfigError, match="max_workers"):
        DiskTier(tmp_path, LAYOUT, PER_BLOCK, max_workers=0)
    assert DiskTier(tmp_path, LAYOUT, 3 * PER_BLOCK + 5).num_slots == 3


@pytest.mark.asyncio
async def test_a_relative_path_stays_where_it_was_when_the_working_directory_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    tier = DiskTier("cache", LAYOUT, 4 * PER_BLOCK)
    monkeypatch.chdir(tmp_path / "elsewhere")
    async with tier:
        await tier.write_from([0], [key(0)], blocks(1))
    assert tier.path == tmp_path / "cache"
    assert [p.name for p in entries(tmp_path / "cache")] == [block_file(tmp_path, 0).name]
    assert not any((tmp_path / "elsewhere").iterdir())


@given(
    slot=st.integers(0, 2**32 - 1),
    block_key=st.binary(min_size=1, max_size=MAX_KEY_BYTES),
    payload=st.binary(min_size=1, max_size=9000),
    flip=st.integers(0, 20_000),
)
def test_trailer_round_trip_and_corruption_is_detected(
    slot: int, block_key: bytes, payload: bytes, flip: int
) -> None:
    fingerprint = LAYOUT.fingerprint()
    trailer = encode_trailer(slot, block_key, fingerprint, payload)
    assert len(payload) + len(trailer) == file_bytes(len(payload), len(block_key))
    assert (len(payload) + len(trailer)) % 4096 == 0
    decoded = decode_trailer(trailer)
    assert decoded is not None
    assert (decoded.slot, decoded.key, decoded.payload_length) == (slot, block_key, len(payload))
    assert decoded.fingerprint == fingerprint
    # Any single flipped bit, in the payload, the trailer or its padding, is caught.
    blob = bytearray(payload + trailer)
    blob[flip % len(blob)] ^= 1 << (flip % 8)
    damaged = decode_trailer(bytes(blob[len(payload) :]))
    intact = (
        damaged is not None
        and (damaged.slot, damaged.key, damaged.fingerprint) == (slot, block_key, fingerprint)
        and damaged.payload_length == len(payload)
        and checksum(bytes(blob[: len(payload)])) == damaged.digest
    )
    assert not intact


def test_trailers_of_the_wrong_length_or_version_are_rejected() -> None:
    trailer = encode_trailer(1, b"k", LAYOUT.fingerprint(), b"x" * 100)
    assert decode_trailer(trailer[: TRAILER.size - 1]) is None
    assert decode_trailer(trailer + bytes(4096)) is None  # a file longer than its payload says
    old = bytearray(trailer)
    old[4] = 1  # format version 1 put a header in front: never read as version 2
    assert decode_trailer(bytes(old)) is None


@pytest.mark.asyncio
async def test_pipeline_device_to_cpu_to_disk_and_back_after_a_restart(tmp_path: Path) -> None:
    from kvtier.tiers.cpu import CpuTier
    from kvtier.tiers.gpu import DeviceTier
    from kvtier.transfer import LoadTask, StoreTask, TransferPipeline

    engine_cache = torch.zeros((8, LAYOUT.block_bytes), dtype=torch.uint8)
    data = blocks(3, 7)
    engine_cache[[1, 4, 6]] = data
    keys = [key(1), key(4), key(6)]
    device = DeviceTier(engine_cache, LAYOUT)
    async with device, CpuTier(LAYOUT, 4) as cpu, tier_at(tmp_path) as disk:
        cpu_index, disk_index = TierIndex("cpu", 4), TierIndex("disk", disk.num_slots)
        async with TransferPipeline() as pipeline:
            cpu_slots = cpu_index.reserve(keys).slots
            await (
                await pipeline.submit(
                    StoreTask(device, [1, 4, 6], cpu, cpu_slots, keys, None, cpu_index)
                )
            )
            disk_slots = disk_index.reserve(keys).slots
            src = cpu_index.pin(keys)
            await (
                await pipeline.submit(
                    StoreTask(cpu, src, disk, disk_slots, keys, cpu_index, disk_index)
                )
            )
        assert cpu_index.num_pinned == disk_index.num_reserved == 0

    engine_cache.zero_()
    async with DeviceTier(engine_cache, LAYOUT) as device, tier_at(tmp_path) as disk:
        disk_index = TierIndex("disk", disk.num_slots)
        disk_index.restore(await disk.recover())
        assert disk_index.lookup(keys) == 3
        async with TransferPipeline() as pipeline:
            src = disk_index.pin(keys)
            await (await pipeline.submit(LoadTask(disk, src, device, [0, 2, 3], keys, disk_index)))
        assert torch.equal(engine_cache[[0, 2, 3]], data)
        assert disk_index.num_pinned == 0


# -- recycling, bookkeeping, batches ------------------------------------------------


@pytest.mark.asyncio
async def test_overwriting_a_slot_recycles_the_old_file(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1, 1))
        inode = block_file(tmp_path, 0).stat().st_ino
        new = blocks(1, 2)
        await tier.write_from([0], [key(9)], new)
        assert not block_file(tmp_path, 0).exists()
        assert block_file(tmp_path, 9).stat().st_ino == inode  # same file, renamed
        assert stat.S_IMODE(block_file(tmp_path, 9).stat().st_mode) == 0o600
        assert torch.equal(await read(tier, [0], [key(9)]), new)


@pytest.mark.asyncio
async def test_a_key_written_to_another_slot_moves_there(tmp_path: Path) -> None:
    data = blocks(2, 4)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([1], [key(5)], data[:1])
        await tier.write_from([2], [key(5)], data[1:])  # the same block, now in slot 2
        await tier.write_from([1], [key(6)], data[:1])  # must not delete slot 2's file
        assert torch.equal(await read(tier, [2], [key(5)]), data[1:])
        assert torch.equal(await read(tier, [1], [key(6)]), data[:1])
        with pytest.raises(BlockMissingError):
            await read(tier, [1], [key(5)])
        # A batch that writes a slot's old key into another slot keeps that block.
        await tier.write_from([2, 3], [key(7), key(5)], blocks(2, 5))
        assert torch.equal(await read(tier, [3], [key(5)]), blocks(2, 5)[1:])
        assert sorted(p.name for p in entries(tmp_path)) == sorted(
            block_file(tmp_path, i).name for i in (5, 6, 7)
        )


@pytest.mark.asyncio
async def test_a_batch_may_not_repeat_a_slot_or_a_key(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        with pytest.raises(InvalidRequestError, match="repeats"):
            await tier.write_from([1, 1], [key(1), key(2)], blocks(2))
        with pytest.raises(InvalidRequestError, match="repeats"):
            await tier.write_from([1, 2], [key(1), key(1)], blocks(2))
        with pytest.raises(InvalidRequestError, match=r"keys must be 1\.\.64 bytes, got 0 bytes"):
            await tier.write_from([1], [b""], blocks(1))
        with pytest.raises(InvalidRequestError, match=r"keys must be 1\.\.64 bytes, got str"):
            await tier.write_from([1], ["a"], blocks(1))  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="keys must be"):
            await tier.write_from([1], [b"x" * (MAX_KEY_BYTES + 1)], blocks(1))
        assert not any(entries(tmp_path))


@pytest.mark.asyncio
async def test_calls_on_a_slot_or_key_being_written_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import anyio

    entered, release = threading.Event(), threading.Event()
    real_pwritev = os.pwritev

    def held(fd: int, buffers: list[memoryview], offset: int) -> int:
        entered.set()
        release.wait(timeout=30)
        return real_pwritev(fd, buffers, offset)

    data = blocks(3, 10)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([2], [key(2)], data[2:])
        monkeypatch.setattr(os, "pwritev", held)
        async with anyio.create_task_group() as group:
            group.start_soon(tier.write_from, [1], [key(1)], data[:1])
            await anyio.to_thread.run_sync(entered.wait, 30)  # the write is in its thread
            with pytest.raises(InvalidRequestError, match=r"slot\(s\) \[1\] being written"):
                await tier.write_from([1], [key(9)], data[1:2])
            with pytest.raises(InvalidRequestError, match=r"1 key\(s\) being written"):
                await tier.write_from([3], [key(1)], data[1:2])
            with pytest.raises(InvalidRequestError, match="being written"):
                await tier.discard([1, 2])
            release.set()
        # A key that a write in flight replaces (its file is reused) is refused too.
        release.clear()
        entered.clear()
        monkeypatch.setattr(os, "pwritev", held)
        async with anyio.create_task_group() as group:
            group.start_soon(tier.write_from, [2], [key(5)], data[1:2])  # slot 2 held key(2)
            await anyio.to_thread.run_sync(entered.wait, 30)
            with pytest.raises(InvalidRequestError, match=r"1 key\(s\) being written"):
                await tier.write_from([4], [key(2)], data[2:])
            release.set()
        await tier.write_from([4], [key(2)], data[2:])  # once it ended: stored again
        assert torch.equal(await read(tier, [2, 4], [key(5), key(2)]), data[1:3])
        await tier.write_from([2], [key(2)], data[2:])  # back where the test expects it
        monkeypatch.undo()
        assert torch.equal(await read(tier, [1, 2], [key(1), key(2)]), data[[0, 2]])
        with pytest.raises(BlockMissingError):
            await read(tier, [1], [key(9)])
        assert tier._map.slot_keys == {1: key(1), 2: key(2)}
        await tier.write_from([3], [key(1)], data[1:2])  # free again: the key moves
        await tier.discard([1, 2])
        assert tier._map.slot_keys == {3: key(1)}
        assert [p.name for p in entries(tmp_path)] == [block_file(tmp_path, 1).name]


@pytest.mark.asyncio
async def test_large_batches_split_across_workers_round_trip(tmp_path: Path) -> None:
    data = blocks(13, 6)
    slots = [15, 0, 7, 3, 9, 1, 12, 4, 11, 2, 14, 5, 8]
    keys = [key(i) for i in range(13)]
    async with DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK, max_workers=3) as tier:
        await tier.write_from(slots, keys, data)
        assert torch.equal(await read(tier, slots, keys), data)
        # A strided destination goes through the pooled buffers.
        wide = torch.zeros((13, 2 * LAYOUT.block_bytes), dtype=torch.uint8)
        await tier.read_into(slots, keys, wide[:, : LAYOUT.block_bytes])
        assert torch.equal(wide[:, : LAYOUT.block_bytes], data)


@pytest.mark.asyncio
async def test_cancelled_writes_leave_files_and_index_in_step(tmp_path: Path) -> None:
    import anyio

    data = blocks(16, 8)
    keys = [key(i) for i in range(16)]
    async with tier_at(tmp_path) as tier:
        await tier.write_from(list(range(16)), keys, data)
        new_keys = [key(100 + i) for i in range(16)]
        for delay in (0.0, 0.0005, 0.002):
            with anyio.move_on_after(delay):
                await tier.write_from(list(range(16)), new_keys, blocks(16, 9))
            mapped = dict(tier._map.slot_keys)  # what the tier serves
            files = {p.name for p in entries(tmp_path)}
            assert files == {k.hex() + ".kvb" for k in mapped.values()}
            for slot, block_key in mapped.items():
                expected = blocks(16, 9) if block_key in new_keys else data
                assert torch.equal(await read(tier, [slot], [block_key]), expected[slot : slot + 1])
            await tier.write_from(list(range(16)), keys, data)  # back to the start


# -- real file-system faults ----------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs (real ENOSPC); skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.asyncio
async def test_disk_full_fails_the_write_and_the_tier_keeps_serving(small_tmpfs: Path) -> None:
    layout = BlockLayout(num_layers=4, block_size=16, num_kv_heads=8, head_size=32, dtype="float16")
    per_block = DiskTier.bytes_per_block(layout)  # 64 KiB + 4 KiB: about 15 fit in 1 MiB
    data = torch.randint(0, 256, (40, layout.block_bytes), dtype=torch.uint8)
    async with DiskTier(small_tmpfs / "blocks", layout, 40 * per_block) as tier:
        await tier.write_from(list(range(4)), [key(i) for i in range(4)], data[:4])
        with pytest.raises(TierIOError, match="No space left") as info:
            await tier.write_from(list(range(4, 40)), [key(i) for i in range(4, 40)], data[4:])
        assert isinstance(info.value.__cause__, OSError)
        root = small_tmpfs / "blocks"
        assert not [p for p in entries(root) if p.name.startswith(".tmp-")]
        served = dict(tier._map.slot_keys)
        assert {p.name for p in entries(root)} == {k.hex() + ".kvb" for k in served.values()}
        out = torch.empty((4, layout.block_bytes), dtype=torch.uint8)
        await tier.read_into(list(range(4)), [key(i) for i in range(4)], out)
        assert torch.equal(out, data[:4])
        await tier.discard([s for s in served if s >= 4])  # space comes back
        await tier.write_from([4], [key(4)], data[4:5])


@pytest.mark.asyncio
async def test_direct_io_refused_by_the_file_system_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what such a file system says
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(ConfigError, match="direct_io is not supported"):
        async with DiskTier(tmp_path / "d", LAYOUT, 4 * PER_BLOCK, direct_io=True):
            pass
    assert not list((tmp_path / "d").iterdir())  # the probe left nothing


@pytest.mark.asyncio
async def test_an_immutable_directory_fails_writes_and_still_serves_reads(tmp_path: Path) -> None:
    import subprocess

    root = tmp_path / "blocks"
    data = blocks(2, 10)
    async with tier_at(root) as tier:
        await tier.write_from([0], [key(0)], data[:1])
        # chattr +i stops even root from creating files (chmod does not).
        if subprocess.run(["chattr", "+i", str(root)], check=False).returncode != 0:
            pytest.skip("chattr +i is not supported here")
        try:
            with pytest.raises(TierIOError, match="writing slot 1"):
                await tier.write_from([1], [key(1)], data[1:])
            assert torch.equal(await read(tier, [0], [key(0)]), data[:1])
        finally:
            subprocess.run(["chattr", "-i", str(root)], check=True)
        await tier.write_from([1], [key(1)], data[1:])
        assert torch.equal(await read(tier, [0, 1], [key(0), key(1)]), data)
    # Unmarked (as an older kvtier left it) and immutable: opened unmarked, reads served.
    for mark in set(root.iterdir()) - set(entries(root)):
        mark.unlink()
    subprocess.run(["chattr", "+i", str(root)], check=True)
    try:
        async with tier_at(root) as tier:
            assert sorted(await tier.recover()) == [(0, key(0)), (1, key(1))]
            assert torch.equal(await read(tier, [0, 1], [key(0), key(1)]), data)
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)
    assert set(root.iterdir()) == set(entries(root))  # still unmarked


@pytest.mark.asyncio
async def test_system_read_errors_fail_the_read_and_later_reads_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    data = blocks(2, 11)
    real_preadv = os.preadv

    def failing_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")  # the process's, not the file's

    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1], [key(0), key(1)], data)
        monkeypatch.setattr(os, "preadv", failing_preadv)
        with pytest.raises(TierIOError, match="Too many open files"):
            await read(tier, [0, 1], [key(0), key(1)])
        monkeypatch.setattr(os, "preadv", real_preadv)
        assert torch.equal(await read(tier, [0, 1], [key(0), key(1)]), data)


@pytest.mark.asyncio
async def test_a_file_that_fails_with_eio_is_a_miss_and_the_rest_of_the_batch_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blocks(3, 12)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1, 2], [key(0), key(1), key(2)], data)
        bad_sector(monkeypatch, block_file(tmp_path, 1))
        out = torch.zeros((3, LAYOUT.block_bytes), dtype=torch.uint8)
        with pytest.raises(BlockMissingError) as info:
            await tier.read_into([0, 1, 2], [key(0), key(1), key(2)], out)
        assert info.value.slots == (1,)
        assert torch.equal(out[[0, 2]], data[[0, 2]])


@pytest.mark.asyncio
async def test_a_persistent_eio_is_forgotten_by_the_index_after_one_failed_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from kvtier.transfer import LoadTask, TransferPipeline
    from tests.tier_doubles import MemoryStore

    data = blocks(2, 13)
    device = MemoryStore(4, layout=LAYOUT, name="gpu")
    index = TierIndex("disk", 16, "lru")
    async with tier_at(tmp_path) as tier, TransferPipeline() as pipeline:
        await tier.write_from([0, 1], [key(0), key(1)], data)
        index.restore([(0, key(0)), (1, key(1))])
        bad_sector(monkeypatch, block_file(tmp_path, 1))
        slots = index.pin([key(1)])
        done = await pipeline.submit(LoadTask(tier, slots, device, [0], [key(1)], index))
        with pytest.raises(BlockMissingError):
            await done
        assert key(1) not in index  # the next lookup misses instead of failing again
        assert key(0) in index
        assert index.num_pinned == 0
        assert not device.data[0].any()  # never wrong bytes


@pytest.mark.asyncio
async def test_a_failed_write_that_moved_a_key_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    data = blocks(3, 14)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([1, 2], [key(5), key(6)], data[:2])

        def disk_full(fd: int, buffers: list[memoryview], offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        real_pwritev = os.pwritev
        monkeypatch.setattr(os, "pwritev", disk_full)
        for slot in (2, 3):  # over another block's file, and into a free slot
            with pytest.raises(TierIOError, match="No space left"):
                await tier.write_from([slot], [key(5)], data[2:])
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        # key 5 was unmapped from slot 1 by the first write: its old file is gone too.
        mapped = dict(tier._map.slot_keys)
        assert {p.name for p in entries(tmp_path)} == {k.hex() + ".kvb" for k in mapped.values()}
        assert key(5) not in mapped.values()
        with pytest.raises(BlockMissingError):
            await read(tier, [1], [key(5)])
    async with tier_at(tmp_path) as tier:  # nothing stale comes back on a warm restart
        assert await tier.recover() == list(mapped.items())


@pytest.mark.asyncio
async def test_a_key_moved_within_a_batch_whose_write_fails_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slot 0 holds A; one batch writes B into slot 0 and A into slot 1, and A fails."""
    import errno

    a, b = key(1), key(2)  # A's file sorts first: a stale one would win slot 0 on restart
    real_pwritev = os.pwritev
    calls = 0

    def second_write_fails(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, buffers, offset)

    new = blocks(2, 16)
    async with DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK, max_workers=1) as tier:
        await tier.write_from([0], [a], blocks(1, 15))
        monkeypatch.setattr(os, "pwritev", second_write_fails)
        with pytest.raises(TierIOError, match="No space left"):
            await tier.write_from([0, 1], [b, a], new)
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        assert dict(tier._map.slot_keys) == {0: b}
        assert {p.name for p in entries(tmp_path)} == {b.hex() + ".kvb"}
    async with DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK) as tier:
        assert await tier.recover() == [(0, b)]
        assert torch.equal(await read(tier, [0], [b]), new[:1])


@pytest.mark.asyncio
async def test_a_failed_directory_sync_fails_the_batch_and_serves_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_fsync = os.fsync
    failure = errno.EIO

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(failure, os.strerror(failure))
        real_fsync(fd)

    data = blocks(3, 17)
    async with DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK, fsync=True) as tier:
        await tier.write_from([0], [key(0)], data[:1])
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(TierIOError, match="syncing the directory"):
            await tier.write_from([1, 2], [key(1), key(2)], data[1:])
        assert dict(tier._map.slot_keys) == {0: key(0)}
        assert {p.name for p in entries(tmp_path)} == {key(0).hex() + ".kvb"}
        # A file system that cannot sync directories at all: skipped, the write counts.
        failure = errno.EINVAL
        await tier.write_from([1, 2], [key(1), key(2)], data[1:])
        await tier.write_from([3], [key(3)], data[:1])
        assert torch.equal(await read(tier, [1, 2], [key(1), key(2)]), data[1:])


@pytest.mark.asyncio
async def test_fsync_syncs_each_block_and_then_the_directory_after_the_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        calls.append("rename")
        real_replace(src, dst)  # type: ignore[arg-type]

    root = tmp_path / "blocks"
    async with DiskTier(root, LAYOUT, 16 * PER_BLOCK, fsync=True, max_workers=1) as tier:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        await tier.write_from([0, 1, 2], [key(0), key(1), key(2)], blocks(3, 15))
        assert calls == ["file", "rename"] * 3 + ["dir"]
        calls.clear()
    async with tier_at(tmp_path / "plain") as tier:  # fsync=False: none at all
        await tier.write_from([0], [key(0)], blocks(1, 15))
        assert calls == ["rename"]


# -- O_DIRECT ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_direct_io_round_trip_and_same_format_as_buffered(tmp_path: Path) -> None:
    data = blocks(5, 12)
    keys = [key(i) for i in range(5)]
    try:
        async with DiskTier(tmp_path, LAYOUT, 16 * PER_BLOCK, direct_io=True) as tier:
            await tier.write_from([0, 2, 4, 6, 8], keys, data)
            assert torch.equal(await read(tier, [0, 2, 4, 6, 8], keys), data)
            await tier.write_from([2], [key(9)], blocks(1, 13))  # recycled with O_DIRECT
    except ConfigError as exc:
        pytest.skip(f"no O_DIRECT under {tmp_path}: {exc}")
    async with tier_at(tmp_path) as tier:  # buffered reopen reads O_DIRECT files
        recovered = dict(await tier.recover())
        assert recovered == {0: key(0), 2: key(9), 4: key(2), 6: key(3), 8: key(4)}
        assert torch.equal(await read(tier, [2], [key(9)]), blocks(1, 13))


@pytest.mark.asyncio
async def test_a_path_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "blocks"
    path.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        async with tier_at(path):
            pass
