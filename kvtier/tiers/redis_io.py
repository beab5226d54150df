"""The round trips a :class:`~kvtier.tiers.redis.RedisTier` makes, bounded and batched.

:class:`RedisCommands` owns nothing but the client it is given: each round
trip (a pipeline, or ``MGET`` for standalone reads) runs under
``asyncio.timeout(deadline)``, with redis-py's errors, time-outs and replies
of the wrong shape turned into :class:`~kvtier.errors.TierIOError`.
:meth:`RedisCommands.get` and :meth:`RedisCommands.set` are one round trip
each (their caller chunks the batch); :meth:`RedisCommands.exists` and
:meth:`RedisCommands.unlink` chunk their names themselves. At most
``concurrency`` round trips of the tier are in flight at once (so the
connection pool is never exhausted: redis-py's async pool raises rather than
waits); :meth:`RedisCommands.chunks` splits a batch into ``batch_size``
chunks and stops the others at the first failure, so a dead server fails a
call within one deadline, not one per chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar, cast

import anyio
import redis.exceptions
from anyio.abc import TaskGroup
from redis.asyncio.cluster import RedisCluster

from kvtier.errors import ClosedError, TierIOError
from kvtier.tiers.redis_client import RedisClient

__all__ = ["MAX_REST_DEADLINES", "RedisCommands"]

MAX_REST_DEADLINES = 8
"""The longest rest after stalls in a row, in deadlines (see ``RedisCommands._timed_out``)."""

_T = TypeVar("_T")
_MALFORMED = (TypeError, ValueError, AttributeError, IndexError, KeyError)
"""What taking apart a reply of the wrong shape raises (in redis-py or here)."""
_FAILED = (
    redis.exceptions.RedisError,
    # A cluster's own failures (no node reachable, a slot no node covers) are
    # not RedisErrors: without them a cluster that is down would fail the open
    # and every later call with redis-py's exception instead of TierIOError.
    redis.exceptions.RedisClusterException,
    OSError,
)
"""What a round trip that failed raises: the server, the network or the cluster."""


class RedisCommands:
    """Bounded round trips on one client.

    Args:
        tier: The tier's name (for errors).
        deadline: Seconds one round trip may take, connecting included.
        batch_size: Most blocks per round trip.
        concurrency: Most round trips of one call in flight.
        cluster: The client is a ``RedisCluster`` (reads use per-node pipelines).
        ttl_ms: Milliseconds each stored value lives; None: until evicted.
    """

    def __init__(
        self,
        tier: str,
        *,
        deadline: float,
        batch_size: int,
        concurrency: int,
        cluster: bool,
        ttl_ms: int | None,
    ) -> None:
        self.tier = tier
        self.deadline = deadline
        self.batch_size = batch_size
        self.cluster = cluster
        self.ttl_ms = ttl_ms
        self.concurrency = concurrency
        # asyncio's semaphore: no checkpoint when a place is free (anyio's
        # CapacityLimiter yields to the loop twice: 5 points of a 64 KiB read).
        self._places = asyncio.Semaphore(concurrency)
        self._closed = False
        self._deadlines: set[asyncio.Timeout] = set()  # of the round trips in flight
        self._answered = 0  # round trips that succeeded, ever
        self._stalls = 0  # round trips that ran out of time while none succeeded
        self._resting_until = 0.0  # time.monotonic() before which calls are not tried
        self._rest = deadline  # how long the next stall rests the tier

    def close(self) -> None:
        """Refuse new round trips, and end those in flight now (they raise ``ClosedError``).

        Their deadlines are moved to now: the way out of a round trip that
        is already there (redis-py drops a connection cancelled mid-reply), at
        no cost to the round trips of an open tier (a cancel scope per call
        cost 3 points of a single 64 KiB read).
        """
        self._closed = True
        if self._deadlines:
            now = asyncio.get_running_loop().time()
            for deadline in self._deadlines:
                if not deadline.expired():  # one that fired is on its way out already
                    deadline.reschedule(now)  # (rescheduling it raises RuntimeError)

    async def round_trip(
        self, what: str, call: Callable[[], Awaitable[_T]], *, bounded: bool = True
    ) -> _T:
        """Run one call against the server, bounded and with errors translated.

        Waits for one of the ``concurrency`` places first (outside the
        deadline). A round trip that ran out of time while no other one
        succeeded (the server looks stalled, not busy) fails every call that
        waited for a place meanwhile, untried: each would otherwise wait out a
        deadline of its own in turn. Calls that start waiting afterwards are
        tried again. ``bounded=False``: ``call`` keeps deadlines of its own.

        Raises:
            ClosedError: :meth:`close` was called, before or during it.
            TierIOError: The call failed, took longer than the deadline, or
                the reply was not of the expected shape; or the server looked
                stalled while it waited for a place.
        """
        if self._resting_until and time.monotonic() < self._resting_until and not self._closed:
            raise TierIOError(
                f"tier {self.tier}: {what} not tried: the server stalled; tried again in "
                f"{self._resting_until - time.monotonic():.1f} s",
                tier=self.tier,
            )
        stalls = self._stalls
        async with self._places:
            if self._closed:
                raise ClosedError(f"tier {self.tier} is closed")
            if self._stalls != stalls:
                raise TierIOError(
                    f"tier {self.tier}: {what} not tried: a round trip ran out of time "
                    "while it waited, and none succeeded (the server looks stalled)",
                    tier=self.tier,
                )
            answered = self._answered
            try:
                # asyncio's own deadline (redis.asyncio runs on asyncio only): half
                # the cost of anyio.fail_after per round trip (4 µs against 8).
                async with asyncio.timeout(self.deadline if bounded else None) as deadline:
                    self._deadlines.add(deadline)
                    try:
                        result = await call()
                    finally:
                        self._deadlines.discard(deadline)
                self._answered += 1
                if self._resting_until:  # the first answer after a stall
                    self._resting_until, self._rest = 0.0, self.deadline
                return result
            except TimeoutError as exc:
                if self._closed:
                    raise ClosedError(f"tier {self.tier} was closed during the call") from exc
                self._timed_out(answered, stalls)
                raise TierIOError(
                    f"tier {self.tier}: {what} took longer than {self.deadline:g} s",
                    tier=self.tier,
                ) from exc
            except _FAILED as exc:
                if isinstance(exc, redis.exceptions.TimeoutError):  # redis-py's socket timeout
                    self._timed_out(answered, stalls)
                raise TierIOError(
                    f"tier {self.tier}: {what} failed: {type(exc).__name__}: {exc}",
                    tier=self.tier,
                ) from exc
            except _MALFORMED as exc:  # a reply redis-py or kvtier could not take apart
                raise TierIOError(
                    f"tier {self.tier}: {what}: the server's reply is malformed: "
                    f"{type(exc).__name__}: {exc}",
                    tier=self.tier,
                ) from exc

    def _timed_out(self, answered: int, stalls: int) -> None:
        """A round trip ran out of time: a stall if none succeeded since it began.

        One stall however many round trips it times out: those that began
        before another declared it (``stalls`` changed since) add nothing.

        A stall rests the tier: calls fail at once, untried, for one deadline,
        then twice as long after each stall in a row (at most
        :data:`MAX_REST_DEADLINES` deadlines), until a round trip succeeds. A
        server that stopped answering then costs an engine a deadline now
        and then, not one per call (every request's probe, every load).
        """
        if self._answered == answered and self._stalls == stalls:  # not one seen already
            self._stalls += 1
            self._resting_until = time.monotonic() + self._rest
            self._rest = min(2 * self._rest, MAX_REST_DEADLINES * self.deadline)

    async def ping(self, client: RedisClient) -> None:
        """PING (raises :class:`TierIOError` when the server does not answer)."""
        await self.round_trip("ping", client.ping)

    async def scan(
        self,
        client: RedisClient,
        pattern: bytes,
        limit: int,
        key_of: Callable[[bytes], bytes | None],
    ) -> list[bytes]:
        """Up to ``limit`` distinct keys of names matching ``pattern`` (every node of a cluster).

        ``key_of`` turns a name into its block key, or None for a name that
        is not a block's (another application's key that the pattern
        matches): only accepted names count towards ``limit``. The deadline
        bounds each SCAN reply, not the whole scan: a healthy server with
        millions of keys (most of them other applications') is not a dead one.
        """
        found: dict[bytes, None] = {}  # SCAN may return a name twice

        async def scan() -> None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.deadline) as deadline:
                async for page in _scan_pages(client, pattern):
                    if deadline.expired():  # it fired while the reply came in
                        raise TimeoutError
                    deadline.reschedule(loop.time() + self.deadline)
                    for name in page:
                        key = key_of(bytes(name))
                        if key is not None:
                            found[key] = None
                            if len(found) >= limit:
                                return

        await self.round_trip("scan", scan, bounded=False)
        return list(found)

    async def get(self, client: RedisClient, names: list[bytes]) -> list[Any]:
        """The values of ``names`` (None where absent; an exception where a node failed)."""

        async def get() -> list[Any]:
            if not self.cluster:
                reply = await client.mget(names)
                if not isinstance(reply, list | tuple):  # a status or a number, not an array
                    raise TypeError(f"MGET answered {type(reply).__name__}, not an array")
                values = list(reply)
            else:
                pipe = client.pipeline()
                for name in names:
                    pipe.get(name)
                values = list(await pipe.execute(raise_on_error=False))
            if len(values) != len(names):
                raise ValueError(f"{len(values)} values for {len(names)} names")
            return values

        return await self.round_trip("read", get)

    async def set(
        self, client: RedisClient, names: list[bytes], values: Sequence[object]
    ) -> list[Any]:
        """SET each name to its value (with the TTL); a reply or an exception per name.

        A value is bytes-like, or a :class:`~kvtier.tiers.redis_framing.FramedValue`
        for a client made to pack one (:func:`~kvtier.tiers.redis_framing.install`).
        """

        async def set_all() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, value in zip(names, values, strict=True):
                pipe.set(name, value, px=self.ttl_ms)  # type: ignore[arg-type]
            return list(await pipe.execute(raise_on_error=False))

        return await self.round_trip("write", set_all)

    async def exists(self, client: RedisClient, names: list[bytes]) -> list[bool]:
        """Whether each name exists now, in the order of ``names``.

        One ``EXISTS`` pipeline per :data:`NAMES_PER_ROUND_TRIP` names
        (:meth:`chunks`); none for no names.

        Raises:
            TierIOError: A chunk's round trip failed, took longer than the
                deadline, or its reply was not one answer per name.
        """
        found = [False] * len(names)

        async def work(begin: int, end: int) -> None:
            async def exists() -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for name in names[begin:end]:
                    pipe.exists(name)
                replies = list(await pipe.execute(raise_on_error=True))
                if len(replies) != end - begin:
                    raise ValueError(f"{len(replies)} replies for {end - begin} names")
                return replies

            found[begin:end] = [bool(n) for n in await self.round_trip("exists", exists)]

        if names:
            await self.chunks(len(names), work, size=NAMES_PER_ROUND_TRIP)
        return found

    async def unlink(self, client: RedisClient, names: list[bytes]) -> None:
        """UNLINK every name: a pipeline per :data:`NAMES_PER_ROUND_TRIP` names (:meth:`chunks`).

        No round trip for no names.

        Raises:
            TierIOError: A chunk's round trip failed or took longer than the
                deadline (the names of other chunks may be deleted or not).
        """

        async def work(begin: int, end: int) -> None:
            async def unlink() -> None:
                pipe = client.pipeline(transaction=False)
                for name in names[begin:end]:
                    # Not pipe.unlink(): on a cluster pipeline that is a coroutine
                    # that must be awaited to queue the command (redis-py 8), so an
                    # unawaited call deleted nothing.
                    pipe.execute_command("UNLINK", name)
                await pipe.execute(raise_on_error=True)

            await self.round_trip("discard", unlink)

        if names:
            await self.chunks(len(names), work, size=NAMES_PER_ROUND_TRIP)

    async def chunks(
        self, n: int, work: Callable[[int, int], Awaitable[None]], *, size: int | None = None
    ) -> None:
        """Run ``work(begin, end)`` over ``range(n)`` in chunks of ``size`` (``batch_size``).

        ``work`` makes its round trips through :meth:`round_trip` (which
        bounds how many are in flight). At most ``concurrency`` chunks run at
        once, so the values a chunk builds before its round trip (copies, on
        a cluster) exist for those chunks only, not for the whole batch. The
        first failure cancels the chunks still running or waiting.

        Raises:
            ClosedError: The tier was closed meanwhile.
            TierIOError: The first chunk's error.
        """
        size = size or self.batch_size
        if n <= size:
            await work(0, n)
            return
        errors: list[TierIOError | ClosedError] = []
        running = asyncio.Semaphore(self.concurrency)

        async def run(begin: int, end: int, group: TaskGroup) -> None:
            try:
                async with running:
                    await work(begin, end)
            except (TierIOError, ClosedError) as exc:
                errors.append(exc)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for begin in range(0, n, size):
                group.start_soon(run, begin, min(n, begin + size), group)
        if errors:
            raise errors[0]


NAMES_PER_ROUND_TRIP: Final = 1024
"""Names one ``EXISTS`` or ``UNLINK`` pipeline carries (no values: far more than ``batch_size``).

A probe of the offload manager's default 256 blocks stays one round trip,
while 100,000 names no longer make one pipeline that outlasts the deadline.
"""

_SCAN_COUNT: Final = 1000
"""Names a SCAN reply covers (a hint to the server)."""


async def _scan_pages(client: RedisClient, pattern: bytes) -> AsyncIterator[list[Any]]:
    """The names matching ``pattern`` of each SCAN reply, one reply at a time (every node)."""
    seen: set[tuple[str, int]] = set()

    def fresh(node: str, cursor: int) -> bool:
        """False when a cursor comes back: a broken server or proxy, not a scan that ends."""
        if (node, cursor) in seen:
            raise ValueError(f"SCAN returned cursor {cursor} twice")
        seen.add((node, cursor))
        return bool(cursor)

    if not isinstance(client, RedisCluster):
        cursor = 0
        while True:
            cursor, names = await client.scan(cursor=cursor, match=pattern, count=_SCAN_COUNT)
            yield list(names)
            if not fresh("", cursor):
                return
    # A cluster's SCAN answers per node: {node name: cursor} (typed as a plain int).
    first, names = await client.scan(match=pattern, count=_SCAN_COUNT)  # each primary, once
    yield list(names)
    cursors = cast(dict[str, int], first)
    nodes = {
        node: client.get_node(node_name=node)
        for node, cursor in cursors.items()
        if fresh(node, cursor)
    }
    while nodes:
        for node, target in list(nodes.items()):
            reply, names = await client.scan(
                cursor=cursors[node], match=pattern, count=_SCAN_COUNT, target_nodes=target
            )
            yield list(names)
            cursors[node] = cast(dict[str, int], reply)[node]
            if not fresh(node, cursors[node]):
                del nodes[node]
