"""RedisTier: URLs that hide secrets or override settings, closing with calls in flight, keys."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import torch

from kvtier.config_redis import parse_redis_options, redact_url
from kvtier.errors import ClosedError, ConfigError, InvalidRequestError
from kvtier.tiers import redis_framing, redis_io
from kvtier.tiers._checks import part_row_views
from kvtier.tiers.redis import RedisTier
from tests.redis_server import RedisServer, redis_server, shared_redis
from tests.test_tier_redis import LAYOUT, MODEL, blocks, key, read, tier

__all__ = ["redis_server", "shared_redis"]


def refused(url: str, secrets: tuple[str, ...], **options: Any) -> None:
    """``url`` is refused by the tier and by the config parser, quoting no secret."""
    with pytest.raises(ConfigError) as info:
        RedisTier(LAYOUT, 8, model=MODEL, url=url, **options)
    with pytest.raises(ConfigError) as parsed:
        parse_redis_options({"kind": "redis", "url": url, "model": "m"}, "tiers[0]")
    for message in (str(info.value), str(parsed.value)):
        for secret in secrets:
            assert secret not in message


# -- 1: secrets in URLs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis:/:S3cr3t@127.0.0.1:21379/0", "redis:***@127.0.0.1:21379/0"),
        ("redis::S3cr3t@127.0.0.1:21379/0", "redis:***@127.0.0.1:21379/0"),
        ("rediss:/user:S3cr3t@h/0", "rediss:***@h/0"),
        ("redis:user:S3cr3t@h/0?db=1", "redis:***@h/0?***"),
        (":S3cr3t@h/0", "***@h/0"),
        ("redis::S3cr3t@h/0?x=://y", "redis:***@h/0?***"),  # a '://' later on
        ("redis://h/0?S3cr3t@x", "redis://***"),  # '@' after the host
        ("redis://app:20245?S3cr3t@127.0.0.1:21379/0", "redis://***"),
    ],
)
def test_a_url_without_two_slashes_is_refused_and_never_shows_its_password(
    url: str, shown: str
) -> None:
    assert redact_url(url) == shown
    refused(url, ("S3cr3t",))


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:20245?Summer@127.0.0.1:21379/0",  # the digits would be the port
        "redis://app:20245/Summer@127.0.0.1:21379/0",
        "redis://app:20245#Summer@127.0.0.1:21379/0",
        "redis://127.0.0.1:21379/0?db=1@x",
    ],
)
def test_a_password_that_ends_the_host_early_is_refused(url: str) -> None:
    # redis-py would connect to host "app" port 20245, and its errors say so.
    refused(url, ("Summer", "20245"))


# -- 2: query parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("max_connections=1", "max_connections"),
        ("socket_timeout=0.000001", "socket_timeout"),
        ("decode_responses=1", "decode_responses"),
        ("ssl_cert_reqs=none&ssl_check_hostname=false", "ssl_cert_reqs"),
        ("db=1&ssl_ca_certs=/tmp/other.pem", "ssl_ca_certs"),
        ("ssl_check_hostname=n%6F", "ssl_check_hostname"),
        ("socket%5Ftimeout=1", "socket_timeout"),  # decoded by redis-py too
        ("protocol=3", "protocol"),
        ("retry_on_timeout", "retry_on_timeout"),  # no value
    ],
)
def test_a_query_parameter_that_would_override_a_setting_is_refused(query: str, name: str) -> None:
    for base in ("redis://127.0.0.1:6379/0", "rediss://cache.example:6380/0"):
        url = f"{base}?{query}"
        with pytest.raises(ConfigError, match=f"'{name}'") as info:
            RedisTier(LAYOUT, 8, model=MODEL, url=url, tls_verify=True)
        assert "none" not in str(info.value)
        assert "other.pem" not in str(info.value)
        with pytest.raises(ConfigError, match=rf"tiers\[0\].url: .*'{name}'"):
            parse_redis_options({"kind": "redis", "url": url, "model": "m"}, "tiers[0]")


def test_the_allowed_query_parameters_keep_the_checked_settings() -> None:
    url = "rediss://cache.example:6380/0?db=2&username=u&password=Pw"
    store = RedisTier(
        LAYOUT, 8, model=MODEL, url=url, concurrency=2, max_connections=4, timeout=3.0
    )
    assert "Pw" not in repr(store)
    assert parse_redis_options({"kind": "redis", "url": url, "model": "m"}, "t").url == url
    client = store._connection.client()
    assert isinstance(client, aioredis.Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (2, "u", "Pw")
    assert (kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("required", True)
    assert kwargs["socket_timeout"] == 3.0
    assert client.connection_pool.max_connections == 4
    unix = "unix:///run/redis.sock?db=3"
    assert RedisTier(LAYOUT, 8, model=MODEL, url=unix).url == "unix:///run/redis.sock?***"


@pytest.mark.parametrize(
    ("url", "given"),
    [
        ("redis://:Pw@h/0", {"password": "other"}),
        ("redis://h/0?password=Pw", {"password": "other"}),
        ("redis://u@h/0", {"username": "v"}),
        ("redis://h/0?username=u", {"username": "v"}),
    ],
)
def test_a_user_or_password_given_twice_is_refused(url: str, given: dict[str, str]) -> None:
    # redis-py would let the URL's win over the keyword, silently.
    with pytest.raises(ConfigError, match="give it once") as info:
        RedisTier(LAYOUT, 8, model=MODEL, url=url, **given)  # type: ignore[arg-type]
    assert "Pw" not in str(info.value)
    table = {"kind": "redis", "url": url, "model": "m"}
    table.update({"password_env": "KVTIER_PW"} if "password" in given else {"username": "v"})
    with pytest.raises(ConfigError, match="give it once"):
        parse_redis_options(table, "tiers[0]")


@pytest.mark.asyncio
async def test_a_database_in_the_query_is_used(shared_redis: RedisServer) -> None:
    url = shared_redis.url + "?db=5"
    with shared_redis.client(db=5) as admin:
        admin.flushdb()
    async with RedisTier(LAYOUT, 8, model=MODEL, url=url, prefix="dbq:") as store:
        await store.write_from([0], [key(1)], blocks(1))
    with shared_redis.client(db=5) as admin:
        assert len(admin.keys(b"dbq:*")) == 1
        admin.flushdb()
    with shared_redis.client(db=0) as admin:
        assert admin.keys(b"dbq:*") == []


# -- 3: aclose() with calls in flight ------------------------------------------------------


def tier_connections(server: RedisServer) -> int:
    """Clients of ``server`` other than the admin client asking."""
    with server.client() as admin:
        admin.client_setname("admin")
        return sum(1 for c in admin.client_list() if c.get("name") != "admin")


async def no_tier_connections(server: RedisServer) -> int:
    """Waits up to a second for the server to see the tier's connections go."""
    for _ in range(50):
        left = tier_connections(server)
        if not left:
            return 0
        await anyio.sleep(0.02)
    return left


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["write", "read", "contains", "discard"])
async def test_aclose_cancels_the_calls_in_flight_and_closes_every_connection(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    n = 400
    data = blocks(n)
    keys = [i.to_bytes(4, "big") * 9 for i in range(n)]
    store = RedisTier(LAYOUT, n, model=MODEL, url=redis_server.url, batch_size=4, concurrency=2)
    await store.__aenter__()
    if call != "write":
        await store.write_from(list(range(n)), keys, data)
    started = anyio.Event()
    round_trips = 0
    real = redis_io.RedisCommands.round_trip

    async def counted(self: Any, what: str, run: Callable[[], Awaitable[Any]], **kw: Any) -> Any:
        nonlocal round_trips
        round_trips += 1
        if round_trips == 3:
            started.set()
        return await real(self, what, run, **kw)

    monkeypatch.setattr(redis_io.RedisCommands, "round_trip", counted)
    monkeypatch.setattr(redis_io, "NAMES_PER_ROUND_TRIP", 4)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "write": lambda: store.write_from(list(range(n)), keys, data),
        "read": lambda: read(store, list(range(n)), keys),
        "contains": lambda: store.contains(keys),
        "discard": lambda: store.discard(list(range(n))),
    }
    outcome: list[BaseException | str] = []

    async def run() -> None:
        try:
            await calls[call]()
            outcome.append("done")
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        with anyio.fail_after(10):
            await started.wait()
        await store.aclose()
        assert outcome  # the call ended before aclose() returned
    assert isinstance(outcome[0], ClosedError), outcome
    assert await no_tier_connections(redis_server) == 0
    assert round_trips < n // 4  # it did not go on after the close
    with pytest.raises(ClosedError):
        await store.contains(keys[:1])


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that accepts and never answers (a stalled proxy).

    Yields its URL and ``[connections open now, connections accepted]``.
    """
    open_now = [0, 0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now[0] += 1
        open_now[1] += 1
        try:
            while await reader.read(65536):  # until the client closes
                pass
        finally:
            open_now[0] -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0", open_now
    finally:
        server.close()


async def closed_by_client(open_now: list[int]) -> bool:
    for _ in range(50):
        if not open_now[0]:
            return True
        await asyncio.sleep(0.02)
    return False


# -- 4: cancelled while opening ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_open_closes_the_client_and_its_connection() -> None:
    async with silent_server() as (url, open_now):
        store = RedisTier(LAYOUT, 8, model=MODEL, url=url, timeout=5, connect_timeout=1)
        with anyio.move_on_after(0.3) as scope:
            async with store:
                pytest.fail("the server never answers")
        assert scope.cancelled_caught
        assert open_now[1] == 1
        assert await closed_by_client(open_now)
        assert store._client is None
        assert "not open" in repr(store)
        with pytest.raises(ClosedError, match="not open"):
            await store.contains([key(1)])


@pytest.mark.asyncio
async def test_aclose_while_opening_ends_the_open_with_closed_error() -> None:
    async with silent_server() as (url, open_now):
        store = RedisTier(LAYOUT, 8, model=MODEL, url=url, timeout=5, connect_timeout=1)
        outcome: list[BaseException] = []

        async def enter() -> None:
            try:
                await store.__aenter__()
            except ClosedError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(enter)
            while not open_now[0]:
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            await store.aclose()
        assert time.perf_counter() - started < 2
        assert len(outcome) == 1
        assert await closed_by_client(open_now)
        assert store.closed
        assert store._client is None


# -- 5: keys of contains / adopt / discard --------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["abc", None, b"", b"x" * 200], ids=repr)
async def test_contains_and_adopt_check_keys_as_reads_do(
    shared_redis: RedisServer, bad: object
) -> None:
    async with tier(shared_redis) as store:
        await store.write_from([0], [key(0)], blocks(1))
        with pytest.raises(InvalidRequestError, match="keys must be"):
            await store.contains([key(0), bad])  # type: ignore[list-item]
        with pytest.raises(InvalidRequestError, match="keys must be"):
            store.adopt([1, 2], [bad, key(2)])  # type: ignore[list-item]
        assert sorted(store._slot_keys) == [0]  # nothing adopted
        await store.discard([0, 1, 2])
        assert await store.contains([key(0)]) == [False]  # UNLINK was sent


@pytest.mark.asyncio
async def test_discard_names_every_block_before_forgetting_any(shared_redis: RedisServer) -> None:
    async with tier(shared_redis) as store:
        await store.write_from([0, 1], [key(0), key(1)], blocks(2))
        store._slot_keys[2] = "not a key"  # type: ignore[assignment]  # got past the checks
        with pytest.raises(AttributeError):
            await store.discard([0, 1, 2])
        assert sorted(store._slot_keys) == [0, 1, 2]  # none forgotten, none deleted
        assert await store.contains([key(0), key(1)]) == [True, True]
        del store._slot_keys[2]
        await store.discard([0, 1])


# -- 6: payload views keep their memory alive ----------------------------------------------


@pytest.mark.asyncio
async def test_the_payload_views_sent_keep_their_tensor_alive(
    shared_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What asyncio's transport buffers on Python 3.12+: memoryview(each payload),
    # which may outlive a cancelled store and the host copy it was made from.
    buffered: list[memoryview] = []
    real = redis_framing._FramingMixin.pack_command

    def pack(self: Any, *args: Any) -> list[Any]:
        output = real(self, *args)
        buffered.extend(memoryview(item) for item in output if isinstance(item, memoryview))
        return output

    monkeypatch.setattr(redis_framing._FramingMixin, "pack_command", pack)
    data = blocks(6, seed=3)
    expected = data.clone()
    storage = weakref.ref(data.untyped_storage())
    async with tier(shared_redis, batch_size=2) as store:
        await store.write_from(list(range(6)), [key(i) for i in range(6)], data)
        del data
        gc.collect()
        assert len(buffered) == 6
        assert storage() is not None  # the buffered views hold it
        assert sorted(map(bytes, buffered)) == sorted(bytes(row.numpy()) for row in expected)
        buffered.clear()
        gc.collect()
        assert storage() is None  # and nothing else did
        assert torch.equal(await read(store, list(range(6)), [key(i) for i in range(6)]), expected)


def test_part_row_views_take_parts_in_order_and_each_view_owns_its_part() -> None:
    whole = torch.arange(5 * 64, dtype=torch.int16).view(torch.uint8).view(5, 128)
    strided = torch.zeros(3, 256, dtype=torch.uint8)[:, :128]  # rows contiguous, part not
    strided.copy_(whole[2:])
    parts = [whole[:2].clone(), strided]
    rows = part_row_views(parts)
    views = [memoryview(rows(index)) for index in range(5)]
    assert [bytes(view) for view in views] == [bytes(row.numpy()) for row in whole]
    first = weakref.ref(parts[0].untyped_storage())
    second = weakref.ref(parts[1].untyped_storage())
    del parts, rows, strided
    gc.collect()
    assert first() is not None
    assert second() is not None
    del views
    gc.collect()
    assert first() is None
    assert second() is None


@pytest.mark.parametrize(
    "url",
    [
        "REDIS://127.0.0.1:6379/0",  # a scheme's case does not matter (RFC 3986)
        "Rediss://h:6380/0",
        "redis://h:6379/0?password=p@ss",  # '@' in a password parameter
        "unix:///run/redis@6379/redis.sock",  # '@' in a socket's path
        "unix://:pw@/run/redis.sock?db=2",
    ],
)
def test_urls_that_look_odd_but_are_valid_are_accepted(url: str) -> None:
    RedisTier(LAYOUT, 4, model=MODEL, url=url)
    parse_redis_options({"url": url, "model": MODEL}, "tiers[0]")


@pytest.mark.asyncio
async def test_a_second_aclose_waits_for_the_first_to_close_everything(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 200
    keys = [i.to_bytes(4, "big") * 9 for i in range(n)]
    store = RedisTier(LAYOUT, n, model=MODEL, url=redis_server.url, batch_size=4, concurrency=2)
    await store.__aenter__()
    started = anyio.Event()
    real = redis_io.RedisCommands.round_trip

    async def slow(self: Any, what: str, run: Callable[[], Awaitable[Any]], **kw: Any) -> Any:
        started.set()
        return await real(self, what, run, **kw)

    monkeypatch.setattr(redis_io.RedisCommands, "round_trip", slow)
    ended: list[str] = []

    async def write() -> None:
        with pytest.raises(ClosedError):
            await store.write_from(list(range(n)), keys, blocks(n))
        ended.append("write")

    async def close(who: str) -> None:
        await store.aclose()
        if who == "second":  # by now the first has cancelled the call and closed the pool
            assert "write" in ended
            assert await no_tier_connections(redis_server) == 0
        ended.append(who)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        with anyio.fail_after(10):
            await started.wait()
        group.start_soon(close, "first")
        group.start_soon(close, "second")
    assert sorted(ended) == ["first", "second", "write"]


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?password=hunter@2S3cr3t",
        "redis://:pw@h/0?password=a@bS3cr3t",
        "redis://h?pass%77ord=top@S3cr3t",
    ],
)
def test_an_at_sign_in_a_password_parameter_hides_everything_after_the_scheme(url: str) -> None:
    assert redact_url(url) == "redis://***"
    store = RedisTier(LAYOUT, 4, model=MODEL, url=url)  # accepted
    assert "S3cr3t" not in repr(store)
    assert "S3cr3t" not in store.url
    refused("redis://h/0#x@S3cr3t", ("S3cr3t",))  # in a fragment: refused, hidden


@pytest.mark.asyncio
async def test_closing_as_a_round_trip_s_own_deadline_fires_ends_it_and_raises_nothing() -> None:
    """Rescheduling a deadline that is already expiring raised RuntimeError out of aclose."""
    commands = redis_io.RedisCommands(
        "redis", deadline=0.2, batch_size=8, concurrency=4, cluster=False, ttl_ms=None
    )

    async def hang() -> None:
        await asyncio.sleep(100)

    round_trip = asyncio.ensure_future(commands.round_trip("read", hang))

    async def busy() -> None:
        await asyncio.sleep(0.05)
        time.sleep(0.4)  # a synchronous step holds the loop past both timers

    blocker = asyncio.ensure_future(busy())
    await asyncio.sleep(0.1)  # wakes in the pass where the round trip's deadline fires
    commands.close()
    with pytest.raises(ClosedError):
        await round_trip
    await blocker
