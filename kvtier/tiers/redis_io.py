"""The round trips a :class:`~kvtier.tiers.redis.RedisTier` makes, bounded and batched.

:class:`RedisCommands` owns nothing but the client it is given: each method
is one round trip (a pipeline, or ``MGET`` for standalone reads) under
``asyncio.timeout(deadline)``, with redis-py's errors, time-outs and replies
of the wrong shape turned into :class:`~kvtier.errors.TierIOError`. At most
``concurrency`` round trips of the tier are in flight at once (so the
connection pool is never exhausted: redis-py's async pool raises rather than
waits); :meth:`RedisCommands.chunks` splits a batch into ``batch_size``
chunks and stops the others at the first failure, so a dead server fails a
call within one deadline, not one per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import redis.exceptions
from anyio.abc import TaskGroup

from kvtier.errors import TierIOError
from kvtier.tiers.redis_client import RedisClient

__all__ = ["RedisCommands"]

_T = TypeVar("_T")
_MALFORMED = (TypeError, ValueError, AttributeError, IndexError, KeyError)
"""What taking apart a reply of the wrong shape raises (in redis-py or here)."""


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
        # asyncio's semaphore: no checkpoint when a place is free (anyio's
        # CapacityLimiter yields to the loop twice: 5 points of a 64 KiB read).
        self._places = asyncio.Semaphore(concurrency)

    async def round_trip(
        self, what: str, call: Callable[[], Awaitable[_T]], *, bounded: bool = True
    ) -> _T:
        """Run one call against the server, bounded and with errors translated.

        Waits for one of the ``concurrency`` places first (outside the
        deadline). ``bounded=False``: ``call`` keeps deadlines of its own.

        Raises:
            TierIOError: The call failed, took longer than the deadline, or
                the reply was not of the expected shape.
        """
        async with self._places:
            try:
                # asyncio's own deadline (redis.asyncio runs on asyncio only): half
                # the cost of anyio.fail_after per round trip (4 µs against 8).
                async with asyncio.timeout(self.deadline if bounded else None):
                    return await call()
            except TimeoutError as exc:
                raise TierIOError(
                    f"tier {self.tier}: {what} took longer than {self.deadline:g} s",
                    tier=self.tier,
                ) from exc
            except (redis.exceptions.RedisError, OSError) as exc:
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

    async def ping(self, client: RedisClient) -> None:
        """PING (raises :class:`TierIOError` when the server does not answer)."""
        await self.round_trip("ping", client.ping)

    async def scan(self, client: RedisClient, pattern: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` distinct names matching ``pattern`` (every node of a cluster).

        The deadline bounds each stretch without progress, not the whole
        scan: a healthy server with millions of keys is not a dead one.
        """
        found: dict[bytes, None] = {}  # SCAN may return a name twice

        async def scan() -> None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.deadline) as deadline:
                async for name in client.scan_iter(match=pattern, count=1000):
                    found[bytes(name)] = None
                    if len(found) >= limit:
                        return
                    if len(found) % 1000 == 0:
                        deadline.reschedule(loop.time() + self.deadline)

        await self.round_trip("scan", scan, bounded=False)
        return list(found)

    async def get(self, client: RedisClient, names: list[bytes]) -> list[Any]:
        """The values of ``names`` (None where absent; an exception where a node failed)."""

        async def get() -> list[Any]:
            if not self.cluster:
                values = list(await client.mget(names))
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
        """Whether each name exists now."""

        async def exists() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return list(await pipe.execute(raise_on_error=True))

        if not names:
            return []
        return [bool(n) for n in await self.round_trip("exists", exists)]

    async def unlink(self, client: RedisClient, names: list[bytes]) -> None:
        """UNLINK every name."""

        async def unlink() -> None:
            pipe = client.pipeline(transaction=False)
            for name in names:
                # Not pipe.unlink(): on a cluster pipeline that is a coroutine
                # that must be awaited to queue the command (redis-py 8), so an
                # unawaited call deleted nothing.
                pipe.execute_command("UNLINK", name)
            await pipe.execute(raise_on_error=True)

        await self.round_trip("discard", unlink)

    async def chunks(self, n: int, work: Callable[[int, int], Awaitable[None]]) -> None:
        """Run ``work(begin, end)`` over ``range(n)`` in ``batch_size`` chunks.

        ``work`` makes its round trips through :meth:`round_trip` (which
        bounds how many are in flight). The first failure cancels the chunks
        still running or waiting.

        Raises:
            TierIOError: The first chunk's error.
        """
        if n <= self.batch_size:
            await work(0, n)
            return
        errors: list[TierIOError] = []

        async def run(begin: int, end: int, group: TaskGroup) -> None:
            try:
                await work(begin, end)
            except TierIOError as exc:
                errors.append(exc)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for begin in range(0, n, self.batch_size):
                group.start_soon(run, begin, min(n, begin + self.batch_size), group)
        if errors:
            raise errors[0]
