"""Lookup-time probes of a shared tier: blocks another engine stored after this one opened.

Engine "A" is a second :class:`RedisTier` on the same real server writing the
blocks a computed; engine "B" is an :class:`OffloadManager` whose Redis index
never saw them.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import pytest
import torch

from kvtier import KVCacheBlocks, Request
from kvtier.errors import ConfigError
from kvtier.offload import FinishedLoad
from kvtier.tiers.base import BlockStore, ProbingStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.redis import RedisTier
from tests.offload_env import BS, LAYOUT, Env, key, pattern, scheduled
from tests.redis_server import RedisServer, redis_server, shared_redis

MODEL = "test-model"  # a redis tier names its model

__all__ = ["redis_server", "shared_redis"]

_prefixes = itertools.count()


def redis_tier(server: RedisServer, prefix: str, **options: object) -> RedisTier:
    options.setdefault("model", MODEL)
    return RedisTier(LAYOUT, 64, url=server.url, prefix=prefix, timeout=2.0, **options)  # type: ignore[arg-type]


@pytest.fixture
def prefix() -> str:
    return f"probe{next(_prefixes)}:"


async def engine_a_stores(
    server: RedisServer, prefix: str, request: Request, positions: list[int]
) -> None:
    """Another engine writes the blocks of ``request`` at ``positions`` (their true bytes)."""
    keys = [key(request, p) for p in positions]
    data = torch.stack([pattern(k) for k in keys])
    async with redis_tier(server, prefix) as other:
        await other.write_from(list(range(len(keys))), keys, data)


async def load_all(env: Env, request: Request, tokens: int) -> tuple[list[FinishedLoad], list]:  # type: ignore[type-arg]
    """Allocate fresh device blocks, load ``tokens`` into them, wait; the outcome and blocks."""
    targets = env.fresh(tokens // BS)
    blocks = KVCacheBlocks((targets,))
    env.manager.update_state_after_alloc(request, blocks, tokens)
    env.manager.build_step(scheduled(new={request.request_id: blocks}))
    await env.manager.wait_for_loads([request.request_id])
    return env.manager.take_finished(), targets


@asynccontextmanager
async def engine_b(server: RedisServer, prefix: str) -> AsyncIterator[Env]:
    """Engine B: a manager over one Redis tier, entered (on the test's own task)."""
    env = Env(gpu_blocks=32, tiers=[redis_tier(server, prefix)])
    async with env.manager:
        yield env


def test_a_redis_tier_is_a_probing_store_and_the_cpu_tier_is_not() -> None:
    assert isinstance(RedisTier(LAYOUT, 4, model=MODEL), ProbingStore)
    assert not isinstance(CpuTier(LAYOUT, 4), ProbingStore)
    env = Env()
    assert not env.manager.probes


@pytest.mark.asyncio
async def test_blocks_stored_by_another_engine_later_are_found_loaded_and_verified(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        manager = env_b.manager
        assert manager.probes
        request = env_b.request(6)
        assert manager.get_num_new_matched_tokens(request, 0) == (0, False)  # B never saw them
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2, 3, 4])
        assert await manager.probe(request, 0) == 5
        assert manager.get_num_new_matched_tokens(request, 0) == (5 * BS, True)
        finished, targets = await load_all(env_b, request, 5 * BS)
        assert finished == [FinishedLoad(request.request_id, True)]
        assert all(env_b.holds(block, request, p) for p, block in enumerate(targets))
        stats = manager.stats().tiers["redis"]
        assert stats.probed_blocks == 5
        assert stats.loads == 5
        # Already known now: a second probe asks about nothing it holds and adopts nothing.
        assert await manager.probe(env_b.request(6, like=request), 0) == 0


@pytest.mark.asyncio
async def test_the_probe_adopts_only_the_held_prefix(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        request = env_b.request(6)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 3, 4])  # position 2 missing
        assert await env_b.manager.probe(request, 0) == 2
        assert env_b.manager.get_num_new_matched_tokens(request, 0) == (2 * BS, True)
        assert not env_b.manager.indexes[0].contains(key(request, 3))


