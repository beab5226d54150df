"""One conformance suite for every tier: what the BlockStore protocol promises.

Every tier kvtier ships is listed in ``TIERS``; a new tier joins the list and
must pass the same tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest
import pytest_asyncio
import torch

from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier
from kvtier.tiers.redis import RedisTier
from tests.redis_cluster import RedisClusterServers, shared_redis_cluster
from tests.redis_server import RedisServer, shared_redis

__all__ = ["shared_redis", "shared_redis_cluster"]

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
MODEL = "test-model"  # a redis tier names its model
SLOTS = 512


def _per_layer(_: Path, _r: pytest.FixtureRequest) -> BlockStore:
    shape = (SLOTS, *LAYOUT.page_shape)
    tensors = [torch.zeros(shape, dtype=torch.float16) for _ in range(2 * LAYOUT.num_layers)]
    return DeviceTier(tensors, LAYOUT)


def _cross_layer(_: Path, _r: pytest.FixtureRequest) -> BlockStore:
    return DeviceTier(torch.zeros((SLOTS, LAYOUT.block_bytes), dtype=torch.uint8), LAYOUT)


def _cpu(_: Path, _r: pytest.FixtureRequest) -> BlockStore:
    return CpuTier(LAYOUT, SLOTS)


def _disk(path: Path, _r: pytest.FixtureRequest) -> BlockStore:
    return DiskTier(path / "blocks", LAYOUT, SLOTS * DiskTier.bytes_per_block(LAYOUT))


def _redis(_: Path, request: pytest.FixtureRequest) -> BlockStore:
    server: RedisServer = request.getfixturevalue("shared_redis")  # skips without the binary
    with server.client() as admin:
        admin.flushall()
    return RedisTier(LAYOUT, SLOTS, model=MODEL, url=server.url, batch_size=64)


def _redis_cluster(_: Path, request: pytest.FixtureRequest) -> BlockStore:
    cluster: RedisClusterServers = request.getfixturevalue("shared_redis_cluster")
    cluster.flushall()
    return RedisTier(LAYOUT, SLOTS, model=MODEL, url=cluster.url, batch_size=64, cluster=True)


TIERS: dict[str, Callable[[Path, pytest.FixtureRequest], BlockStore]] = {
    "device-per-layer": _per_layer,
    "device-cross-layer": _cross_layer,
    "cpu": _cpu,
    "disk": _disk,
    "redis": _redis,
    "redis-cluster": _redis_cluster,  # 3 masters: every batch spans the nodes
}


@pytest_asyncio.fixture(params=sorted(TIERS))
async def tier(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockStore]:
    store = TIERS[request.param](tmp_path, request)
    async with store:
        yield store


@runtime_checkable
class TakesParts(Protocol):
    """The optional parts calls (see :class:`~kvtier.tiers.base.BlockStore`)."""

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[bytes], parts: Sequence[torch.Tensor]
    ) -> None: ...

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[bytes], parts: Sequence[torch.Tensor]
    ) -> None: ...


def random_blocks(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def keys(slots: list[int], tag: int = 0) -> list[bytes]:
    return [b"%d-%d" % (tag, slot) for slot in slots]


@pytest.mark.asyncio
async def test_is_a_block_store(tier: BlockStore) -> None:
    assert isinstance(tier, BlockStore)
    assert tier.layout == LAYOUT
    assert tier.num_slots == SLOTS
    assert not tier.closed
    assert isinstance(tier.name, str)


@pytest.mark.asyncio
@pytest.mark.parametrize("batch", [1, 2, 7, 64, 512])
async def test_round_trip_in_batches(tier: BlockStore, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    slots = torch.randperm(SLOTS, generator=generator)[:batch].tolist()
    data = random_blocks(batch, batch)
    await tier.write_from(slots, keys(slots), data)
    out = torch.empty_like(data)
    await tier.read_into(slots, keys(slots), out)
    assert torch.equal(out, data)


@pytest.mark.asyncio
async def test_partial_batches_and_slot_reuse(tier: BlockStore) -> None:
    first = random_blocks(8, 1)
    await tier.write_from(list(range(8)), keys(list(range(8))), first)
    second = random_blocks(3, 2)
    await tier.write_from([2, 5, 6], keys([2, 5, 6], tag=1), second)  # overwrite three slots
    out = torch.empty((8, LAYOUT.block_bytes), dtype=torch.uint8)
    await tier.read_into([0, 1, 3, 4, 7], keys([0, 1, 3, 4, 7]), out[:5])
    assert torch.equal(out[:5], first[[0, 1, 3, 4, 7]])
    await tier.read_into([2, 5, 6], keys([2, 5, 6], tag=1), out[:3])
    assert torch.equal(out[:3], second)


@pytest.mark.asyncio
async def test_reads_into_strided_views(tier: BlockStore) -> None:
    data = random_blocks(4, 3)
    await tier.write_from([10, 11, 12, 13], keys([10, 11, 12, 13]), data)
    wide = torch.zeros((4, 2, LAYOUT.block_bytes), dtype=torch.uint8)
    await tier.read_into([10, 11, 12, 13], keys([10, 11, 12, 13]), wide[:, 1])
    assert torch.equal(wide[:, 1], data)
    assert not wide[:, 0].any()


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [[-1], [SLOTS], [0, SLOTS + 5]])
async def test_bad_slots_are_rejected(tier: BlockStore, bad: list[int]) -> None:
    data = random_blocks(len(bad), 4)
    with pytest.raises(InvalidRequestError):
        await tier.write_from(bad, keys(bad), data)
    with pytest.raises(InvalidRequestError):
        await tier.read_into(bad, keys(bad), torch.empty_like(data))


@pytest.mark.asyncio
async def test_mismatched_lengths_are_rejected(tier: BlockStore) -> None:
    with pytest.raises(InvalidRequestError):
        await tier.write_from([0, 1], keys([0]), random_blocks(2, 5))
    with pytest.raises(InvalidRequestError):
        await tier.read_into(
            [0, 1], keys([0, 1]), torch.empty((3, LAYOUT.block_bytes), dtype=torch.uint8)
        )


@pytest.mark.asyncio
async def test_closed_tier_refuses_everything_and_close_is_idempotent(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for make in TIERS.values():
        store = make(tmp_path, request)
        async with store:
            assert list(await store.recover()) == []  # nothing stored yet
        assert store.closed
        await store.aclose()
        data = random_blocks(1, 6)
        with pytest.raises(ClosedError):
            await store.write_from([0], keys([0]), data)
        with pytest.raises(ClosedError):
            await store.read_into([0], keys([0]), data)
        with pytest.raises(ClosedError):
            await store.discard([0])


@pytest.mark.asyncio
@pytest.mark.parametrize("sizes", [[1], [3, 0, 1, 4], [1] * 9, [20, 44]])
async def test_parts_calls_move_what_one_call_per_part_would(
    tier: BlockStore, sizes: list[int]
) -> None:
    """Every shipped tier takes a batch in several buffers (the mover's one-call path)."""
    n = sum(sizes)
    generator = torch.Generator().manual_seed(n)
    slots = torch.randperm(SLOTS, generator=generator)[:n].tolist()
    data = random_blocks(n, n)
    assert isinstance(tier, TakesParts)
    sources, at = [], 0
    for size in sizes:  # plain, row-strided and column-major parts in turn
        kind = len(sources) % 3
        part = (
            torch.zeros(size, LAYOUT.block_bytes, dtype=torch.uint8)
            if kind == 0
            else torch.zeros(size, LAYOUT.block_bytes + 8, dtype=torch.uint8)[:, 4:-4]
            if kind == 1
            else torch.zeros(LAYOUT.block_bytes, size, dtype=torch.uint8).t()
        )
        part.copy_(data[at : at + size])
        sources.append(part)
        at += size
    await tier.write_from_parts(slots, keys(slots, tag=5), sources)
    whole = torch.empty_like(data)
    await tier.read_into(slots, keys(slots, tag=5), whole)
    assert torch.equal(whole, data)
    targets = [  # contiguous and column-major in turn
        torch.empty(size, LAYOUT.block_bytes, dtype=torch.uint8)
        if i % 2
        else torch.empty(LAYOUT.block_bytes, size, dtype=torch.uint8).t()
        for i, size in enumerate(sizes)
    ]
    await tier.read_into_parts(slots, keys(slots, tag=5), targets)
    assert torch.equal(torch.cat(targets), data)
    extra = torch.empty(1, LAYOUT.block_bytes, dtype=torch.uint8)
    with pytest.raises(InvalidRequestError, match=f"parts hold {n + 1} rows for {n} slots"):
        await tier.read_into_parts(slots, keys(slots, tag=5), [*targets, extra])
