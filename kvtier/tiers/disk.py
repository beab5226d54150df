"""DiskTier: blocks in files under a directory, verified on every read.

One file per block, named ``<key hex>.kvb`` (names come only from the key's
hex digest), holding the payload and a verified trailer
(:mod:`kvtier.tiers.disk_format`). A write goes to a ``.tmp-*`` file created
``0600`` in the same directory (or recycled from the block the slot held
before), then ``os.replace`` moves it over the final name, so a crash leaves
either the old block, the new one, or a stray temp file (deleted on the next
open), never a half block under a block's name; the checksum catches torn or
corrupted payloads anyway. The directory is created ``0700`` (an existing one
is tightened to ``0700``).

One file per block rather than slab files: a block is 64 KiB to several MiB,
large enough that per-file costs are small next to the copy; replacement is
atomic per block with no free-space map to keep crash-consistent; and warm
restart is a directory scan. A batch is split into at most ``max_workers``
runs of blocks, each run one worker-thread call behind a ``CapacityLimiter``
(a thread hop per block would cost as much as copying a 64 KiB block).

Every read checks magic, version, layout fingerprint, key, slot, length and
checksum: any mismatch, a missing or short file, or an error that doubts the
file itself (``EIO``, ``EBADMSG``, ``EUCLEAN``…) raises ``BlockMissingError``
(a miss, never wrong bytes, and the index forgets the block). Other
``OSError`` (``EMFILE``, ``ENOMEM``, ``EACCES``…) become ``TierIOError``.
With ``fsync=True`` each block is synced before its rename, and the directory
once per batch after them, before the write returns (a failed directory sync
fails the whole batch; a file system that cannot sync directories is logged
once and skipped).
``direct_io=True`` opens files with ``O_DIRECT`` through page-aligned buffers
(checked when the tier opens: a file system without it is a ``ConfigError``).

**Warm restart**: opening scans the directory, verifies every block file and
offers the valid ones through :meth:`DiskTier.recover`; torn, corrupt, foreign
and stray temp files are deleted.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
import torch

from kvtier.errors import (
    BlockMissingError,
    ClosedError,
    ConfigError,
    InvalidRequestError,
    TierIOError,
)
from kvtier.log import get_logger
from kvtier.tiers._checks import check_buffer, check_slots, tensor_bytes
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.disk_dir import check_direct_io, claim_directory, scan
from kvtier.tiers.disk_format import MAX_KEY_BYTES, file_bytes

__all__ = ["DiskTier"]

_log = get_logger("kvtier.tiers.disk")
_MAX_SLOTS: Final = 1 << 32
"""Slots a directory may hold: the trailer records a block's slot as a u32."""
_FILE_ERRORS: Final = frozenset(
    getattr(errno, name)
    for name in ("EIO", "EBADMSG", "ENODATA", "EUCLEAN", "ESTALE")
    if hasattr(errno, name)
)
"""Read errors that doubt one file (a bad sector, a damaged inode): the block
reads as a miss. Others (``EMFILE``, ``ENOMEM``, ``EACCES``…) may be the
process's or the system's, say nothing sure of the block, and fail the read."""


