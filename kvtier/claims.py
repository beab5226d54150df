"""A pipeline's dealings with the tiers' ledgers (the indexes' reservations and pins).

:func:`check_ledger` asks a ledger, before a task is queued, whether the
task's slots are reserved or pinned; :class:`Claims` keeps two queued tasks
from spending one reservation or pin; :func:`settle` commits, aborts and
unpins when a task ends, each call on its own so that one ledger that raises
strands nothing.

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
from kvtier.log import get_logger
from kvtier.tasks import SlotLedger, TransferTask
from kvtier.tiers.base import BlockKey, keys_text

__all__ = ["Claims", "check_ledger", "ledger_call", "settle"]

_log = get_logger("kvtier.transfer")


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


def check_ledger(
    ledger: SlotLedger | None, keys: Sequence[BlockKey], slots: Sequence[int], *, written: bool
) -> None:
    """Ask a ledger that can check slots (``check_task_slots``) whether the task may run."""
    check = getattr(ledger, "check_task_slots", None)
    if check is not None:
        check(keys, slots, written=written)


def settle(task: TransferTask, *, ok: bool) -> Exception | None:
    """Release the task's pins and reservations; the first ledger error, never raised.

    Each ledger call is tried on its own, so one that raises cannot keep the
    others from releasing, stop a worker, or strand the tasks queued behind.
    """
    refused: Exception | None = None
    if task.dst_ledger is not None:
        ledger = task.dst_ledger
        call = ledger.commit if ok else ledger.abort
        refused = _settle_keys(call, ledger, task.keys, task.dst_slots, written=True)
    if task.src_ledger is not None:
        ledger = task.src_ledger
        unpinned = _settle_keys(ledger.unpin, ledger, task.keys, task.src_slots, written=False)
        refused = refused or unpinned
    return refused


def _settle_keys(
    call: Callable[[Sequence[BlockKey]], object],
    ledger: SlotLedger,
    keys: Sequence[BlockKey],
    slots: Sequence[int],
    *,
    written: bool,
) -> Exception | None:
    """``call`` for the keys the ledger still holds for this task; the first error.

    A ledger that can check slots (``check_task_slots``, a ``TierIndex``) is
    asked first: a key it no longer holds at the task's slot (aborted or
    unpinned by a caller's slip while the copy ran, then perhaps reserved or
    pinned again for another transfer) is left out, since committing,
    aborting or unpinning it by key would settle the other transfer's
    reservation or pin (a commit would make a slot this copy never wrote
    visible). A key reserved again *at the same slot* cannot be told apart
    (an index keeps no generations of a reservation): its settle spends the
    new reservation, so the other writer's own commit is refused; the slot
    holds that key's bytes from this copy. Else a call refused as a whole is
    made again key by key (a
    ledger refuses whole: :class:`~kvtier.tasks.SlotLedger`), so one bad key
    strands no other.
    """
    check = getattr(ledger, "check_task_slots", None)
    if check is not None and _refuses(check, keys, slots, written):
        held: list[BlockKey] = []
        gone: list[BlockKey] = []
        for key, slot in zip(keys, slots, strict=True):
            (gone if _refuses(check, [key], [slot], written) else held).append(key)
        name = getattr(call, "__name__", "?")
        refusal = InvalidRequestError(
            f"{name}: {len(gone)} of {len(keys)} keys are no longer "
            f"{'reserved' if written else 'pinned'} at this transfer's slots, "
            f"left alone (first: {keys_text(gone[:1])})"
        )
        _log.error("transfer_ledger_failed", call=name, error=repr(refusal))
        if held:
            ledger_call(call, held)
        return refusal
    refused = ledger_call(call, keys)
    if refused is not None and len(keys) > 1:
        for key in keys:
            ledger_call(call, [key])
    return refused


def _refuses(
    check: Callable[..., object], keys: Sequence[BlockKey], slots: Sequence[int], written: bool
) -> bool:
    try:
        check(keys, slots, written=written)
    except Exception:  # InvalidRequestError, or a ledger's own bug: not held
        return True
    return False


def ledger_call(
    call: Callable[[Sequence[BlockKey]], object], keys: Sequence[BlockKey]
) -> Exception | None:
    """``call(keys)``; the exception it raised (logged), never raised, else None."""
    try:
        call(keys)
    except Exception as exc:  # a ledger's bug or a caller's slip: logged, reported
        _log.error("transfer_ledger_failed", call=getattr(call, "__name__", "?"), error=repr(exc))
        return exc
    return None
