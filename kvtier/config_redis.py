"""The ``[[tiers]] kind = "redis"`` table: options of a :class:`~kvtier.tiers.redis.RedisTier`.

::

    [[tiers]]
    kind = "redis"
    capacity = "64GiB"              # blocks this process tracks in Redis
    url = "redis://127.0.0.1:6379/0" # rediss:// for TLS, unix:///path.sock
    prefix = "kvtier:"
    model = "llama-3-8b"            # required: separates models with equal layouts
    rank = 0                        # this worker's tensor/pipeline-parallel rank
    world_size = 1                  # how many such workers hold shards of a block
    ttl = "3600s"                   # optional; else Redis's maxmemory policy evicts
    timeout = "5s"
    connect_timeout = "2s"
    batch_size = 32
    username = "kvtier"
    password_env = "KVTIER_REDIS_PASSWORD"   # the secret stays out of the file
    cluster = false
    scan_on_open = true             # start with the blocks other engines stored
    tls_ca_file = "/etc/ssl/redis-ca.pem"

A password is never read from the file: ``password_env`` names the
environment variable that holds it (the URL may carry one instead, not as
well; it is redacted wherever kvtier prints the URL). The URL's query may
only hold ``db``, ``username`` and ``password`` (:data:`~kvtier.redis_urls.URL_QUERY_KEYS`).
A redis:// or rediss:// URL's path is empty or the database number
(``/0``); a ``db`` parameter is a number too, and may override only a path
of ``/0`` (unix:// URLs have the socket's path there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from kvtier.config_units import parse_duration
from kvtier.errors import ConfigError
from kvtier.redis_urls import URL_QUERY_KEYS, URL_SCHEMES, redact_url, url_problem

__all__ = [
    "DEFAULT_URL",
    "MAX_TIMEOUT",
    "REDIS_KEYS",
    "URL_QUERY_KEYS",
    "URL_SCHEMES",
    "RedisOptions",
    "parse_redis_options",
    "redact_url",
    "reject_password",
    "url_problem",
]

REDIS_KEYS: Final = (
    "url",
    "prefix",
    "model",
    "rank",
    "world_size",
    "ttl",
    "timeout",
    "connect_timeout",
    "batch_size",
    "username",
    "password_env",
    "cluster",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_verify",
    "scan_on_open",
)
"""The keys a redis tier's table may hold besides ``kind``, ``capacity`` and ``eviction``."""


DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
"""A server on this host's default port."""


@attrs.frozen
class RedisOptions:
    """A redis tier's connection and key options (see :class:`~kvtier.tiers.redis.RedisTier`).

    Attributes:
        url: The server (``redis://``, ``rediss://`` or ``unix://``).
        prefix: Put in front of every key.
        model: Separates models whose layouts are equal (required in a
            config; empty only before parsing).
        rank: This worker's tensor- or pipeline-parallel rank.
        world_size: Workers that hold shards of every block (names carry the
            rank when more than 1).
        ttl: Seconds a stored block lives (None: until Redis evicts it).
        timeout: Seconds a round trip may take.
        connect_timeout: Seconds to open a connection.
        batch_size: Most blocks per round trip.
        username: ACL user.
        password_env: Environment variable holding the password.
        cluster: A Redis Cluster.
        tls: Use TLS (implied by ``rediss://``).
        tls_ca_file: CA bundle.
        tls_cert_file: Client certificate.
        tls_key_file: Client key.
        tls_verify: Verify the server's certificate.
        scan_on_open: Opening scans the server for this model and layout's
            blocks, so an engine starts with what other engines stored.
    """

    url: str = attrs.field(default=DEFAULT_URL, repr=redact_url)
    prefix: str = "kvtier:"
    model: str = ""
    rank: int = 0
    world_size: int = 1
    ttl: float | None = None
    timeout: float = 5.0
    connect_timeout: float = 2.0
    batch_size: int = 32
    username: str | None = None
    password_env: str | None = attrs.field(default=None, repr=False)
    cluster: bool = False
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    scan_on_open: bool = False

    def password(self) -> str | None:
        """The password from ``password_env`` (None when not configured).

        Raises:
            ConfigError: ``password_env`` names an unset variable.
        """
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            # The name is never quoted: a password put there by mistake looks
            # like a name as often as not (hex, letters and digits).
            raise ConfigError(
                "redis tier: the environment variable that password_env names is not set "
                "(password_env holds the variable's name, never the password itself)"
            )
        return value


def _text(table: Mapping[str, Any], name: str, key: str, default: str | None) -> str | None:
    value = table.get(name, default)
    if value is not None and not isinstance(value, str):
        # A URL or a variable's name may hold the password: its type only.
        secret = name in ("url", "password_env")
        shown = f"a value of type {type(value).__name__}" if secret else repr(value)
        raise ConfigError(f"{key}.{name}: {shown} is not a string")
    return value


