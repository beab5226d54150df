"""The block calls of :class:`~kvtier.tiers.redis.RedisTier`.

:class:`RedisCalls` gives the tier its four calls (``read_into``,
``write_from`` and the *parts* forms): each checks its arguments (slots,
buffers, then keys) and hands the rows to the tier's
:class:`~kvtier.tiers.redis_batch.RedisBatches`, which frames, verifies and
sends them. It also gives the calls of a shared tier (``contains``,
``adopt``, ``discard``), through the tier's
:class:`~kvtier.tiers.redis_io.RedisCommands`. The tier provides the open
client (:meth:`RedisCalls._open`), runs each call as one that closing the
tier ends (:meth:`RedisCalls._run`) and holds the state named on the class.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

import torch

from kvtier.errors import InvalidRequestError
from kvtier.tiers._checks import check_keys, check_slots
from kvtier.tiers.base import BlockKey
from kvtier.tiers.redis_batch import RedisBatches
from kvtier.tiers.redis_client import RedisClient
from kvtier.tiers.redis_format import MAX_KEY_BYTES, KeyFormat
from kvtier.tiers.redis_io import RedisCommands

__all__ = ["RedisCalls"]

_T = TypeVar("_T")


class RedisCalls(abc.ABC):
    """Reads and writes of blocks by key, through a tier's :class:`RedisBatches`."""

    _batches: RedisBatches
    _commands: RedisCommands
    _keys: KeyFormat
    _name: str
    _num_slots: int
    _discard_deletes: bool
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

    # -- shared-tier calls ---------------------------------------------------------------

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each block is in Redis now (it may go at any time), in the order of ``keys``.

        One ``EXISTS`` pipeline per 1,024 keys, at most ``concurrency``
        in flight, each under its own deadline; none for no keys.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: A key is not ``bytes`` of 1..``MAX_KEY_BYTES``.
            TierIOError: The server failed or timed out.
        """
        self._open()
        names = [self._keys.name(key) for key in self._checked_keys(keys)]
        return await self._run(partial(self._commands.exists, names=names))

    def adopt(self, slots: Sequence[int], keys: Sequence[BlockKey]) -> None:
        """Remember that ``slots`` stand for ``keys``, found by :meth:`contains` (for discard).

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: A slot is out of range, a key is not
                ``bytes`` of 1..``MAX_KEY_BYTES``, or the keys are not as many
                as the slots.
        """
        self._open()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        key_list = self._checked_keys(keys)
        if len(key_list) != len(slot_list):
            raise InvalidRequestError(
                f"tier {self._name}: {len(slot_list)} slots but {len(key_list)} keys"
            )
        self._slot_keys.update(zip(slot_list, key_list, strict=True))

    def _checked_keys(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """``keys`` as a list, each checked as reads and writes check theirs.

        Raises:
            InvalidRequestError: ``keys`` is not a sequence, or a key is not
                ``bytes`` of 1..``MAX_KEY_BYTES``.
        """
        try:
            key_list = list(keys)
        except TypeError as exc:
            raise InvalidRequestError(f"tier {self._name}: keys must be a sequence") from exc
        check_keys(key_list, MAX_KEY_BYTES, tier=self._name)
        return key_list

    async def discard(self, slots: Sequence[int]) -> None:
        """Forget the blocks in ``slots`` and, with ``discard_deletes``, delete them.

        The delete is one ``UNLINK`` pipeline per 1,024 blocks, at
        most ``concurrency`` in flight, each under its own deadline; none when
        no slot holds a block this process knows.

        Raises:
            ClosedError: The tier is not open, or was closed during the call.
            InvalidRequestError: A slot is out of range.
            TierIOError: A chunk of the delete failed (every block is forgotten
                all the same; those of other chunks may be deleted or not).
        """
        self._open()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        known = {slot: key for slot in slot_list if (key := self._slot_keys.get(slot)) is not None}
        doomed = [self._keys.name(key) for key in known.values()]  # before forgetting any
        for slot in known:
            del self._slot_keys[slot]
        if not doomed or not self._discard_deletes:
            return
        await self._run(partial(self._commands.unlink, names=doomed))
