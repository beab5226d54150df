"""RedisTier when the server, other clients or the URL misbehave (real servers, a fake one)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
import torch

from kvtier.config_redis import redact_url
from kvtier.errors import BlockMissingError, ConfigError, TierIOError
from kvtier.tiers import redis_io
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_client import RedisConnection
from kvtier.tiers.redis_io import RedisCommands
from tests.redis_server import RedisServer, redis_server, shared_redis
from tests.test_tier_redis import LAYOUT, MODEL, blocks, count_pipelines, key, read, tier

__all__ = ["redis_server", "shared_redis"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:S3c?r3t@h/0", "redis://***"),  # a '?' in the password
        ("redis://u:p/w@h:1/0", "redis://u:***@h:1/0"),  # a '/' in the password
        ("redis://h/0?password=S3cr3t", "redis://h/0?***"),  # redis-py reads it
        ("redis://h/0?db=1&Password=S3cr3t&x=2", "redis://h/0?***"),
        ("redis://h/0?pass%77ord=S3cr3t", "redis://h/0?***"),  # decoded by redis-py too
        ("redis://u:pw@h/0?a=1#frag", "redis://u:***@h/0?***"),
        ("redis://h/0#&password=S3cr3t", "redis://h/0#***"),  # after a fragment too
        ("redis://h/0?db=1#;pwd=S3cr3t", "redis://h/0?***"),
        ("redis://u:pw@[::1:6379/0", "redis://u:***@[::1:6379/0"),  # unparsable
        ("redis://h:1/0", "redis://h:1/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_no_password_in_the_connections_repr_or_errors() -> None:
    options = {
        "concurrency": 1,
        "max_connections": 1,
        "connect_timeout": 1.0,
        "timeout": 1.0,
        "username": None,
        "password": None,
        "tls": False,
        "tls_ca_file": None,
        "tls_cert_file": None,
        "tls_key_file": None,
        "tls_verify": True,
        "cluster": False,
    }
    connection = RedisConnection.build("redis://:S3cr3t@h:1/0", **options)  # type: ignore[arg-type]
    assert "S3cr3t" not in repr(connection)
    with pytest.raises(ConfigError) as info:
        RedisConnection.build("http://:S3cr3t@h:1/0", **options)  # type: ignore[arg-type]
    assert "S3cr3t" not in str(info.value)
    for ttl in (float("inf"), 1e20):
        with pytest.raises(ConfigError, match="ttl"):
            RedisTier(LAYOUT, 8, model=MODEL, ttl=ttl)
    for name in ("timeout", "connect_timeout"):  # a deadline must end
        for seconds in (float("inf"), float("nan"), 1e9):
            with pytest.raises(ConfigError, match=name):
                RedisTier(LAYOUT, 8, model=MODEL, **{name: seconds})  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["redis://app:Xy7Qsecret/9@h/0", "redis://:Xy7Qsecret#x@h:1/0"])
def test_a_password_that_breaks_the_url_is_never_quoted(url: str) -> None:
    from kvtier.config_redis import parse_redis_options

    with pytest.raises(ConfigError) as info:
        parse_redis_options({"kind": "redis", "url": url}, "tiers[0]")
    assert "Xy7Q" not in str(info.value)
    assert "percent-encoded" in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.asyncio
async def test_a_stalled_server_fails_a_call_of_many_chunks_within_one_deadline(
    redis_server: RedisServer,
) -> None:
    n = 256  # 16 chunks: 8 waves at concurrency 2 when each waited its own deadline
    data, keys = blocks(n, 2), [key(i % 250) + bytes([i // 250]) for i in range(n)]
    async with RedisTier(
        LAYOUT,
        n,
        model=MODEL,
        url=redis_server.url,
        batch_size=16,
        timeout=0.3,
        connect_timeout=0.2,
    ) as store:
        await store.write_from(list(range(n)), keys, data[: n // 4].repeat(4, 1))
        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")  # past both calls
            try:
                for call in (store.read_into, store.write_from):
                    with anyio.fail_after(2.0):  # one deadline is 0.5 s; eight were 4 s
                        with pytest.raises(TierIOError):
                            await call(list(range(n)), keys, torch.empty_like(data))
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        assert torch.equal(await read(store, [0], keys[:1]), data[:1])


@pytest.mark.asyncio
async def test_a_contains_and_a_discard_of_many_blocks_go_in_round_trips_of_bounded_size(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One pipeline of 100k names took 1.5 s here, three times a 0.5 s round-trip
    # deadline, so a healthy server would time out. The bound on each round
    # trip's size is what keeps them under the deadline; checked by size, not by
    # time (a tight deadline failed under load: two suites on two cores).
    n = 100_000
    keys = [i.to_bytes(36, "big") for i in range(n)]
    chunk = redis_io.NAMES_PER_ROUND_TRIP
    held = [0, chunk - 1, chunk, n // 2, n - 1]  # across chunk boundaries
    async with RedisTier(LAYOUT, n, model=MODEL, url=redis_server.url, timeout=30) as store:
        await store.write_from(list(range(len(held))), [keys[i] for i in held], blocks(len(held)))
        sizes = count_pipelines(monkeypatch)
        found = await store.contains(keys)
        assert [i for i, there in enumerate(found) if there] == held
        assert (sum(sizes), max(sizes)) == (n, chunk)
        store.adopt(list(range(len(held), n)), [k for i, k in enumerate(keys) if i not in held])
        sizes.clear()
        await store.discard(list(range(n)))
        assert (sum(sizes), max(sizes)) == (n, chunk)
    with redis_server.client() as admin:
        assert admin.dbsize() == 0
        assert admin.info("commandstats")["cmdstat_unlink"]["calls"] == n


@pytest.mark.asyncio
async def test_a_failed_chunk_of_a_discard_forgets_every_block_and_raises(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [key(i) for i in range(12)]
    monkeypatch.setattr(redis_io, "NAMES_PER_ROUND_TRIP", 4)
    async with tier(redis_server, batch_size=4, concurrency=1) as store:
        await store.write_from(list(range(12)), keys, blocks(12))
        sizes = count_pipelines(monkeypatch, fail=2)
        with pytest.raises(TierIOError, match="discard failed"):
            await store.discard(list(range(12)))
        assert sizes[:2] == [4, 4]  # the first chunk deleted its blocks, the second failed
        left = await store.contains(keys)  # (the third may have started as it failed)
        assert left[:8] == [False] * 4 + [True] * 4
        sizes.clear()
        await store.discard(list(range(12)))  # every slot was forgotten: nothing to delete
        assert sizes == []
        assert await store.contains(keys) == left
        assert sizes == [4, 4, 4]  # the tier serves on (a contains of 3 chunks)


@pytest.mark.asyncio
async def test_more_concurrent_calls_than_connections_wait_instead_of_failing(
    redis_server: RedisServer,
) -> None:
    async with tier(redis_server, concurrency=2, max_connections=2, timeout=5.0) as store:
        await store.write_from(list(range(12)), [key(i) for i in range(12)], blocks(12, 3))
        results: list[torch.Tensor] = []

        async def one(i: int) -> None:
            results.append(await read(store, [i], [key(i)]))

        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", "300", "ALL")  # every call is in flight
            async with anyio.create_task_group() as group:
                for i in range(12):
                    group.start_soon(one, i)
        assert len(results) == 12


@pytest.mark.asyncio
async def test_calls_queued_behind_a_stalled_server_fail_within_one_deadline(
    redis_server: RedisServer,
) -> None:
    """A round trip that timed out makes the calls that waited for a place meanwhile
    fail at once, instead of each waiting out a deadline of its own in turn (twelve
    calls at concurrency 2 took six deadlines). Later calls are tried again."""
    async with tier(redis_server, concurrency=2, timeout=0.3, connect_timeout=0.2) as store:
        await store.write_from(list(range(12)), [key(i) for i in range(12)], blocks(12, 3))
        failed: list[int] = []

        async def one(i: int) -> None:
            with pytest.raises(TierIOError):
                await read(store, [i], [key(i)])
            failed.append(i)

        with redis_server.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # past the calls
            try:
                with anyio.fail_after(1.5):  # one deadline is 0.5 s; six were 3 s
                    async with anyio.create_task_group() as group:
                        for i in range(12):
                            group.start_soon(one, i)
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        assert sorted(failed) == list(range(12))
        assert torch.equal(await read(store, [5], [key(5)]), blocks(12, 3)[5:6])


@pytest.mark.asyncio
async def test_a_value_of_another_type_is_a_miss(redis_server: RedisServer) -> None:
    async with tier(redis_server) as store:
        await store.write_from([0, 1], [key(1), key(2)], blocks(2, 4))
        with redis_server.client() as admin:
            admin.delete(store.keys.name(key(2)))
            admin.hset(store.keys.name(key(2)), "field", "value")  # another client's hash
        with pytest.raises(BlockMissingError) as info:
            await read(store, [0, 1], [key(1), key(2)])
        assert info.value.slots == (1,)


@pytest.mark.asyncio
async def test_scan_on_open_maps_each_block_once_and_ignores_names_it_never_writes(
    redis_server: RedisServer,
) -> None:
    async with tier(redis_server) as store:
        await store.write_from([0, 1], [key(1), key(2)], blocks(2, 5))
        name = store.keys.name(key(1))
    head, hexpart = name[: -len(key(1).hex())], key(1).hex()
    with redis_server.client() as admin:
        admin.set(head + hexpart.upper().encode(), b"x")  # the same key, upper-case hex
        admin.set(head + b" " + hexpart.encode(), b"x")  # and with a space
    async with tier(redis_server, scan_on_open=True) as store:
        recovered = await store.recover()
        assert sorted(key for _, key in recovered) == [key(1), key(2)]
        assert len({slot for slot, _ in recovered}) == 2


@pytest.mark.asyncio
async def test_scan_on_open_finds_its_blocks_among_many_keys_of_other_applications(
    redis_server: RedisServer,
) -> None:
    async with tier(redis_server) as store:
        await store.write_from([0, 1, 2], [key(1), key(2), key(3)], blocks(3, 6))
    with redis_server.client() as admin:  # 1.5 M keys that are not kvtier's
        admin.eval("for i = 1, ARGV[1] do redis.call('SET', 'app:' .. i, 'x') end", 0, 1_500_000)
    # The whole scan (1,500 replies, ~1.8 s) takes far longer than one 0.5 s deadline, each
    # reply far less: only a scan without progress counts as an unreachable server.
    async with tier(redis_server, scan_on_open=True, timeout=0.25, connect_timeout=0.25) as store:
        assert sorted(key for _, key in await store.recover()) == [key(1), key(2), key(3)]


@asynccontextmanager
async def fake_server(
    reply: bytes | Callable[[list[bytes]], bytes], scan: bytes = b"*2\r\n$1\r\n0\r\n*0\r\n"
) -> AsyncIterator[str]:
    """A RESP2 server: PING gets PONG, MGET ``reply`` (or ``reply(its parts)``), SCAN
    ``scan``, HELLO an error (so redis-py speaks RESP2, as to an old server), anything
    else +OK."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readline()
                if not header:
                    return
                parts = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    parts.append((await reader.readexactly(size + 2))[:-2].upper())
                if parts[0] == b"PING":
                    writer.write(b"+PONG\r\n")
                elif parts[0] == b"HELLO":
                    writer.write(b"-ERR unknown command 'HELLO'\r\n")
                elif parts[0] == b"SCAN":
                    writer.write(scan)
                elif parts[0] == b"MGET":
                    writer.write(reply if isinstance(reply, bytes) else reply(parts))
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "reply",
    [b":5\r\n", b"*1\r\n$-1\r\n", b"+OK\r\n"],
    ids=["an integer", "too few values", "a status"],
)
async def test_a_reply_of_the_wrong_shape_is_a_tier_error(reply: bytes) -> None:
    def absent(parts: list[bytes]) -> bytes:  # a well-formed reply: every name absent
        return f"*{len(parts) - 1}\r\n".encode() + b"$-1\r\n" * (len(parts) - 1)

    async with (
        fake_server(absent) as url,
        RedisTier(LAYOUT, 64, model=MODEL, url=url, batch_size=4, timeout=2.0) as store,
    ):  # the control: the conversation works, and absent blocks are misses
        for n in (2, 12):
            with anyio.fail_after(10), pytest.raises(BlockMissingError):
                await read(store, list(range(n)), [key(i) for i in range(n)])
    async with (
        fake_server(reply) as url,
        RedisTier(LAYOUT, 64, model=MODEL, url=url, batch_size=4, timeout=2.0) as store,
    ):
        for n in (2, 12):  # one chunk, and several
            with anyio.fail_after(10), pytest.raises(TierIOError, match="malformed"):
                await read(store, list(range(n)), [key(i) for i in range(n)])


