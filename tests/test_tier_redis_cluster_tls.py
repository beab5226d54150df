"""RedisTier against a real 3-master Redis Cluster and a real TLS redis-server.

No mocks: the fixtures (tests/redis_cluster.py, tests/redis_tls.py) start
real servers on loopback. The BlockStore conformance suite runs on the
cluster too (``redis-cluster`` in tests/test_tier_conformance.py); these tests
cover what is particular to a cluster (per-node batches, a dead node) and to
TLS (CA, wrong CA, host name, client certificates, secrets), and the config
loader opening both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
import torch
from structlog.testing import capture_logs

from kvtier.config import load_config
from kvtier.errors import BlockMissingError, ConfigError, TierIOError
from kvtier.replay import chat_workload, replay
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_format import hash_slot
from tests.redis_cluster import (
    RedisClusterServers,
    cluster_state,
    redis_cluster,
    shared_redis_cluster,
    wait_for_state,
)
from tests.redis_server import RedisServer
from tests.redis_tls import Certificates, tls_certificates, tls_redis

__all__ = ["redis_cluster", "shared_redis_cluster", "tls_certificates", "tls_redis"]

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
MODEL = "test-model"  # a redis tier names its model


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, LAYOUT.block_bytes), dtype=torch.uint8, generator=generator)


def keys(n: int, tag: str = "") -> list[bytes]:
    return [f"{tag}block-{i}".encode() for i in range(n)]


async def read(store: RedisTier, slots: list[int], names: list[bytes]) -> torch.Tensor:
    out = torch.empty((len(slots), LAYOUT.block_bytes), dtype=torch.uint8)
    with anyio.fail_after(30):  # a hang fails the test instead of stalling it
        await store.read_into(slots, names, out)
    return out


def owners(cluster: RedisClusterServers, store: RedisTier, names: list[bytes]) -> list[int]:
    """The node index serving each block, from kvtier's CRC16 and the cluster's slot map."""
    ranges = cluster.slot_owners()
    slots = [hash_slot(store.keys.name(name)) for name in names]
    return [next(node for lo, hi, node in ranges if lo <= slot <= hi) for slot in slots]


# -- Cluster -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_batch_is_split_per_node_and_reads_back(
    shared_redis_cluster: RedisClusterServers,
) -> None:
    cluster = shared_redis_cluster
    cluster.flushall()
    n = 512
    data, names = blocks(n, 1), keys(n)
    async with RedisTier(
        LAYOUT, n, model=MODEL, url=cluster.url, cluster=True, batch_size=n
    ) as store:
        await store.write_from(list(range(n)), names, data)  # one batch, one pipeline
        where = owners(cluster, store, names)
        # Every node holds exactly the blocks kvtier's slot logic assigns it.
        assert cluster.dbsizes() == [where.count(node) for node in range(3)]
        assert min(cluster.dbsizes()) > n // 5
        assert torch.equal(await read(store, list(range(n)), names), data)
        odd = list(range(1, n, 2))
        assert torch.equal(await read(store, odd, [names[i] for i in odd]), data[odd])
    # Any node is an entry point: a client given the third node reads the same bytes.
    async with RedisTier(LAYOUT, n, model=MODEL, url=cluster.nodes[2].url, cluster=True) as other:
        assert torch.equal(await read(other, list(range(n)), names), data)


@pytest.mark.asyncio
async def test_contains_discard_and_recover_across_nodes(
    shared_redis_cluster: RedisClusterServers,
) -> None:
    cluster = shared_redis_cluster
    cluster.flushall()
    n, prefix = 300, "cd:"
    data, names = blocks(n, 2), keys(n)
    url = cluster.url
    async with RedisTier(
        LAYOUT, n, model=MODEL, url=url, cluster=True, prefix=prefix, batch_size=40
    ) as store:
        await store.write_from(list(range(n)), names, data)
        assert await store.contains([*names, b"absent"]) == [True] * n + [False]
        doomed = list(range(0, n, 3))
        where = owners(cluster, store, names)
        assert {where[i] for i in doomed} == {0, 1, 2}
        await store.discard(doomed)  # UNLINKs on every node
        kept = [i for i in range(n) if i not in doomed]
        assert cluster.dbsizes() == [sum(where[i] == node for i in kept) for node in range(3)]
        assert await store.contains([names[i] for i in doomed]) == [False] * len(doomed)
        with pytest.raises(BlockMissingError) as info:
            await read(store, [0, 1, 3], [names[0], names[1], names[3]])
        assert info.value.slots == (0, 3)
    async with RedisTier(
        LAYOUT, n, model=MODEL, url=url, cluster=True, prefix="keep:", discard_deletes=False
    ) as forgetful:
        await forgetful.write_from([0], [b"kept"], blocks(1))
        await forgetful.discard([0])  # forgets the slot, leaves the block to Redis
        assert await forgetful.contains([b"kept"]) == [True]
    assert sum(cluster.dbsizes()) == len(kept) + 1
    # A new process finds what is left on all three nodes (SCAN on each primary).
    async with RedisTier(
        LAYOUT, n, model=MODEL, url=url, cluster=True, prefix=prefix, scan_on_open=True
    ) as b:
        recovered = await b.recover()
        assert sorted(key for _, key in recovered) == sorted(names[i] for i in kept)
        assert sorted(slot for slot, _ in recovered) == list(range(len(kept)))
        assert torch.equal(await read(b, kept, [names[i] for i in kept]), data[kept])
    async with RedisTier(
        LAYOUT, 50, model=MODEL, url=url, cluster=True, prefix=prefix, scan_on_open=True
    ) as c:
        assert len(await c.recover()) == 50  # at most num_slots


@pytest.mark.asyncio
async def test_a_killed_node(redis_cluster: RedisClusterServers) -> None:
    """What a dead master (no replicas) does to reads, bounded in time, never wrong bytes.

    redis-py's cluster client sends each node its part of a batch. While the
    others still think the dead node is alive (``cluster-node-timeout``), its
    blocks fail (TierIOError: connection refused) and the others' read back
    exactly. Once the survivors mark it failed they answer CLUSTERDOWN for
    every key (``cluster-require-full-coverage yes``, the default): every read
    is a TierIOError. With ``cluster-require-full-coverage no`` they serve
    their own slots again.
    """
    cluster = redis_cluster
    n = 120
    data, names = blocks(n, 3), keys(n)
    async with RedisTier(
        LAYOUT,
        n,
        model=MODEL,
        url=cluster.url,
        cluster=True,
        batch_size=16,
        timeout=1.0,
        connect_timeout=0.5,
    ) as store:
        await store.write_from(list(range(n)), names, data)
        where = owners(cluster, store, names)
        dead = [i for i in range(n) if where[i] == 2]
        alive = [i for i in range(n) if where[i] != 2]
        assert dead
        assert alive
        cluster.nodes[2].kill()
        bound = 1.5 + 1.0  # connect_timeout + timeout, and a margin

        async def expect_io_error(slots: list[int], match: str | None = None) -> None:
            start = time.monotonic()
            with anyio.fail_after(bound):
                with pytest.raises(TierIOError, match=match):
                    await read(store, slots, [names[i] for i in slots])
            assert time.monotonic() - start < bound

        # Before the survivors notice (NODE_TIMEOUT_MS): the live nodes' blocks
        # are exact and they take writes.
        with anyio.fail_after(bound):
            assert torch.equal(await read(store, alive, [names[i] for i in alive]), data[alive])
            await store.write_from(alive, [names[i] for i in alive], data[alive])
        assert cluster_state(cluster.nodes[0]) == "ok"  # (so the above was that case)
        await expect_io_error(dead, "Connect")  # closed, or refused
        await expect_io_error(list(range(n)))  # a batch touching the dead node fails whole

        # The survivors mark it failed: the cluster is down for every key.
        wait_for_state(cluster.nodes[:2], "fail", 20)
        await expect_io_error(alive, "cluster is down")
        await expect_io_error(dead)
        # A new tier opens (logged as unreachable) with nothing recovered.
        async with RedisTier(
            LAYOUT, n, model=MODEL, url=cluster.url, cluster=True, scan_on_open=True, timeout=1.0
        ) as late:
            assert list(await late.recover()) == []

        # Partial coverage allowed: the survivors serve their slots again.
        for node in cluster.nodes[:2]:
            with node.client() as admin:
                admin.config_set("cluster-require-full-coverage", "no")
        wait_for_state(cluster.nodes[:2], "ok", 20)
        with anyio.fail_after(bound * 2):
            assert torch.equal(await read(store, alive, [names[i] for i in alive]), data[alive])
        await expect_io_error(dead)


# -- TLS -----------------------------------------------------------------------------


def tls_tier(url: str, **options: object) -> RedisTier:
    options.setdefault("model", MODEL)
    return RedisTier(LAYOUT, 8, url=url, connect_timeout=1.0, timeout=1.0, **options)  # type: ignore[arg-type]


async def round_trip(store: RedisTier) -> None:
    with anyio.fail_after(10):
        await store.write_from([0, 1], keys(2), blocks(2, 4))
        assert torch.equal(await read(store, [0, 1], keys(2)), blocks(2, 4))


def test_tls_options_are_checked() -> None:
    for bad in (
        {"tls_key_file": "client.key"},  # a key without its certificate
        {"url": "unix:///tmp/redis.sock", "tls": True},
        {"url": "unix:///tmp/redis.sock", "tls_ca_file": "ca.crt"},
    ):
        with pytest.raises(ConfigError):
            RedisTier(LAYOUT, 8, model=MODEL, **bad)  # type: ignore[arg-type]
    # Any TLS option makes a redis:// URL a rediss:// one (what the client is given).
    assert (
        RedisTier(LAYOUT, 8, model=MODEL, url="redis://h:1/0", tls_ca_file="ca.crt").url
        == "rediss://h:1/0"
    )
    assert RedisTier(LAYOUT, 8, model=MODEL, url="redis://h:1/0").url == "redis://h:1/0"


@pytest.mark.asyncio
async def test_tls_round_trip(tls_redis: RedisServer, tls_certificates: Certificates) -> None:
    ca = str(tls_certificates.ca)
    assert tls_redis.url.startswith("rediss://")
    async with tls_tier(tls_redis.url, tls_ca_file=ca) as store:
        await round_trip(store)
        assert "rediss://" in repr(store)
    # redis:// with tls=True is TLS too.
    async with tls_tier(tls_redis.url.replace("rediss:", "redis:"), tls=True, tls_ca_file=ca) as b:
        await round_trip(b)
    # Plain TCP to the TLS port: refused by the server, a TierIOError.
    async with tls_tier(tls_redis.url.replace("rediss:", "redis:")) as plain:
        with anyio.fail_after(5), pytest.raises(TierIOError):
            await plain.write_from([0], keys(1), blocks(1))


@pytest.mark.asyncio
async def test_tls_verification_failures_are_tier_errors(
    tls_redis: RedisServer, tls_certificates: Certificates
) -> None:
    other = str(tls_certificates.other_ca)
    localhost = tls_redis.url.replace("127.0.0.1", "localhost")  # not in the certificate
    for url, options in (
        (tls_redis.url, {"tls_ca_file": other}),  # signed by a CA we do not trust
        (tls_redis.url, {}),  # the system's CAs do not know ours
        (localhost, {"tls_ca_file": str(tls_certificates.ca)}),  # host name mismatch
    ):
        async with tls_tier(url, **options) as store:  # opens; logs tier_unreachable
            with anyio.fail_after(5), pytest.raises(TierIOError, match="CERTIFICATE_VERIFY"):
                await store.write_from([0], keys(1), blocks(1))
            with anyio.fail_after(5), pytest.raises(TierIOError):
                await read(store, [0], keys(1))
    # tls_verify=False accepts any certificate (and host name).
    async with tls_tier(localhost, tls_ca_file=other, tls_verify=False) as unverified:
        await round_trip(unverified)


@pytest.mark.asyncio
async def test_mutual_tls(tls_redis: RedisServer, tls_certificates: Certificates) -> None:
    certs = tls_certificates
    with tls_redis.client() as admin:
        admin.config_set("tls-auth-clients", "yes")  # a client certificate is required
    async with tls_tier(tls_redis.url, tls_ca_file=str(certs.ca)) as anonymous:
        with anyio.fail_after(5), pytest.raises(TierIOError):
            await anonymous.write_from([0], keys(1), blocks(1))
    async with tls_tier(
        tls_redis.url,
        tls_ca_file=str(certs.ca),
        tls_cert_file=str(certs.client_cert),
        tls_key_file=str(certs.client_key),
    ) as store:
        await round_trip(store)


@pytest.fixture
def stdlib_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record (kvtier's and redis-py's) at DEBUG, structlog unconfigured."""
    structlog.reset_defaults()
    with caplog.at_level(logging.DEBUG):
        yield caplog
    structlog.reset_defaults()


