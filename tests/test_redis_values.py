"""Reusable store buffers of the Redis tier: reuse, the byte budget, failures."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import ConfigError, TierIOError
from kvtier.tiers._disk_io import tensor_bytes
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_format import max_value_bytes, verify_value
from kvtier.tiers.redis_values import ValueBuffers
from tests.redis_server import RedisServer, redis_server, shared_redis

__all__ = ["redis_server", "shared_redis"]

LAYOUT = BlockLayout(num_layers=1, block_size=16, num_kv_heads=1, head_size=8)
FP = b"f" * 16


def payload(fill: int) -> memoryview:
    return memoryview(bytes([fill]) * LAYOUT.block_bytes)


def test_a_given_back_buffer_is_reused_and_holds_the_new_value() -> None:
    pool = ValueBuffers(1 << 20)
    first = pool.encode(b"k" * 32, FP, payload(1))
    pool.give_back([first])
    assert pool.kept_bytes == len(first)
    second = pool.encode(b"j" * 32, FP, payload(2))
    assert second is first  # the same memory, rewritten
    assert pool.kept_bytes == 0
    assert verify_value(bytes(second), b"j" * 32, FP, LAYOUT.block_bytes) == payload(2)
    assert verify_value(bytes(second), b"k" * 32, FP, LAYOUT.block_bytes) is None


def test_buffers_of_another_size_are_not_mixed_up() -> None:
    pool = ValueBuffers(1 << 20)
    short = pool.encode(b"k" * 8, FP, payload(1))
    pool.give_back([short])
    longer = pool.encode(b"k" * 40, FP, payload(1))
    assert longer is not short
    assert len(longer) == len(short) + 32
    assert verify_value(bytes(longer), b"k" * 40, FP, LAYOUT.block_bytes) == payload(1)


def test_the_budget_bounds_what_is_kept() -> None:
    size = len(ValueBuffers(0).encode(b"k" * 32, FP, payload(0)))
    pool = ValueBuffers(2 * size)
    values = [pool.encode(b"k" * 32, FP, payload(i)) for i in range(5)]
    pool.give_back(values)
    assert pool.kept_bytes == 2 * size
    none = ValueBuffers(0)
    none.give_back([none.encode(b"k" * 32, FP, payload(0))])
    assert none.kept_bytes == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="value pool bytes"):
            ValueBuffers(bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_tier_reuses_buffers_and_every_store_reads_back_its_own_bytes(
    shared_redis: RedisServer,
) -> None:
    keys = [bytes([i]) * 32 for i in range(8)]
    async with RedisTier(LAYOUT, 8, url=shared_redis.url, prefix="pool1:", batch_size=4) as tier:
        # The default budget covers one call's values in flight.
        assert tier._values.max_bytes == 4 * 2 * max_value_bytes(LAYOUT.block_bytes)
        for generation in range(3):  # each store reuses the last one's buffers
            data = torch.full((8, LAYOUT.block_bytes), generation, dtype=torch.uint8)
            data[:, 0] = torch.arange(8, dtype=torch.uint8)
            await tier.write_from(range(8), keys, data)
            assert tier._values.kept_bytes > 0
            out = torch.zeros_like(data)
            await tier.read_into(range(8), keys, out)
            assert torch.equal(out, data)


@pytest.mark.asyncio
async def test_buffers_of_a_failed_store_are_dropped(redis_server: RedisServer) -> None:
    tier = RedisTier(LAYOUT, 4, url=redis_server.url, prefix="pool2:", connect_timeout=0.5)
    async with tier:
        redis_server.kill()
        data = torch.ones((2, LAYOUT.block_bytes), dtype=torch.uint8)
        with pytest.raises(TierIOError):
            await tier.write_from([0, 1], [b"a" * 32, b"b" * 32], data)
        assert tier._values.kept_bytes == 0


def test_tensor_rows_and_a_bytes_payload_encode_alike() -> None:
    row = torch.arange(LAYOUT.block_bytes, dtype=torch.int64).to(torch.uint8)
    pool = ValueBuffers(0)
    a = pool.encode(b"k" * 32, FP, tensor_bytes(row))
    b = pool.encode(b"k" * 32, FP, memoryview(bytes(tensor_bytes(row))))
    assert a == b
