"""DiskBatches: a batch of block files read or written by worker threads.

A batch is split into at most ``max_workers`` runs of blocks, each run one
worker-thread call behind a ``CapacityLimiter`` (a thread hop per block
would cost as much as copying a 64 KiB block). Each block goes straight
between its file and its row (a row of the caller's buffer, or of one of
several parts): reads verify every block and name the bad ones together;
writes keep the :class:`~kvtier.tiers.disk_map.DiskMap` exact, so the files
on disk are the blocks the tier serves, whatever fails or is cancelled.

Every batch (read, write or delete) is counted while it runs, and
:meth:`DiskBatches.close` waits for them: worker threads cannot be
cancelled, so the tier keeps its directory lock until the last one has
finished touching files. A file whose delete failed is remembered and
deleted again at close, when no batch can race it. Deletes are
:class:`~kvtier.tiers.disk_deletes.DiskDeletes`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Final

import anyio
import torch

from kvtier.errors import BlockMissingError, ClosedError, InvalidRequestError, TierIOError
from kvtier.log import get_logger
from kvtier.tiers._checks import host_rows, part_row_views, tensor_bytes
from kvtier.tiers._disk_io import FILE_ERRORS, BlockFiles
from kvtier.tiers._in_flight import InFlight
from kvtier.tiers._threads import run_to_end
from kvtier.tiers.base import BlockKey
from kvtier.tiers.disk_deletes import DiskDeletes
from kvtier.tiers.disk_map import DiskMap

__all__ = ["CALL_BYTES", "DiskBatches", "RowAt", "row_access"]

_log = get_logger("kvtier.tiers.disk")

CALL_BYTES: Final = 64 << 20
"""Default most bytes one worker-thread call of a batch reads or writes (32 blocks of
2 MiB): a store of hundreds of blocks then lets a load waiting for a thread in
after one call instead of after a quarter of the batch."""

RowAt = Callable[[int], "memoryview | torch.Tensor"]
"""Block ``i``'s row: its bytes, or (rows that are not contiguous host memory) the row tensor."""


def row_access(parts: Sequence[torch.Tensor]) -> RowAt:
    """Row ``i`` of host parts taken in order, as bytes wherever that is possible.

    When every part's rows are each contiguous, a row is a slice of one
    memoryview per part: a worker thread then reads or writes it with no
    torch call per block (after a 2 MiB copy has flushed the core's caches,
    indexing a tensor and wrapping its memory took 40 µs here, a fifth of
    the copy). Otherwise each row is the row tensor.

    The function returned holds the parts, so the memory its views alias
    lives as long as it does.
    """
    if all(host_rows(part) for part in parts):
        return part_row_views(parts)
    rows = [row for part in parts for row in part.unbind(0)]
    return rows.__getitem__


