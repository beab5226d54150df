"""Short and misaligned I/O: finished where it can be, a typed failure where it cannot, no loop.

File-system behaviour is injected by wrapping ``os.preadv`` / ``os.pwritev``
(what FUSE or network file systems may return); torn files are real files
cut with ``os.truncate``.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.tiers._file_io import read_all, write_all
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_format import ALIGN

LAYOUT = BlockLayout(num_layers=2, block_size=16, num_kv_heads=2, head_size=64)
KEYS = [bytes([index + 1]) * 32 for index in range(3)]
Transfer = Callable[[int, list[memoryview], int], int]


def _blocks(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (count, LAYOUT.block_bytes)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def _tier(root: Path, *, direct_io: bool = False) -> DiskTier:
    return DiskTier(root, LAYOUT, 4 * DiskTier.bytes_per_block(LAYOUT), direct_io=direct_io)


def _bounded(real: Transfer, cap: int, calls: list[int]) -> Transfer:
    """``real`` moving at most ``cap`` bytes per call; fails the test after 1,000 calls."""

    def transfer(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1000:
            raise AssertionError("the caller retried the same bytes a thousand times")
        room, kept = cap, []
        for buffer in buffers:
            if room <= 0:
                break
            kept.append(buffer[:room])
            room -= len(kept[-1])
        return real(fd, kept, offset)

    return transfer


def test_a_warm_restart_finishes_short_reads_and_keeps_every_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _blocks(3, 1)
    real_preadv = os.preadv
    calls: list[int] = []

    def half(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = buffers[0]
        calls.append(offset)
        return real_preadv(fd, [first[: max(1, len(first) // 2)]], offset)

    async def main() -> tuple[dict[int, bytes], torch.Tensor]:
        async with _tier(tmp_path) as tier:
            await tier.write_from([0, 1, 3], KEYS, data)
        with monkeypatch.context() as patch:
            patch.setattr(os, "preadv", half)
            async with _tier(tmp_path) as tier:
                recovered = dict(await tier.recover())
        async with _tier(tmp_path) as tier:
            await tier.recover()
            out = torch.zeros_like(data)
            await tier.read_into([0, 1, 3], KEYS, out)
        return recovered, out

    recovered, out = anyio.run(main)
    assert recovered == {0: KEYS[0], 1: KEYS[1], 3: KEYS[2]}
    assert len(calls) > 3  # reads were short, and taken up again
    assert torch.equal(out, data)


@pytest.mark.parametrize("direct_io", [False, True])
def test_a_torn_file_of_unaligned_size_is_dropped_at_restart(
    tmp_path: Path, direct_io: bool
) -> None:
    data = _blocks(2, 2)

    async def main() -> dict[int, bytes]:
        try:
            async with _tier(tmp_path, direct_io=direct_io) as tier:
                await tier.write_from([0, 1], KEYS[:2], data)
        except ConfigError as exc:
            pytest.skip(f"no O_DIRECT under {tmp_path}: {exc}")
        torn = tmp_path / (KEYS[1].hex() + ".kvb")
        os.truncate(torn, torn.stat().st_size - 100)
        async with _tier(tmp_path, direct_io=direct_io) as tier:
            return dict(await tier.recover())

    assert anyio.run(main) == {0: KEYS[0]}
    assert not (tmp_path / (KEYS[1].hex() + ".kvb")).exists()


def _aligned_buffer(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))  # page-aligned, as the tier's buffers are


@pytest.mark.parametrize("cap", [100, ALIGN - 1])
def test_direct_writes_that_never_cross_a_boundary_fail_instead_of_looping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "pwritev", _bounded(os.pwritev, cap, calls))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="no progress past byte 0") as caught:
            write_all(fd, [_aligned_buffer(2 * ALIGN)], 2 * ALIGN, align=ALIGN)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EIO
    assert calls == [0, 0]  # the first call and one retry from the same boundary


@pytest.mark.parametrize("cap", [100, ALIGN - 1])
def test_direct_reads_that_never_cross_a_boundary_fail_instead_of_looping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> None:
    (tmp_path / "f").write_bytes(bytes(2 * ALIGN))
    calls: list[int] = []
    monkeypatch.setattr(os, "preadv", _bounded(os.preadv, cap, calls))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="no progress past byte 0") as caught:
            read_all(fd, [_aligned_buffer(2 * ALIGN)], 2 * ALIGN, 0, align=ALIGN)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EIO
    assert calls == [0, 0]


@pytest.mark.parametrize("align", [1, ALIGN])
def test_short_transfers_that_cross_boundaries_are_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, align: int
) -> None:
    size = 4 * ALIGN
    payload = bytes(range(256)) * (size // 256)
    source = _aligned_buffer(size)
    source[:] = payload
    writes: list[int] = []
    reads: list[int] = []
    cap = ALIGN + 10  # every call crosses one boundary and then stops short
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwritev", _bounded(os.pwritev, cap, writes))
        patch.setattr(os, "preadv", _bounded(os.preadv, cap, reads))
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            write_all(fd, [source], size, align=align)
            target = _aligned_buffer(size)
            assert read_all(fd, [target], size, 0, align=align)
        finally:
            os.close(fd)
    assert bytes(target) == payload
    assert len(writes) > 3
    assert len(reads) > 3
