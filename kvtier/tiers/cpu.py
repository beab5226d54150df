"""The CPU tier: blocks in host memory, pinned when CUDA is there.

Storage is one ``uint8 [num_slots, block_bytes]`` tensor allocated, zeroed (so
every page is resident) and, when pinning, page-locked on ``__aenter__`` in a
worker thread; ``aclose()`` releases it. Pinning registers the tensor's own
pages with ``cudaHostRegister`` instead of allocating through torch's caching
host allocator, which rounds every pinned allocation up to a power of two (a
40 GiB tier would lock 64 GiB).

:meth:`CpuTier.slot_view` exposes an ascending run of slots as a view of the
storage, so a pipeline can have the device gather straight into place (or
scatter straight from it) without a staging copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio
import torch

from kvtier.errors import ClosedError, ConfigError, TierIOError
from kvtier.log import get_logger
from kvtier.tiers._checks import ascending_run, check_slots
from kvtier.tiers._close_gate import CloseGate
from kvtier.tiers._copier_calls import CopierCalls
from kvtier.tiers._copy import OFFLOAD_MIN_BYTES, STAGING_BYTES, RowCopier, check_copy_threads
from kvtier.tiers._host import host_shortfall
from kvtier.tiers._threads import run_to_end
from kvtier.tiers.base import BlockKey, BlockLayout

__all__ = ["CpuTier"]

_log = get_logger("kvtier.tiers.cpu")
_HOST_REGISTER_PORTABLE = 1
_cudart: Callable[[], Any] = torch.cuda.cudart


def _register(tensor: torch.Tensor, device: int) -> None:
    """Page-lock ``tensor``'s memory (exactly its bytes) for every CUDA context.

    Called from a worker thread, whose current device is 0 whatever the
    engine's: made on ``device`` (the tier's GPU), the call binds that GPU's
    context, never creates one on GPU 0.
    """
    nbytes = tensor.numel() * tensor.element_size()
    with torch.cuda.device(device):
        error = _cudart().cudaHostRegister(tensor.data_ptr(), nbytes, _HOST_REGISTER_PORTABLE)
    if int(error) != 0:
        raise TierIOError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(error)}")


def _unregister(tensor: torch.Tensor, device: int) -> None:
    """Unpin, once every GPU with a context has finished what it had queued.

    Only GPUs that have a context are synchronised: selecting one that has
    none would create it (from CUDA 12 on).
    """
    for index in _with_context(device):
        torch.cuda.synchronize(index)
    with torch.cuda.device(device):
        error = _cudart().cudaHostUnregister(tensor.data_ptr())
    if int(error) != 0:
        raise TierIOError(f"cudaHostUnregister failed with CUDA error {int(error)}")


def _with_context(device: int) -> list[int]:
    """The GPUs whose primary context exists (``device`` at least)."""
    has_context: Callable[[int], bool] | None = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if has_context is None:
        return [device]
    return [i for i in range(torch.cuda.device_count()) if i == device or has_context(i)]


class CpuTier(CopierCalls):
    """Host memory tier: ``num_slots`` blocks in one (optionally pinned) tensor.

    Storage is allocated when the tier is entered (``async with tier``); any
    call before that or after ``aclose()`` raises
    :class:`~kvtier.errors.ClosedError`. Keys are not stored or verified (the
    tier index owns them).

    Args:
        layout: The block layout.
        num_slots: Capacity in blocks.
        name: The tier's name (``medium`` in events).
        pin_memory: Page-lock the storage for fast, asynchronous device copies.
            ``None`` pins when CUDA is available and ``device`` is a CUDA device
            (or not given), and falls back to pageable memory (with a warning
            log) if pinning fails; ``True`` requires CUDA and pinning.
        device: The accelerator the tier exchanges blocks with: decides
            automatic pinning, and a CUDA device with an index is the GPU
            whose context pins the memory (default: the current device of
            the thread that opens the tier). Pinned memory serves every GPU.
        offload_min_bytes: Copies of at least this many bytes run in a worker
            thread instead of on the event loop.
        staging_bytes: Most bytes of staging memory a copy to or from another
            device uses at once.
        copy_threads: Worker threads a host-to-host copy off the event loop
            is split across (in shares of at least 2 MiB); ``None`` uses
            torch's intra-op thread count, read at each copy.

    Raises:
        ConfigError: An argument is out of range, or pinning was asked for
            without CUDA.
    """

    in_memory: ClassVar[bool] = True
    """Calls are memory copies (see :class:`~kvtier.tiers.base.BlockStore`)."""

    def __init__(
        self,
        layout: BlockLayout,
        num_slots: int,
        *,
        name: str = "cpu",
        pin_memory: bool | None = None,
        device: torch.device | str | None = None,
        offload_min_bytes: int = OFFLOAD_MIN_BYTES,
        staging_bytes: int = STAGING_BYTES,
        copy_threads: int | None = None,
    ) -> None:
        if not isinstance(layout, BlockLayout):
            raise ConfigError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
            raise ConfigError(f"num_slots must be a positive integer, got {num_slots!r}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        limits = (("offload_min_bytes", offload_min_bytes), ("staging_bytes", staging_bytes))
        for label, value in limits:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{label} must be a non-negative integer, got {value!r}")
        check_copy_threads(copy_threads)
        try:
            target = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {device!r} is not a torch device") from exc
        cuda = torch.cuda.is_available()
        self._pin_required = pin_memory is True
        if pin_memory is None:
            pin_memory = cuda and (target is None or target.type == "cuda")
        elif pin_memory and not cuda:
            raise ConfigError("pin_memory=True needs CUDA, which is not available")
        self._name = name
        self._layout = layout
        self._block_bytes = layout.block_bytes
        self._num_slots = num_slots
        self._pin = bool(pin_memory)
        self._target = target
        self._gpu = 0  # the GPU that pins and unpins the storage (chosen on opening)
        self._offload_min_bytes = offload_min_bytes
        self._staging_bytes = staging_bytes
        self._copy_threads = copy_threads
        self._storage: torch.Tensor | None = None
        self._copier: RowCopier | None = None
        self._pinned = False
        self._closed = False
        self._gate = CloseGate()

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
    def pinned(self) -> bool:
        """True while the storage is page-locked (only after opening)."""
        return self._pinned

    def _open(self) -> tuple[torch.Tensor, RowCopier]:
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if self._storage is None or self._copier is None:
            raise ClosedError(f"tier {self._name} is not open: enter it with `async with` first")
        return self._storage, self._copier

    def _live_copier(self) -> RowCopier:
        return self._open()[1]

    def _settled(self) -> bool:
        """Whether the tier is closed or already holds its storage."""
        return self._closed or self._storage is not None

    def _pinning_gpu(self) -> int:
        """The GPU whose context pins the storage: ``device``'s, else the caller's current one.

        Read on the event loop's thread (the engine's, or the thread a
        synchronous engine's offload manager copied its CUDA stream to), not
        in the worker thread that pins, whose current device is always 0.
        """
        target = self._target
        if target is not None and target.type == "cuda" and target.index is not None:
            return target.index
        return torch.cuda.current_device()

    def _allocate(self) -> tuple[torch.Tensor, bool]:
        """Zeroed storage and whether it is page-locked (blocking)."""
        nbytes = self._num_slots * self._block_bytes
        shortfall = host_shortfall(nbytes)
        if shortfall is not None:
            raise TierIOError(f"{shortfall}: lower the tier's capacity")
        # Its own allocation, registered from its first byte: ``is_pinned()`` checks
        # the storage's base pointer, so views of it report pinned too.
        storage = torch.zeros((self._num_slots, self._block_bytes), dtype=torch.uint8)
        if self._pin:
            try:
                _register(storage, self._gpu)
            except TierIOError as exc:
                if self._pin_required:
                    raise
                _log.warning("tier_pin_failed", tier=self._name, bytes=nbytes, error=str(exc))
            else:
                return storage, True
        return storage, False

    def _drop_storage(self, made: tuple[torch.Tensor, bool]) -> None:
        """Unpin storage whose opening was cancelled meanwhile (blocking)."""
        storage, pinned = made
        if pinned:
            _unregister(storage, self._gpu)

    async def __aenter__(self) -> Self:
        """Allocate (and pin) the storage in a worker thread.

        Raises:
            ClosedError: The tier was closed.
            TierIOError: Host memory could not be allocated or pinned, or
                the capacity is more than the machine (or its container) has
                available (refused before allocating).
        """
        if self._closed:
            raise ClosedError(f"tier {self._name} is closed")
        if self._storage is not None:
            return self
        start = time.perf_counter()
        if self._pin:
            self._gpu = self._pinning_gpu()
        try:
            storage, pinned = await run_to_end(self._allocate, undo=self._drop_storage)
        except TierIOError as exc:
            raise TierIOError(f"tier {self._name}: {exc}", tier=self._name) from exc
        except (RuntimeError, MemoryError) as exc:
            raise TierIOError(
                f"tier {self._name}: cannot allocate host memory", tier=self._name
            ) from exc
        if self._settled():  # closed, or opened by a concurrent ``__aenter__``, meanwhile
            if pinned:
                with anyio.CancelScope(shield=True):  # cancelled or not: never left pinned
                    await run_to_end(_unregister, storage, self._gpu, must_run=True)
            if self._closed:
                raise ClosedError(f"tier {self._name} was closed while opening")
            return self
        self._storage, self._pinned = storage, pinned
        self._copier = RowCopier(
            [storage],
            tier=self._name,
            offload_min_bytes=self._offload_min_bytes,
            staging_bytes=self._staging_bytes,
            copy_threads=self._copy_threads,
        )
        _log.info(
            "tier_open",
            tier=self._name,
            n_blocks=self._num_slots,
            bytes=storage.numel(),
            pinned=self._pinned,
            seconds=time.perf_counter() - start,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the tier."""
        await self.aclose()

    async def aclose(self) -> None:
        """Release the storage (unpinning it after its copies finish); idempotent.

        Shielded from cancellation, as ``async with`` exits when its task is
        cancelled: pinned pages are always unpinned before the storage goes
        (else they stay locked until the process ends). A second call waits
        for the first to finish.
        """
        async with self._gate.closing() as first:
            if not first:
                return
            self._closed = True
            storage, copier = self._storage, self._copier
            self._storage = self._copier = None
            if storage is None or copier is None:
                return
            with anyio.CancelScope(shield=True):
                try:
                    await copier.quiesce()  # copies still running in worker threads end first
                finally:  # also when asyncio's own cancellation ends the wait (after it)
                    if self._pinned:
                        await run_to_end(_unregister, storage, self._gpu, must_run=True)
                        self._pinned = False
            _log.info(
                "tier_close", tier=self._name, n_blocks=self._num_slots, bytes=storage.numel()
            )

    def slot_view(self, slots: Sequence[int]) -> torch.Tensor | None:
        """A view of the storage rows of ``slots`` when they are one ascending run.

        Args:
            slots: Slots, e.g. ``[7, 8, 9]``.

        Returns:
            ``uint8 [len(slots), block_bytes]`` sharing the tier's memory (pinned
            when the tier is), or None when ``slots`` is empty or not
            ``first, first + 1, …``. Writing into the view stores blocks.
            A copy through the view is another tier's (the pipeline's mover
            hands it to the device or disk tier), which :meth:`aclose` does
            not wait for: finish it before closing this tier (the offload
            manager closes its tiers after its jobs have ended).

        Raises:
            ClosedError: The tier is not open.
            InvalidRequestError: A slot is out of range.
        """
        storage, _ = self._open()
        first = ascending_run(check_slots(slots, self._num_slots, tier=self._name))
        if first is None:
            return None
        return storage[first : first + len(slots)]

    async def discard(self, slots: Sequence[int]) -> None:
        """Do nothing: slots are reused by overwriting (checks the tier is open).

        Raises:
            ClosedError: The tier is not open.
        """
        self._open()

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """Host memory does not survive a restart: always ``[]``.

        Raises:
            ClosedError: The tier is not open.
        """
        self._open()
        return []

    def __repr__(self) -> str:
        state = "open" if self._storage is not None else "not open"
        state = "closed" if self._closed else state
        pinned = ", pinned" if self._pinned else ""
        return f"CpuTier({self._name!r}, {self._num_slots} slots{pinned}, {state})"