class DiskTier:
    """A persistent tier of block files under ``path``.

    Args:
        path: The directory (created 0700 if missing).
        layout: The block layout.
        capacity_bytes: Disk budget; ``num_slots`` is how many block files
            (:meth:`bytes_per_block` each) fit in it.
        name: The tier's name (``medium`` of its events).
        max_workers: Worker threads doing one batch's I/O at once.
        fsync: ``fsync`` each block before it replaces the old one, and the
            directory after a batch's renames.
        direct_io: Open block files with ``O_DIRECT`` (bypassing the page cache).

    Raises:
        ConfigError: The budget holds no block, or ``max_workers`` < 1.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: BlockLayout,
        capacity_bytes: int,
        *,
        name: str = "disk",
        max_workers: int = 4,
        fsync: bool = False,
        direct_io: bool = False,
    ) -> None:
        per_block = self.bytes_per_block(layout)
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise ConfigError(f"capacity_bytes must be an integer, got {capacity_bytes!r}")
        if capacity_bytes < per_block:
            raise ConfigError(
                f"capacity_bytes={capacity_bytes} holds no block of {per_block} bytes"
            )
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        if capacity_bytes // per_block > _MAX_SLOTS:
            raise ConfigError(
                f"capacity_bytes={capacity_bytes} holds more than {_MAX_SLOTS} blocks "
                "(a block file records its slot in 32 bits)"
            )
        if "\0" in os.fspath(path):
            raise ConfigError(f"path {path!r} contains a NUL byte")
        self._layout = layout
        self._name = name
        self._num_slots = capacity_bytes // per_block
        self._lock: int | None = None
        self._workers = max_workers
        self._limiter = anyio.CapacityLimiter(max_workers)
        self._files = BlockFiles(
            Path(path), layout.block_bytes, layout.fingerprint(), direct=direct_io, fsync=fsync
        )
        self._slot_keys: dict[int, BlockKey] = {}
        self._key_slots: dict[BlockKey, int] = {}
        self._recovered: list[tuple[int, BlockKey]] = []
        self._opened = False
        self._closed = False

    @staticmethod
    def bytes_per_block(layout: BlockLayout) -> int:
        """Disk bytes one block of ``layout`` takes (payload, trailer, padding)."""
        return file_bytes(layout.block_bytes, MAX_KEY_BYTES)

    @property
    def name(self) -> str:
        """The tier's name, reported as ``medium`` in events."""
        return self._name

    @property
    def layout(self) -> BlockLayout:
        """The block layout."""
        return self._layout

    @property
    def num_slots(self) -> int:
        """Capacity in blocks."""
        return self._num_slots

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    @property
    def path(self) -> Path:
        """The directory."""
        return self._files.path

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if not self._opened:
            try:
                self._recovered = await anyio.to_thread.run_sync(self._open)
            except OSError as exc:
                raise TierIOError(
                    f"tier {self._name}: cannot open {self.path}: {exc}", tier=self._name
                ) from exc
            self._slot_keys = dict(self._recovered)
            self._key_slots = {key: slot for slot, key in self._recovered}
            self._opened = True
            _log.info("tier_open", tier=self._name, n_blocks=len(self._recovered))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop using the directory (its blocks stay for a warm restart). Idempotent."""
        self._closed = True
        self._unlock()

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)  # releases the flock

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if not self._opened:
            raise ClosedError(f"tier {self._name} is not open: use 'async with'")

    def _open(self) -> list[tuple[int, BlockKey]]:
        self._lock = claim_directory(self.path, self._name)
        try:
            if self._files.direct:
                check_direct_io(self._files, self._name)
            return scan(self._files, self._num_slots, self._name)
        except BaseException:
            self._unlock()
            raise

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """``(slot, key)`` of every valid block found when the tier was opened."""
        self._check_open()
        return list(self._recovered)

    # -- I/O -------------------------------------------------------------------------

    def _check_batch(
        self, slots: Sequence[int], keys: Sequence[BlockKey], buffer: torch.Tensor
    ) -> tuple[list[int], torch.Tensor]:
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        rows = check_buffer(buffer, slot_list, keys, self._layout.block_bytes, tier=self._name)
        for key in keys:
            if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
                raise InvalidRequestError(
                    f"tier {self._name}: keys must be 1..{MAX_KEY_BYTES} bytes"
                )
        if len(set(slot_list)) != len(slot_list) or len(set(keys)) != len(keys):
            raise InvalidRequestError(f"tier {self._name}: a batch repeats a slot or a key")
        return slot_list, rows

    async def _in_workers(self, work: Callable[[range], None], n: int) -> None:
        """Run ``work`` over ``range(n)`` split into at most ``max_workers`` threads."""
        step = -(-n // self._workers)
        if step >= n:  # one thread call: no task group to pay for
            await anyio.to_thread.run_sync(work, range(n), limiter=self._limiter)
            return

        async def run(part: range) -> None:
            await anyio.to_thread.run_sync(work, part, limiter=self._limiter)

        async with anyio.create_task_group() as group:
            for begin in range(0, n, step):
                group.start_soon(run, range(begin, min(n, begin + step)))

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Write ``data`` rows as the blocks ``keys`` into ``slots``, atomically per block.

        Raises:
            InvalidRequestError: Bad slots, keys or buffer, or a repeated slot or key.
            TierIOError: A block could not be written (the others were).
        """
        self._check_open()
        slot_list, rows = self._check_batch(slots, keys, data)
        host = rows.to("cpu") if rows.device.type != "cpu" else rows
        batch_keys = set(keys)
        unmapped: set[BlockKey] = set()  # keys whose files must go unless written again
        recycle: list[BlockKey | None] = []  # a file to reuse for each block
        for slot, key in zip(slot_list, keys, strict=True):
            old = self._slot_keys.pop(slot, None)  # overwritten: gone whatever happens
            if old is not None:
                del self._key_slots[old]
                unmapped.add(old)
            moved = self._key_slots.pop(key, None)  # the same key in another slot
            if moved is not None:
                del self._slot_keys[moved]
                unmapped.add(key)
            if old is not None and (old == key or old not in batch_keys):
                recycle.append(old)
            else:  # (an old key written again in this batch is that write's file)
                recycle.append(key if moved is not None else None)
        done: list[int] = []
        errors: list[TierIOError] = []

        def work(part: range) -> None:
            for index in part:
                slot = slot_list[index]
                row = host[index].contiguous()
                try:
                    self._files.write(slot, keys[index], tensor_bytes(row), recycle[index])
                except OSError as exc:
                    errors.append(self._io_error(f"writing slot {slot}", exc))
                else:
                    done.append(index)

        try:
            await self._in_workers(work, len(slot_list))
            if done and self._files.fsync:
                await self._sync_directory(done, errors)
        finally:
            await self._settle_writes(slot_list, keys, unmapped | batch_keys, done)
        if errors:
            raise errors[0]

    async def _sync_directory(self, done: list[int], errors: list[TierIOError]) -> None:
        """Make the batch's renames durable before the write counts.

        A failure fails the whole batch (``done`` emptied: its files are
        deleted, none mapped), so the tier never serves a block its index
        was told failed.
        """
        try:
            await anyio.to_thread.run_sync(self._files.sync_directory, limiter=self._limiter)
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

        File names come only from keys, so after the batch a file under the
        name of a key the tier does not map (one the batch overwrote or
        moved, or one whose write failed) is stale. Runs even when the write
        was cancelled, so the files on disk stay exactly the blocks the tier
        maps.
        """
        for index in done:
            self._slot_keys[slots[index]] = keys[index]
            self._key_slots[keys[index]] = slots[index]
        stale = [key for key in candidates if key not in self._key_slots]
        if not stale:
            return
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._unlink_all, stale, limiter=self._limiter)
            except OSError as exc:
                _log.warning("tier_unlink_failed", tier=self._name, error=repr(exc))

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        """Read and verify the blocks into ``out``'s rows.

        On any error ``out``'s rows hold undefined bytes.

        Raises:
            BlockMissingError: Blocks absent, failing verification or whose
                file cannot be read (``slots``).
            TierIOError: An I/O error that says nothing of the blocks
                (``EMFILE``, ``ENOMEM``…).
        """
        self._check_open()
        slot_list, rows = self._check_batch(slots, keys, out)
        missing: list[int] = []
        errors: list[TierIOError] = []

        def work(part: range) -> None:
            for index in part:
                slot = slot_list[index]
                try:
                    if not self._files.read(slot, keys[index], rows[index]):
                        missing.append(slot)
                except OSError as exc:
                    if exc.errno in _FILE_ERRORS:  # this file is damaged: a miss from now on
                        _log.warning(
                            "tier_block_unreadable", tier=self._name, slot=slot, error=str(exc)
                        )
                        missing.append(slot)
                    else:
                        errors.append(self._io_error(f"reading slot {slot}", exc))

        await self._in_workers(work, len(slot_list))
        if errors:
            raise errors[0]
        if missing:
            raise BlockMissingError(
                f"tier {self._name}: {len(missing)} block(s) missing or failed verification",
                tier=self._name,
                slots=tuple(sorted(missing)),
            )

    async def discard(self, slots: Sequence[int]) -> None:
        """Delete the blocks in ``slots``.

        Raises:
            TierIOError: A file could not be deleted (it is forgotten all the same).
        """
        self._check_open()
        doomed: list[BlockKey] = []
        for slot in check_slots(slots, self._num_slots, tier=self._name):
            key = self._slot_keys.pop(slot, None)
            if key is not None:
                del self._key_slots[key]
                doomed.append(key)
        if not doomed:
            return
        try:
            await anyio.to_thread.run_sync(self._unlink_all, doomed, limiter=self._limiter)
        except OSError as exc:
            raise self._io_error("discard", exc) from exc

    def _unlink_all(self, keys: list[BlockKey]) -> None:
        """Delete every key's file, trying them all; raise the first error after."""
        first: OSError | None = None
        for key in keys:
            try:
                self._files.unlink(key)
            except OSError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _io_error(self, what: str, exc: OSError) -> TierIOError:
        error = TierIOError(f"tier {self._name}: {what} failed: {exc}", tier=self._name)
        error.__cause__ = exc
        return error
