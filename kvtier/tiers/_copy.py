"""Where and when a tier's batched block copies run.

:class:`RowCopier` is a tier's copy engine: it checks that a caller's buffers
do not alias the tier's memory, then runs the blocking copies of
:class:`~kvtier.tiers._rows.SegmentRows` where they cost the event loop least.
A batch may go to (or come from) one buffer or several *parts* in order
(``read_parts`` / ``write_parts``): one call, one check, one wait, however
scattered the other tier's slots are.

Where a copy runs: CPU only, on the event loop below ``offload_min_bytes``,
else in worker threads: the batch is cut into up to ``copy_threads`` runs of
about :data:`SHARE_MIN_BYTES` or more, one thread each (by default as many as
torch's intra-op pool, which a plain multi-threaded ``copy_`` would use).
CUDA, with same-device or pinned contiguous host buffers: queued on the
copier's stream for that direction (after the caller's current stream),
through device staging of at most ``staging_bytes``; the loop awaits a CUDA
event in a worker thread (large batches are also queued there).
Anything else (pageable or strided host memory, another device): chunked
blocking copies in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Final

import anyio
import structlog
import torch

from kvtier.errors import ConfigError, InvalidRequestError, KVTierError, TierIOError
from kvtier.log import get_logger
from kvtier.tiers._in_flight import InFlight
from kvtier.tiers._memory import MemorySpans
from kvtier.tiers._rows import SegmentRows, split_parts
from kvtier.tiers._streams import drain, event_done, mark, new_stream, on_stream, wait_event
from kvtier.tiers._threads import run_to_end

__all__ = [
    "OFFLOAD_MIN_BYTES",
    "SHARE_MIN_BYTES",
    "STAGING_BYTES",
    "RowCopier",
    "check_copy_threads",
]

OFFLOAD_MIN_BYTES: Final = 4 << 20
"""CPU copies of at least this many bytes run in a worker thread (measured:
a thread round trip costs 50-200 µs, about what copying 1-4 MiB does)."""

SHARE_MIN_BYTES: Final = 2 << 20
"""A CPU copy run off the event loop is split across at most ``copy_threads``
worker threads, and into at most ``bytes // SHARE_MIN_BYTES`` runs (one
8B-class block each at least, give or take a row)."""

STAGING_BYTES: Final = 64 << 20
"""Most bytes of device (or host) staging memory one transfer uses at a time."""

_LOGGER = "kvtier.tiers"
_log = get_logger(_LOGGER)
_stdlib_log = logging.getLogger(_LOGGER)


def check_copy_threads(copy_threads: object) -> None:
    """Validate a tier's ``copy_threads`` argument.

    Raises:
        ConfigError: Not ``None`` or a positive integer.
    """
    if copy_threads is None:
        return
    if isinstance(copy_threads, bool) or not isinstance(copy_threads, int) or copy_threads < 1:
        raise ConfigError(f"copy_threads must be a positive integer or None, got {copy_threads!r}")


class RowCopier:
    """Moves batches of rows between segment tensors and caller buffers.

    Args:
        sources: ``uint8 [num_rows, segment_bytes]`` views, all on one device.
        tier: The owning tier's name (for errors and logs).
        offload_min_bytes: CPU copies this large or larger run in a worker thread.
        staging_bytes: Most bytes of staging memory per transfer.
        copy_threads: Worker threads one CPU copy off the event loop is split
            across; ``None``: torch's intra-op thread count
            (``torch.get_num_threads()``, read at each copy), the budget a
            plain torch copy of the same bytes would use.
    """

    def __init__(
        self,
        sources: Sequence[torch.Tensor],
        *,
        tier: str,
        offload_min_bytes: int,
        staging_bytes: int,
        copy_threads: int | None = None,
    ) -> None:
        self.tier = tier
        self.copy_threads = copy_threads
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop
        self.rows = SegmentRows(sources, staging_bytes=staging_bytes)
        self.device = self.rows.device
        self.row_bytes = self.rows.row_bytes
        self.offload_min_bytes = offload_min_bytes
        self._spans = MemorySpans(sources)
        self._streams: dict[tuple[int, bool], torch.cuda.Stream] = {}
        self._cuda = self.device.type == "cuda"
        self._in_flight = InFlight()  # copies in progress (see quiesce)

    # -- CUDA --

    def _cuda_stream(
        self, parts: Sequence[torch.Tensor], *, read: bool
    ) -> torch.cuda.Stream | None:
        """The stream the copy runs on, ordered after the caller's current streams.

        Reads and writes get a stream each, so loads never queue behind stores
        on the device and both directions of the bus are used at once.
        """
        devices = {d for d in (self.device, *(p.device for p in parts)) if d.type == "cuda"}
        if not devices:
            return None
        main = self.device if self._cuda else next(p.device for p in parts if p.is_cuda)
        index = main.index if main.index is not None else torch.cuda.current_device()
        stream = self._streams.get((index, read))
        if stream is None:
            stream = self._streams[index, read] = new_stream(device=index)
        for device in devices:
            stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _async_ok(self, buffer: torch.Tensor) -> bool:
        """Whether a CUDA tier can queue its copy to or from ``buffer`` without blocking."""
        if self.device.type != "cuda":
            return False
        if buffer.device == self.device:
            return True
        return buffer.device.type == "cpu" and buffer.is_contiguous() and buffer.is_pinned()

    async def sync_streams(self) -> None:
        """Wait (off the event loop) until every copy queued on the copier's streams is done.

        Every stream is drained, whatever cancels the caller meanwhile (the
        cancellation is raised after the last).
        """
        cancel: BaseException | None = None
        for stream in list(self._streams.values()):
            try:
                await run_to_end(drain, stream, must_run=True)
            except asyncio.CancelledError as exc:  # that drain ended: the others must too
                cancel = exc
        if cancel is not None:
            raise cancel

    async def quiesce(self) -> None:
        """Wait until every copy in progress has ended, then until the streams are drained.

        A closing tier calls it (shielded) before it drops or unpins its memory:
        a copy in a worker thread cannot be interrupted, so one still running
        would read or write memory already freed (or, pinned, unregistered).
        """
        try:
            await self._in_flight.wait_idle()
        finally:  # cancelled once the copies ended: the streams are drained all the same
            await self.sync_streams()

    # -- the operations --

    async def read(self, slots: list[int], out: torch.Tensor) -> None:
        """Copy the rows in ``slots`` into ``out`` (``uint8 [len(slots), row_bytes]``)."""
        await self._move(slots, (out,), read=True)

    async def write(self, slots: list[int], data: torch.Tensor) -> None:
        """Copy ``data`` (``uint8 [len(slots), row_bytes]``) into the rows in ``slots``.

        Raises:
            InvalidRequestError: A slot appears twice.
        """
        await self.write_parts(slots, (data,))

    async def read_parts(self, slots: list[int], parts: Sequence[torch.Tensor]) -> None:
        """Copy the rows in ``slots`` into consecutive ``parts``, in one call.

        ``parts[0]`` receives the first ``parts[0].shape[0]`` rows, the next
        part the rows after them, and so on; the row counts add up to
        ``len(slots)`` (checked by the tier).
        """
        await self._move(slots, parts, read=True)

    async def write_parts(self, slots: list[int], parts: Sequence[torch.Tensor]) -> None:
        """Copy consecutive ``parts`` into the rows in ``slots``, in one call.

        Raises:
            InvalidRequestError: A slot appears twice.
        """
        if len(set(slots)) != len(slots):
            raise InvalidRequestError(f"tier {self.tier}: a slot appears twice in one write")
        await self._move(slots, parts, read=False)

    def _check_disjoint(self, buffer: torch.Tensor) -> None:
        """Refuse a buffer that shares memory with the tier's own rows.

        torch does not detect partial overlap of non-contiguous tensors, so a
        scattered copy between a tier and a view of its own memory would
        return normally with wrong bytes.

        Raises:
            InvalidRequestError: The buffer overlaps the tier's memory.
        """
        if buffer.device == self.device and self._spans.overlaps(buffer):
            raise InvalidRequestError(
                f"tier {self.tier}: the buffer overlaps the tier's own memory"
            )

    async def _move(self, slots: list[int], parts: Sequence[torch.Tensor], *, read: bool) -> None:
        """:meth:`_copy`, counted as in progress until it ends (see :meth:`quiesce`)."""
        with self._in_flight:
            await self._copy(slots, parts, read=read)

    async def _copy(self, slots: list[int], parts: Sequence[torch.Tensor], *, read: bool) -> None:
        if not slots:
            return
        # Empty parts move nothing; left in, one (``data_ptr`` 0: not pinned)
        # would send the whole batch down the blocking path.
        parts = [part for part in parts if part.shape[0]]
        for part in parts:
            self._check_disjoint(part)
        start = time.perf_counter()
        nbytes = len(slots) * self.row_bytes
        try:
            stream = self._cuda_stream(parts, read=read)
            queue = stream is not None and all(self._async_ok(part) for part in parts)
            if stream is not None and queue and nbytes < self.offload_min_bytes:
                done = self._enqueue(stream, slots, parts, read=read)
                with torch.cuda.device(stream.device):
                    finished = event_done(done)  # a tiny copy may be done already
                if not finished:
                    # Waited for whatever cancels the caller (anyio's shield does
                    # not stop asyncio's own): its buffer is settled before we return.
                    with anyio.CancelScope(shield=True):
                        await run_to_end(wait_event, done, stream.device, must_run=True)
            elif stream is None and nbytes >= self.offload_min_bytes and self._shares(nbytes) > 1:
                await self._in_threads(slots, parts, read=read, shares=self._shares(nbytes))
            else:
                work = self._work(stream, slots, parts, read=read, queue=queue)
                if stream is not None or nbytes >= self.offload_min_bytes:
                    await run_to_end(work)
                else:
                    work()
        except KVTierError:
            raise
        except RuntimeError as exc:
            raise TierIOError(
                f"tier {self.tier}: block copy failed: {exc}", tier=self.tier
            ) from exc
        if structlog.is_configured() or _stdlib_log.isEnabledFor(logging.DEBUG):
            # Checked first: a dropped event still costs ~10 µs, a tenth of a 2 MiB copy.
            _log.debug(
                "tier_read" if read else "tier_write",
                tier=self.tier,
                n_blocks=len(slots),
                n_parts=len(parts),
                bytes=nbytes,
                seconds=time.perf_counter() - start,
            )

    def _shares(self, nbytes: int) -> int:
        """How many worker threads a CPU copy of ``nbytes`` is split across."""
        threads = self.copy_threads if self.copy_threads is not None else torch.get_num_threads()
        return max(1, min(threads, nbytes // SHARE_MIN_BYTES))

    async def _in_threads(
        self, slots: list[int], parts: Sequence[torch.Tensor], *, read: bool, shares: int
    ) -> None:
        """A CPU copy cut into ``shares`` runs of the batch, each in its own worker thread.

        NumPy and torch release the GIL while they copy, so the runs use as
        many cores as a multi-threaded torch ``copy_`` would. The threads
        come from the copier's own limiter, not anyio's default one, so a
        large copy never holds up other ``to_thread`` calls. Every run that
        started finishes (a worker thread cannot be interrupted) before this
        returns or raises; a run not yet started when the caller is
        cancelled is skipped, so a cancelled copy leaves its destination
        rows undefined, as a failed one does. The first failure is raised,
        whether of a copy or of starting its thread.
        """
        runs = split_parts(parts, shares)
        limiter = self._share_limiter(len(runs))
        failures: list[Exception] = []

        def share(begin: int, end: int, run: list[torch.Tensor]) -> None:
            self.rows.copy(
                slots[begin:end], run, read=read, non_blocking=False, staging_share=len(runs)
            )

        async def in_thread(begin: int, end: int, run: list[torch.Tensor]) -> None:
            try:
                await run_to_end(partial(share, begin, end, run), limiter=limiter)
            except Exception as exc:  # raised below, once every run has settled
                failures.append(exc)

        async with anyio.create_task_group() as group:
            for begin, end, run in runs:
                group.start_soon(in_thread, begin, end, run)
        if failures:
            raise failures[0]

    def _share_limiter(self, threads: int) -> anyio.CapacityLimiter:
        """The copier's worker-thread limiter, with room for ``threads`` at least."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(threads)
        elif self._limiter.total_tokens < threads:
            self._limiter.total_tokens = threads
        return self._limiter

    def _work(
        self,
        stream: torch.cuda.Stream | None,
        slots: list[int],
        parts: Sequence[torch.Tensor],
        *,
        read: bool,
        queue: bool,
    ) -> Callable[[], None]:
        """The blocking copy, for the event loop (small CPU copies) or a worker thread."""

        def work() -> None:
            if stream is None:
                self.rows.copy(slots, parts, read=read, non_blocking=False)
                return
            try:
                if queue:  # large: even queueing the kernels would hold up the loop
                    self._enqueue(stream, slots, parts, read=read)
                else:
                    with on_stream(stream):
                        self.rows.copy(slots, parts, read=read, non_blocking=False)
            finally:
                # Also on failure: kernels queued before it may still use the
                # caller's buffers, which must be settled when we return.
                drain(stream)

        return work

    def _enqueue(
        self,
        stream: torch.cuda.Stream,
        slots: list[int],
        parts: Sequence[torch.Tensor],
        *,
        read: bool,
    ) -> torch.cuda.Event:
        """Queue the copy on ``stream`` without blocking; the event marks its end.

        Every part is on the tier's device, or pinned and contiguous on the host.
        """
        try:
            with on_stream(stream):
                self.rows.copy(slots, parts, read=read, non_blocking=True)
            return mark(stream)
        except BaseException:
            # Kernels queued before the failure may still use the caller's
            # buffer: let them finish before the caller sees the error.
            drain(stream)
            raise
