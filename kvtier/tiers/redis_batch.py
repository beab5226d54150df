"""RedisBatches: a batch of blocks stored to or loaded from Redis, chunk by chunk.

Each block's bytes go between Redis and a row given as a ``memoryview`` (a
row of the caller's buffer, or of one of several parts): stores frame the
rows into pooled values (:mod:`kvtier.tiers.redis_values`), loads verify
every value and copy its payload into the row. Chunks of ``batch_size``
blocks are round trips; up to ``concurrency`` run at once
(:class:`~kvtier.tiers.redis_io.RedisCommands`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvtier.errors import BlockMissingError, TierIOError
from kvtier.log import get_logger
from kvtier.tiers._checks import copy_back, part_row_views
from kvtier.tiers.base import BlockKey
from kvtier.tiers.redis_client import RedisClient
from kvtier.tiers.redis_format import KeyFormat
from kvtier.tiers.redis_io import RedisCommands
from kvtier.tiers.redis_values import ValueBuffers, take_value

__all__ = ["RedisBatches", "RowBytes"]

_log = get_logger("kvtier.tiers.redis")

RowBytes = Callable[[int], memoryview]
"""``index -> the bytes of block index's row`` (CPU memory, contiguous)."""


class RedisBatches:
    """Stores and loads of one Redis tier's blocks, from and into row views.

    Args:
        name: The tier's name (for errors and logs).
        keys: How block keys become Redis names.
        commands: The tier's round trips.
        values: The tier's pooled store buffers.
        block_bytes: Payload bytes per block.
    """

    def __init__(
        self,
        name: str,
        keys: KeyFormat,
        commands: RedisCommands,
        values: ValueBuffers,
        block_bytes: int,
    ) -> None:
        self._name = name
        self._keys = keys
        self._commands = commands
        self._values = values
        self._block_bytes = block_bytes

    async def store_parts(
        self,
        client: RedisClient,
        keys: Sequence[BlockKey],
        parts: Sequence[torch.Tensor],
        *,
        framed: bool,
    ) -> None:
        """Store the rows of ``parts`` (taken in order) as the blocks ``keys``.

        Rows of host parts are framed where they are; other parts (on a
        device, or strided within a row) are copied to the host first. Each
        row goes out as a view that keeps its part alive
        (:func:`~kvtier.tiers._checks.tensor_bytes`): the socket writer may
        still hold it after a cancelled or failed round trip, when this copy
        is otherwise gone.

        Raises:
            TierIOError: As for :meth:`store`.
        """
        host = [part if _on_host(part) else part.to("cpu").contiguous() for part in parts]
        await self.store(client, keys, part_row_views(host), framed=framed)

    async def load_parts(
        self,
        client: RedisClient,
        slots: Sequence[int],
        keys: Sequence[BlockKey],
        parts: Sequence[torch.Tensor],
    ) -> None:
        """Load and verify the blocks ``keys`` into the rows of ``parts``, taken in order.

        Payloads land straight in host parts; other parts are filled from a
        host copy once the round trips end (also when blocks are missing: the
        others are filled; on other errors the rows are undefined).

        Raises:
            BlockMissingError: As for :meth:`load`.
            TierIOError: As for :meth:`load`.
        """
        targets = [
            part if _on_host(part) else torch.empty(part.shape, dtype=torch.uint8) for part in parts
        ]
        try:
            await self.load(client, slots, keys, part_row_views(targets))
        except BlockMissingError:
            copy_back(parts, targets)  # the blocks that loaded are filled, as promised
            raise
        copy_back(parts, targets)

    async def store(
        self,
        client: RedisClient,
        keys: Sequence[BlockKey],
        payloads: RowBytes,
        *,
        framed: bool,
    ) -> None:
        """Store block ``i`` as ``keys[i]`` from ``payloads(i)``.

        Raises:
            TierIOError: The server failed, timed out or refused a block;
                blocks of other chunks may be stored.
        """
        fingerprint = self._keys.fingerprint

        async def work(begin: int, end: int) -> None:
            names = [self._keys.name(keys[index]) for index in range(begin, end)]
            chunk = [(keys[index], payloads(index)) for index in range(begin, end)]
            values, pooled = self._values.frame(chunk, fingerprint, packed=framed)
            replies = await self._commands.set(client, names, values)
            failed = [reply for reply in replies if isinstance(reply, Exception)]
            if failed:
                raise TierIOError(
                    f"tier {self._name}: the server refused {len(failed)} of "
                    f"{len(names)} blocks: {failed[0]}",
                    tier=self._name,
                ) from failed[0]
            self._values.give_back(pooled)  # only after a whole, successful round trip

        await self._commands.chunks(len(keys), work)

    async def load(
        self,
        client: RedisClient,
        slots: Sequence[int],
        keys: Sequence[BlockKey],
        targets: RowBytes,
    ) -> None:
        """Load and verify block ``i`` (``keys[i]``, in ``slots[i]``) into ``targets(i)``.

        Raises:
            BlockMissingError: Blocks absent or failing verification (their
                slots, named together after the others were loaded).
            TierIOError: The server failed or timed out.
        """
        fingerprint = self._keys.fingerprint
        missing: list[int] = []

        async def work(begin: int, end: int) -> None:
            names = [self._keys.name(keys[index]) for index in range(begin, end)]
            values = await self._commands.get(client, names)
            for index, value in zip(range(begin, end), values, strict=True):
                payload = take_value(value, keys[index], fingerprint, self._block_bytes, self._name)
                if payload is None:
                    missing.append(slots[index])
                else:
                    targets(index)[:] = payload

        await self._commands.chunks(len(keys), work)
        if missing:
            _log.debug("tier_miss", tier=self._name, n_blocks=len(missing))
            raise BlockMissingError.of_slots(self._name, missing)


def _on_host(part: torch.Tensor) -> bool:
    """Whether a part's rows are host memory that a ``memoryview`` covers row by row."""
    return part.device.type == "cpu" and part.stride(1) == 1
