"""Reusable store buffers of the Redis tier: reuse, the byte budget, failures."""

from __future__ import annotations

import pytest
import torch

from kvtier.errors import ConfigError, TierIOError
from kvtier.tiers._checks import row_views, tensor_bytes
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_format import max_value_bytes, verify_value
from kvtier.tiers.redis_values import ValueBuffers
from tests.redis_cluster import RedisClusterServers, shared_redis_cluster
from tests.redis_server import RedisServer, redis_server, shared_redis

__all__ = ["redis_server", "shared_redis", "shared_redis_cluster"]

LAYOUT = BlockLayout(num_layers=1, block_size=16, num_kv_heads=1, head_size=8)
MODEL = "test-model"  # a redis tier names its model
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


async def store_and_read_back(tier: RedisTier, generations: int = 3) -> None:
    """Store 8 blocks ``generations`` times over (new bytes each time) and read each back."""
    keys = [bytes([i]) * 32 for i in range(8)]
    for generation in range(generations):
        data = torch.full((8, LAYOUT.block_bytes), generation, dtype=torch.uint8)
        data[:, 0] = torch.arange(8, dtype=torch.uint8)
        await tier.write_from(range(8), keys, data)
        out = torch.zeros_like(data)
        await tier.read_into(range(8), keys, out)
        assert torch.equal(out, data)


@pytest.mark.asyncio
async def test_a_cluster_tier_reuses_buffers_and_every_store_reads_back_its_own_bytes(
    shared_redis_cluster: RedisClusterServers,
) -> None:
    url = shared_redis_cluster.nodes[0].url
    async with RedisTier(
        LAYOUT, 8, model=MODEL, url=url, cluster=True, prefix="pool1:", batch_size=4
    ) as tier:
        # The default budget covers one call's values in flight.
        assert tier._values.max_bytes == 4 * 2 * max_value_bytes(LAYOUT.block_bytes)
        await store_and_read_back(tier)  # each store reuses the last one's buffers
        assert tier._values.kept_bytes > 0


@pytest.mark.asyncio
async def test_a_standalone_tier_sends_framed_values_without_a_copy(
    shared_redis: RedisServer,
) -> None:
    async with RedisTier(
        LAYOUT, 8, model=MODEL, url=shared_redis.url, prefix="pool3:", batch_size=4
    ) as tier:
        await store_and_read_back(tier)
        assert tier._values.kept_bytes == 0  # no value buffers: header and payload sent apart
        with shared_redis.client() as admin:  # the server holds exactly header | key | payload
            raw = admin.get(tier.keys.name(bytes([3]) * 32))
        assert isinstance(raw, bytes)
        payload = verify_value(raw, bytes([3]) * 32, tier.keys.fingerprint, LAYOUT.block_bytes)
        assert payload is not None
        assert payload[0] == 3


@pytest.mark.asyncio
async def test_buffers_of_a_failed_store_are_dropped(redis_server: RedisServer) -> None:
    tier = RedisTier(
        LAYOUT, 4, model=MODEL, url=redis_server.url, prefix="pool2:", connect_timeout=0.5
    )
    async with tier:
        tier._framed = False  # the pooled path, as a Cluster client's
        data = torch.ones((2, LAYOUT.block_bytes), dtype=torch.uint8)
        await tier.write_from([0, 1], [b"a" * 32, b"b" * 32], data)
        kept = tier._values.kept_bytes
        assert kept > 0  # a successful store gives its buffers back
        redis_server.kill()
        with pytest.raises(TierIOError):
            await tier.write_from([0, 1], [b"c" * 32, b"d" * 32], data)
        assert tier._values.kept_bytes == 0  # taken for the failed store, never given back


def test_tensor_rows_and_a_bytes_payload_encode_alike() -> None:
    row = torch.arange(LAYOUT.block_bytes, dtype=torch.int64).to(torch.uint8)
    pool = ValueBuffers(0)
    a = pool.encode(b"k" * 32, FP, tensor_bytes(row))
    b = pool.encode(b"k" * 32, FP, memoryview(bytes(tensor_bytes(row))))
    assert a == b


def test_row_views_of_contiguous_strided_and_empty_rows() -> None:
    rows = torch.arange(4 * 8, dtype=torch.int64).to(torch.uint8).view(4, 8)
    views = row_views(rows)
    assert [bytes(views(i)) for i in range(4)] == [bytes(rows[i].tolist()) for i in range(4)]
    strided = torch.zeros(4, 16, dtype=torch.uint8)[:, 4:12]  # rows contiguous, not the whole
    strided.copy_(rows)
    views = row_views(strided)
    assert [bytes(views(i)) for i in range(4)] == [bytes(rows[i].tolist()) for i in range(4)]
    views(2)[:] = b"\xff" * 8  # the views alias the tensor
    assert strided[2].tolist() == [255] * 8
    row_views(torch.empty(0, 8, dtype=torch.uint8))  # nothing to view, no error
