"""How a :class:`~kvtier.tiers.redis.RedisTier` connects: URL, timeouts, auth, TLS, Cluster.

:class:`RedisConnection` validates the connection settings once and builds
the redis-py client (``redis.asyncio.Redis`` or ``RedisCluster``) with a
bounded pool, socket timeouts, one retry on a dropped connection (how a
restarted server is reconnected) and the TLS options. Secrets stay in the
client's options: :func:`redact_url` is what logs and reprs show.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvtier.config_redis import MAX_TIMEOUT
from kvtier.errors import ConfigError
from kvtier.redis_urls import redact_url, url_problem

__all__ = [
    "RedisClient",
    "RedisConnection",
    "close_client",
    "positive_int",
    "positive_number",
    "redact_url",
]

RedisClient = aioredis.Redis | RedisCluster
"""The client types a tier talks through."""


def positive_number(label: str, value: object, *, allow_none: bool = False) -> None:
    """Raise :class:`~kvtier.errors.ConfigError` unless ``value`` is a number > 0."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{label} must be a positive number, got {value!r}")


def positive_int(label: str, value: object) -> None:
    """Raise :class:`~kvtier.errors.ConfigError` unless ``value`` is an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{label} must be a positive integer, got {value!r}")


@attrs.frozen
class RedisConnection:
    """Validated connection settings; :meth:`client` builds the redis-py client.

    Attributes:
        url: The server (may carry a password; see :func:`redact_url`);
            ``redis://`` is made ``rediss://`` when a TLS option is set.
        options: Keyword arguments of ``from_url`` (never logged).
        cluster: A Redis Cluster.
        tls: Whether the connection uses TLS.
        deadline: Most seconds one round trip may take (connect + command).
    """

    url: str = attrs.field(repr=redact_url)
    options: dict[str, Any] = attrs.field(repr=False)
    cluster: bool
    tls: bool
    deadline: float

    @classmethod
    def build(
        cls,
        url: str,
        *,
        concurrency: int,
        max_connections: int,
        connect_timeout: float,
        timeout: float,
        username: str | None,
        password: str | None,
        tls: bool,
        tls_ca_file: str | None,
        tls_cert_file: str | None,
        tls_key_file: str | None,
        tls_verify: bool,
        cluster: bool,
    ) -> RedisConnection:
        """Check the settings (see :class:`~kvtier.tiers.redis.RedisTier` for each).

        Raises:
            ConfigError: A setting is out of range, or the URL's scheme is unknown,
                its query has a parameter other than ``db``, ``username`` and
                ``password`` (redis-py would let it override the settings
                checked here), it names a user or password given apart from
                it too, or a password in it is not percent-encoded.
        """
        positive_int("concurrency", concurrency)
        positive_int("max_connections", max_connections)
        if max_connections < concurrency:
            raise ConfigError(
                f"max_connections={max_connections} is less than concurrency={concurrency}"
            )
        for label, seconds in (("connect_timeout", connect_timeout), ("timeout", timeout)):
            positive_number(label, seconds)
            if not seconds <= MAX_TIMEOUT:  # also refuses inf and nan: a deadline must end
                raise ConfigError(f"{label} must be at most {MAX_TIMEOUT:g} s, got {seconds!r}")
        if not isinstance(url, str):
            raise ConfigError(f"url must be a string, got {type(url).__name__}")
        problem = url_problem(
            url, username=username is not None, password=password is not None, cluster=cluster
        )
        if problem is not None:
            raise ConfigError(f"url {redact_url(url)!r} {problem}")
        scheme = urlsplit(url).scheme
        if cluster and scheme == "unix":
            raise ConfigError("a Redis Cluster is reached over TCP, not a unix:// socket")
        uses_tls = bool(tls or tls_ca_file or tls_cert_file or scheme == "rediss")
        if uses_tls and scheme == "unix":
            raise ConfigError("TLS is for a TCP connection, not a unix:// socket")
        if tls_key_file and not tls_cert_file:
            raise ConfigError("tls_key_file needs tls_cert_file (the client certificate)")
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "socket_connect_timeout": float(connect_timeout),
            "socket_timeout": float(timeout),
            # One retry on a dropped connection (a restarted server): the pool's
            # dead connection fails once, the retry connects afresh.
            "retry": Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
            # No client_name: CLIENT SETNAME on every connection would need an ACL
            # permission that a least-privilege user for the block keys lacks.
        }
        if username is not None:
            options["username"] = username
        if password is not None:
            options["password"] = password
        if uses_tls:
            # TLS is chosen by the scheme: rediss:// makes redis-py use its
            # SSLConnection (standalone) or ssl=True (Cluster); an ``ssl``
            # keyword would reach the plain connection class and fail there.
            if scheme == "redis":
                url = "rediss" + url[len("redis") :]
            options.update(
                ssl_ca_certs=tls_ca_file,
                ssl_certfile=tls_cert_file,
                ssl_keyfile=tls_key_file,
                ssl_cert_reqs="required" if tls_verify else "none",
                ssl_check_hostname=tls_verify,
            )
        return cls(url, options, cluster, uses_tls, float(connect_timeout) + float(timeout))

    def client(self) -> RedisClient:
        """A new client with its own connection pool.

        Raises:
            ConfigError: redis-py rejected the options.
        """
        try:
            if self.cluster:
                return RedisCluster.from_url(self.url, **self.options)
            return aioredis.Redis.from_url(self.url, **self.options)
        except ValueError:
            # Not the parser's text: a password holding '/', '?' or '#' ends up in
            # what it takes for the port or path, and its message would quote it.
            raise ConfigError(
                f"bad Redis URL {redact_url(self.url)!r} (a password with '/', '?', '#' "
                "or '@' must be percent-encoded)"
            ) from None
        except (
            TypeError,
            redis.exceptions.RedisError,
            redis.exceptions.RedisClusterException,  # not a RedisError
        ) as exc:
            raise ConfigError(f"bad Redis options: {type(exc).__name__}") from None


async def close_client(client: RedisClient) -> None:
    """Close ``client`` and every connection it opened.

    redis-py 8.1's ``RedisCluster.aclose()`` does nothing while the client is
    marked for re-initialisation, which any connection error does (a node
    that died, a failed scan at open) until a later call succeeds; its nodes'
    sockets would stay open. So a cluster client's nodes, and the startup
    nodes it discovered them from, are disconnected here as well (which is
    idempotent).
    """
    await client.aclose()
    if isinstance(client, RedisCluster):
        manager = client.nodes_manager
        known = (*manager.nodes_cache.values(), *manager.startup_nodes.values())
        for node in {id(node): node for node in known}.values():
            await node.disconnect()
