"""How a transfer task ends: its ledgers settled, its completion resolved, a log line.

Used by :class:`~kvtier.transfer.TransferPipeline`'s workers once a task's
copy has succeeded or failed (the pipeline forgets the task's claims first).
"""

from __future__ import annotations

from kvtier.claims import ledger_call, settle
from kvtier.completion import Completion
from kvtier.errors import BlockMissingError, LedgerError
from kvtier.log import get_logger
from kvtier.tasks import TransferResult, TransferTask

__all__ = ["fail", "finish"]

_log = get_logger("kvtier.transfer")


def fail(task: TransferTask, completion: Completion[TransferResult], exc: Exception) -> None:
    """Settle a task whose copy failed with ``exc`` and fail its completion.

    Source blocks that failed verification (``exc`` a :class:`BlockMissingError`
    naming them, or every source block when it names none) are removed from
    the source's ledger: a miss from then on.
    """
    if isinstance(exc, BlockMissingError) and task.src_ledger is not None:
        missing = set(exc.slots) or set(task.src_slots)
        ledger_call(
            task.src_ledger.remove,
            [k for k, s in zip(task.keys, task.src_slots, strict=True) if s in missing],
        )
    settle(task, ok=False)
    completion.set_error(exc)
    _log.warning(
        "transfer_failed",
        task=completion.name,
        tier=f"{task.src.name}->{task.dst.name}",
        n_blocks=task.num_blocks,
        error=repr(exc),
    )


def finish(task: TransferTask, completion: Completion[TransferResult], seconds: float) -> None:
    """Settle a task whose copy succeeded and resolve its completion.

    An index that refuses to record the transfer fails it with a
    :class:`~kvtier.errors.LedgerError` (the bytes moved, but nothing may
    read them).
    """
    refused = settle(task, ok=True)
    if refused is not None:
        error = LedgerError(f"transfer {completion.name}: an index refused it: {refused!r}")
        error.__cause__ = refused
        completion.set_error(error)
        return
    size = task.num_blocks * task.src.layout.block_bytes
    completion.set_result(
        TransferResult(completion.name, task.direction, task.num_blocks, size, seconds)
    )
    _log.debug(
        "transfer_done",
        task=completion.name,
        tier=f"{task.src.name}->{task.dst.name}",
        n_blocks=task.num_blocks,
        bytes=size,
        seconds=seconds,
    )
