"""RedisTier against a real redis-server on loopback: round trips, keys, faults."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.crc
import redis.exceptions
import torch
from redis.asyncio.client import Pipeline

from kvtier.block_hasher import BlockHasher
from kvtier.errors import BlockMissingError, ClosedError, ConfigError, TierIOError
from kvtier.request import Request
from kvtier.tiers import redis_io
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.redis import RedisTier, redact_url
from kvtier.tiers.redis_format import KeyFormat, hash_slot, slot_groups
from tests.redis_server import RedisServer, redis_server, shared_redis

__all__ = ["redis_server", "shared_redis"]

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
MODEL = "test-model"  # a redis tier names its model


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def key(i: int) -> bytes:
    return bytes([i]) * 36


def tier(server: RedisServer, **options: object) -> RedisTier:
    options.setdefault("model", MODEL)
    return RedisTier(LAYOUT, 64, url=server.url, **options)  # type: ignore[arg-type]


async def read(store: RedisTier, slots: list[int], keys: list[bytes]) -> torch.Tensor:
    out = torch.empty((len(slots), LAYOUT.block_bytes), dtype=torch.uint8)
    await store.read_into(slots, keys, out)
    return out


@pytest.mark.asyncio
async def test_round_trip_is_batched(redis_server: RedisServer) -> None:
    data = blocks(10)
    keys = [key(i) for i in range(10)]
    async with tier(redis_server, batch_size=3) as store:
        await store.write_from(list(range(10)), keys, data)
        assert torch.equal(await read(store, list(range(10)), keys), data)
        assert await store.contains([keys[0], key(99)]) == [True, False]
    with redis_server.client() as admin:
        stats = admin.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 4  # ceil(10 / 3) round trips
    assert stats["cmdstat_set"]["calls"] == 10


def count_pipelines(monkeypatch: pytest.MonkeyPatch, *, fail: int = 0) -> list[int]:
    """The number of commands of each pipeline a (standalone) tier executes, in order.

    The ``fail``-th pipeline executed from now (from 1; 0: none) fails as a
    dropped connection would, sending nothing.
    """
    sizes: list[int] = []
    count = 0
    execute = Pipeline.execute

    async def counted(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        nonlocal count
        count += 1
        sizes.append(len(self))
        if count == fail:
            raise redis.exceptions.ConnectionError("injected: the connection dropped")
        return await execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", counted)
    return sizes


@pytest.mark.asyncio
async def test_contains_and_discard_are_batched(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [key(i) for i in range(10)]
    async with tier(redis_server, batch_size=3, concurrency=2) as store:
        await store.write_from(list(range(5)), keys[::2], blocks(5))  # the even keys
        sizes = count_pipelines(monkeypatch)
        assert await store.contains([]) == []
        await store.discard([])
        await store.discard([5, 6, 7])  # slots of no block it knows
        assert sizes == []  # no round trip for nothing to ask or delete
        # names alone are cheap: a chunk holds NAMES_PER_ROUND_TRIP, not batch_size
        assert await store.contains(keys) == [True, False] * 5
        assert sizes == [10]
        sizes.clear()
        monkeypatch.setattr(redis_io, "NAMES_PER_ROUND_TRIP", 3)
        # 4 chunks, 2 in flight at a time; the answers in the order of the keys
        assert await store.contains(keys) == [True, False] * 5
        assert sorted(sizes) == [1, 3, 3, 3]
        sizes.clear()
        await store.discard(list(range(5)))
        assert sorted(sizes) == [2, 3]
        assert await store.contains(keys) == [False] * 10
    with redis_server.client() as admin:
        stats = admin.info("commandstats")
        assert admin.dbsize() == 0
    assert stats["cmdstat_exists"]["calls"] == 30
    assert stats["cmdstat_unlink"]["calls"] == 5


@pytest.mark.asyncio
async def test_ttl(redis_server: RedisServer) -> None:
    async with tier(redis_server, ttl=60) as store, tier(redis_server, prefix="b:") as other:
        await store.write_from([0], [key(1)], blocks(1))
        await other.write_from([0], [key(1)], blocks(1))
        with redis_server.client() as admin:
            assert 0 < admin.pttl(store.keys.name(key(1))) <= 60_000
            assert admin.pttl(other.keys.name(key(1))) == -1


@pytest.mark.asyncio
async def test_layouts_models_and_salts_never_share_a_key(redis_server: RedisServer) -> None:
    bf16 = BlockLayout(2, 4, 2, 8, dtype="bfloat16")  # same bytes per block
    async with (
        tier(redis_server) as a,
        RedisTier(bf16, 64, model=MODEL, url=redis_server.url) as b,
        tier(redis_server, model="other") as c,
    ):
        await a.write_from([0], [key(1)], blocks(1))
        for store in (b, c):
            with pytest.raises(BlockMissingError):
                await read(store, [0], [key(1)])
        # the same name with another namespace's header is a miss too
        with redis_server.client() as admin:
            admin.set(b.keys.name(key(1)), admin.get(a.keys.name(key(1))))
        with pytest.raises(BlockMissingError):
            await read(b, [0], [key(1)])
        hasher = BlockHasher(4)
        tokens = list(range(16))
        salted = [Request(s or "none", tokens, hasher, cache_salt=s) for s in ("x", "y", None)]
        hashes = [set(r.block_hashes) for r in salted]
        assert not hashes[0] & hashes[1]
        assert not hashes[0] & hashes[2]
        x, y = salted[0].block_hashes[0], salted[1].block_hashes[0]
        await a.write_from([1], [x], blocks(1, 2))
        assert torch.equal(await read(a, [1], [x]), blocks(1, 2))
        with pytest.raises(BlockMissingError):
            await read(a, [1], [y])


@pytest.mark.asyncio
async def test_garbage_and_truncated_values_are_misses(redis_server: RedisServer) -> None:
    async with tier(redis_server) as store:
        await store.write_from([0, 1, 2], [key(0), key(1), key(2)], blocks(3))
        with redis_server.client() as admin:
            admin.set(store.keys.name(key(0)), b"garbage")
            value = bytearray(admin.get(store.keys.name(key(1))))
            value[-1] ^= 1
            admin.set(store.keys.name(key(1)), bytes(value))
        with pytest.raises(BlockMissingError) as info:
            await read(store, [0, 1, 2], [key(0), key(1), key(2)])
        assert info.value.slots == (0, 1)


@pytest.mark.asyncio
async def test_killed_restarted_empty_and_reconnect(redis_server: RedisServer) -> None:
    async with tier(redis_server, timeout=2.0) as store:
        await store.write_from([0], [key(1)], blocks(1))
        redis_server.kill()
        with pytest.raises(TierIOError):
            await read(store, [0], [key(1)])
        with pytest.raises(TierIOError):
            await store.write_from([1], [key(2)], blocks(1))
        redis_server.start()
        with pytest.raises(BlockMissingError):
            await read(store, [0], [key(1)])
        await store.write_from([1], [key(2)], blocks(1, 5))
        assert torch.equal(await read(store, [1], [key(2)]), blocks(1, 5))


@pytest.mark.asyncio
async def test_server_absent_at_start(redis_server: RedisServer) -> None:
    redis_server.kill()
    async with tier(redis_server, connect_timeout=1.0, timeout=1.0) as store:
        with pytest.raises(TierIOError):
            await store.write_from([0], [key(1)], blocks(1))
        redis_server.start()
        await store.write_from([0], [key(1)], blocks(1))
        assert torch.equal(await read(store, [0], [key(1)]), blocks(1))


@pytest.mark.asyncio
async def test_paused_server_times_out(redis_server: RedisServer) -> None:
    async with tier(redis_server, timeout=0.3) as store:
        await store.write_from([0], [key(1)], blocks(1))
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # 3 s: past every deadline here
            try:
                with pytest.raises(TierIOError):
                    await read(store, [0], [key(1)])
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        assert torch.equal(await read(store, [0], [key(1)]), blocks(1))


@pytest.mark.asyncio
async def test_a_caller_cancelling_a_round_trip_is_a_cancellation_and_the_tier_serves_on(
    redis_server: RedisServer,
) -> None:
    async with tier(redis_server, timeout=30.0) as store:
        await store.write_from([0], [key(1)], blocks(1))
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # 3 s: past every deadline here
            try:
                with anyio.fail_after(10):  # the caller's deadline, far shorter than the tier's
                    with anyio.move_on_after(0.3) as scope:
                        await read(store, [0], [key(1)])
                assert scope.cancelled_caught  # cancelled, not a TierIOError or a hang
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        await store.write_from([1], [key(2)], blocks(1, seed=2))
        assert torch.equal(
            await read(store, [0, 1], [key(1), key(2)]), torch.cat([blocks(1), blocks(1, seed=2)])
        )


@pytest.mark.asyncio
async def test_maxmemory(redis_server: RedisServer) -> None:
    big = BlockLayout(num_layers=4, block_size=16, num_kv_heads=4, head_size=64)  # 64 KiB
    data = torch.randint(0, 256, (64, big.block_bytes), dtype=torch.uint8)
    keys = [key(i) for i in range(64)]
    with redis_server.client() as admin:
        admin.config_set("maxmemory", str(2 << 20))
        admin.config_set("maxmemory-policy", "allkeys-lru")
    async with RedisTier(big, 64, model=MODEL, url=redis_server.url, batch_size=8) as store:
        await store.write_from(list(range(64)), keys, data)
        out = torch.empty_like(data)
        with pytest.raises(BlockMissingError) as info:
            await store.read_into(list(range(64)), keys, out)
        assert len(info.value.slots) > 0
        with redis_server.client() as admin:  # no more evictions: what is left stays
            admin.config_set("maxmemory", "0")
        # The first read's own replies may have evicted more; ask again, then
        # every survivor must read back exactly.
        with pytest.raises(BlockMissingError) as again:
            await store.read_into(list(range(64)), keys, out)
        kept = [s for s in range(64) if s not in again.value.slots]
        assert kept
        await store.read_into(kept, [keys[s] for s in kept], out[: len(kept)])
        assert torch.equal(out[: len(kept)], data[kept])
        with redis_server.client() as admin:
            admin.config_set("maxmemory", str(2 << 20))
            admin.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(TierIOError):
            await store.write_from(list(range(64)), [key(i + 100) for i in range(64)], data)


@pytest.mark.asyncio
async def test_secrets_are_redacted(redis_server: RedisServer) -> None:
    with redis_server.client() as admin:
        admin.config_set("requirepass", "s3cret")
    url = redis_server.url.replace("redis://", "redis://default:s3cret@")
    async with RedisTier(LAYOUT, 8, model=MODEL, url=url) as store:
        await store.write_from([0], [key(1)], blocks(1))
        assert "s3cret" not in repr(store)
        assert "s3cret" not in store.url
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    async with RedisTier(LAYOUT, 8, model=MODEL, url=redis_server.url, password="wrong") as bad:
        with pytest.raises(TierIOError):
            await read(bad, [0], [key(1)])
        assert "wrong" not in repr(bad)


@pytest.mark.asyncio
async def test_closed_and_config_errors(shared_redis: RedisServer) -> None:
    store = RedisTier(LAYOUT, 8, model=MODEL, url=shared_redis.url)
    with pytest.raises(ClosedError):
        await read(store, [0], [key(1)])
    async with store:
        pass
    with pytest.raises(ClosedError):
        await store.write_from([0], [key(1)], blocks(1))
    for bad in ({"prefix": "a{b}"}, {"url": "http://x"}, {"ttl": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            RedisTier(LAYOUT, 8, model=MODEL, **bad)  # type: ignore[arg-type]
    for model in ("", None, b"m"):  # a shared store's names must say whose blocks they are
        with pytest.raises(ConfigError, match="model must name the model"):
            RedisTier(LAYOUT, 8, model=model)  # type: ignore[arg-type]


def test_cluster_slots() -> None:
    assert hash_slot(b"123456789") == 12739
    assert hash_slot(b"{user1000}.following") == hash_slot(b"{user1000}.followers")
    assert hash_slot(b"foo{}{bar}") == redis.crc.key_slot(b"foo{}{bar}")
    names = [KeyFormat("kv:", LAYOUT, MODEL).name(key(i)) for i in range(200)]
    assert all(hash_slot(n) == redis.crc.key_slot(n) for n in names)
    groups = slot_groups(names)
    assert len(groups) > 150  # no hash tag: blocks spread over the cluster
    assert sorted(i for g in groups.values() for i in g) == list(range(200))