@pytest.mark.asyncio
async def test_the_probe_starts_after_the_device_hit_and_the_blocks_known_already(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        request = env_b.request(6)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2, 3, 4])
        # One device-hit block: the probe asks from position 1 and adopts 4.
        assert await env_b.manager.probe(request, BS) == 4
        assert not env_b.manager.indexes[0].contains(key(request, 0))
        assert env_b.manager.get_num_new_matched_tokens(request, BS) == (4 * BS, True)


@pytest.mark.asyncio
async def test_the_last_block_is_never_probed_so_one_token_is_left_to_compute(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        request = env_b.request(3, extra=0)  # exactly 3 full blocks: only 2 may hit
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2])
        assert await env_b.manager.probe(request, 0) == 2


@pytest.mark.asyncio
async def test_a_garbage_value_found_by_the_probe_fails_its_load_never_wrong_bytes(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        request = env_b.request(4)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2, 3])
        tier = env_b.manager.tiers[0]
        assert isinstance(tier, RedisTier)
        with shared_redis.client() as admin:
            admin.set(tier.keys.name(key(request, 1)), b"not a block")
        assert await env_b.manager.probe(request, 0) == 4  # it exists; only a read can tell
        finished, targets = await load_all(env_b, request, 4 * BS)
        assert len(finished) == 1
        assert not finished[0].ok
        failed = set(finished[0].failed_block_ids)
        assert targets[1].block_id in failed
        for position, block in enumerate(targets):
            if block.block_id not in failed:
                assert env_b.holds(block, request, position)


@pytest.mark.asyncio
async def test_a_server_that_is_gone_makes_the_probe_a_counted_miss(
    redis_server: RedisServer, prefix: str
) -> None:
    env = Env(tiers=[redis_tier(redis_server, prefix, connect_timeout=0.5)])
    async with env.manager as manager:
        request = env.request(4)
        redis_server.kill()
        with anyio.fail_after(10):
            assert await manager.probe(request, 0) == 0
        assert manager.stats().tiers["redis"].failed_probes == 1
        assert manager.get_num_new_matched_tokens(request, 0) == (0, False)


@pytest.mark.asyncio
async def test_probing_is_off_with_max_probe_blocks_zero_and_bounded_otherwise(
    shared_redis: RedisServer, prefix: str
) -> None:
    off = Env(tiers=[redis_tier(shared_redis, prefix)], max_probe_blocks=0)
    assert not off.manager.probes
    env = Env(gpu_blocks=32, tiers=[redis_tier(shared_redis, prefix)], max_probe_blocks=3)
    async with env.manager as manager:
        request = env.request(6)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2, 3, 4])
        assert await manager.probe(request, 0) == 3
        assert await manager.probe(request, 0) == 2  # the next probe goes on from there
    with pytest.raises(ConfigError, match="max_probe_blocks"):
        Env(tiers=[redis_tier(shared_redis, prefix)], max_probe_blocks=-1)


@pytest.mark.asyncio
async def test_a_full_index_of_pinned_blocks_adopts_nothing(
    shared_redis: RedisServer, prefix: str
) -> None:
    tier = RedisTier(LAYOUT, 2, model=MODEL, url=shared_redis.url, prefix=prefix)
    env = Env(gpu_blocks=32, tiers=[tier])
    async with env.manager as manager:
        index = manager.indexes[0]
        index.commit(index.reserve([b"p" * 32, b"q" * 32]).keys)
        index.pin([b"p" * 32, b"q" * 32])
        request = env.request(4)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2])
        assert await manager.probe(request, 0) == 0
        index.unpin([b"p" * 32, b"q" * 32])
        assert await manager.probe(request, 0) == 2  # evicts the two: the index holds 2
        index.check_invariants()


