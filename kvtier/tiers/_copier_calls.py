"""The batched copy calls shared by the tiers whose blocks a RowCopier moves.

:class:`CopierCalls` gives the device and CPU tiers their four copy calls
(``read_into``, ``write_from`` and the *parts* forms), each checking its
arguments the same way before the tier's :class:`~kvtier.tiers._copy.RowCopier`
moves the bytes. A tier provides its name, slot count, bytes per block and
the copier while open (:meth:`CopierCalls._live_copier`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from kvtier.tiers._checks import check_buffer, check_parts, check_slots
from kvtier.tiers._copy import RowCopier
from kvtier.tiers.base import BlockKey

__all__ = ["CopierCalls"]


class CopierCalls(abc.ABC):
    """Batched reads and writes of rows through a :class:`RowCopier`.

    Keys are checked for count only: these tiers neither store nor verify them
    (the tier index and the device prefix cache own them).
    """

    _name: str
    _num_slots: int
    _block_bytes: int

    @abc.abstractmethod
    def _live_copier(self) -> RowCopier:
        """The copier of an open tier.

        Raises:
            ClosedError: The tier is not open.
        """

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        """Copy the blocks in ``slots`` into ``out`` in canonical byte order.

        Args:
            slots: Slots to read (any order; repeats allowed).
            keys: One key per slot.
            out: ``uint8 [len(slots), block_bytes]``; may be a strided view and
                may live on another device (pinned, contiguous host memory is
                the fast path from CUDA).

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: Bad slot, buffer shape/dtype, or key count.
            TierIOError: The copy failed.
        """
        copier = self._live_copier()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        out = check_buffer(out, slot_list, keys, self._block_bytes, tier=self._name)
        await copier.read(slot_list, out)

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Store ``data`` (canonical byte order) into ``slots``.

        Args:
            slots: Slots to write (any order, each at most once).
            keys: One key per slot.
            data: ``uint8 [len(slots), block_bytes]``; may be a strided view and
                may live on another device.

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: Bad or repeated slot, buffer shape/dtype, or
                key count.
            TierIOError: The copy failed.
        """
        copier = self._live_copier()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        data = check_buffer(data, slot_list, keys, self._block_bytes, tier=self._name)
        await copier.write(slot_list, data)

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Copy the blocks in ``slots`` into several buffers, in one call.

        The same as ``read_into(slots[a:b], keys[a:b], part)`` for each part
        in turn (``parts[0]`` takes the first ``parts[0].shape[0]`` blocks, the
        next part the blocks after them), but with one check, one copy call
        and one wait: the pipeline's :class:`~kvtier.mover.BlockMover` passes
        the scattered runs of the other tier's slots this way.

        Args:
            slots: Slots to read (any order; repeats allowed).
            keys: One key per slot.
            parts: ``uint8 [rows, block_bytes]`` buffers whose rows add up to
                ``len(slots)``; each may be strided and on another device; no
                two may share memory.

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: Bad slot, part shape/dtype, row total, key
                count, or parts sharing memory.
            TierIOError: The copy failed.
        """
        copier = self._live_copier()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        buffers = check_parts(
            parts, slot_list, keys, self._block_bytes, tier=self._name, written=True
        )
        await copier.read_parts(slot_list, buffers)

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Store several buffers into ``slots``, in one call.

        The same as ``write_from(slots[a:b], keys[a:b], part)`` for each part
        in turn, with one check, one copy call and one wait.

        Args:
            slots: Slots to write (any order, each at most once).
            keys: One key per slot.
            parts: ``uint8 [rows, block_bytes]`` buffers whose rows add up to
                ``len(slots)``; each may be strided and on another device.

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: Bad or repeated slot, part shape/dtype, row
                total, or key count.
            TierIOError: The copy failed.
        """
        copier = self._live_copier()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        buffers = check_parts(
            parts, slot_list, keys, self._block_bytes, tier=self._name, written=False
        )
        await copier.write_parts(slot_list, buffers)
