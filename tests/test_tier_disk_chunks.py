"""DiskTier's batch rows and chunked verified reads: every chunk is hashed, a bad one is a miss.

Blocks here are several :data:`~kvtier.tiers._disk_io.HASH_CHUNK` long (the
last chunk partial), so a single-block batch really goes chunk by chunk.
File-system faults are injected by wrapping ``os.preadv`` / ``os.pwritev``.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import BlockMissingError
from kvtier.tiers import _disk_io
from kvtier.tiers._checks import row_views
from kvtier.tiers._disk_io import HASH_CHUNK
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_batch import row_access
from kvtier.tiers.disk_format import checksum, checksum_stream

# 5 layers x 64 KiB = 320 KiB: one whole 256 KiB chunk and a partial one.
CHUNKY = BlockLayout(num_layers=5, block_size=16, num_kv_heads=8, head_size=128, dtype="float16")
EIGHT_B = BlockLayout(num_layers=32, block_size=16, num_kv_heads=8, head_size=128, dtype="float16")
KEY = b"\x5a" * 32
OTHER = b"\x02" * 32
Preadv = Callable[[int, list[memoryview], int], int]


def _file(root: Path) -> Path:
    return root / (KEY.hex() + ".kvb")


def _payload(layout: BlockLayout, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, layout.block_bytes), dtype=torch.uint8, generator=generator)


def _tier(root: Path, layout: BlockLayout = CHUNKY, blocks: int = 1) -> DiskTier:
    return DiskTier(root, layout, blocks * DiskTier.bytes_per_block(layout))


async def _write_then_read(
    root: Path, layout: BlockLayout, data: torch.Tensor, damage: int | None
) -> torch.Tensor | None:
    """Write one block, flip payload byte ``damage`` (if any), read it back (None: a miss)."""
    async with _tier(root, layout) as tier:
        await tier.write_from([0], [KEY], data)
        if damage is not None:
            with open(_file(root), "r+b") as handle:
                handle.seek(damage)
                byte = handle.read(1)[0]
                handle.seek(damage)
                handle.write(bytes([byte ^ 0x10]))
        out = torch.zeros_like(data)
        try:
            await tier.read_into([0], [KEY], out)
        except BlockMissingError:
            return None
        return out


def test_the_layouts_span_several_chunks() -> None:
    assert HASH_CHUNK < CHUNKY.block_bytes < 2 * HASH_CHUNK
    assert EIGHT_B.block_bytes == 8 * HASH_CHUNK


def test_the_stream_checksum_of_pieces_equals_the_checksum_of_the_whole() -> None:
    data = os.urandom(10_000)
    stream = checksum_stream()
    for start in range(0, len(data), 999):
        stream.update(data[start : start + 999])
    assert stream.digest() == checksum(data)


@settings(max_examples=25)
@given(
    flip=st.one_of(st.none(), st.integers(0, CHUNKY.block_bytes - 1)),
    seed=st.integers(0, 2**16),
)
def test_a_block_reads_back_exactly_and_any_flipped_byte_is_a_miss(
    tmp_path_factory: pytest.TempPathFactory, flip: int | None, seed: int
) -> None:
    data = _payload(CHUNKY, seed)
    out = anyio.run(_write_then_read, tmp_path_factory.mktemp("chunks") / "t", CHUNKY, data, flip)
    if flip is None:
        assert out is not None
        assert torch.equal(out, data)
    else:
        assert out is None


@pytest.mark.parametrize("flip", [None, 0, 700_000, 1_600_000, EIGHT_B.block_bytes - 1])
def test_an_8b_class_block_spans_several_chunks_and_each_is_verified(
    tmp_path: Path, flip: int | None
) -> None:
    data = _payload(EIGHT_B, 3)
    out = anyio.run(_write_then_read, tmp_path / "tier", EIGHT_B, data, flip)
    if flip is None:
        assert out is not None
        assert torch.equal(out, data)
    else:
        assert out is None


def _wrapped(monkeypatch: pytest.MonkeyPatch, name: str, wrapper: Preadv) -> None:
    monkeypatch.setattr(_disk_io.os, name, wrapper)


def test_a_file_cut_short_between_two_chunks_is_a_miss_and_the_tier_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(CHUNKY, 5)
    real_preadv = os.preadv
    calls: list[int] = []
    cut = HASH_CHUNK + 1000

    def shrinking_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:  # another writer cuts the file after its size was checked
            os.truncate(_file(tmp_path / "tier"), cut)
        return real_preadv(fd, buffers, offset)

    async def main() -> None:
        async with _tier(tmp_path / "tier", blocks=2) as tier:
            await tier.write_from([0, 1], [KEY, OTHER], torch.cat([data, data]))
            out = torch.zeros_like(data)
            with monkeypatch.context() as patch:
                _wrapped(patch, "preadv", shrinking_preadv)
                with pytest.raises(BlockMissingError):
                    await tier.read_into([0], [KEY], out)
            # The second chunk came back short, its rest at end of file: no further reads.
            assert calls == [0, HASH_CHUNK, cut]
            await tier.read_into([1], [OTHER], out)
            assert torch.equal(out, data)

    anyio.run(main)


def test_rows_of_contiguous_host_parts_are_views_of_their_bytes() -> None:
    plain = torch.zeros(2, 8, dtype=torch.uint8)
    padded = torch.zeros(3, 12, dtype=torch.uint8)[:, 2:10]  # rows contiguous, part not
    empty = torch.zeros(0, 8, dtype=torch.uint8)
    row = row_access([plain, empty, padded])
    rows = [row(index) for index in range(5)]
    assert all(isinstance(view, memoryview) and len(view) == 8 for view in rows)
    for index, view in enumerate(rows):
        view[:] = bytes([index + 1]) * 8  # written through to the part's own row
    assert plain.tolist() == [[1] * 8, [2] * 8]
    assert padded.tolist() == [[3] * 8, [4] * 8, [5] * 8]


def test_rows_that_are_not_contiguous_are_tensors_of_the_parts() -> None:
    columnar = torch.zeros(8, 2, dtype=torch.uint8).t()
    plain = torch.zeros(1, 8, dtype=torch.uint8)
    row = row_access([plain, columnar])  # one part without contiguous rows: tensors for all
    rows = [row(index) for index in range(3)]
    for index, tensor in enumerate(rows):
        assert isinstance(tensor, torch.Tensor)
        tensor.fill_(index + 1)
    assert plain.tolist() == [[1] * 8]
    assert columnar.tolist() == [[2] * 8, [3] * 8]


def test_row_views_keep_the_tensor_their_memory_belongs_to() -> None:
    rows = torch.zeros(2, 8, dtype=torch.uint8)
    alive = weakref.ref(rows)
    view = row_views(rows)
    del rows
    gc.collect()
    assert alive() is not None  # the views alias its memory: it must not be freed
    view(1)[:] = b"\x07" * 8
    owner = alive()
    assert owner is not None
    assert owner[1].tolist() == [7] * 8
    del owner, view
    gc.collect()
    assert alive() is None


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16))
def test_a_block_written_in_chunks_is_the_same_file_as_one_written_whole(
    tmp_path_factory: pytest.TempPathFactory, seed: int
) -> None:
    data = _payload(CHUNKY, seed)
    other = _payload(CHUNKY, seed + 1)

    async def files(root: Path) -> tuple[bytes, bytes]:
        async with _tier(root, blocks=2) as tier:
            await tier.write_from([0], [KEY], data)  # alone: chunked
            alone = _file(root).read_bytes()
            # Two blocks: one call per block on two threads, each written whole.
            await tier.write_from([0, 1], [KEY, OTHER], torch.cat([data, other]))
            return alone, _file(root).read_bytes()

    alone, shared = anyio.run(files, tmp_path_factory.mktemp("chunks") / "tier")
    assert alone == shared


def test_a_short_write_in_a_middle_chunk_is_finished_at_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _payload(CHUNKY, 9)
    real_pwritev = os.pwritev
    offsets: list[int] = []

    def short_once(fd: int, buffers: list[memoryview], offset: int) -> int:
        offsets.append(offset)
        if len(offsets) == 2:  # the second chunk: only 10 of its bytes land
            return real_pwritev(fd, [bytes(buffers[0][:10])], offset)
        return real_pwritev(fd, buffers, offset)

    async def main() -> torch.Tensor:
        async with _tier(tmp_path / "tier") as tier:
            with monkeypatch.context() as patch:
                _wrapped(patch, "pwritev", short_once)
                await tier.write_from([0], [KEY], data)
            out = torch.zeros_like(data)
            await tier.read_into([0], [KEY], out)
            return out

    out = anyio.run(main)
    assert offsets == [0, HASH_CHUNK, HASH_CHUNK + 10]  # the rest of the short chunk
    assert torch.equal(out, data)


@pytest.mark.parametrize("blocks", [1, 2])
def test_short_reads_are_finished_not_taken_for_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: int
) -> None:
    data = torch.cat([_payload(CHUNKY, 11 + index) for index in range(blocks)])
    keys = [KEY, OTHER][:blocks]
    real_preadv = os.preadv
    sizes: list[int] = []

    def half_each_time(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = buffers[0]
        if len(first) > 1:  # as a FUSE file system may: half of what was asked
            moved = real_preadv(fd, [first[: len(first) // 2]], offset)
        else:
            moved = real_preadv(fd, buffers, offset)
        sizes.append(moved)
        return moved

    async def main() -> torch.Tensor:
        async with _tier(tmp_path / "tier", blocks=blocks) as tier:
            await tier.write_from(list(range(blocks)), keys, data)
            out = torch.zeros_like(data)
            with monkeypatch.context() as patch:
                _wrapped(patch, "preadv", half_each_time)
                await tier.read_into(list(range(blocks)), keys, out)
            return out

    assert torch.equal(anyio.run(main), data)
    assert len(sizes) > 4 * blocks  # the short reads were taken up again


def test_batches_spread_over_threads_move_each_block_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = torch.cat([_payload(CHUNKY, 12), _payload(CHUNKY, 13)])
    keys = [KEY, OTHER]
    real_preadv, real_pwritev = os.preadv, os.pwritev
    reads: list[int] = []
    writes: list[int] = []

    def counted_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(offset)
        return real_preadv(fd, buffers, offset)

    def counted_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        writes.append(offset)
        return real_pwritev(fd, buffers, offset)

    async def main() -> torch.Tensor:
        async with _tier(tmp_path / "tier", blocks=2) as tier:
            out = torch.zeros_like(data)
            with monkeypatch.context() as patch:
                _wrapped(patch, "preadv", counted_preadv)
                _wrapped(patch, "pwritev", counted_pwritev)
                await tier.write_from([0, 1], keys, data)  # two threads, one block each
                await tier.read_into([0, 1], keys, out)
                assert reads == [0, 0]
                assert writes == [0, 0]
                await tier.read_into([1], keys[1:], out[1:])  # alone: chunked
                assert reads[2:] == [0, HASH_CHUNK]
            return out

    assert torch.equal(anyio.run(main), data)
