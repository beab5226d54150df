"""RedisTier parts calls, and the mover moving CPU rows to and from Redis with no staging."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.errors import BlockMissingError, InvalidRequestError
from kvtier.mover import BlockMover
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.redis import RedisTier
from tests.redis_server import RedisServer, shared_redis
from tests.test_tier_redis import LAYOUT, MODEL, blocks, key, read

__all__ = ["shared_redis"]

BB = LAYOUT.block_bytes


def tier(server: RedisServer, prefix: str, **options: object) -> RedisTier:
    options.setdefault("model", MODEL)
    return RedisTier(LAYOUT, 64, url=server.url, prefix=prefix, **options)  # type: ignore[arg-type]


def columnar(n: int) -> torch.Tensor:
    """``uint8 [n, BB]`` stored column by column: its rows are not contiguous."""
    return torch.zeros(BB, n, dtype=torch.uint8).t()


@pytest.mark.asyncio
async def test_parts_round_trip_in_chunks(shared_redis: RedisServer) -> None:
    data = blocks(11, seed=5)
    slots = [4, 0, 9, 2, 14, 7, 3, 11, 1, 8, 6]
    keys = [key(i) for i in range(11)]
    sources = [data[:2], columnar(4), torch.empty(0, BB, dtype=torch.uint8), data[6:]]
    sources[1].copy_(data[2:6])
    async with tier(shared_redis, "parts-rt:", batch_size=3) as store:
        await store.write_from_parts(slots, keys, sources)
        assert torch.equal(await read(store, slots, keys), data)
        padded = torch.zeros(5, BB + 16, dtype=torch.uint8)[:, 8 : 8 + BB]
        targets = [columnar(3), padded, torch.empty(3, BB, dtype=torch.uint8)]
        await store.read_into_parts(slots, keys, targets)
        assert torch.equal(torch.cat(targets), data)


@pytest.mark.asyncio
async def test_missing_blocks_are_named_and_the_others_land(shared_redis: RedisServer) -> None:
    data = blocks(5, seed=6)
    keys = [key(20 + i) for i in range(5)]
    async with tier(shared_redis, "parts-miss:", batch_size=2) as store:
        await store.write_from([0, 1, 2, 3, 4], keys, data)
        await store.discard([3])
        out = [torch.empty(2, BB, dtype=torch.uint8), torch.empty(3, BB, dtype=torch.uint8)]
        with pytest.raises(BlockMissingError) as caught:
            await store.read_into_parts([0, 1, 2, 3, 4], keys, out)
        assert caught.value.slots == (3,)
        assert torch.equal(out[0], data[:2])
        assert torch.equal(out[1][[0, 2]], data[[2, 4]])
        with pytest.raises(InvalidRequestError, match="parts hold 4 rows for 5 slots"):
            await store.read_into_parts([0, 1, 2, 3, 4], keys, [out[1], out[0][:1]])
        with pytest.raises(InvalidRequestError, match="share memory"):
            await store.read_into_parts([0, 1], keys[:2], [out[0][:1], out[0][:1]])


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [1, 9, 30])
async def test_mover_moves_cpu_rows_to_redis_and_back_without_staging(
    shared_redis: RedisServer, n: int
) -> None:
    rng = random.Random(n)
    data = blocks(n, seed=n)
    keys = [key(40 + i) for i in range(n)]
    cpu_slots = rng.sample(range(48), n)
    back = rng.sample(range(48), n)
    mover = BlockMover()
    async with (
        tier(shared_redis, f"parts-mover-{n}:", batch_size=4) as store,
        CpuTier(LAYOUT, 48) as cpu,
    ):
        rows = cpu.slot_view(range(48))
        assert rows is not None
        rows[cpu_slots] = data
        await mover.move(cpu, cpu_slots, store, list(range(n)), keys)
        assert torch.equal(await read(store, list(range(n)), keys), data)
        rows.zero_()
        await mover.move(store, list(range(n)), cpu, back, keys)
        assert torch.equal(rows[back], data)
    assert mover.staging_rows == 0


@pytest.mark.asyncio
async def test_one_buffer_calls_name_the_buffer_and_check_it_before_the_keys(
    shared_redis: RedisServer,
) -> None:
    async with tier(shared_redis, "parts-errors:") as store:
        wrong = torch.empty(3, BB, dtype=torch.uint8)
        with pytest.raises(InvalidRequestError, match=r"buffer must be uint8 \[2, "):
            await store.write_from([0, 1], [b"", key(1)], wrong)  # a bad key too
        with pytest.raises(InvalidRequestError, match="buffer rows overlap"):
            await store.read_into([0, 1], [key(0), key(1)], wrong[:1].expand(2, BB))
        with pytest.raises(InvalidRequestError, match="keys must be"):
            await store.read_into([0, 1], [b"", key(1)], wrong[:2])


@pytest.mark.asyncio
async def test_a_missing_block_still_fills_the_others_in_parts_read_through_a_copy(
    shared_redis: RedisServer,
) -> None:
    data = blocks(4, seed=9)
    keys = [key(60 + i) for i in range(4)]
    async with tier(shared_redis, "parts-copy:") as store:
        await store.write_from([0, 1, 2, 3], keys, data)
        await store.discard([2])
        strided = columnar(4)  # not host memory a row view can cover: loaded through a copy
        with pytest.raises(BlockMissingError):
            await store.read_into_parts([0, 1, 2, 3], keys, [strided])
        assert torch.equal(strided[[0, 1, 3]], data[[0, 1, 3]])
