"""The batched reads and writes of :class:`~kvtier.tiers.redis.RedisTier`.

:class:`RedisCalls` gives the tier its four calls (``read_into``,
``write_from`` and the *parts* forms): each checks its arguments (slots,
buffers, then keys) and hands the rows to the tier's
:class:`~kvtier.tiers.redis_batch.RedisBatches`, which frames, verifies and
sends them. The tier provides the open client (:meth:`RedisCalls._open`),
runs each call as one that closing the tier ends (:meth:`RedisCalls._run`)
and holds the state named on the class.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import torch

from kvtier.tiers.base import BlockKey
from kvtier.tiers.redis_batch import RedisBatches
from kvtier.tiers.redis_client import RedisClient

__all__ = ["RedisCalls"]

_T = TypeVar("_T")


class RedisCalls(abc.ABC):
    """Reads and writes of blocks by key, through a tier's :class:`RedisBatches`."""

    _batches: RedisBatches
    _framed: bool
    _slot_keys: dict[int, BlockKey]
    _checked: Callable[..., tuple[list[int], list[torch.Tensor]]]

    @abc.abstractmethod
    def _open(self) -> RedisClient:
        """The client of an open tier.

        Raises:
            ClosedError: The tier is not open.
        """

    @abc.abstractmethod
    async def _run(self, call: Callable[[RedisClient], Awaitable[_T]]) -> _T:
        """``call(client)`` on the open client, ended if the tier closes meanwhile.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
        """

    async def _store(
        self, slot_list: list[int], keys: Sequence[BlockKey], parts: list[torch.Tensor]
    ) -> None:
        self._open()
        for slot, key in zip(slot_list, keys, strict=True):
            self._slot_keys[slot] = key
        await self._run(
            lambda client: self._batches.store_parts(client, keys, parts, framed=self._framed)
        )

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Store ``data``'s rows as the blocks ``keys`` (``slots`` are remembered).

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: Bad slots, keys or buffer.
            TierIOError: The server failed, timed out or refused a block (for
                example out of memory); blocks of other chunks may be stored.
        """
        self._open()
        slot_list, parts = self._checked(slots, keys, data, one=True, written=False)
        await self._store(slot_list, keys, parts)

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Store several buffers' rows, taken in order, as the blocks ``keys``, in one call.

        Each row is framed straight from its part (the pipeline's mover
        passes the CPU tier's runs this way: no staging copy).

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: Bad slots, keys or parts (rows not adding up
                to ``len(slots)``).
            TierIOError: As for :meth:`write_from`.
        """
        self._open()
        slot_list, checked = self._checked(slots, keys, parts, one=False, written=False)
        await self._store(slot_list, keys, checked)

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        """Read and verify the blocks ``keys`` into ``out``'s rows.

        On any error ``out``'s rows hold undefined bytes.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: Bad slots, keys or buffer.
            BlockMissingError: Blocks absent (evicted, expired, never stored
                or lost with a restarted server) or failing verification.
            TierIOError: The server failed or timed out.
        """
        self._open()
        slot_list, parts = self._checked(slots, keys, out, one=True, written=True)
        await self._run(lambda client: self._batches.load_parts(client, slot_list, keys, parts))

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Read and verify the blocks ``keys`` into several buffers' rows, taken in order.

        One call; each payload is copied straight into its part's row when
        the part is host memory with contiguous rows (the CPU tier's runs).
        When blocks are missing, the others are filled before the error.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: Bad slots, keys or parts (rows not adding up
                to ``len(slots)``, or parts sharing memory).
            BlockMissingError: As for :meth:`read_into`.
            TierIOError: The server failed or timed out.
        """
        self._open()
        slot_list, checked = self._checked(slots, keys, parts, one=False, written=True)
        await self._run(lambda client: self._batches.load_parts(client, slot_list, keys, checked))