@pytest.mark.asyncio
async def test_adopting_never_evicts_the_prefix_the_request_already_hits(
    shared_redis: RedisServer, prefix: str
) -> None:
    tier = RedisTier(LAYOUT, 4, model=MODEL, url=shared_redis.url, prefix=prefix)
    env = Env(gpu_blocks=32, tiers=[tier])
    async with env.manager as manager:
        request = env.request(6)
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2, 3, 4])
        index = manager.indexes[0]
        index.commit(index.reserve([key(request, 0), key(request, 1)]).keys)  # known, older
        index.commit(index.reserve([b"x" * 32, b"y" * 32]).keys)  # unrelated, newer
        assert manager.get_num_new_matched_tokens(request, 0) == (2 * BS, True)
        assert await manager.probe(request, 0) == 2  # room only by evicting x and y
        assert key(request, 0) in index
        assert key(request, 1) in index
        assert manager.get_num_new_matched_tokens(request, 0) == (4 * BS, True)
        assert index.num_pinned == 0
        index.check_invariants()


def test_the_blocking_probe_runs_on_the_managers_background_loop(
    shared_redis: RedisServer, prefix: str
) -> None:
    async def store_for(request: Request) -> None:
        await engine_a_stores(shared_redis, prefix, request, [0, 1, 2])

    env = Env(gpu_blocks=32, tiers=[redis_tier(shared_redis, prefix)])
    with env.manager as manager:
        request = env.request(4)
        anyio.run(store_for, request)
        assert manager.probe_blocking(request, 0) == 3
        assert manager.get_num_new_matched_tokens(request, 0) == (3 * BS, True)


def test_tiers_without_probing_keep_the_protocol_optional() -> None:
    tiers: list[BlockStore] = [CpuTier(LAYOUT, 4)]
    env = Env(tiers=tiers)
    request = env.request(2)
    assert anyio.run(env.manager.probe, request, 0) == 0


@pytest.mark.asyncio
async def test_another_tenants_blocks_are_never_found(
    shared_redis: RedisServer, prefix: str
) -> None:
    async with engine_b(shared_redis, prefix) as env_b:
        tokens = list(range(7_000, 7_000 + 4 * BS + 3))
        hasher = env_b.request(1).block_hasher
        tenant_x = Request("x", tokens, hasher, cache_salt="tenant-x")
        tenant_y = Request("y", tokens, hasher, cache_salt="tenant-y")
        await engine_a_stores(shared_redis, prefix, tenant_x, [0, 1, 2, 3])
        assert await env_b.manager.probe(tenant_y, 0) == 0  # same tokens, other salt
        assert env_b.manager.get_num_new_matched_tokens(tenant_y, 0) == (0, False)
        assert await env_b.manager.probe(tenant_x, 0) == 4


class _SharedStandIn:
    """Only the names :class:`RemoteProbe` uses of a shared tier (no server needed)."""

    name = "shared"

    def adopt(self, slots: Sequence[int], keys: Sequence[bytes]) -> None:
        pass


@pytest.mark.parametrize("policy", ["lru", "lfu", "slru"])
def test_adopting_does_not_count_as_a_read_of_the_prefix_it_protects(policy: str) -> None:
    """The request's held blocks are pinned while room is made, not read: a policy
    must not see them as used (LFU would count a hit, SLRU promote them)."""
    from kvtier.offload.remote import ProbePlan, RemoteProbe
    from kvtier.offload.stats import TierStats
    from kvtier.tiers.index import TierIndex

    index = TierIndex("shared", 8, policy)
    held = (b"h0" * 16, b"h1" * 16)
    index.commit(index.reserve(held).keys)
    index.commit(index.reserve([b"z" * 32]).keys)  # stored after them
    probe = RemoteProbe(
        [_SharedStandIn()],  # type: ignore[list-item]
        [index],
        [TierStats()],
        block_size=BS,
        num_groups=1,
        max_blocks=8,
    )
    adopted = (b"n0" * 16, b"n1" * 16)
    plan = ProbePlan("r", 2, tuple((k,) for k in adopted), (0,), held)
    assert probe.adopt(plan, {0: [True, True]}) == 2
    # Unread since stored, and stored first: still the first to go.
    assert set(index.policy.victims(2, lambda key: True)) == set(held)
