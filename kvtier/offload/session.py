"""The offload manager's session: what it opens on entry and settles on exit.

:func:`serve` opens the device tier, every lower tier (entering the blocks a
persistent tier recovers into its index and counting them in the tier's
``restored_blocks``), the transfer pipeline and the task
group the jobs run in; once the jobs ended, before the pipeline and the tiers
close, it deletes what stores still waiting for other workers wrote
(:func:`discard_unreported`) and, on a clean exit with ``flush_on_close``,
flushes the volatile tiers down (:mod:`kvtier.offload.flush`);
:func:`release_all` settles, once the jobs ended, the events that never
finished.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, cast

import anyio

from kvtier.offload import flush, jobs
from kvtier.offload.transfers import Transfers
from kvtier.tiers.base import BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import TransferPipeline

__all__ = ["discard_unreported", "release_all", "serve"]


@asynccontextmanager
async def serve(
    device: BlockStore,
    tiers: Sequence[BlockStore],
    indexes: Sequence[TierIndex],
    pipeline: TransferPipeline,
    transfers: Transfers,
    *,
    flush_on_close: Callable[[], bool] = lambda: False,
) -> AsyncIterator[None]:
    """Open everything the manager owns; jobs start in its task group meanwhile.

    ``flush_on_close()`` is asked at exit, once the jobs ended: whether to
    flush (a synchronous engine's exit by an error reaches here as a clean
    one, so the manager answers False then).
    """
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(cast(Any, device))
        for level, (tier, index) in enumerate(zip(tiers, indexes, strict=True)):
            await stack.enter_async_context(cast(Any, tier))
            recover = getattr(tier, "recover", None)
            if recover is not None:
                found = await recover()
                index.restore(found)
                transfers.tier_stats[level].restored_blocks += len(found)
        await stack.enter_async_context(pipeline)

        async def wind_down(
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> bool:
            transfers.drain()  # the jobs ended: their outcomes first
            await discard_unreported(transfers)
            if exc_type is None and flush_on_close():
                await flush.flush(
                    pipeline,
                    tiers,
                    indexes,
                    transfers.tier_stats,
                    batch_blocks=pipeline.max_batch_blocks,
                )
            return False

        stack.push_async_exit(wind_down)  # after the task group, before the pipeline
        group = await stack.enter_async_context(anyio.create_task_group())
        transfers.runtime.bind(group)
        try:
            yield
        finally:
            transfers.runtime.bind(None)


async def discard_unreported(transfers: Transfers) -> None:
    """Discard what the transfers the close aborts left in their reserved slots.

    :func:`release_all` frees those slots; a lasting tier (a disk file) would
    bring back at a warm restart what they hold, so it is deleted first,
    while the tiers are open:

    - a store still waiting for other workers' reports (tensor parallelism):
      what its local copy wrote (a local copy that failed discarded its
      slots itself);
    - a store or load never dispatched (a store whose ``step_computed`` never
      came): its reservations may have evicted blocks whose files are still
      in those slots, its demotions' destinations included.
    """
    tiers = transfers.tiers
    for event in list(transfers.stores.values()):
        if event.local_done and event.error is None:
            await jobs.discard(tiers[event.level], list(event.slots))
        elif not event.dispatched:
            await jobs.discard_unrun(tiers, event.demotions)
            await jobs.discard(tiers[event.level], list(event.slots))
    for load in list(transfers.loads.values()):
        if not load.dispatched:
            await jobs.discard_unrun(tiers, load.demotions)


def release_all(transfers: Transfers) -> None:
    """After the jobs ended: apply their outcomes, drop what never finished.

    A store or load that started and never ended counts as failed. One that
    never started (a store whose ``step_computed`` never came, a load whose
    ``build_step`` never came) failed nothing: it is aborted uncounted, as a
    demotion that never ran is (the load is still reported failed, so the
    engine knows its blocks hold nothing).
    """
    transfers.drain()
    for store in list(transfers.stores.values()):
        transfers.end_store(store, ok=False, ran=store.dispatched)
    for load in list(transfers.loads.values()):
        transfers.end_load(load, error=True, missing=(), ran=load.dispatched)