@pytest.mark.asyncio
async def test_password_never_in_repr_or_logs(
    tls_redis: RedisServer, tls_certificates: Certificates, stdlib_logs: pytest.LogCaptureFixture
) -> None:
    secret = "tls-s3cret-pw"
    with tls_redis.client() as admin:
        admin.config_set("requirepass", secret)
    tls_redis.admin["password"] = secret
    ca = str(tls_certificates.ca)
    in_url = tls_redis.url.replace("rediss://", f"rediss://default:{secret}@")
    shown: list[str] = []  # reprs, URLs and error messages
    # kvtier's events through stdlib logging (structlog unconfigured) ...
    async with tls_tier(in_url, tls_ca_file=ca) as store:
        await round_trip(store)
        shown += [repr(store), store.url]
    # (a wrong password, which contains the secret, is never shown either)
    async with tls_tier(tls_redis.url, tls_ca_file=ca, password="wrong-" + secret) as bad:
        with pytest.raises(TierIOError, match="AuthenticationError") as info:
            await bad.write_from([0], keys(1), blocks(1))
        shown += [repr(bad), str(info.value)]
    assert "tier_open" in stdlib_logs.text
    assert "tier_unreachable" in stdlib_logs.text
    assert ":***@" in stdlib_logs.text  # the URL was logged, redacted
    # ... and through structlog when the application configured it.
    with capture_logs() as structured:
        async with tls_tier(in_url, tls_ca_file=ca) as good:
            await round_trip(good)
        async with tls_tier(tls_redis.url, password=secret) as unverified:  # no CA: fails
            with pytest.raises(TierIOError) as info:
                await unverified.write_from([0], keys(1), blocks(1))
            shown += [repr(unverified), unverified.url, str(info.value)]
    events = [str(event) for event in structured]
    assert any("tier_open" in e for e in events)
    assert any("tier_unreachable" in e for e in events)
    for text in (*shown, *events, stdlib_logs.text):
        assert secret not in text


