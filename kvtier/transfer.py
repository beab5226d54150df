"""The transfer pipeline: moves blocks between tiers and resolves completions.

Callers post :class:`StoreTask` (down the stack: device → CPU → disk…) and
:class:`LoadTask` (back up) and get a :class:`~kvtier.completion.Completion`
each. Each direction has a bounded queue (an anyio memory-object stream) and a
worker task in a task group the pipeline owns, so loads never wait behind
stores. A full queue pushes back: :meth:`TransferPipeline.submit` waits (first
come, first served, through a :class:`~kvtier.fair_send.FairSender`),
:meth:`TransferPipeline.submit_nowait` raises :class:`anyio.WouldBlock`.

A worker takes a task plus whatever else is queued behind it for the same pair
of tiers, as long as the batch stays within ``max_batch_blocks`` (a larger
task runs alone) and repeats no key, and moves them with a
:class:`~kvtier.mover.BlockMover`: when a tier can expose its slots as a
tensor view (the CPU tier, for an ascending run of slots), the other tier
gathers straight into it or scatters straight from it: all the runs (of at
least ``direct_min_bytes`` for a memory tier, any for the disk or Redis
tier) in one parts call where the other tier takes parts, else run by run;
the rest passes through a staging buffer of at most ``staging_bytes`` per
direction, allocated once.

Slot bookkeeping stays with the caller, who reserves destination slots and
pins source slots before posting; the pipeline settles them when the task
ends, through the task's ledgers (:class:`~kvtier.tiers.index.TierIndex`):
success commits the destination and unpins the source; failure or
cancellation aborts the destination and unpins the source; source blocks that
fail verification are removed from the source's index (a miss from then on).
A batch whose copy names source blocks that failed verification fails the
tasks holding them and moves the others again together; after any other
error it is retried task by task, so one bad task does not fail its
neighbours.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from kvtier.claims import Claims, check_ledger, settle
from kvtier.completion import Completion
from kvtier.errors import BlockMissingError, ClosedError, ConfigError, KVTierError
from kvtier.fair_send import FairSender
from kvtier.mover import DIRECT_MIN_BYTES, BlockMover
from kvtier.outcomes import fail, finish
from kvtier.tasks import (
    Direction,
    LoadTask,
    SlotLedger,
    StoreTask,
    TransferResult,
    TransferTask,
)
from kvtier.tiers.base import BlockKey

__all__ = [
    "LoadTask",
    "SlotLedger",
    "StoreTask",
    "TransferPipeline",
    "TransferResult",
    "TransferTask",
]
# The task value classes live in kvtier.tasks; they are re-exported here
# because callers build them next to the pipeline.

_MiB = 1 << 20


_Item = tuple[TransferTask, Completion[TransferResult]]


class TransferPipeline:
    """Moves blocks between tiers in the background; an async context manager.

    Args:
        queue_size: Tasks each direction's queue holds before pushing back.
        max_batch_blocks: Most blocks moved by one read/write pair.
        staging_bytes: Most bytes of staging memory per direction (at least
            one block is always allowed).
        direct_min_bytes: Least bytes of a run of slots that moves without
            staging when a batch's slots are not one run and the other tier's
            calls are memory copies (see :mod:`kvtier.mover`).

    Raises:
        ConfigError: A size is not positive.
    """

    def __init__(
        self,
        *,
        queue_size: int = 256,
        max_batch_blocks: int = 512,
        staging_bytes: int = 256 * _MiB,
        direct_min_bytes: int = DIRECT_MIN_BYTES,
    ) -> None:
        for name, value in (
            ("queue_size", queue_size),
            ("max_batch_blocks", max_batch_blocks),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.queue_size = queue_size
        self.max_batch_blocks = max_batch_blocks
        self.staging_bytes = staging_bytes
        self.direct_min_bytes = direct_min_bytes
        self._movers: dict[Direction, BlockMover] = {
            direction: BlockMover(staging_bytes=staging_bytes, direct_min_bytes=direct_min_bytes)
            for direction in ("store", "load")
        }
        self._ids = itertools.count(1)
        self._claims = Claims()
        self._send: dict[Direction, FairSender[_Item]] = {}
        self._task_group: TaskGroup | None = None
        self._closed = False
        self._started = False
        self._workers = 0
        self._stopped = anyio.Event()  # set when the last worker ended

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed or self._started:
            raise ClosedError("a TransferPipeline can be entered once")
        self._started = True
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group = group
        for direction in ("store", "load"):
            send, receive = anyio.create_memory_object_stream[_Item](self.queue_size)
            self._send[direction] = FairSender(send)
            self._workers += 1
            group.start_soon(self._worker, direction, receive, name=f"kvtier-{direction}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Finish the queued tasks and stop the workers (see :meth:`aclose`).

        A body that raises cancels the queued tasks instead (their
        completions resolve as cancelled); its exception comes out as it
        was raised, not inside an exception group.
        """
        try:
            return await self._shutdown(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return False  # the body's own exception goes on, unwrapped
            raise

    async def aclose(self) -> None:
        """Finish the queued tasks and stop the workers; from any task. Idempotent.

        New tasks are refused from the first call on. The task group itself
        is left by ``__aexit__`` (``async with``), in the task that entered it.
        """
        self._close_queues()
        if self._workers:  # started and not all ended (none if entering failed early)
            await self._stopped.wait()

    def _close_queues(self) -> None:
        self._closed = True
        for send in self._send.values():
            send.close()  # workers drain what is queued, then stop; waiting submits see it

    async def _shutdown(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._close_queues()
        group, self._task_group = self._task_group, None
        try:
            # The group's answer is passed on: True when it absorbed the
            # cancellation of its own scope (a worker that failed cancels it).
            return None if group is None else await group.__aexit__(exc_type, exc, tb)
        finally:
            for mover in self._movers.values():
                mover.release()

    @property
    def closed(self) -> bool:
        """True once closing has begun."""
        return self._closed

    # -- submission ----------------------------------------------------------------

    def _prepare(self, task: TransferTask) -> tuple[FairSender[_Item], _Item]:
        if self._closed or not self._started:
            raise ClosedError("the transfer pipeline is not running")
        check_ledger(task.src_ledger, task.keys, task.src_slots, written=False)
        check_ledger(task.dst_ledger, task.keys, task.dst_slots, written=True)
        self._claims.take(task)
        name = f"{task.direction}-{next(self._ids)}"
        return self._send[task.direction], (task, Completion[TransferResult](name))

    async def submit(self, task: TransferTask) -> Completion[TransferResult]:
        """Queue ``task``, waiting while its direction's queue is full.

        Raises:
            ClosedError: The pipeline is not running.
            InvalidRequestError: A ledger that can check slots (a
                ``TierIndex``) holds no reservation (destination) or pin
                (source) of a key at its slot; nothing queued.
        """
        send, item = self._prepare(task)
        try:
            await send.send(item)
        except BaseException as exc:
            self._claims.release(item[0])  # never queued (see kvtier.fair_send)
            if isinstance(exc, anyio.ClosedResourceError | anyio.BrokenResourceError):
                raise ClosedError("the transfer pipeline is closed") from exc
            raise
        return item[1]

    def submit_nowait(self, task: TransferTask) -> Completion[TransferResult]:
        """Queue ``task`` or fail at once.

        Raises:
            anyio.WouldBlock: The direction's queue is full, or submits wait for
                room (they come first; nothing queued).
            ClosedError: The pipeline is not running.
            InvalidRequestError: As for :meth:`submit`; nothing queued.
        """
        send, item = self._prepare(task)
        try:
            send.send_nowait(item)
        except BaseException as exc:
            self._claims.release(item[0])  # never queued
            if isinstance(exc, anyio.ClosedResourceError | anyio.BrokenResourceError):
                raise ClosedError("the transfer pipeline is closed") from exc
            raise
        return item[1]

    # -- the workers -----------------------------------------------------------------

    async def _worker(
        self, direction: Direction, receive: MemoryObjectReceiveStream[_Item]
    ) -> None:
        batch: list[_Item] = []
        carry: _Item | None = None  # taken, but for the next batch
        try:
            while True:
                if carry is None:
                    try:
                        carry = await receive.receive()
                    except anyio.EndOfStream:
                        break
                batch = [carry]
                carry = self._take_more(receive, batch)
                self._send[direction].took()
                await self._run_batch(direction, batch)
                batch = []
        finally:
            # Cancelled: settle what is in hand and what is still queued.
            leftovers = [*batch, *([] if carry is None else [carry])]
            while True:
                try:
                    leftovers.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
            receive.close()
            self._send[direction].broken()  # waiting submits see it
            interrupt: BaseException | None = None
            try:
                for task, completion in leftovers:
                    if completion.done():
                        continue
                    self._settle(task, ok=False)  # never raises an Exception
                    try:
                        completion.set_cancelled()
                    except BaseException as exc:  # a callback's KeyboardInterrupt and kin
                        interrupt = interrupt or exc  # after every leftover is resolved
            finally:
                self._workers -= 1
                if not self._workers:
                    self._stopped.set()
            if interrupt is not None:
                raise interrupt

    def _take_more(
        self, receive: MemoryObjectReceiveStream[_Item], batch: list[_Item]
    ) -> _Item | None:
        """Add the queued tasks that fit ``batch``; the first that does not, if taken."""
        first = batch[0][0]
        blocks = first.num_blocks
        keys: set[BlockKey] | None = None  # built once a second task comes
        while blocks < self.max_batch_blocks:
            try:
                item = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return None
            task = item[0]
            if keys is None:
                keys = set(first.keys)
            if (
                task.src is not first.src
                or task.dst is not first.dst
                or blocks + task.num_blocks > self.max_batch_blocks
                or not keys.isdisjoint(task.keys)
            ):
                # Another pair of tiers, too big, or a key already in the batch
                # (two loads of one block: a tier may refuse a repeated key):
                # it starts the next batch.
                return item
            batch.append(item)
            keys.update(task.keys)
            blocks += task.num_blocks
        return None

    async def _run_batch(self, direction: Direction, batch: list[_Item]) -> None:
        """Move a batch (one pair of tiers) with one copy.

        When the copy names the source slots that failed verification, their
        tasks fail and the rest are moved again together (a block that shared
        a staging chunk with a bad one may not have been copied); after any
        other error the tasks are moved one by one, to isolate the bad one.
        """
        while len(batch) > 1:
            try:
                seconds = await self._move(direction, [task for task, _ in batch])
            except BlockMissingError as exc:
                bad = set(exc.slots)
                failed = [item for item in batch if not bad.isdisjoint(item[0].src_slots)]
                if not failed:  # the error names no slot of the batch: isolate
                    break
                for task, completion in failed:
                    found = bad.intersection(task.src_slots)
                    self._fail(task, completion, BlockMissingError.of_slots(task.src.name, found))
                batch = [item for item in batch if not item[1].done()]
                continue
            except Exception:
                break
            blocks = sum(task.num_blocks for task, _ in batch)
            for task, completion in batch:  # each its share, so that summed times add up
                self._finish(task, completion, seconds * task.num_blocks / blocks)
            return
        for task, completion in batch:  # one task, or isolating the failing one
            await self._run_one(direction, task, completion)

    async def _run_one(
        self, direction: Direction, task: TransferTask, completion: Completion[TransferResult]
    ) -> None:
        try:
            seconds = await self._move(direction, [task])
        except Exception as exc:
            self._fail(task, completion, exc)
            return
        self._finish(task, completion, seconds)

    def _fail(
        self, task: TransferTask, completion: Completion[TransferResult], exc: Exception
    ) -> None:
        self._claims.release(task)
        fail(task, completion, exc)

    def _finish(
        self, task: TransferTask, completion: Completion[TransferResult], seconds: float
    ) -> None:
        self._claims.release(task)
        finish(task, completion, seconds)

    def _settle(self, task: TransferTask, *, ok: bool) -> Exception | None:
        """Settle the task's ledgers (:func:`~kvtier.claims.settle`) and forget its claims."""
        self._claims.release(task)
        return settle(task, ok=ok)

    async def _move(self, direction: Direction, tasks: list[TransferTask]) -> float:
        """Copy the tasks' blocks (same source and destination tiers); seconds taken.

        Raises:
            KVTierError: A tier raised asyncio's ``CancelledError`` while
                nothing cancelled the worker (a tier's bug, say reading a
                cancelled future): the tasks fail; the pipeline goes on.
        """
        start = time.perf_counter()
        try:
            await self._movers[direction].move(
                tasks[0].src,
                [s for t in tasks for s in t.src_slots],
                tasks[0].dst,
                [s for t in tasks for s in t.dst_slots],
                [k for t in tasks for k in t.keys],
            )
        except asyncio.CancelledError as exc:
            worker = asyncio.current_task()
            if worker is None or worker.cancelling():
                raise  # the worker is being cancelled: the pipeline is
            pair = f"{tasks[0].src.name}->{tasks[0].dst.name}"
            raise KVTierError(f"{pair}: a tier raised CancelledError unasked") from exc
        return time.perf_counter() - start
