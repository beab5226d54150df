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

from kvtier.errors import BlockMissingError, ConfigError, TierIOError
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_format import HEADER, MAX_KEY_BYTES, decode_header, encode_header
from kvtier.tiers.index import TierIndex

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
PER_BLOCK = LAYOUT.block_bytes + HEADER.size + MAX_KEY_BYTES


def tier_at(path: Path, slots: int = 16, layout: BlockLayout = LAYOUT) -> DiskTier:
    return DiskTier(path, layout, slots * PER_BLOCK)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def key(i: int) -> bytes:
    return bytes([i]) * 36  # like a sha256 hash + group id


def block_file(root: Path, i: int) -> Path:
    return root / (key(i).hex() + ".kvb")


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
    names = sorted(p.name for p in loose.iterdir())
    assert names == sorted(k.hex() + ".kvb" for k in (key(1), key(2)))
    for path in loose.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh = tmp_path / "a" / "b"
    async with tier_at(fresh):
        pass
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def _flip_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x40  # inside the fingerprint
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
async def test_another_layout_never_reads_the_blocks(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
    other = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="bfloat16")
    async with tier_at(tmp_path, layout=other) as tier:
        assert list(await tier.recover()) == []  # foreign blocks were dropped
    assert not any(tmp_path.iterdir())


@pytest.mark.asyncio
async def test_overwriting_a_slot_replaces_its_block(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], blocks(1, 1))
        new = blocks(1, 2)
        await tier.write_from([0], [key(9)], new)
        assert not block_file(tmp_path, 0).exists()
        assert torch.equal(await read(tier, [0], [key(9)]), new)
        await tier.discard([0])
        assert not any(tmp_path.iterdir())


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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
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


@given(
    slot=st.integers(0, 2**32 - 1),
    block_key=st.binary(min_size=1, max_size=MAX_KEY_BYTES),
    payload=st.binary(min_size=1, max_size=256),
    flip=st.integers(0, 10_000),
)
def test_header_round_trip_and_corruption_is_detected(
    slot: int, block_key: bytes, payload: bytes, flip: int
) -> None:
    fingerprint = LAYOUT.fingerprint()
    header = encode_header(slot, block_key, fingerprint, payload)
    decoded = decode_header(header)
    assert decoded is not None
    assert (decoded.slot, decoded.key, decoded.payload_length) == (slot, block_key, len(payload))
    assert decoded.fingerprint == fingerprint
    assert decoded.size == len(header)
    # Any single flipped bit, in the header or the payload, is caught.
    blob = bytearray(header + payload)
    blob[flip % len(blob)] ^= 1 << (flip % 8)
    damaged = decode_header(blob)
    intact = (
        damaged is not None
        and (damaged.slot, damaged.key, damaged.fingerprint) == (slot, block_key, fingerprint)
        and damaged.payload_length == len(payload)
        and damaged.digest == decoded.digest
        and bytes(blob[damaged.size :]) == payload
    )
    assert not intact


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