# -- The config loader ---------------------------------------------------------------

STACK = """
[layout]
num_layers = 1
block_size = 16
num_kv_heads = 1
head_size = 8

[offload]
prefetch = "wait_complete"

[[tiers]]
kind = "device"
capacity = "32KiB"

[[tiers]]
kind = "redis"
capacity = "2MiB"
model = "m"
timeout = "2s"
connect_timeout = "1s"
"""


async def replay_through(path: Path) -> tuple[RedisTier, int, int, int]:
    built: list[BlockStore] = []

    def keep(store: BlockStore) -> BlockStore:
        built.append(store)
        return store

    # Eight users' histories do not fit the 32-block device cache, so later
    # rounds must find theirs in Redis whatever the stores' timing.
    workload = chat_workload(users=8, rounds=3, system_prompt=256, question=32, answer=64)
    with anyio.fail_after(60):
        report = await replay(load_config(path), workload, wrap_tier=keep)
    (store,) = built
    assert isinstance(store, RedisTier)
    remote = report.tiers[-1]
    assert report.verified_blocks == (report.device_hit_tokens + report.loaded_tokens) // 16
    return store, remote.stored_blocks, remote.hits, remote.loaded_blocks


@pytest.mark.asyncio
async def test_config_cluster_tier_opens_and_replays(
    shared_redis_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    cluster = shared_redis_cluster
    cluster.flushall()
    path = tmp_path / "cluster.toml"
    path.write_text(STACK + f'url = "{cluster.nodes[1].url}"\ncluster = true\nprefix = "cfg:"\n')
    store, stored, hits, loaded = await replay_through(path)
    assert "cluster" in repr(store)
    assert stored > 0
    assert hits > 0
    assert loaded > 0
    assert all(size > 0 for size in cluster.dbsizes())  # the replay's blocks on every node


@pytest.mark.asyncio
async def test_config_tls_tier_opens_and_replays(
    tls_redis: RedisServer,
    tls_certificates: Certificates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    certs = tls_certificates
    with tls_redis.client() as admin:
        admin.config_set("tls-auth-clients", "yes")
        admin.config_set("requirepass", "cfg-secret")
    tls_redis.admin["password"] = "cfg-secret"
    monkeypatch.setenv("KVTIER_TEST_REDIS_PASSWORD", "cfg-secret")
    path = tmp_path / "tls.toml"
    path.write_text(
        STACK
        + f'url = "{tls_redis.url.replace("rediss:", "redis:")}"\n'
        + "tls = true\n"
        + f'tls_ca_file = "{certs.ca}"\n'
        + f'tls_cert_file = "{certs.client_cert}"\n'
        + f'tls_key_file = "{certs.client_key}"\n'
        + 'password_env = "KVTIER_TEST_REDIS_PASSWORD"\n'
    )
    store, stored, hits, loaded = await replay_through(path)
    assert store.url.startswith("rediss://")
    assert stored > 0
    assert hits > 0
    assert loaded > 0
    with tls_redis.client() as admin:
        assert admin.dbsize() > 0


@pytest.mark.asyncio
async def test_a_value_of_another_type_on_a_cluster_is_a_miss_not_a_node_failure(
    shared_redis_cluster: RedisClusterServers,
) -> None:
    import redis

    cluster = shared_redis_cluster
    cluster.flushall()
    n = 8
    data, names = blocks(n, 7), keys(n, "wrongtype")
    async with RedisTier(LAYOUT, n, model=MODEL, url=cluster.url, cluster=True) as store:
        await store.write_from(list(range(n)), names, data)
        admin = redis.RedisCluster.from_url(cluster.url)
        try:
            admin.delete(store.keys.name(names[3]))
            admin.hset(store.keys.name(names[3]), "field", "value")  # another client's hash
        finally:
            admin.close()
        with pytest.raises(BlockMissingError) as info:
            await read(store, list(range(n)), names)
        assert info.value.slots == (3,)
        others = [i for i in range(n) if i != 3]
        assert torch.equal(await read(store, others, [names[i] for i in others]), data[others])
