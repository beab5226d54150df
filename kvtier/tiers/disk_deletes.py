"""Deleting a disk tier's block files: discards, the reset's sweep, and why they always run.

A base of :class:`~kvtier.tiers.disk_batch.DiskBatches`, which sets the
state these use. A delete forgets its blocks first, so a file left behind
would hold a block no one deletes: a warm restart would bring it back (a
block the engine discarded, or one of weights a reset replaced), and a
block written to its slot since would be dropped as ambiguous. Deletes
therefore always run, whatever cancels the caller (asyncio's own
cancellation included, which anyio's shield does not stop), in threads of
the tier's own (at most ``max_workers``), apart from its I/O threads and
from asyncio's default executor: a file system stuck in ``unlink`` (a hung
network file system) holds up nothing else. While its files are deleted
the keys count as being written, so a write of one of them is refused
instead of being deleted by the late unlink. A delete that fails is
remembered and tried again at close.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import anyio

from kvtier.errors import TierIOError
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers._threads import run_to_end
from kvtier.tiers.base import BlockKey
from kvtier.tiers.disk_dir import listed_keys
from kvtier.tiers.disk_map import DiskMap

__all__ = ["DiskDeletes"]


class DiskDeletes:
    """Discards and the unmapped sweep of a disk tier's batches (not constructed on its own)."""

    _name: str
    _files: BlockFiles
    _map: DiskMap
    _limiter: anyio.CapacityLimiter
    _writing_keys: set[BlockKey]
    _undeleted: set[BlockKey]
    _deleter: ThreadPoolExecutor

    if TYPE_CHECKING:  # DiskBatches's

        def running(self) -> AbstractContextManager[None]:
            """Count a batch while it runs (see ``DiskBatches.running``)."""

        def check_not_writing(self, slots: Iterable[int], keys: Iterable[BlockKey] = ()) -> None:
            """Refuse slots or keys being written (see ``DiskBatches.check_not_writing``)."""

    async def discard(self, slot_list: list[int]) -> None:
        """Unmap ``slots`` and delete their blocks' files, whatever cancels the caller.

        Raises:
            InvalidRequestError: A slot is being written (nothing deleted).
            TierIOError: A file could not be deleted (tried again at close).
        """
        self.check_not_writing(slot_list)
        with self.running():  # counted first: a close on another loop waits or refuses it
            failed = await self._delete_held(self._map.forget(slot_list))
        if failed:
            raise self._io_error("discard", failed[0][1])

    async def discard_unmapped(self) -> int:
        """Delete the directory's block files of keys not mapped; how many were deleted.

        Files of keys being written or deleted are left alone. A cancelled
        call still deletes.

        Raises:
            TierIOError: The directory could not be listed, or a file could
                not be deleted (tried again at close).
        """
        with self.running():
            try:
                listed = await run_to_end(listed_keys, self._files.path, limiter=self._limiter)
            except OSError as exc:
                raise self._io_error("listing the directory", exc) from exc
            mapped, writing = self._map.key_slots, self._writing_keys
            doomed = [key for key in listed if key not in mapped and key not in writing]
            failed = await self._delete_held(doomed)
        if failed:
            raise self._io_error("deleting unmapped blocks", failed[0][1])
        return len(doomed)

    async def _delete_held(self, doomed: list[BlockKey]) -> list[tuple[BlockKey, OSError]]:
        """Delete the files of ``doomed`` (no longer mapped), holding the keys meanwhile."""
        if not doomed:
            return []
        self._writing_keys.update(doomed)
        try:
            with anyio.CancelScope(shield=True):
                failed = await self._unlink(doomed)
        finally:
            self._writing_keys.difference_update(doomed)
        return failed

    async def _unlink(self, keys: list[BlockKey]) -> list[tuple[BlockKey, OSError]]:
        """Delete every key's file in the tier's delete threads; the keys that failed.

        Runs to its end whatever cancels the caller (see the module doc); the
        keys that failed are remembered for close.
        """
        return await run_to_end(self._unlink_all, keys, must_run=True, executor=self._deleter)

    def _unlink_all(self, keys: list[BlockKey]) -> list[tuple[BlockKey, OSError]]:
        """Delete every key's file, trying them all; the keys whose delete failed.

        With ``fsync`` the directory is synced after the deletes, so a block
        discarded (by a reset, say) does not come back after a power loss; a
        sync that fails counts every delete as failed (retried at close).
        """
        failed: list[tuple[BlockKey, OSError]] = []
        for key in keys:
            try:
                self._files.unlink(key)
            except OSError as exc:
                failed.append((key, exc))
        if self._files.fsync and len(failed) < len(keys):
            try:
                self._files.sync_directory()
            except OSError as exc:
                failed = [(key, exc) for key in keys]
        # Here, not in the caller: a caller cancelled meanwhile must not lose them.
        self._undeleted.update(key for key, _ in failed)
        return failed

    def _io_error(self, what: str, exc: Exception) -> TierIOError:
        error = TierIOError(f"tier {self._name}: {what} failed: {exc}", tier=self._name)
        error.__cause__ = exc
        return error
