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
restart is a directory scan. A batch's blocks are spread over at most
``max_workers`` threads (:mod:`kvtier.tiers.disk_batch`), which
:meth:`DiskTier.read_into_parts` / :meth:`DiskTier.write_from_parts` also use
for blocks held in several buffers (the CPU tier's runs: no staging copy).

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

**Warm restart**: opening scans the directory and offers the valid blocks
through :meth:`DiskTier.recover` (what is deleted, kept or fails the open:
:mod:`kvtier.tiers.disk_dir`). :meth:`DiskTier.aclose` waits for the batches
in flight before it releases the directory: their worker threads cannot be
interrupted. A forked child's copy of an open tier is closed (its lock
descriptor too: :mod:`kvtier.tiers._dir_lock`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import torch

from kvtier.errors import (
    BlockMissingError,
    ClosedError,
    ConfigError,
    TierIOError,
)
from kvtier.log import get_logger
from kvtier.tiers._checks import check_batch, check_slots, copy_back
from kvtier.tiers._close_gate import CloseGate
from kvtier.tiers._dir_lock import DirectoryLock
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers._open_gate import OpenGate
from kvtier.tiers._threads import run_to_end
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.disk_batch import CALL_BYTES, DiskBatches, row_access
from kvtier.tiers.disk_dir import claim_directory, namespace_fingerprint, prepare_directory
from kvtier.tiers.disk_format import MAX_KEY_BYTES, file_bytes
from kvtier.tiers.disk_map import DiskMap

__all__ = ["DiskTier", "namespace_fingerprint"]

_log = get_logger("kvtier.tiers.disk")
_MAX_SLOTS: Final = 1 << 32
"""Slots a directory may hold: the trailer records a block's slot as a u32."""


class DiskTier:
    """A persistent tier of block files under ``path``.

    Args:
        path: The directory (created 0700 if missing); a relative path is
            taken from the working directory at construction.
        layout: The block layout.
        capacity_bytes: Disk budget; ``num_slots`` is how many block files
            (:meth:`bytes_per_block` each) fit in it.
        name: The tier's name (``medium`` of its events).
        max_workers: Worker threads doing one batch's I/O at once.
        call_bytes: Most bytes one worker-thread call reads or writes; a
            large batch is cut into such calls, so another batch waiting for
            a thread (a load behind a large store) gets one after a call.
        fsync: ``fsync`` each block before it replaces the old one, and the
            directory after a batch's renames.
        direct_io: Open block files with ``O_DIRECT`` (bypassing the page cache).
        model: Separates models (or deployments) whose layouts are equal: it
            joins the layout in the fingerprint every block carries and the
            directory's mark, so a directory holding another model's blocks
            is refused and its blocks never verify. ``""`` (the default):
            the layout alone, as directories written before it existed.

    Raises:
        ConfigError: The budget holds no block, or ``max_workers`` or
            ``call_bytes`` < 1.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: BlockLayout,
        capacity_bytes: int,
        *,
        name: str = "disk",
        max_workers: int = 4,
        call_bytes: int = CALL_BYTES,
        fsync: bool = False,
        direct_io: bool = False,
        model: str = "",
    ) -> None:
        if not isinstance(model, str):
            raise ConfigError(f"model must be a string, got {model!r}")
        per_block = self.bytes_per_block(layout)
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise ConfigError(f"capacity_bytes must be an integer, got {capacity_bytes!r}")
        if capacity_bytes < per_block:
            raise ConfigError(
                f"capacity_bytes={capacity_bytes} holds no block of {per_block} bytes"
            )
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        if isinstance(call_bytes, bool) or not isinstance(call_bytes, int) or call_bytes < 1:
            raise ConfigError(f"call_bytes must be an integer >= 1, got {call_bytes!r}")
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
        self._lock: DirectoryLock | None = None
        self._files = BlockFiles(
            Path(path).absolute(),  # a later chdir must not move the tier
            layout.block_bytes,
            namespace_fingerprint(layout, model),
            direct=direct_io,
            fsync=fsync,
        )
        self._map = DiskMap()
        self._checked = partial(  # a batch's slots, buffers, then keys (check_batch)
            check_batch,
            num_slots=self._num_slots,
            row_bytes=layout.block_bytes,
            tier=name,
            max_key_bytes=MAX_KEY_BYTES,
            unique=True,
        )
        self._batches = DiskBatches(
            name, self._files, self._map, max_workers=max_workers, call_bytes=call_bytes
        )
        self._recovered: list[tuple[int, BlockKey]] = []
        self._opened = False
        self._closed = False
        self._gate = CloseGate()
        self._open_gate = OpenGate()

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
        """True after ``aclose()``, and in a process forked from the one that opened it."""
        return self._closed or self._forked()

    def _forked(self) -> bool:
        """This is a forked child's copy of an open tier: the directory is the parent's."""
        return self._lock is not None and self._lock.forked

    @property
    def path(self) -> Path:
        """The directory."""
        return self._files.path

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Claim the directory, mark its layout and scan it (a warm restart).

        Entering a tier that is open returns it; concurrent entrants wait for
        the open in progress (after a failed one, each tries in turn). A
        cancelled open finishes first (its thread cannot be interrupted):
        the tier is then open, and the cancellation lands in the caller.

        Raises:
            ClosedError: The tier was closed, before or while it opened.
            ConfigError: The path is a file or a symlink, belongs to another
                user, is held by another open DiskTier, is marked with
                another block layout, or refuses ``O_DIRECT`` (``direct_io``).
            TierIOError: The directory cannot be created, read, locked,
                marked or (``fsync``) synced (an ``OSError`` such as ``EACCES``
                or ``EROFS``), or a block file cannot be verified for a reason
                that is not the file's own (``EMFILE``, ``ENOMEM``…).
        """
        await self._open_gate.once(lambda: self._opened or self.closed, self._open_once)
        if self.closed:
            raise ClosedError(f"tier {self._name} is closed")
        return self

    async def _open_once(self) -> None:
        try:  # a cancelled call still waits for the thread: the lock is never left claimed
            with self._batches.running():  # aclose waits for the scan's thread
                recovered = await run_to_end(self._open, undo=self._release_lock)
        except OSError as exc:
            raise TierIOError(
                f"tier {self._name}: cannot open {self.path}: {exc}", tier=self._name
            ) from exc
        if self._closed:  # closed while it scanned: aclose releases the lock
            raise ClosedError(f"tier {self._name} was closed while it opened")
        self._recovered = recovered
        self._map.load(recovered)
        self._opened = True
        _log.info("tier_open", tier=self._name, n_blocks=len(recovered))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop using the directory (its blocks stay for a warm restart). Idempotent.

        Calls made after it starts raise ``ClosedError``; the batches already
        running are waited for (shielded from cancellation) before the
        directory's lock is released, since their worker threads cannot be
        interrupted and would otherwise go on renaming and deleting files in
        a directory another tier may open. A worker stuck in a system call
        (a hung network file system) therefore holds ``aclose`` up until it
        returns. Files whose delete failed are deleted again here. A second
        call waits for the first to finish (an opening scan counts as a batch).
        In a process forked from the one that opened it, it only marks the
        tier closed: the directory, its lock and its files are the parent's.
        """
        if self._forked():
            self._closed = True
            return
        async with self._gate.closing() as first:
            if not first:  # waited for the first: the lock is gone
                return
            self._closed = True
            try:
                await self._batches.close()
            finally:
                self._unlock()

    def _release_lock(self, _: object) -> None:
        """Undo an open whose caller was cancelled meanwhile (it will never close it)."""
        self._unlock()

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()  # closes the descriptor: releases the flock

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"tier {self._name} is closed")
        if not self._opened:
            raise ClosedError(f"tier {self._name} is not open: use 'async with'")

    def _open(self) -> list[tuple[int, BlockKey]]:
        self._lock, created = claim_directory(self.path, self._name)
        try:
            return prepare_directory(self._files, self._num_slots, self._name, created)
        except BaseException:
            self._unlock()
            raise

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """``(slot, key)`` of every valid block found when the tier was opened."""
        self._check_open()
        return list(self._recovered)

    # -- I/O -------------------------------------------------------------------------

    async def _write(
        self, slot_list: list[int], keys: Sequence[BlockKey], parts: list[torch.Tensor]
    ) -> None:
        host = [part if part.device.type == "cpu" else part.to("cpu") for part in parts]
        await self._batches.write(slot_list, keys, row_access(host))

    async def _read(
        self, slot_list: list[int], keys: Sequence[BlockKey], parts: list[torch.Tensor]
    ) -> None:
        # Device parts are filled from a host copy here, on the caller's
        # thread and stream, once every block is read (never from a worker).
        host = [
            part if part.device.type == "cpu" else torch.empty(part.shape, dtype=torch.uint8)
            for part in parts
        ]
        try:
            await self._batches.read(slot_list, keys, row_access(host))
        except BlockMissingError:
            copy_back(parts, host)  # the blocks that were read are filled, as promised
            raise
        copy_back(parts, host)

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Write ``data`` rows as the blocks ``keys`` into ``slots``, atomically per block.

        Raises:
            InvalidRequestError: Bad slots, keys or buffer, a repeated slot or
                key, or a slot or key that another call is writing.
            TierIOError: A block could not be written (the others were).
        """
        self._check_open()
        slot_list, checked = self._checked(slots, keys, data, one=True, written=False)
        await self._write(slot_list, keys, checked)

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Write several buffers' rows (taken in order) as the blocks ``keys`` into ``slots``.

        One call, its blocks spread over the worker threads as in
        :meth:`write_from`, straight from each part's rows (the pipeline's
        mover passes the CPU tier's runs this way: no staging copy).

        Raises:
            InvalidRequestError: Bad slots, keys or parts (rows not adding up to
                ``len(slots)``), a repeated slot or key, or a slot or key that
                another call is writing.
            TierIOError: A block could not be written (the others were).
        """
        self._check_open()
        slot_list, checked = self._checked(slots, keys, parts, one=False, written=False)
        await self._write(slot_list, keys, checked)

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
        slot_list, checked = self._checked(slots, keys, out, one=True, written=True)
        await self._read(slot_list, keys, checked)

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        """Read and verify the blocks into several buffers' rows, taken in order.

        One call, its blocks spread over the worker threads as in
        :meth:`read_into`, each read straight into its part's row (the
        pipeline's mover passes the CPU tier's runs this way: no staging
        copy). Blocks that are missing are named together after every other
        block was read.

        Raises:
            BlockMissingError: Blocks absent, failing verification or whose
                file cannot be read (``slots``).
            InvalidRequestError: Bad slots, keys or parts (rows not adding up
                to ``len(slots)``, or parts sharing memory).
            TierIOError: An I/O error that says nothing of the blocks.
        """
        self._check_open()
        slot_list, checked = self._checked(slots, keys, parts, one=False, written=True)
        await self._read(slot_list, keys, checked)

    async def discard(self, slots: Sequence[int]) -> None:
        """Delete the blocks in ``slots`` (a cancelled call still deletes them).

        Raises:
            InvalidRequestError: Bad slots, or a slot being written (nothing
                deleted).
            TierIOError: A file could not be deleted (it is forgotten all the
                same, and deleted again at ``aclose``).
        """
        self._check_open()
        await self._batches.discard(check_slots(slots, self._num_slots, tier=self._name))

    async def discard_unmapped(self) -> int:
        """Delete the directory's blocks outside the tier's slots; how many were deleted.

        They are the blocks a larger capacity wrote in slots beyond this
        one's, files the opening scan could not read, and ones whose delete
        failed: the offload manager's ``reset_cache`` deletes them with the
        mapped blocks (see :class:`~kvtier.tiers.base.SweepingStore`). Keys
        being written or deleted are left alone. A cancelled call still
        deletes.

        Raises:
            TierIOError: The directory could not be listed, or a file could
                not be deleted (tried again at ``aclose``).
        """
        self._check_open()
        return await self._batches.discard_unmapped()
