"""Transfer tasks and results: the values posted to and returned by the pipeline.

A :class:`StoreTask` copies blocks down the stack, a :class:`LoadTask` back
up; each names its source and destination tiers, their slots, the blocks'
keys, and the :class:`SlotLedger` (usually a
:class:`~kvtier.tiers.index.TierIndex`) that the pipeline settles when the
task ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import attrs

from kvtier.errors import InvalidRequestError
from kvtier.tiers._checks import slot_index
from kvtier.tiers.base import BlockKey, BlockStore

__all__ = ["Direction", "LoadTask", "SlotLedger", "StoreTask", "TransferResult", "TransferTask"]

Direction = Literal["store", "load"]
"""``"store"`` (down the stack) or ``"load"`` (back up)."""


class SlotLedger(Protocol):
    """The slot bookkeeping a task settles when it ends (a ``TierIndex``).

    A ledger may also offer ``check_task_slots(keys, slots, *, written)``
    (``TierIndex`` does): the pipeline then calls it before queuing a task,
    for the source (``written=False``: each key pinned at its slot) and the
    destination (``written=True``: each key reserved at its slot), so a
    task posted without them fails at once with ``InvalidRequestError``
    instead of copying into slots it does not own.

    When a task ends, a ledger with ``check_task_slots`` is asked again, and
    the keys it no longer holds at the task's slots (released by a caller's
    slip while the copy ran, perhaps reserved again elsewhere) are left out
    of the commit, abort or unpin, so another transfer's reservation or pin
    at another slot is never settled by key (one at the same slot cannot be
    told apart: the index keeps no generations). A call that raises must
    have changed nothing
    (``TierIndex`` checks every key first): the pipeline then makes the call
    again key by key, so only the bad keys are left.
    """

    def commit(self, keys: Sequence[BlockKey]) -> object:
        """Make the written blocks visible."""
        ...

    def abort(self, keys: Sequence[BlockKey]) -> object:
        """Release reservations of blocks that were not written."""
        ...

    def unpin(self, keys: Sequence[BlockKey]) -> object:
        """Release read pins."""
        ...

    def remove(self, keys: Sequence[BlockKey]) -> object:
        """Drop blocks whose bytes proved missing or corrupt."""
        ...


def _tuple_of_ints(value: Sequence[int]) -> tuple[int, ...]:
    """The slots as ints, refusing what ``int()`` would round or reinterpret.

    Raises:
        InvalidRequestError: A slot is a float, a boolean or not an integer.
    """
    try:
        return tuple(slot_index(v) for v in value)
    except TypeError as exc:
        raise InvalidRequestError(f"slots must be integers: {exc}") from exc


def _tuple_of_keys(value: Sequence[BlockKey]) -> tuple[BlockKey, ...]:
    """The keys as a tuple of ``bytes``.

    Raises:
        InvalidRequestError: A key is not ``bytes`` (a ``bytearray`` or a
            ``memoryview`` cannot be hashed, and batching hashes keys).
    """
    keys = tuple(value)
    if not all(isinstance(key, bytes) for key in keys):
        bad = next(key for key in keys if not isinstance(key, bytes))
        raise InvalidRequestError(f"block keys must be bytes, got {type(bad).__name__}")
    return keys


@attrs.frozen(eq=False)
class TransferTask:
    """Move ``keys`` from ``src_slots`` of ``src`` to ``dst_slots`` of ``dst``.

    Attributes:
        src: The tier read from.
        src_slots: Its slots, one per key.
        dst: The tier written to.
        dst_slots: Its slots, one per key (reserved by the caller).
        keys: The blocks' keys.
        src_ledger: Unpinned when the task ends (``None``: nothing to settle).
        dst_ledger: Committed on success, aborted otherwise.

    Raises:
        InvalidRequestError: Lengths differ, no blocks, a key is not
            ``bytes``, or the tiers' layouts differ.
    """

    direction: Direction = attrs.field(init=False, default="store")
    src: BlockStore
    src_slots: tuple[int, ...] = attrs.field(converter=_tuple_of_ints)
    dst: BlockStore
    dst_slots: tuple[int, ...] = attrs.field(converter=_tuple_of_ints)
    keys: tuple[BlockKey, ...] = attrs.field(converter=_tuple_of_keys)
    src_ledger: SlotLedger | None = None
    dst_ledger: SlotLedger | None = None

    def __attrs_post_init__(self) -> None:
        n = len(self.keys)
        if n == 0:
            raise InvalidRequestError("a transfer task needs at least one block")
        if len(self.src_slots) != n or len(self.dst_slots) != n:
            raise InvalidRequestError(
                f"{len(self.src_slots)} source slots, {len(self.dst_slots)} destination "
                f"slots and {n} keys: they must be equal"
            )
        if self.src.layout != self.dst.layout:
            raise InvalidRequestError(
                f"tier {self.src.name!r} and tier {self.dst.name!r} have different block layouts"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks moved."""
        return len(self.keys)


@attrs.frozen(eq=False)
class StoreTask(TransferTask):
    """Copy blocks down the stack (device → CPU → disk…)."""

    direction: Direction = attrs.field(init=False, default="store")


@attrs.frozen(eq=False)
class LoadTask(TransferTask):
    """Copy blocks back up the stack (toward the device)."""

    direction: Direction = attrs.field(init=False, default="load")


@attrs.frozen
class TransferResult:
    """What a finished task moved.

    Attributes:
        task: The task's name.
        direction: ``"store"`` or ``"load"``.
        n_blocks: Blocks moved.
        bytes: Bytes moved.
        seconds: Wall time of the copy; for tasks batched into one copy, this
            task's share of it, by blocks (so that summed times add up).
    """

    task: str
    direction: Direction
    n_blocks: int
    bytes: int
    seconds: float
