"""DiskTier trusts only files it could have written, in a directory it owns and holds.

Links, FIFOs, stray directories, foreign owners and loose modes are never served
or written through; unreadable files are kept, not deleted; a second open of a
directory in use is refused; every delete of a discard is tried.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import anyio
import pytest
import torch

from kvtier.errors import BlockMissingError, ConfigError, TierIOError
from kvtier.tiers import _disk_io
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from tests.factories import entries

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
PER_BLOCK = DiskTier.bytes_per_block(LAYOUT)
ROOT = os.geteuid() == 0


def tier_at(path: Path, slots: int = 16) -> DiskTier:
    return DiskTier(path, LAYOUT, slots * PER_BLOCK)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def key(i: int) -> bytes:
    return bytes([i]) * 36


def name(i: int) -> str:
    return key(i).hex() + ".kvb"


async def fill(path: Path, n: int) -> torch.Tensor:
    data = blocks(n)
    async with tier_at(path) as tier:
        await tier.write_from(list(range(n)), [key(i) for i in range(n)], data)
    return data


async def read(tier: DiskTier, slots: list[int], keys: list[bytes]) -> torch.Tensor:
    out = torch.empty((len(slots), LAYOUT.block_bytes), dtype=torch.uint8)
    await tier.read_into(slots, keys, out)
    return out


@pytest.mark.asyncio
async def test_links_into_another_directory_are_dropped_and_never_written_through(
    tmp_path: Path,
) -> None:
    golden, mine = tmp_path / "golden", tmp_path / "mine"
    data = await fill(golden, 2)
    before = [(golden / name(i)).read_bytes() for i in range(2)]
    mine.mkdir(mode=0o700)
    (mine / name(0)).symlink_to(golden / name(0))
    os.link(golden / name(1), mine / name(1))  # a hard link: a `cp -al` snapshot
    async with tier_at(mine) as tier:
        assert await tier.recover() == []
        assert sorted(p.name for p in entries(mine)) == []  # our names gone, targets kept
        # A link that appears while the tier serves is a miss, and a write over it
        # (recycling the slot's file) replaces the link, never its target.
        await tier.write_from([0], [key(0)], data[:1])
        (mine / name(0)).unlink()
        (mine / name(0)).symlink_to(golden / name(0))
        with pytest.raises(BlockMissingError):
            await read(tier, [0], [key(0)])
        await tier.write_from([0], [key(5)], blocks(1, seed=5))
        assert torch.equal(await read(tier, [0], [key(5)]), blocks(1, seed=5))
    assert [(golden / name(i)).read_bytes() for i in range(2)] == before
    assert not (mine / name(5)).is_symlink()


@pytest.mark.asyncio
async def test_files_with_group_or_other_bits_are_dropped_on_restart(tmp_path: Path) -> None:
    data = await fill(tmp_path, 3)
    os.chmod(tmp_path / name(1), 0o644)
    async with tier_at(tmp_path) as tier:
        assert [slot for slot, _ in await tier.recover()] == [0, 2]
        assert torch.equal(await read(tier, [0, 2], [key(0), key(2)]), data[[0, 2]])
    assert not (tmp_path / name(1)).exists()


@pytest.mark.asyncio
@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
async def test_a_block_planted_by_another_user_is_never_served(tmp_path: Path) -> None:
    await fill(tmp_path, 2)
    os.chown(tmp_path / name(1), 65534, 65534)
    async with tier_at(tmp_path) as tier:
        assert [slot for slot, _ in await tier.recover()] == [0]
        with pytest.raises(BlockMissingError):
            await read(tier, [1], [key(1)])


@pytest.mark.asyncio
@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
async def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chmod(foreign, 0o777)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        await tier_at(foreign).__aenter__()
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o777  # not touched


@pytest.mark.asyncio
async def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        await tier_at(tmp_path / "link").__aenter__()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.asyncio
async def test_stray_directories_and_fifos_neither_break_nor_hang_the_open(
    tmp_path: Path,
) -> None:
    data = await fill(tmp_path, 1)
    (tmp_path / "stray.kvb").mkdir()
    (tmp_path / ".tmp-leftover").mkdir()
    os.mkfifo(tmp_path / name(3), 0o600)
    with anyio.fail_after(20):
        async with tier_at(tmp_path) as tier:
            assert [slot for slot, _ in await tier.recover()] == [0]
            assert torch.equal(await read(tier, [0], [key(0)]), data)
            await tier.write_from([3], [key(9)], blocks(1, seed=9))
    assert (tmp_path / "stray.kvb").is_dir()  # left alone, logged


@pytest.mark.asyncio
async def test_an_unreadable_file_is_kept_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(tmp_path, 3)
    real = BlockFiles.verify

    def flaky(self: BlockFiles, path: Path) -> tuple[int, bytes] | None:
        if path.name == name(1):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(self, path)

    monkeypatch.setattr(BlockFiles, "verify", flaky)
    async with tier_at(tmp_path) as tier:
        assert [slot for slot, _ in await tier.recover()] == [0, 2]
    assert (tmp_path / name(1)).exists()
    monkeypatch.setattr(BlockFiles, "verify", real)
    async with tier_at(tmp_path) as tier:
        assert [slot for slot, _ in await tier.recover()] == [0, 1, 2]


@pytest.mark.asyncio
async def test_a_directory_in_use_is_refused_until_its_tier_closes(tmp_path: Path) -> None:
    async with tier_at(tmp_path) as first:
        await first.write_from([0], [key(0)], blocks(1))
        with pytest.raises(ConfigError, match="in use by another open DiskTier"):
            await tier_at(tmp_path).__aenter__()
        assert torch.equal(await read(first, [0], [key(0)]), blocks(1))
    async with tier_at(tmp_path) as second:
        assert [slot for slot, _ in await second.recover()] == [0]


def test_bad_capacities_and_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="32 bits"):
        DiskTier(tmp_path, LAYOUT, ((1 << 32) + 1) * PER_BLOCK)
    with pytest.raises(ConfigError, match="NUL"):
        DiskTier(str(tmp_path) + "/a\0b", LAYOUT, PER_BLOCK)


@pytest.mark.asyncio
async def test_a_failing_delete_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(tmp_path, 3)
    real = BlockFiles.unlink

    def flaky(self: BlockFiles, k: bytes) -> None:
        if k == key(0):
            raise OSError(errno.EIO, "Input/output error")
        real(self, k)

    async with tier_at(tmp_path) as tier:
        monkeypatch.setattr(BlockFiles, "unlink", flaky)
        with pytest.raises(TierIOError, match="discard failed"):
            await tier.discard([0, 1, 2])
    assert sorted(p.name for p in entries(tmp_path)) == [name(0)]


@pytest.mark.asyncio
async def test_short_writes_are_finished_and_a_stalled_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    calls = {"n": 0}

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # the first call writes 1000 bytes only
            return real(fd, [bytes(b"".join(bytes(b) for b in buffers)[:1000])], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(_disk_io.os, "pwritev", short)
    data = blocks(1)
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(0)], data)
        assert calls["n"] == 2
        assert torch.equal(await read(tier, [0], [key(0)]), data)
        monkeypatch.setattr(_disk_io.os, "pwritev", lambda fd, buffers, offset: 0)
        with pytest.raises(TierIOError, match="moved no bytes"):
            await tier.write_from([1], [key(1)], data)
        assert not [p for p in entries(tmp_path) if p.name.startswith(".tmp-")]


@pytest.mark.asyncio
async def test_a_recycled_file_that_cannot_be_opened_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tier_at(tmp_path, slots=1) as tier:
        await tier.write_from([0], [key(0)], blocks(1))
        real = _disk_io.open_trusted

        def no_fds(path: Path, flags: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(_disk_io, "open_trusted", no_fds)
        with pytest.raises(TierIOError, match="Too many open files"):
            await tier.write_from([0], [key(1)], blocks(1, seed=1))
        monkeypatch.setattr(_disk_io, "open_trusted", real)
        assert not [p for p in entries(tmp_path) if p.name.startswith(".tmp-")]
        await tier.write_from([0], [key(2)], blocks(1, seed=2))
        assert torch.equal(await read(tier, [0], [key(2)]), blocks(1, seed=2))


@pytest.mark.parametrize("code", [errno.ESTALE, errno.EIO])
def test_an_fstat_failing_after_the_open_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """NFS or FUSE can fail the ``fstat`` of a file just opened: no descriptor may leak."""
    from kvtier.tiers import _file_io

    path = tmp_path / "block"
    path.write_bytes(b"x")
    path.chmod(0o600)
    opened: list[int] = []
    real_open = os.open

    def recording_open(*args: object, **kwargs: object) -> int:
        opened.append(real_open(*args, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    def failing_fstat(fd: int) -> os.stat_result:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_file_io.os, "open", recording_open)
    monkeypatch.setattr(_file_io.os, "fstat", failing_fstat)
    with pytest.raises(OSError, match=os.strerror(code)):
        _file_io.open_trusted(path, os.O_RDONLY)
    monkeypatch.undo()
    assert len(opened) == 1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0])