class DiskBatches(DiskDeletes):
    """Reads, writes and deletes of a disk tier's block files, spread over worker threads.

    Args:
        name: The tier's name (for errors and logs).
        files: The directory's block files.
        blocks: The tier's slot ↔ key map, kept exact by every write.
        max_workers: Worker threads one batch uses at most.
        call_bytes: Most bytes one worker-thread call moves (at least a block).
    """

    def __init__(
        self,
        name: str,
        files: BlockFiles,
        blocks: DiskMap,
        *,
        max_workers: int,
        call_bytes: int = CALL_BYTES,
    ) -> None:
        self._name = name
        self._files = files
        self._map = blocks
        self._workers = max_workers
        self._limiter = anyio.CapacityLimiter(max_workers)
        self._call_blocks = max(1, call_bytes // files.block_bytes)
        self._writing_slots: set[int] = set()
        self._writing_keys: set[BlockKey] = set()  # and keys a discard is deleting
        self._in_flight = InFlight()  # batches in flight (reads, writes, deletes)
        self._undeleted: set[BlockKey] = set()  # stale files whose delete failed
        self._closing = False
        # Deletes always run (see _unlink): in threads of the tier's own, so a
        # stuck file system neither starves nor waits behind asyncio's default
        # executor (CUDA waits, DNS lookups, the engine's to_thread calls).
        self._deleter = ThreadPoolExecutor(max_workers, thread_name_prefix=f"kvtier-{name}-rm")

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a batch while it runs (its worker threads included: they are never abandoned).

        The tier counts its opening scan this way too: :meth:`close` waits for it,
        from whichever event loop it is called.

        Raises:
            ClosedError: :meth:`close` has begun. Checked after counting, so a
                close on another loop either waits for this batch or is seen
                by it: a call that passed the tier's own open check before the
                close began never runs after the close let the directory go.
        """
        with self._in_flight:
            if self._closing:
                raise ClosedError(f"tier {self._name} is closed")
            yield

    async def close(self) -> None:
        """Wait for every batch in flight, then delete again the files whose delete failed.

        Shielded from cancellation: the caller releases the directory lock
        after this, and a worker thread still renaming or deleting files
        then would act on a directory another tier may already hold. Worker
        threads cannot be interrupted, so a thread stuck in a system call
        (a hung network file system) holds this up until it returns.
        Callers refuse new batches first (the tier is marked closed).
        """
        self._closing = True  # before the count is read: see running()
        with anyio.CancelScope(shield=True):
            await self._in_flight.wait_idle()
            # No batch runs now: a key not mapped is stale, its file safe to delete.
            stale = [key for key in self._undeleted if key not in self._map.key_slots]
            self._undeleted.clear()
            for key, exc in await self._unlink(stale) if stale else ():
                _log.warning("tier_unlink_failed", tier=self._name, file=key.hex(), error=repr(exc))
            self._deleter.shutdown(wait=False)  # idle: every delete was waited for

    def check_not_writing(self, slots: Iterable[int], keys: Iterable[BlockKey] = ()) -> None:
        """Refuse slots or keys that a write (or a discard's delete) in flight holds.

        A write unmaps the slots it overwrites when it starts and maps them
        when it ends, and reuses or deletes the files of the keys those
        slots held, so a second call on the same slot, key or replaced key
        in between would act on a map and files about to change (a
        :class:`TierIndex` never makes one: its reservations are exclusive).
        A discard holds the keys it deletes the same way: a write of one of
        them in between would have its new file deleted.

        Raises:
            InvalidRequestError: A slot or key is being written.
        """
        slots_busy = sorted(self._writing_slots.intersection(slots))
        keys_busy = len(self._writing_keys.intersection(keys))
        if slots_busy or keys_busy:
            what = f"slot(s) {slots_busy}" if slots_busy else f"{keys_busy} key(s)"
            raise InvalidRequestError(
                f"tier {self._name}: {what} being written or deleted by another call; "
                "wait for it to finish"
            )

    def _call_size(self, n: int) -> int:
        """Blocks per worker-thread call for a batch of ``n``."""
        return max(1, min(-(-n // self._workers), self._call_blocks))

    def _one_call(self, n: int) -> bool:
        """Whether a batch of ``n`` blocks runs in one worker-thread call (no other thread)."""
        return self._call_size(n) >= n

    async def _in_workers(self, work: Callable[[range], None], n: int) -> None:
        """Run ``work`` over ``range(n)`` in worker-thread calls of bounded size.

        Calls take at most ``n / max_workers`` blocks and ``call_bytes``,
        and at most ``max_workers`` tasks run them one after another, taking
        the next range as they go: a batch never holds the tier's limiter for
        more than one call per worker, so another batch (a load behind a
        large store) gets a thread after one call, and a cancellation takes
        effect between calls.
        """
        if self._one_call(n):  # no task group to pay for
            await run_to_end(work, range(n), limiter=self._limiter)
            return
        size = self._call_size(n)
        ranges = iter([range(begin, min(n, begin + size)) for begin in range(0, n, size)])

        async def worker() -> None:
            for part in ranges:  # shared: each task takes the next range
                await run_to_end(work, part, limiter=self._limiter)

        async with anyio.create_task_group() as group:
            for _ in range(min(self._workers, -(-n // size))):
                group.start_soon(worker)

    async def write(
        self,
        slot_list: list[int],
        keys: Sequence[BlockKey],
        row: RowAt,
    ) -> None:
        """Write each block from its host row (``row(i)`` for block ``i``), atomically per block.

        Args:
            slot_list: The blocks' slots.
            keys: Their keys.
            row: Block ``i``'s source row (see :func:`row_access`).

        Raises:
            InvalidRequestError: A slot or key is being written by another
                call (nothing done).
            TierIOError: A block could not be written (the others were), or
                (``fsync``) the directory could not be synced (none counts).
        """
        # The keys the slots hold now: the write reuses or deletes their files.
        held = self._map.slot_keys
        touched = {*keys, *(held[slot] for slot in slot_list if slot in held)}
        self.check_not_writing(slot_list, touched)
        self._writing_slots.update(slot_list)
        self._writing_keys.update(touched)
        try:
            with self.running():
                await self._write(slot_list, keys, row)
        finally:
            self._writing_slots.difference_update(slot_list)
            self._writing_keys.difference_update(touched)

    async def _write(self, slot_list: list[int], keys: Sequence[BlockKey], row: RowAt) -> None:
        recycle, candidates = self._map.plan_write(slot_list, keys)
        done: list[int] = []
        errors: list[TierIOError] = []
        alone = self._one_call(len(slot_list))

        def work(part: range) -> None:
            for index in part:
                slot = slot_list[index]
                source = row(index)
                try:
                    if isinstance(source, torch.Tensor):
                        source = source.contiguous()  # kept alive by this name while written
                        payload = tensor_bytes(source)
                    else:
                        payload = source
                    self._files.write(slot, keys[index], payload, recycle[index], alone=alone)
                except (OSError, RuntimeError, MemoryError) as exc:
                    errors.append(self._io_error(f"writing slot {slot}", exc))
                else:
                    done.append(index)

        try:
            await self._in_workers(work, len(slot_list))
            if done and self._files.fsync:
                await self._sync_directory(done, errors)
        finally:
            await self._settle_writes(slot_list, keys, candidates, done)
        if errors:
            raise errors[0]

    async def _sync_directory(self, done: list[int], errors: list[TierIOError]) -> None:
        """Make the batch's renames durable before the write counts.

        A failure fails the whole batch (``done`` emptied: its files are
        deleted, none mapped), so the tier never serves a block its index
        was told failed.
        """
        try:
            await run_to_end(self._files.sync_directory, limiter=self._limiter)
        except OSError as exc:
            done.clear()
            errors.append(self._io_error("syncing the directory", exc))

    async def _settle_writes(
        self,
        slots: list[int],
        keys: Sequence[BlockKey],
        candidates: set[BlockKey],
        done: list[int],
    ) -> None:
        """Map the written blocks; delete the files of ``candidates`` left unmapped.

        Runs even when the write was cancelled, so the files on disk stay
        exactly the blocks the tier maps (see :class:`DiskMap`).
        """
        stale = self._map.settle(slots, keys, candidates, done)
        if not stale:
            return
        with anyio.CancelScope(shield=True):
            failed = await self._unlink(stale)
        for _, exc in failed:
            _log.warning("tier_unlink_failed", tier=self._name, error=repr(exc))

    async def read(
        self,
        slot_list: list[int],
        keys: Sequence[BlockKey],
        row: RowAt,
    ) -> None:
        """Read and verify each block into its row (``row(i)`` for block ``i``).

        Args:
            slot_list: The blocks' slots.
            keys: Their keys.
            row: Block ``i``'s destination row (see :func:`row_access`).

        Raises:
            BlockMissingError: Blocks absent, failing verification or whose
                file cannot be read (named together after the others were read).
            TierIOError: An I/O error that says nothing of the blocks.
        """
        with self.running():
            await self._read(slot_list, keys, row)

    async def _read(self, slot_list: list[int], keys: Sequence[BlockKey], row: RowAt) -> None:
        missing: list[int] = []
        errors: list[TierIOError] = []
        alone = self._one_call(len(slot_list))

        def work(part: range) -> None:
            for index in part:
                slot = slot_list[index]
                try:
                    if not self._files.read(slot, keys[index], row(index), alone=alone):
                        missing.append(slot)
                except OSError as exc:
                    if exc.errno in FILE_ERRORS:  # this file is damaged: a miss from now on
                        _log.warning(
                            "tier_block_unreadable", tier=self._name, slot=slot, error=str(exc)
                        )
                        missing.append(slot)
                    else:
                        errors.append(self._io_error(f"reading slot {slot}", exc))
                except (RuntimeError, MemoryError) as exc:  # the row refused the bytes
                    errors.append(self._io_error(f"reading slot {slot}", exc))

        await self._in_workers(work, len(slot_list))
        if errors:
            raise errors[0]
        if missing:
            raise BlockMissingError.of_slots(self._name, missing)