def _model(table: Mapping[str, Any], key: str) -> str:
    """The required ``model``: a shared store's names must say whose blocks they are."""
    model = _text(table, "model", key, None)
    if not model:
        raise ConfigError(
            f'{key}.model: a redis tier needs the model\'s name (model = "llama-3-8b"): two '
            "models of one layout (a base model and its fine-tune) hash equal prompts to "
            "equal block keys and would read each other's KV bytes"
        )
    return model


def _flag(table: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}: {value!r} is not true or false")
    return value


def reject_password(table: Mapping[str, Any], key: str) -> None:
    """Refuse a ``password`` key, saying where the password goes instead.

    Raises:
        ConfigError: The table has a ``password``.
    """
    if "password" in table:
        raise ConfigError(
            f"{key}.password: passwords do not go in the file; set password_env to the "
            "name of an environment variable that holds it"
        )


MAX_TIMEOUT: Final = 86_400.0
"""The longest ``timeout`` / ``connect_timeout`` a redis tier takes (a day): a deadline must end."""


def parse_redis_options(table: Mapping[str, Any], key: str) -> RedisOptions:
    """Validate a redis tier's options (the table's other keys are checked by the caller).

    Raises:
        ConfigError: A bad value; the message names the key.
    """
    reject_password(table, key)
    url = _text(table, "url", key, DEFAULT_URL) or ""
    problem = url_problem(
        url,
        username=_text(table, "username", key, None) is not None,
        password=_text(table, "password_env", key, None) is not None,
        cluster=_flag(table, "cluster", key, False),
    )
    if problem is not None:
        raise ConfigError(f"{key}.url: {redact_url(url)!r} {problem}")
    ints: dict[str, int] = {}
    for name, fallback, least in (("batch_size", 32, 1), ("rank", 0, 0), ("world_size", 1, 1)):
        value = table.get(name, fallback)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}.{name}: {value!r} is not an integer >= {least}")
        ints[name] = value
    if ints["rank"] >= ints["world_size"]:
        raise ConfigError(
            f"{key}.rank: {ints['rank']} is not below world_size={ints['world_size']}"
        )
    durations: dict[str, float] = {}
    for name, default in (("timeout", 5.0), ("connect_timeout", 2.0)):
        durations[name] = parse_duration(table.get(name, default), key=f"{key}.{name}")
        if durations[name] <= 0:
            raise ConfigError(f"{key}.{name}: must be more than 0, got {durations[name]!r}")
        if durations[name] > MAX_TIMEOUT:  # the tier's own limit, named here by its key
            raise ConfigError(f"{key}.{name}: must be at most a day (86400s)")
    ttl = table.get("ttl")
    ttl_seconds = None if ttl is None else parse_duration(ttl, key=f"{key}.ttl")
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise ConfigError(f"{key}.ttl: must be more than 0 (leave it out for no TTL)")
    options = RedisOptions(
        url=url,
        prefix=_text(table, "prefix", key, "kvtier:") or "",
        model=_model(table, key),
        ttl=ttl_seconds,
        timeout=durations["timeout"],
        connect_timeout=durations["connect_timeout"],
        batch_size=ints["batch_size"],
        rank=ints["rank"],
        world_size=ints["world_size"],
        username=_text(table, "username", key, None),
        password_env=_text(table, "password_env", key, None),
        cluster=_flag(table, "cluster", key, False),
        tls=_flag(table, "tls", key, False),
        tls_ca_file=_text(table, "tls_ca_file", key, None),
        tls_cert_file=_text(table, "tls_cert_file", key, None),
        tls_key_file=_text(table, "tls_key_file", key, None),
        tls_verify=_flag(table, "tls_verify", key, True),
        scan_on_open=_flag(table, "scan_on_open", key, False),
    )
    _check_combinations(options, key)
    return options


def _check_combinations(options: RedisOptions, key: str) -> None:
    """Refuse by its key what the tier refuses only when built (``RedisNames``, ``build``)."""
    if "{" in options.prefix or "}" in options.prefix:
        hint = "a hash tag would put every block on one cluster node"
        raise ConfigError(f"{key}.prefix: {options.prefix!r} has a brace ({hint})")
    if options.tls_key_file and not options.tls_cert_file:
        cert = "tls_cert_file (the client certificate)"
        raise ConfigError(f"{key}.tls_key_file: {options.tls_key_file!r} needs {cert}")
    unix = urlsplit(options.url).scheme == "unix"
    socket = f"not the unix:// socket of url {redact_url(options.url)!r}"
    if unix and options.cluster:
        raise ConfigError(f"{key}.cluster: a Redis Cluster is reached over TCP, {socket}")
    for name in ("tls", "tls_ca_file", "tls_cert_file"):
        if unix and getattr(options, name):
            shown = getattr(options, name)
            raise ConfigError(
                f"{key}.{name}: {shown!r} turns TLS on, which runs over TCP, {socket}"
            )
