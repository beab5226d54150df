"""RedisTier: blocks in a shared Redis or Valkey server (standalone or Cluster).

Slots. Lower tiers are addressed by slots that a
:class:`~kvtier.tiers.index.TierIndex` hands out; Redis stores by name. Here
``num_slots`` is a configured capacity: how many blocks this process's index
remembers having in Redis. The tier keeps ``slot → key`` from the keys passed
to writes (for :meth:`RedisTier.discard`), but reads name blocks by the keys
passed to them, so the bytes never depend on a process-local slot and any
process of the same model and layout reads what another stored.

Eviction is Redis's own. Redis (``maxmemory-policy allkeys-lru``), a TTL or
another client may remove any block at any time, so every read may miss: an
absent value, or one that fails verification (:mod:`kvtier.tiers.redis_format`),
raises :class:`~kvtier.errors.BlockMissingError` naming the slots, and the
transfer pipeline drops them from the index; the engine recomputes them.

Faults. A server that is down, unreachable, slow past ``timeout``, out of
memory or answering errors makes the call raise
:class:`~kvtier.errors.TierIOError` (a failed load: the engine recomputes; a
failed store: dropped and counted by the offload manager). Every round trip
runs under a deadline (``asyncio.timeout``) and the first failed chunk of a
call cancels the others, so a call fails within ``connect_timeout + timeout``
of a dead server (plus any wait for one of the ``concurrency`` places, which
also keeps the connection pool from running out; a round trip that runs out
of time while none succeeded fails the calls that waited meanwhile at once,
so calls queued behind a stalled server do not each wait out a deadline in
turn, and a stall rests the tier: calls fail untried for a deadline, doubling
per stall in a row up to eight, until an answer). A value of another type
under a block's name (another client's data) is a miss. The connection pool
reconnects by itself on the next call once the server is back; a server
absent when the tier opens is logged, not fatal.

Batches: one pipeline (``MGET`` for standalone reads) per ``batch_size``
blocks for reads and writes, and per
:data:`~kvtier.tiers.redis_io.NAMES_PER_ROUND_TRIP` names for
:meth:`RedisTier.contains` and :meth:`RedisTier.discard`; up to
``concurrency`` such round trips in flight, each on its own pooled
connection. On a Cluster the pipeline sends one round trip per node.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Self, TypeVar

import anyio
import redis.exceptions

from kvtier.errors import (
    ClosedError,
    ConfigError,
    TierIOError,
)
from kvtier.log import get_logger
from kvtier.tiers import redis_framing as framing
from kvtier.tiers._checks import check_batch
from kvtier.tiers._close_gate import CloseGate
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.redis_batch import RedisBatches
from kvtier.tiers.redis_calls import RedisCalls
from kvtier.tiers.redis_client import (
    RedisClient,
    RedisConnection,
    close_client,
    positive_int,
    positive_number,
    redact_url,
)
from kvtier.tiers.redis_format import (
    MAX_KEY_BYTES,
    KeyFormat,
    max_value_bytes,
)
from kvtier.tiers.redis_io import RedisCommands
from kvtier.tiers.redis_values import ValueBuffers

__all__ = ["RedisTier", "redact_url"]

_log = get_logger("kvtier.tiers.redis")

_T = TypeVar("_T")

_MAX_TTL = 365 * 86_400.0


class RedisTier(RedisCalls):
    """A shared tier in Redis / Valkey; see the module docstring for the model.

    Its reads, writes, ``contains``, ``adopt`` and ``discard`` come from
    :class:`~kvtier.tiers.redis_calls.RedisCalls`.

    Args:
        layout: The block layout.
        num_slots: Capacity in blocks this process tracks (its index's size).
        url: ``redis://host:port/db``, ``rediss://`` (TLS) or ``unix://path``.
            A password in the URL is used but never logged; its query may
            only hold ``db``, ``username`` and ``password`` (redis-py would
            let any other parameter override the settings below).
        name: The tier's name (``medium`` of its events).
        prefix: Put in front of every key (no braces).
        model: The model's name, required and non-empty: part of every key,
            so models whose layouts are equal (a base model and its
            fine-tune) never read each other's blocks.
        rank: This worker's tensor- or pipeline-parallel rank; with
            ``world_size`` > 1 part of every key, so workers that hold
            different shards of the same block never read each other's.
        world_size: The number of such workers.
        ttl: Seconds each stored block lives; ``None``: until Redis evicts it.
        batch_size: Most blocks per round trip.
        concurrency: Most round trips of one call in flight at once.
        max_connections: Size of the connection pool (at least ``concurrency``).
        connect_timeout: Seconds to open a connection.
        timeout: Seconds a round trip may take once connected.
        username: ACL user name (the URL must not name one too).
        password: Password (the URL must not hold one too); never logged,
            redacted in reprs.
        tls: Use TLS (also implied by ``rediss://``).
        tls_ca_file: CA bundle that verifies the server.
        tls_cert_file: Client certificate (mutual TLS).
        tls_key_file: The client certificate's key.
        tls_verify: Verify the server's certificate and host name.
        cluster: Talk to a Redis Cluster (``url`` names any node).
        discard_deletes: :meth:`discard` deletes the blocks from Redis; when
            False it only forgets them (Redis evicts them in time).
        scan_on_open: Opening scans Redis for this model and layout's blocks
            (up to ``num_slots``) and offers them through :meth:`recover`,
            so a new process starts with what others stored.
        value_pool_bytes: Bytes of store buffers kept for reuse
            (:mod:`kvtier.tiers.redis_values`); 0 keeps none; None: as many
            as one call has in flight (``batch_size * concurrency`` values,
            128 MiB for 2 MiB blocks at the defaults).

    Raises:
        ConfigError: An argument is out of range, or the URL is refused (see
            :meth:`~kvtier.tiers.redis_client.RedisConnection.build`).
    """

    def __init__(
        self,
        layout: BlockLayout,
        num_slots: int,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        name: str = "redis",
        model: str,
        prefix: str = "kvtier:",
        rank: int = 0,
        world_size: int = 1,
        ttl: float | None = None,
        batch_size: int = 32,
        concurrency: int = 2,
        max_connections: int = 8,
        connect_timeout: float = 2.0,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_verify: bool = True,
        cluster: bool = False,
        discard_deletes: bool = True,
        scan_on_open: bool = False,
        value_pool_bytes: int | None = None,
    ) -> None:
        if not isinstance(layout, BlockLayout):
            raise ConfigError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        positive_int("num_slots", num_slots)
        positive_int("batch_size", batch_size)
        positive_int("concurrency", concurrency)
        positive_int("max_connections", max_connections)
        self._connection = RedisConnection.build(
            url,
            concurrency=concurrency,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            timeout=timeout,
            username=username,
            password=password,
            tls=tls,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_verify=tls_verify,
            cluster=cluster,
        )
        positive_number("ttl", ttl, allow_none=True)
        if ttl is not None and not ttl <= _MAX_TTL:
            raise ConfigError(f"ttl must be at most {_MAX_TTL:g} s (a year), got {ttl!r}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        self._layout = layout
        self._num_slots = num_slots
        self._name = name
        self._keys = KeyFormat(prefix, layout, model, rank, world_size)
        self._commands = RedisCommands(
            name,
            deadline=self._connection.deadline,
            batch_size=batch_size,
            concurrency=concurrency,
            cluster=cluster,
            ttl_ms=None if ttl is None else max(1, round(ttl * 1000)),
        )
        if value_pool_bytes is None:
            value_pool_bytes = batch_size * concurrency * max_value_bytes(layout.block_bytes)
        self._values = ValueBuffers(value_pool_bytes)
        self._checked = partial(  # a batch's slots, buffers, then keys (check_batch)
            check_batch,
            num_slots=self._num_slots,
            row_bytes=layout.block_bytes,
            tier=name,
            max_key_bytes=MAX_KEY_BYTES,
            unique=False,
        )
        self._batches = RedisBatches(
            name, self._keys, self._commands, self._values, layout.block_bytes
        )
        self._cluster = cluster
        self._discard_deletes = discard_deletes
        self._scan_on_open = scan_on_open
        self._client: RedisClient | None = None
        self._framed = False  # stores send header and payload apart (standalone)
        self._slot_keys: dict[int, BlockKey] = {}
        self._recovered: list[tuple[int, BlockKey]] = []
        self._closed = False
        self._calls = 0  # calls in flight (aclose ends their round trips and waits)
        self._idle: anyio.Event | None = None  # set when the last call ends after aclose
        self._gate = CloseGate()

    # -- properties ----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The tier's name, reported as ``medium`` in events."""
        return self._name

    @property
    def layout(self) -> BlockLayout:
        """The block layout."""
        return self._layout

    @property
    def num_slots(self) -> int:
        """Capacity in blocks (how many this process's index tracks)."""
        return self._num_slots

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    @property
    def keys(self) -> KeyFormat:
        """How block keys become Redis names for this model and layout."""
        return self._keys

    @property
    def url(self) -> str:
        """The server's URL with any password redacted."""
        return redact_url(self._connection.url)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._client else "not open")
        kind = "cluster" if self._cluster else "standalone"
        return (
            f"RedisTier({self._name!r}, {self.url!r}, {kind}, prefix={self._keys.prefix!r}, "
            f"{self._num_slots} slots, {state})"
        )

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Create the client and check the server (a server that is down is logged).

        Cancelled or failing while it checks, it closes the client again (the
        tier is then not open, and may be entered again).

        Raises:
            ClosedError: The tier was closed, before or while opening.
            ConfigError: The client rejected the options.
        """
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if self._client is not None:
            return self
        try:
            self._client = self._connection.client()
        except ConfigError as exc:
            raise ConfigError(f"tier {self._name}: {exc}") from exc
        self._framed = framing.install(self._client)  # before its first connection
        start = time.perf_counter()
        try:
            await self._run(self._check_server)
        except TierIOError as exc:
            _log.warning("tier_unreachable", tier=self._name, url=self.url, error=str(exc))
        except BaseException:
            client, self._client = self._client, None
            self._recovered, self._slot_keys = [], {}
            if client is not None:  # else aclose() took it and closes it
                await self._close_client(client)
            raise
        else:
            _log.info(
                "tier_open",
                tier=self._name,
                url=self.url,
                tls=self._connection.tls,
                cluster=self._cluster,
                n_blocks=len(self._recovered),
                seconds=time.perf_counter() - start,
            )
        return self

    async def _check_server(self, client: RedisClient) -> None:
        await self._commands.ping(client)
        if self._scan_on_open:
            self._recovered = await self._scan(client)
            self._slot_keys = dict(self._recovered)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the tier."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (the blocks stay in Redis). Idempotent.

        Calls in flight are cancelled (they raise
        :class:`~kvtier.errors.ClosedError`) and waited for, at most one
        round trip's deadline, before the pool's connections are closed. A
        second call waits for the first to finish.
        """
        async with self._gate.closing() as first:
            if not first:
                return
            self._closed = True
            await self._close_calls_and_client()
        _log.info("tier_close", tier=self._name)

    async def _close_calls_and_client(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                self._commands.close()  # the round trips in flight end now: ClosedError
                if self._calls:
                    self._idle = anyio.Event()
                    with anyio.move_on_after(self._connection.deadline):
                        await self._idle.wait()
                    if self._calls:
                        _log.warning("tier_close_calls_left", tier=self._name, n_calls=self._calls)
            finally:
                client, self._client = self._client, None
                if client is not None:
                    await self._close_client(client)

    async def _close_client(self, client: RedisClient) -> None:
        """Close ``client`` and its connections, shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            try:
                await close_client(client)
            except (redis.exceptions.RedisError, OSError) as exc:
                _log.warning("tier_close_failed", tier=self._name, error=repr(exc))

    def _open(self) -> RedisClient:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if self._client is None:
            raise ClosedError(f"tier {self._name} is not open: use 'async with'")
        return self._client

    async def _run(self, call: Callable[[RedisClient], Awaitable[_T]]) -> _T:
        """``call(client)``, as a call in flight that :meth:`aclose` ends and waits for.

        Closing ends the call's round trips (:meth:`RedisCommands.close
        <kvtier.tiers.redis_io.RedisCommands.close>`): the one in flight at
        once, the next ones before they start.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
        """
        client = self._open()
        self._calls += 1
        try:
            return await call(client)
        finally:
            self._calls -= 1
            if not self._calls and self._idle is not None:
                self._idle.set()

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """``(slot, key)`` of the blocks found when opening (``scan_on_open``), else ``[]``.

        The blocks are not verified here; a read verifies each one.
        """
        self._open()
        return list(self._recovered)

    async def _scan(self, client: RedisClient) -> list[tuple[int, BlockKey]]:
        pattern, limit = self._keys.pattern(), self._num_slots
        return list(enumerate(await self._commands.scan(client, pattern, limit, self._keys.key_of)))
