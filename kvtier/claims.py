"""Which reservations and pins the tasks queued in a pipeline have named.

A reservation is spent by one commit or abort, a pin by one unpin. Two tasks
naming one reserved key would both copy into its slot, and when the first
settles, the second's commit is refused as a whole, stranding its other
reservations for good (the second copy may even land in a slot reused
meanwhile). :class:`Claims` refuses such a task when it is submitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from kvtier.errors import InvalidRequestError
from kvtier.tasks import TransferTask
from kvtier.tiers.base import BlockKey, keys_text

__all__ = ["Claims"]


class Claims:
    """The reservations (each spent once) and pins (as often as pinned) of queued tasks.

    A source ledger is tracked when it tells pin counts (``pin_count(key)``,
    as :class:`~kvtier.tiers.index.TierIndex` does); a destination ledger
    always. Set operations keep the common case (keys no other task names)
    at a few hundredths of a microsecond per block.
    """

    def __init__(self) -> None:
        # By the ledger's id: a ledger need not be hashable (an attrs class
        # with ``eq=True`` is not); queued tasks keep their ledgers alive.
        self._reserved: dict[int, set[BlockKey]] = {}
        self._pinned: dict[int, Counter[BlockKey]] = {}

    def take(self, task: TransferTask) -> None:
        """Record the task's claims.

        Raises:
            InvalidRequestError: A reservation another queued task (or this
                one) names already, or a key named by more tasks than it is
                pinned; nothing recorded.
        """
        keys = task.keys
        dst, src = task.dst_ledger, task.src_ledger
        pin_count: Callable[[BlockKey], int] | None = getattr(src, "pin_count", None)
        if dst is not None:
            claimed = self._reserved.get(id(dst), set())
            if len(set(keys)) != len(keys) or not claimed.isdisjoint(keys):
                taken = [key for key in keys if key in claimed] or _repeated(keys)
                raise InvalidRequestError(
                    f"{keys_text(taken[:1])}: its reservation is named by another queued "
                    "transfer (each transfer needs its own reservation)"
                )
        if src is not None and pin_count is not None:
            named = self._pinned.get(id(src), Counter())
            # Each key is pinned at least once (the ledger's check_task_slots):
            # only a key named twice needs its count.
            if len(set(keys)) != len(keys) or not named.keys().isdisjoint(keys):
                for key, count in Counter(keys).items():
                    if named[key] + count > pin_count(key):
                        raise InvalidRequestError(
                            f"{keys_text([key])}: its {pin_count(key)} pin(s) are named by "
                            "more queued transfers (each transfer needs its own pin)"
                        )
            self._pinned.setdefault(id(src), Counter()).update(keys)
        if dst is not None:
            self._reserved.setdefault(id(dst), set()).update(keys)

    def release(self, task: TransferTask) -> None:
        """Forget the task's claims (it was settled, or never queued)."""
        dst, src = task.dst_ledger, task.src_ledger
        if dst is not None and id(dst) in self._reserved:
            claimed = self._reserved[id(dst)]
            claimed.difference_update(task.keys)
            if not claimed:
                del self._reserved[id(dst)]
        if src is not None and id(src) in self._pinned:
            named = self._pinned[id(src)]
            for key in task.keys:
                left = named[key] - 1
                if left > 0:
                    named[key] = left
                else:
                    named.pop(key, None)
            if not named:
                del self._pinned[id(src)]


def _repeated(keys: Sequence[BlockKey]) -> list[BlockKey]:
    """The keys that occur more than once, in order."""
    counts = Counter(keys)
    return [key for key in keys if counts[key] > 1]
