"""The transfer jobs of the offload manager: coroutines run by its runtime.

A job moves bytes through the :class:`~kvtier.transfer.TransferPipeline` and
reports one outcome, whatever happens (success, failure or cancellation); it
touches no bookkeeping. The manager applies the outcome on the engine's
thread. A job cancelled while a copy it posted is queued or running reports
only once that copy has ended (:func:`_transfer`): the outcome frees device
blocks and slots, which the copy must be done with.

A load whose source blocks prove missing or corrupt (``BlockMissingError``)
discards them from their tier before it reports (:func:`discard`): their
slots are still pinned then, so no store of this process can have been given
them yet, and the outcome that frees them in the index finds the tier rid of
them (a disk tier's file deleted, instead of lingering until the slot is
rewritten). A shared tier (Redis) is left alone: other engines write there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import attrs

from kvtier.completion import CompletionState
from kvtier.errors import BlockMissingError, TransferCancelledError
from kvtier.log import get_logger
from kvtier.offload._state import Demotion, LoadEvent, LoadOutcome, StoreEvent, StoreOutcome
from kvtier.tasks import TransferResult, TransferTask
from kvtier.tiers.base import BlockKey, BlockStore, ProbingStore
from kvtier.transfer import LoadTask, StoreTask, TransferPipeline

__all__ = ["discard", "discard_unrun", "run_load", "run_store"]

Push = Callable[[StoreOutcome | LoadOutcome], None]
Ready = Callable[[], Awaitable[None]]
"""What a job awaits before its first copy (the engine's work it must follow)."""

_log = get_logger("kvtier.offload")


async def _transfer(pipeline: TransferPipeline, task: TransferTask) -> TransferResult:
    """Post ``task`` and await it; when cancelled, first wait for the copy to end.

    Cancelling the job does not cancel the pipeline's copy (it runs in the
    pipeline's task group, maybe in a worker thread): waiting for its
    completion, shielded, keeps the job's outcome from releasing memory the
    copy still reads or writes. The wait is bounded by the copy itself.
    """
    completion = await pipeline.submit(task)
    try:
        return await completion
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await completion.settled()
        raise


async def _demote(
    pipeline: TransferPipeline,
    tiers: Sequence[BlockStore],
    demotion: Demotion,
    demoted: list[float | None],
) -> None:
    """Copy evicted blocks one tier down; append the copy's seconds, or None if it failed.

    Once the copy is posted its outcome is appended even when the job is
    cancelled meanwhile (after the copy ended, as :func:`_transfer` waits):
    it ran. Cancelled before that, nothing is appended: it never ran.
    """
    task = StoreTask(
        tiers[demotion.level],
        demotion.src_slots,
        tiers[demotion.level + 1],
        demotion.dst_slots,
        demotion.keys,
    )
    below = tiers[demotion.level + 1]
    try:
        completion = await pipeline.submit(task)
    except Exception:  # refused: the evicted blocks are lost, as without a lower tier
        demoted.append(None)
        await discard(below, demotion.dst_slots)
        return
    try:
        demoted.append((await completion).seconds)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await completion.settled()
        copied = completion.state is CompletionState.DONE
        demoted.append(completion.result().seconds if copied else None)
        if not copied:
            await discard(below, demotion.dst_slots)
        raise
    except Exception:  # failed: lost, as above
        demoted.append(None)
        await discard(below, demotion.dst_slots)


async def discard(tier: BlockStore, slots: list[int]) -> None:
    """Discard blocks the index is about to forget; a failure is only logged.

    Blocks a load found missing or corrupt, and the slots of a write that
    failed: a disk tier keeps the blocks of a batch that were written, and a
    file the index does not know of would outlive a reset (come back on a
    warm restart after the weights changed).

    Shielded: a cancelled job still finishes the discard (bounded by the
    tier's own call) before it reports, and so before their slots are freed.
    Not on a shared tier (a :class:`~kvtier.tiers.base.ProbingStore`): its
    names are the blocks' keys, which another engine may have stored afresh
    since; deleting them would delete its block.
    """
    if not slots or isinstance(tier, ProbingStore):
        return
    with anyio.CancelScope(shield=True):
        try:
            await tier.discard(slots)
        except Exception as exc:  # the index forgets them all the same
            _log.warning("discard_failed", tier=tier.name, slots=slots, error=repr(exc))


async def run_store(
    pipeline: TransferPipeline,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    push: Push,
    event: StoreEvent,
    *,
    ready: Ready | None = None,
) -> None:
    """Demote what the event's slots held, then copy its device blocks down.

    ``ready`` is awaited first; if it fails, so does the store.
    """
    dst = tiers[event.level]
    demoted: list[float | None] = []
    error: BaseException | None = TransferCancelledError(f"store event {event.event_id} cancelled")
    seconds = 0.0
    try:
        if ready is not None:
            await ready()
        for demotion in event.demotions:
            await _demote(pipeline, tiers, demotion, demoted)
        task = StoreTask(device, event.block_ids, dst, event.slots, event.keys)
        seconds = (await _transfer(pipeline, task)).seconds
        error = None
    except Exception as exc:
        error = exc
    finally:
        if error is not None:  # the index aborts all: some may be written, or hold old blocks
            await discard_unrun(tiers, event.demotions[len(demoted) :])
            await discard(dst, list(event.slots))
        push(StoreOutcome(event.event_id, error, tuple(demoted), seconds))


async def discard_unrun(tiers: Sequence[BlockStore], demotions: Sequence[Demotion]) -> None:
    """Discard the destination slots of demotions that never ran.

    A reserved slot may still hold the block evicted from it: the index
    frees the slot uncounted when it aborts the demotion, and a disk file
    left there would outlive a reset (and come back at a warm restart).
    """
    for demotion in demotions:
        await discard(tiers[demotion.level + 1], demotion.dst_slots)


@attrs.frozen
class _Leg:
    """One copy of a load: from tier ``level`` into the first tier or the device."""

    level: int
    src_slots: list[int]
    to_device: bool
    dst_slots: list[int]
    keys: list[BlockKey]


def _legs(event: LoadEvent, keep: set[BlockKey] | None = None) -> list[_Leg]:
    """The event's copies in order: staging up into the first tier, then into the device.

    A staged block without a first-tier slot (-1: the first tier holds it
    already, or had no room) goes from its tier straight into the device.
    With ``keep``, only the copies of those keys.
    """
    target = {key: block.block_id for key, block in zip(event.keys, event.targets, strict=True)}
    legs = []
    for stage in event.stages:
        rows = list(zip(stage.src_slots, stage.keys, stage.dst_slots, strict=True))
        if keep is not None:
            rows = [row for row in rows if row[1] in keep]
        up = [row for row in rows if row[2] >= 0]
        if up:
            legs.append(_leg(stage.level, up, to_device=False))
        direct = [(slot, key, target[key]) for slot, key, dst in rows if dst < 0]
        if direct:
            legs.append(_leg(stage.level, direct, to_device=True))
    first = [
        (slot, key, target[key])
        for slot, key in zip(event.first_slots, event.keys, strict=True)
        if slot >= 0 and (keep is None or key in keep)
    ]
    if first:
        legs.append(_leg(0, first, to_device=True))
    return legs


def _leg(level: int, rows: list[tuple[int, BlockKey, int]], *, to_device: bool) -> _Leg:
    """A leg from ``(source slot, key, destination slot)`` rows."""
    return _Leg(
        level,
        [row[0] for row in rows],
        to_device,
        [row[2] for row in rows],
        [row[1] for row in rows],
    )


async def run_load(
    pipeline: TransferPipeline,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    push: Push,
    event: LoadEvent,
    *,
    ready: Ready | None = None,
) -> None:
    """Stage blocks held only by slower tiers into the first, then load them all.

    ``ready`` is awaited first; if it fails, so does the load. When a copy
    finds source blocks missing or corrupt, the positions before the first
    bad one are copied again by that copy and the ones after it (the failed
    copy may have left any of its blocks unwritten; the ones before it
    ended), and, once they arrive, reported loaded (``cut``): the engine
    recomputes only from the first bad position.
    """
    error: BaseException | None = TransferCancelledError(f"load event {event.event_id} cancelled")
    missing: list[tuple[int, BlockKey]] = []
    demoted: list[float | None] = []
    seconds: dict[int, float] = {}  # per source tier level
    cut: int | None = None
    try:
        if ready is not None:
            await ready()
        for demotion in event.demotions:
            await _demote(pipeline, tiers, demotion, demoted)
        keep: set[BlockKey] | None = None  # None: every key
        bad_at: int | None = None  # the first position found bad
        done: set[tuple[int, bool]] = set()  # legs whose copy ended: kept keys arrived
        while failed := await _copy(pipeline, device, tiers, event, keep, seconds, done):
            leg, missed = failed
            bad = await _bad_sources(tiers, leg, missed, missing)
            places = [p for k, p in zip(event.keys, event.positions, strict=True) if k in bad]
            if not places:
                raise missed
            # The keys copied were all before bad_at: it only moves back.
            bad_at = min(places) if bad_at is None else min(bad_at, *places)
            keep = {k for k, p in zip(event.keys, event.positions, strict=True) if p < bad_at}
            if not keep:
                raise missed
            error = missed
        if bad_at is None:
            error = None
        cut = bad_at
    except BlockMissingError as exc:
        error = exc
    except Exception as exc:
        error = exc
    finally:
        if error is not None:  # staged copies the index will abort: any may be written
            await discard_unrun(tiers, event.demotions[len(demoted) :])
            await discard(tiers[0], _unkept_stages(event, cut))
        outcome = LoadOutcome(
            event.event_id,
            event.request_id,
            error,
            tuple(missing),
            tuple(demoted),
            tuple(seconds.items()),
            cut,
        )
        push(outcome)


def _unkept_stages(event: LoadEvent, cut: int | None) -> list[int]:
    """First-tier slots of the staged blocks at or after ``cut`` (all when None)."""
    kept = (
        set()
        if cut is None
        else {key for key, place in zip(event.keys, event.positions, strict=True) if place < cut}
    )
    return [
        slot
        for stage in event.stages
        for key, slot in zip(stage.keys, stage.dst_slots, strict=False)
        if slot >= 0 and key not in kept
    ]


async def _copy(
    pipeline: TransferPipeline,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    event: LoadEvent,
    keep: set[BlockKey] | None,
    seconds: dict[int, float],
    done: set[tuple[int, bool]],
) -> tuple[_Leg, BlockMissingError] | None:
    """Run the event's legs (of the ``keep`` keys); the first that found blocks bad, or None.

    Legs in ``done`` (a leg is its source level and whether it goes to the
    device) are skipped: their copy ended, every key of theirs arrived, and
    no later leg overwrites what they wrote. Each leg that ends joins
    ``done``; its time is added to ``seconds`` (per source tier level).
    """
    for leg in _legs(event, keep):
        if (leg.level, leg.to_device) in done:
            continue
        dst = device if leg.to_device else tiers[0]
        task = LoadTask(tiers[leg.level], leg.src_slots, dst, leg.dst_slots, leg.keys)
        try:
            took = (await _transfer(pipeline, task)).seconds
        except BlockMissingError as exc:
            return leg, exc
        seconds[leg.level] = seconds.get(leg.level, 0.0) + took
        done.add((leg.level, leg.to_device))
    return None


async def _bad_sources(
    tiers: Sequence[BlockStore],
    leg: _Leg,
    exc: BlockMissingError,
    missing: list[tuple[int, BlockKey]],
) -> set[BlockKey]:
    """The keys a failed copy found bad (all of its blocks when it named none).

    Adds them to ``missing`` and discards them from their tier first.
    """
    by_slot = dict(zip(leg.src_slots, leg.keys, strict=True))
    bad = [slot for slot in dict.fromkeys(exc.slots or leg.src_slots) if slot in by_slot]
    missing.extend((leg.level, by_slot[slot]) for slot in bad)
    await discard(tiers[leg.level], bad)  # still pinned: no store can reuse them yet
    return {by_slot[slot] for slot in bad}
