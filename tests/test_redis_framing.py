"""Framed values: header and payload packed as one bulk string, without a copy."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from kvtier.tiers.redis_framing import FramedValue, install


def joined(chunks: list[object]) -> bytes:
    return b"".join(bytes(c) if isinstance(c, memoryview) else c for c in chunks)  # type: ignore[misc]


def test_a_framed_set_packs_to_the_same_bytes_as_the_joined_value() -> None:
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    assert install(client)
    cls = client.connection_pool.connection_class
    connection = cls(**client.connection_pool.connection_kwargs)
    plain = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    reference = plain.connection_pool.connection_class(**plain.connection_pool.connection_kwargs)
    payload = memoryview(bytes(range(256)) * 64)  # 16 KiB: above redis-py's 6,000-byte cutoff
    value = FramedValue(b"HEADER+KEY", payload)
    for args in (("SET", b"name", value), ("SET", b"name", value, "PX", 1500)):
        ours = connection.pack_commands([args])
        theirs = reference.pack_commands([tuple(bytes(a) if a is value else a for a in args)])
        assert joined(ours) == joined(theirs)
        assert any(chunk is payload for chunk in ours)  # the payload itself, not a copy
    # Commands without a framed value are packed by redis-py itself.
    assert joined(connection.pack_commands([("GET", b"name")])) == joined(
        reference.pack_commands([("GET", b"name")])
    )
    assert len(value) == 10 + len(payload)


def test_install_is_idempotent_and_keeps_tls_and_unix_classes() -> None:
    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/none.sock"):
        client = aioredis.Redis.from_url(url)
        original = client.connection_pool.connection_class
        assert install(client)
        framing = client.connection_pool.connection_class
        assert issubclass(framing, original)
        assert install(client)
        assert client.connection_pool.connection_class is framing  # not wrapped twice


def test_a_cluster_client_is_left_alone() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=1)
    assert not install(cluster)
