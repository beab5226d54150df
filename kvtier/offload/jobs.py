"""The transfer jobs of the offload manager: coroutines run by its runtime.

A job moves bytes through the :class:`~kvtier.transfer.TransferPipeline` and
reports one outcome, whatever happens (success, failure or cancellation); it
touches no bookkeeping. The manager applies the outcome on the engine's
thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtier.errors import BlockMissingError, TransferCancelledError
from kvtier.offload._state import Demotion, LoadEvent, LoadOutcome, StoreEvent, StoreOutcome
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.transfer import LoadTask, StoreTask, TransferPipeline

__all__ = ["run_load", "run_store"]

Push = Callable[[StoreOutcome | LoadOutcome], None]


async def _demote(
    pipeline: TransferPipeline, tiers: Sequence[BlockStore], demotion: Demotion
) -> bool:
    task = StoreTask(
        tiers[demotion.level],
        demotion.src_slots,
        tiers[demotion.level + 1],
        demotion.dst_slots,
        demotion.keys,
    )
    try:
        await (await pipeline.submit(task))
    except Exception:  # the evicted blocks are lost, as without a lower tier
        return False
    return True


async def run_store(
    pipeline: TransferPipeline,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    push: Push,
    event: StoreEvent,
) -> None:
    """Demote what the event's slots held, then copy its device blocks down."""
    demoted: list[bool] = []
    error: BaseException | None = TransferCancelledError(f"store event {event.event_id} cancelled")
    seconds = 0.0
    try:
        for demotion in event.demotions:
            demoted.append(await _demote(pipeline, tiers, demotion))
        task = StoreTask(device, event.block_ids, tiers[0], event.slots, event.keys)
        seconds = (await (await pipeline.submit(task))).seconds
        error = None
    except Exception as exc:
        error = exc
    finally:
        missing = len(event.demotions) - len(demoted)
        push(StoreOutcome(event.event_id, error, (*demoted, *([False] * missing)), seconds))


async def run_load(
    pipeline: TransferPipeline,
    device: BlockStore,
    tiers: Sequence[BlockStore],
    push: Push,
    event: LoadEvent,
) -> None:
    """Stage blocks held only by slower tiers into the first, then load them all."""
    error: BaseException | None = TransferCancelledError(f"load event {event.event_id} cancelled")
    missing: tuple[tuple[int, BlockKey], ...] = ()
    level, by_slot = 0, dict(zip(event.first_slots, event.keys, strict=True))
    demoted: list[bool] = []
    seconds = 0.0
    try:
        for demotion in event.demotions:
            demoted.append(await _demote(pipeline, tiers, demotion))
        for stage in event.stages:
            level, by_slot = stage.level, dict(zip(stage.src_slots, stage.keys, strict=True))
            task = LoadTask(tiers[level], stage.src_slots, tiers[0], stage.dst_slots, stage.keys)
            seconds += (await (await pipeline.submit(task))).seconds
        level, by_slot = 0, dict(zip(event.first_slots, event.keys, strict=True))
        ids = [block.block_id for block in event.targets]
        task = LoadTask(tiers[0], event.first_slots, device, ids, event.keys)
        seconds += (await (await pipeline.submit(task))).seconds
        error = None
    except BlockMissingError as exc:
        error = exc
        slots = exc.slots or tuple(by_slot)
        missing = tuple((level, by_slot[slot]) for slot in slots if slot in by_slot)
    except Exception as exc:
        error = exc
    finally:
        unrun = [False] * (len(event.demotions) - len(demoted))
        outcome = LoadOutcome(
            event.event_id, event.request_id, error, missing, (*demoted, *unrun), seconds
        )
        push(outcome)
