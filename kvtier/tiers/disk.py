"""DiskTier: blocks in files under a directory, verified on every read.

One file per block, named ``<key hex>.kvb`` (names come only from the key's
hex digest), holding a header (:mod:`kvtier.tiers.disk_format`) and the
payload. A write goes to a ``.tmp-*`` file created ``0600`` in the same
directory, then ``os.replace`` moves it over the final name, so a crash leaves
either the old block, the new one, or a stray temp file (deleted on the next
open), never a half block under a block's name; the checksum catches torn or
corrupted payloads anyway. The directory is created ``0700`` (an existing one
is tightened to ``0700``).

One file per block rather than slab files: a block is 64 KiB to several MiB,
large enough that per-file costs are small next to the copy; replacement is
atomic per block with no free-space map to keep crash-consistent; and warm
restart is a directory scan. I/O runs in worker threads behind a
``CapacityLimiter`` (``max_workers``), a batch's blocks in parallel.

Every read checks magic, version, layout fingerprint, key, slot, length and
checksum: any mismatch, a missing or short file raises ``BlockMissingError``
(a miss, never wrong bytes). Other ``OSError`` become ``TierIOError``.

**Warm restart**: opening scans the directory, verifies every block file and
offers the valid ones through :meth:`DiskTier.recover`; torn, corrupt, foreign
and stray temp files are deleted.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import stat
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import torch

from kvtier.errors import BlockMissingError, ClosedError, ConfigError, TierIOError
from kvtier.log import get_logger
from kvtier.tiers._copy import check_buffer, check_slots
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.disk_format import HEADER, MAX_KEY_BYTES, checksum, decode_header, encode_header

__all__ = ["DiskTier"]

_SUFFIX = ".kvb"
_TMP_PREFIX = ".tmp-"
_log = get_logger("kvtier.tiers.disk")


class DiskTier:
    """A persistent tier of block files under ``path``.

    Args:
        path: The directory (created 0700 if missing).
        layout: The block layout.
        capacity_bytes: Disk budget; ``num_slots`` is how many blocks (header
            included) fit in it.
        name: The tier's name (``medium`` of its events).
        max_workers: Blocks read or written at once (worker threads).
        fsync: ``fsync`` each block before it replaces the old one.

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
    ) -> None:
        per_block = layout.block_bytes + HEADER.size + MAX_KEY_BYTES
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise ConfigError(f"capacity_bytes must be an integer, got {capacity_bytes!r}")
        if capacity_bytes < per_block:
            raise ConfigError(
                f"capacity_bytes={capacity_bytes} holds no block of {per_block} bytes"
            )
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        self._path = Path(path)
        self._layout = layout
        self._name = name
        self._num_slots = capacity_bytes // per_block
        self._fingerprint = layout.fingerprint()
        self._fsync = fsync
        self._limiter = anyio.CapacityLimiter(max_workers)
        self._file_bytes = per_block  # the largest block file (longest key)
        self._buffers: deque[bytearray] = deque()  # pooled read buffers
        self._slot_keys: dict[int, BlockKey] = {}
        self._recovered: list[tuple[int, BlockKey]] = []
        self._opened = False
        self._closed = False

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
        return self._path

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if not self._opened:
            try:
                self._recovered = await anyio.to_thread.run_sync(self._open)
            except OSError as exc:
                raise TierIOError(f"tier {self._name}: cannot open {self._path}: {exc}") from exc
            self._slot_keys = dict(self._recovered)
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

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if not self._opened:
            raise ClosedError(f"tier {self._name} is not open: use 'async with'")

    def _open(self) -> list[tuple[int, BlockKey]]:
        self._path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self._path.stat().st_mode) != 0o700:
            self._path.chmod(0o700)
        found: dict[int, BlockKey] = {}
        for entry in sorted(self._path.iterdir()):
            if entry.name.startswith(_TMP_PREFIX):
                entry.unlink(missing_ok=True)
                continue
            if entry.suffix != _SUFFIX:
                continue
            valid = self._verify_file(entry)
            if valid is None or valid[0] in found:
                _log.warning("tier_block_dropped", tier=self._name, file=entry.name)
                entry.unlink(missing_ok=True)
                continue
            found[valid[0]] = valid[1]
        return sorted(found.items())

    def _verify_file(self, path: Path) -> tuple[int, BlockKey] | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        header = decode_header(data)
        if (
            header is None
            or header.fingerprint != self._fingerprint
            or header.payload_length != self._layout.block_bytes
            or header.slot >= self._num_slots
            or path.name != header.key.hex() + _SUFFIX
            or len(data) != header.size + header.payload_length
            or checksum(memoryview(data)[header.size :]) != header.digest
        ):
            return None
        return header.slot, header.key

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """``(slot, key)`` of every valid block found when the tier was opened."""
        self._check_open()
        return list(self._recovered)

    # -- I/O -------------------------------------------------------------------------

    def _file(self, key: BlockKey) -> Path:
        return self._path / (key.hex() + _SUFFIX)

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Write ``data`` rows as the blocks ``keys`` into ``slots``, atomically per block."""
        self._check_open()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        rows = check_buffer(data, slot_list, keys, self._layout.block_bytes, tier=self._name)
        for key in keys:
            if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
                raise ConfigError(f"tier {self._name}: keys must be 1..{MAX_KEY_BYTES} bytes")
        host = rows.to("cpu") if rows.device.type != "cpu" else rows
        errors: list[TierIOError] = []

        async def write(index: int, slot: int, key: BlockKey) -> None:
            try:
                await self._write_one(slot, key, host[index])
            except OSError as exc:
                errors.append(self._io_error(f"writing slot {slot}", exc))

        async with anyio.create_task_group() as group:
            for index, (slot, key) in enumerate(zip(slot_list, keys, strict=True)):
                group.start_soon(write, index, slot, key)
        if errors:
            raise errors[0]

    def _io_error(self, what: str, exc: OSError) -> TierIOError:
        error = TierIOError(f"tier {self._name}: {what} failed: {exc}", tier=self._name)
        error.__cause__ = exc
        return error

    async def _write_one(self, slot: int, key: BlockKey, row: torch.Tensor) -> None:
        contiguous = row.contiguous()  # kept alive across the write below
        payload = _tensor_view(contiguous)
        run = anyio.to_thread.run_sync
        await run(self._write_file, slot, key, payload, limiter=self._limiter)
        old = self._slot_keys.get(slot)
        self._slot_keys[slot] = key
        if old is not None and old != key:
            await run(self._unlink, old, limiter=self._limiter)

    def _write_file(self, slot: int, key: BlockKey, payload: memoryview) -> None:
        header = encode_header(slot, key, self._fingerprint, payload)
        tmp = self._path / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                total = len(header) + len(payload)
                written = os.writev(fd, [header, payload])
                if written < total:  # short write: finish it
                    rest = memoryview(header + bytes(payload))[written:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._file(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _unlink(self, key: BlockKey) -> None:
        self._file(key).unlink(missing_ok=True)

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        """Read and verify the blocks; any doubt raises ``BlockMissingError``."""
        self._check_open()
        slot_list = check_slots(slots, self._num_slots, tier=self._name)
        rows = check_buffer(out, slot_list, keys, self._layout.block_bytes, tier=self._name)
        missing: list[int] = []
        errors: list[TierIOError] = []

        async def read(index: int, slot: int, key: BlockKey) -> None:
            try:
                ok = await anyio.to_thread.run_sync(
                    self._read_file, slot, key, rows[index], limiter=self._limiter
                )
            except FileNotFoundError:
                ok = False
            except OSError as exc:
                errors.append(self._io_error(f"reading slot {slot}", exc))
                return
            if not ok:
                missing.append(slot)

        async with anyio.create_task_group() as group:
            for index, (slot, key) in enumerate(zip(slot_list, keys, strict=True)):
                group.start_soon(read, index, slot, key)
        if errors:
            raise errors[0]
        if missing:
            raise BlockMissingError(
                f"tier {self._name}: {len(missing)} block(s) missing or failed verification",
                tier=self._name,
                slots=tuple(sorted(missing)),
            )

    def _read_file(self, slot: int, key: BlockKey, row: torch.Tensor) -> bool:
        """Read, verify, and only then copy the block's payload into ``row``.

        Read buffers are pooled (at most ``max_workers`` exist at once):
        a fresh 2 MiB buffer per block costs more in page faults than the read.
        """
        try:
            data = self._buffers.pop()
        except IndexError:
            data = bytearray(self._file_bytes)
        try:
            with self._file(key).open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != self._file_bytes - MAX_KEY_BYTES + len(key):
                    return False
                view = memoryview(data)[:size]
                if handle.readinto(view) != size:
                    return False
            header = decode_header(view)
            if (
                header is None
                or header.key != key
                or header.slot != slot
                or header.fingerprint != self._fingerprint
                or header.payload_length != self._layout.block_bytes
                or size != header.size + header.payload_length
                or checksum(view[header.size :]) != header.digest
            ):
                return False
            row.copy_(
                torch.frombuffer(
                    data, dtype=torch.uint8, offset=header.size, count=header.payload_length
                )
            )
            return True
        finally:
            self._buffers.append(data)

    async def discard(self, slots: Sequence[int]) -> None:
        """Delete the blocks in ``slots``."""
        self._check_open()
        for slot in check_slots(slots, self._num_slots, tier=self._name):
            key = self._slot_keys.pop(slot, None)
            if key is not None:
                try:
                    await anyio.to_thread.run_sync(self._unlink, key, limiter=self._limiter)
                except OSError as exc:
                    raise TierIOError(
                        f"tier {self._name}: discard failed: {exc}", tier=self._name
                    ) from exc


def _tensor_view(row: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, without copying or NumPy.

    The view aliases the tensor's memory: the caller keeps the tensor alive
    (and unchanged) while the view is in use.
    """
    size = row.numel() * row.element_size()
    buffer = (ctypes.c_ubyte * size).from_address(row.data_ptr())
    return memoryview(buffer).cast("B")
