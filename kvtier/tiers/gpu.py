"""The device tier: an engine's KV cache tensors seen as a :class:`BlockStore`.

Two layouts of the engine's cache are understood:

* **per-layer**: a sequence of ``2 * num_layers`` tensors ordered ``[K0, V0, K1,
  V1, …]``, each ``[num_blocks, block_size, num_kv_heads, head_size]`` of the
  layout's dtype (vLLM's ``kv_cache[0]`` / ``kv_cache[1]`` per layer);
* **cross-layer**: one tensor whose first dimension is ``num_blocks`` and whose
  per-block bytes are already in kvtier's canonical order (layer-major, K then
  V, then the page), e.g. ``[num_blocks, num_layers, 2, block_size, heads,
  head_size]``.

Each block's bytes (each page, per layer) must be contiguous; the stride
between blocks may be anything that keeps blocks apart. Blocks that share
memory are refused (a ``ConfigError``): those of one tensor (a block stride
shorter than a block), or of two tensors that partly overlap. The same
tensor may appear more than once (layers that share one KV cache); K and V
views interleaved in one ``[num_blocks, 2, …]`` tensor are apart and
accepted. Slot ``i`` is the engine's block ``i``; keys
are ignored here (the device prefix cache tracks them). On CUDA, copies run on
streams the tier owns (one per direction), ordered after the current stream
of the thread that calls the tier (the event loop's: an async engine's own
thread, or the background loop of a synchronous engine's offload manager,
which is given the engine thread's current stream with each job); the event
loop awaits a CUDA event from a worker thread (see :mod:`kvtier.tiers._copy`).
The engine must not touch the blocks of a transfer until it completes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar, Self

import anyio
import torch

from kvtier.errors import ClosedError, ConfigError
from kvtier.log import get_logger
from kvtier.tiers._checks import byte_rows
from kvtier.tiers._close_gate import CloseGate
from kvtier.tiers._copier_calls import CopierCalls
from kvtier.tiers._copy import OFFLOAD_MIN_BYTES, STAGING_BYTES, RowCopier, check_copy_threads
from kvtier.tiers._memory import any_overlap, grid_overlaps_itself
from kvtier.tiers.base import BlockKey, BlockLayout

__all__ = ["DeviceTier"]

_log = get_logger("kvtier.tiers.gpu")


def _is_flattening(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Whether ``shape`` merges consecutive ``dims`` (in order) and nothing else."""
    i = 0
    for size in shape:
        product = 1
        while product < size and i < len(dims):
            product *= dims[i]
            i += 1
        if product != size:
            return False
    return all(d == 1 for d in dims[i:])


def _per_layer_sources(tensors: Sequence[object], layout: BlockLayout) -> list[torch.Tensor]:
    expected = 2 * layout.num_layers
    if len(tensors) != expected:
        raise ConfigError(
            f"per-layer kv_caches need 2 * num_layers = {expected} tensors "
            f"[K0, V0, K1, V1, …], got {len(tensors)}"
        )
    sources: list[torch.Tensor] = []
    first: torch.Tensor | None = None
    for i, tensor in enumerate(tensors):
        what = f"kv_caches[{i}] ({'KV'[i % 2]}{i // 2})"
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
        if first is None:
            first = tensor
        num_blocks = first.shape[0] if first.dim() == 4 else 0
        shape = (num_blocks, *layout.page_shape)
        if num_blocks == 0 or tuple(tensor.shape) != shape:
            raise ConfigError(
                f"{what} has shape {list(tensor.shape)}, expected "
                f"[num_blocks > 0, {', '.join(map(str, layout.page_shape))}] like kv_caches[0]"
            )
        if tensor.dtype != layout.torch_dtype:
            raise ConfigError(f"{what} has dtype {tensor.dtype}, layout says {layout.torch_dtype}")
        if tensor.device != first.device:
            raise ConfigError(f"{what} is on {tensor.device}, kv_caches[0] on {first.device}")
        sources.append(byte_rows(tensor, num_blocks, layout.page_bytes, what=what))
    return sources