@pytest.mark.asyncio
async def test_tensor_parallel_ranks_never_read_each_others_shards(
    redis_server: RedisServer,
) -> None:
    shards = [blocks(1, 10 + rank) for rank in range(2)]  # one block, two shards
    tiers = [tier(redis_server, rank=rank, world_size=2) for rank in range(2)]
    async with tiers[0] as rank0, tiers[1] as rank1:
        await rank0.write_from([0], [key(9)], shards[0])
        with pytest.raises(BlockMissingError):
            await read(rank1, [0], [key(9)])  # rank 1's shard was never stored
        await rank1.write_from([0], [key(9)], shards[1])
        assert torch.equal(await read(rank0, [0], [key(9)]), shards[0])
        assert torch.equal(await read(rank1, [0], [key(9)]), shards[1])
    async with tier(redis_server) as single:  # world_size 1: the names of before
        with pytest.raises(BlockMissingError):
            await read(single, [0], [key(9)])
    for bad in ({"rank": 2, "world_size": 2}, {"rank": -1}, {"world_size": 0}, {"rank": True}):
        with pytest.raises(ConfigError):
            RedisTier(LAYOUT, 8, model=MODEL, **bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_least_privilege_acl_user_can_use_the_tier(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.execute_command(
        "ACL",
        "SETUSER",
        "engine",
        "on",
        ">engine-pw",
        "~kvtier:*",
        "resetchannels",
        "-@all",
        "+ping",
        "+get",
        "+mget",
        "+set",
        "+exists",
        "+unlink",
        "+scan",
        "+hello",
        "+auth",
    )
    data, keys = blocks(3, 5), [key(i) for i in range(3)]
    async with RedisTier(
        LAYOUT, 8, model=MODEL, url=redis_server.url, username="engine", password="engine-pw"
    ) as store:
        await store.write_from([0, 1, 2], keys, data)
        assert torch.equal(await read(store, [0, 1, 2], keys), data)
        assert await store.contains(keys) == [True, True, True]


@pytest.mark.asyncio
async def test_a_call_runs_at_most_concurrency_chunks_at_once() -> None:
    commands = RedisCommands(
        "redis", deadline=1.0, batch_size=16, concurrency=2, cluster=True, ttl_ms=None
    )
    running: list[int] = []
    peak = 0
    spans: list[tuple[int, int]] = []

    async def work(begin: int, end: int) -> None:  # builds its values, then one round trip
        nonlocal peak
        running.append(begin)
        peak = max(peak, len(running))
        await asyncio.sleep(0.001)
        spans.append((begin, end))
        running.remove(begin)

    await commands.chunks(1024, work)
    assert peak == 2  # not 64: each chunk's values exist only while it runs
    assert sorted(spans) == [(b, b + 16) for b in range(0, 1024, 16)]


@pytest.mark.asyncio
async def test_a_scan_whose_cursor_comes_back_fails_the_scan_and_the_tier_opens() -> None:
    cycling = b"*2\r\n$1\r\n7\r\n*0\r\n"  # always cursor 7: a scan that would never end
    with anyio.fail_after(3):  # found at the second reply, not at a 5 s deadline (or never)
        async with (
            fake_server(b"*0\r\n", scan=cycling) as url,
            RedisTier(LAYOUT, 8, model=MODEL, url=url, scan_on_open=True, timeout=5.0) as store,
        ):
            assert list(await store.recover()) == []  # logged as unreachable; it serves on


@pytest.mark.asyncio
async def test_names_that_are_not_blocks_do_not_use_up_the_scans_limit(
    redis_server: RedisServer,
) -> None:
    """scan_on_open stops at the tier's slots counting its blocks, not every matching name."""
    small = {"model": MODEL}
    async with RedisTier(LAYOUT, 4, url=redis_server.url, **small) as store:  # type: ignore[arg-type]
        await store.write_from([0, 1], [key(1), key(2)], blocks(2, 7))
        head = store.keys.name(key(1))[: -len(key(1).hex())]
    with redis_server.client() as admin:  # names under the tier's pattern that no block has
        for number in range(20):
            admin.set(head + b"JUNK%02d" % number, b"x")
    async with RedisTier(
        LAYOUT,
        4,
        url=redis_server.url,
        scan_on_open=True,
        **small,  # type: ignore[arg-type]
    ) as store:
        assert sorted(key for _, key in await store.recover()) == [key(1), key(2)]


@pytest.mark.asyncio
async def test_a_cluster_that_cannot_be_reached_opens_and_its_calls_fail_typed() -> None:
    """redis-py's cluster errors are not RedisErrors: they become TierIOError like the rest."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisTier(
        LAYOUT,
        8,
        model=MODEL,
        url=f"redis://127.0.0.1:{port}/0",
        cluster=True,
        connect_timeout=0.5,
        timeout=0.5,
    )
    async with store:  # an engine starts while the cache is down
        for _ in range(2):  # the second call comes after redis-py marked the client stale
            with pytest.raises(TierIOError):
                await read(store, [0], [key(1)])
            with pytest.raises(TierIOError):
                await store.write_from([0], [key(1)], blocks(1))


@pytest.mark.parametrize("url", ["redis://h:1/2", "redis://h:1/0?db=3", "redis://h:1?db=1"])
def test_a_cluster_url_selecting_a_database_other_than_0_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="a Redis Cluster has database 0 only"):
        RedisTier(LAYOUT, 8, model=MODEL, url=url, cluster=True)
    RedisTier(LAYOUT, 8, model=MODEL, url=url)  # a single server has them


def _commands(concurrency: int = 2, deadline: float = 0.2) -> RedisCommands:
    """Round trips of a tier with no server: the calls below stand for them."""
    return RedisCommands(
        "redis",
        deadline=deadline,
        batch_size=16,
        concurrency=concurrency,
        cluster=False,
        ttl_ms=None,
    )


async def _attempt(commands: RedisCommands, seconds: float) -> str:
    """One round trip taking ``seconds``: answered, timed out, or not tried (resting)."""

    async def call() -> str:
        await asyncio.sleep(seconds)
        return "answered"

    try:
        return await commands.round_trip("read", call)
    except TierIOError as exc:
        return "untried" if "not tried" in str(exc) else "timed out"


async def _round_trips(slow: int, fast: int) -> list[str]:
    """``slow`` round trips that outlive the deadline, then ``fast`` ones queued behind."""
    commands = _commands()
    outcomes: list[str] = []

    async def one(seconds: float) -> None:
        outcomes.append(await _attempt(commands, seconds))

    async with anyio.create_task_group() as group:
        for _ in range(slow):
            group.start_soon(one, 5.0)
        await anyio.sleep(0.01)
        for _ in range(fast):
            group.start_soon(one, 0.02)
    return outcomes


@pytest.mark.asyncio
async def test_a_slow_round_trip_on_a_busy_server_fails_no_queued_call() -> None:
    """One large value timing out while the other place keeps answering is a busy
    server, not a stalled one: the calls queued behind are tried."""
    with anyio.fail_after(5):
        outcomes = await _round_trips(slow=1, fast=20)
    assert sorted(outcomes) == ["answered"] * 20 + ["timed out"]


@pytest.mark.asyncio
async def test_round_trips_timing_out_with_none_answered_fail_the_queued_calls_untried() -> None:
    with anyio.fail_after(1):  # one deadline (0.2 s), not ten
        outcomes = await _round_trips(slow=2, fast=20)
    assert sorted(outcomes) == ["timed out"] * 2 + ["untried"] * 20


@pytest.mark.asyncio
async def test_a_stall_rests_the_tier_twice_as_long_each_time_until_an_answer() -> None:
    """A server that stopped answering costs a deadline now and then, not one per
    call: after a stall calls fail untried for a deadline, doubling per stall in a
    row, and the first answer ends it."""
    deadline = 0.2
    commands = _commands(deadline=deadline)

    attempt = partial(_attempt, commands)
    stalled, answering = 5.0, 0.0
    assert await attempt(stalled) == "timed out"  # rests one deadline
    assert await attempt(answering) == "untried"
    await asyncio.sleep(1.5 * deadline)
    assert await attempt(stalled) == "timed out"  # rests two deadlines
    await asyncio.sleep(1.5 * deadline)
    assert await attempt(answering) == "untried"
    await asyncio.sleep(1.0 * deadline)
    assert await attempt(answering) == "answered"  # the rest is over, and reset
    assert await attempt(stalled) == "timed out"
    await asyncio.sleep(1.5 * deadline)
    assert await attempt(answering) == "answered"  # one deadline again


@pytest.mark.asyncio
async def test_round_trips_timed_out_by_one_stall_rest_the_tier_once() -> None:
    """Four round trips in flight when the server stalls are one stall: one deadline
    of rest, not four stalls in a row (eight deadlines)."""
    deadline = 0.2
    commands = _commands(concurrency=4, deadline=deadline)

    attempt = partial(_attempt, commands)
    outcomes: list[str] = []

    async def stalled() -> None:
        outcomes.append(await attempt(5.0))

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(stalled)
    assert outcomes == ["timed out"] * 4
    await asyncio.sleep(1.5 * deadline)
    assert await attempt(0.0) == "answered"


@pytest.mark.asyncio
async def test_a_closed_tier_says_closed_even_while_resting() -> None:
    from kvtier.errors import ClosedError

    commands = _commands()
    assert await _attempt(commands, 5.0) == "timed out"  # a stall: resting now
    commands.close()

    async def call() -> str:
        return "answered"

    with pytest.raises(ClosedError):
        await commands.round_trip("read", call)