def _cross_layer_source(tensor: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    what = "cross-layer kv_caches"
    if tensor.dtype not in (layout.torch_dtype, torch.uint8):
        raise ConfigError(f"{what} has dtype {tensor.dtype}, layout says {layout.torch_dtype}")
    if tensor.dim() < 2 or tensor.shape[0] == 0:
        raise ConfigError(f"{what} must be [num_blocks, …] with num_blocks > 0")
    num_blocks = tensor.shape[0]
    block_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
    if block_bytes != layout.block_bytes:
        raise ConfigError(
            f"{what} has {block_bytes} bytes per block, layout says {layout.block_bytes}"
        )
    ratio = layout.itemsize // tensor.element_size()  # 1, or the itemsize for uint8
    canonical = (layout.num_layers, 2, *layout.page_shape[:2], layout.head_size * ratio)
    if not _is_flattening(tensor.shape[1:], canonical):
        raise ConfigError(
            f"{what} has shape {list(tensor.shape)}: its per-block dimensions are not "
            f"the canonical [num_layers, 2, block_size, num_kv_heads, head_size] "
            f"= {list(canonical)} (or a flattening of it)"
        )
    return byte_rows(tensor, num_blocks, layout.block_bytes, what=what)


def _refuse_shared_blocks(sources: Sequence[torch.Tensor], *, cross_layer: bool) -> None:
    """Raise ``ConfigError`` when two blocks' bytes may share memory.

    One tensor listed twice is the same memory, not an overlap: a copy moves
    the same bytes through both (layers sharing a KV cache).
    """
    for index, source in enumerate(sources):
        (rows, cols), (row_stride, col_stride) = source.shape, source.stride()
        if grid_overlaps_itself(rows, cols, row_stride, col_stride):
            what = "cross-layer kv_caches" if cross_layer else f"kv_caches[{index}]"
            raise ConfigError(
                f"{what}: its blocks share memory ({cols} bytes each, one every {row_stride} bytes)"
            )
    distinct = {(s.data_ptr(), s.stride(), tuple(s.shape)): s for s in sources}
    if any_overlap(distinct.values()):
        raise ConfigError(
            "kv_caches: two tensors share memory without being the same tensor "
            "(their blocks would overwrite each other)"
        )


class DeviceTier(CopierCalls):
    """An engine's KV cache tensors as a tier (slot ``i`` = engine block ``i``).

    The tier is open from construction (it wraps memory the engine owns);
    ``async with`` is accepted and closes it on exit. Closing releases the
    tier's references to the cache, never the cache itself.

    Args:
        kv_caches: One cross-layer tensor, or ``2 * num_layers`` per-layer
            tensors ``[K0, V0, K1, V1, …]`` (see the module docstring).
        layout: The block layout; shapes and dtypes are checked against it.
        name: The tier's name (``medium`` in events).
        offload_min_bytes: On CPU, copies of at least this many bytes run in a
            worker thread instead of on the event loop.
        staging_bytes: Most bytes of device staging memory a copy to or from
            host memory uses at once (larger batches go in chunks).
        copy_threads: On CPU, worker threads a copy off the event loop is
            split across (in shares of at least 2 MiB); ``None`` uses torch's
            intra-op thread count, read at each copy. CUDA copies run on the
            tier's streams and ignore it.

    Raises:
        ConfigError: A tensor has the wrong shape, dtype, device or memory
            layout, blocks share memory, or an argument is out of range.
    """

    in_memory: ClassVar[bool] = True
    """Calls are memory copies (see :class:`~kvtier.tiers.base.BlockStore`)."""

    def __init__(
        self,
        kv_caches: torch.Tensor | Sequence[torch.Tensor],
        layout: BlockLayout,
        *,
        name: str = "gpu",
        offload_min_bytes: int = OFFLOAD_MIN_BYTES,
        staging_bytes: int = STAGING_BYTES,
        copy_threads: int | None = None,
    ) -> None:
        if not isinstance(layout, BlockLayout):
            raise ConfigError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        for label, value in (
            ("offload_min_bytes", offload_min_bytes),
            ("staging_bytes", staging_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{label} must be a non-negative integer, got {value!r}")
        check_copy_threads(copy_threads)
        caches: object = kv_caches
        if isinstance(caches, torch.Tensor):
            sources = [_cross_layer_source(caches, layout)]
            self._cross_layer = True
        elif isinstance(caches, Sequence):
            sources = _per_layer_sources(list(caches), layout)
            self._cross_layer = False
        else:
            raise ConfigError(
                "kv_caches must be a tensor (cross-layer) or a sequence of tensors (per-layer), "
                f"got {type(kv_caches).__name__}"
            )
        _refuse_shared_blocks(sources, cross_layer=self._cross_layer)
        self._name = name
        self._layout = layout
        self._block_bytes = layout.block_bytes
        self._num_slots = sources[0].shape[0]
        self._copier: RowCopier | None = RowCopier(
            sources,
            tier=name,
            offload_min_bytes=offload_min_bytes,
            staging_bytes=staging_bytes,
            copy_threads=copy_threads,
        )
        self._device = sources[0].device
        self._gate = CloseGate()
        _log.info(
            "tier_open",
            tier=name,
            n_blocks=self._num_slots,
            bytes=self._num_slots * layout.block_bytes,
            device=str(self._device),
            cross_layer=self._cross_layer,
        )

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
        """Capacity in blocks: the engine's ``num_blocks``."""
        return self._num_slots

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._copier is None

    @property
    def device(self) -> torch.device:
        """The device the KV cache lives on."""
        return self._device

    @property
    def cross_layer(self) -> bool:
        """True for one cross-layer tensor, False for per-layer tensors."""
        return self._cross_layer

    def _open(self) -> RowCopier:
        if self._copier is None:
            raise ClosedError(f"tier {self._name} is closed")
        return self._copier

    def _live_copier(self) -> RowCopier:
        return self._open()

    async def discard(self, slots: Sequence[int]) -> None:
        """Do nothing: the engine owns its blocks (checks the tier is open).

        Raises:
            ClosedError: The tier is closed.
        """
        self._open()

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """Nothing survives a restart in device memory: always ``[]``.

        Raises:
            ClosedError: The tier is closed.
        """
        self._open()
        return []

    async def aclose(self) -> None:
        """Wait for copies in progress or queued, then drop the references to the cache.

        Idempotent; shielded from cancellation (the wait is bounded by the
        copies). A second call waits for the first to finish.
        """
        async with self._gate.closing() as first:
            copier, self._copier = self._copier, None
            if not first or copier is None:
                return
            with anyio.CancelScope(shield=True):
                await copier.quiesce()
            _log.info("tier_close", tier=self._name, n_blocks=self._num_slots)

    async def __aenter__(self) -> Self:
        """Return the tier (already open).

        Raises:
            ClosedError: The tier is closed.
        """
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the tier."""
        await self.aclose()

    def __repr__(self) -> str:
        kind = "cross-layer" if self._cross_layer else "per-layer"
        state = "closed" if self.closed else "open"
        where = f"{self._num_slots} blocks on {self._device}"
        return f"DeviceTier({self._name!r}, {kind}, {where}, {state})"
