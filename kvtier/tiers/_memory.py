"""Where tensors' bytes live: address spans (to refuse aliasing) and NumPy views."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["MemorySpans", "any_overlap", "grid_overlaps_itself", "host_views"]


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[first, end)`` a 2-D tensor's elements lie within."""
    start = tensor.data_ptr()
    (rows, cols), (row_stride, col_stride) = tensor.shape, tensor.stride()
    if rows == 0 or cols == 0:
        return start, start
    last = (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride)
    return start, start + (last + 1) * tensor.element_size()


def _merged(spans: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, disjoint ``(starts, ends)`` covering ``spans``."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(spans):
        if ends and start <= ends[-1]:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class MemorySpans:
    """The address ranges of some 2-D tensors, merged, for overlap checks in O(log n).

    Args:
        tensors: The tensors (a tier's segment tensors).
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._starts, self._ends = _merged(_span(tensor) for tensor in tensors)

    def overlaps(self, tensor: torch.Tensor) -> bool:
        """Whether any byte of 2-D ``tensor`` may lie in one of the spans."""
        start, end = _span(tensor)
        below = bisect.bisect_left(self._starts, end) - 1  # last span starting before ``end``
        return below >= 0 and self._ends[below] > start


def any_overlap(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether two of some 2-D tensors may share memory.

    Only tensors on the same device are compared, and only pairs whose address
    ranges intersect are looked at closely: row slices of one tensor (the
    parts of a column-major buffer, say) are told apart exactly, and so are
    views with contiguous rows on one row grid that interleave (``x[0::2]``
    and ``x[1::2]``; a K and a V view of ``[num_blocks, 2, …]``); any other
    pair whose ranges intersect counts as overlapping (conservative).
    """
    by_device: dict[torch.device, list[tuple[int, int, int, torch.Tensor]]] = {}
    for index, tensor in enumerate(tensors):
        start, end = _span(tensor)
        by_device.setdefault(tensor.device, []).append((start, end, index, tensor))
    for items in by_device.values():
        active: list[tuple[int, torch.Tensor]] = []  # (end, tensor) of ranges still open
        for start, end, _, tensor in sorted(items, key=lambda item: item[:3]):
            active = [(other_end, other) for other_end, other in active if other_end > start]
            if any(_may_share(other, tensor) for _, other in active):
                return True
            active.append((end, tensor))
    return False


def _may_share(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two 2-D tensors whose address ranges intersect may share an element."""
    same_grid = (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.stride() == b.stride()
        and a.shape[1] == b.shape[1]
        and a.element_size() == b.element_size()
    )
    row_stride, col_stride = a.stride()
    shift = b.storage_offset() - a.storage_offset()
    if not same_grid or row_stride <= 0:
        return True
    cols = a.shape[1]
    if shift % row_stride:
        if col_stride != 1 or row_stride < cols:
            return True
        # Rows of ``cols`` elements every ``row_stride``: b's rows start ``phase``
        # elements into a's period, so they meet a row of a only if they begin
        # inside one or run into the next.
        phase = shift % row_stride
        return phase < cols or phase > row_stride - cols
    first = shift // row_stride  # b's first row, counted in a's rows
    low, high = min(0, first), max(a.shape[0], first + b.shape[0])
    if grid_overlaps_itself(high - low, a.shape[1], row_stride, col_stride):
        return True  # the rows of the grid they both belong to share memory
    return first < a.shape[0] and first + b.shape[0] > 0


def grid_overlaps_itself(rows: int, cols: int, row_stride: int, col_stride: int) -> bool:
    """True when two elements of a ``rows x cols`` grid with these strides may share memory.

    Exact for the layouts tensors take (contiguous rows, columns, expands);
    conservative for exotic strides.
    """
    if col_stride == 1 and (rows < 2 or abs(row_stride) >= cols):
        return False  # the common case: contiguous rows, apart
    dims = sorted(((abs(row_stride), rows), (abs(col_stride), cols)))
    (inner_stride, inner), (outer_stride, outer) = dims
    if inner > 1 and inner_stride == 0:
        return True
    return outer > 1 and outer_stride < (inner - 1) * inner_stride + 1


def host_views(sources: Sequence[torch.Tensor]) -> tuple[np.ndarray[Any, Any], ...] | None:
    """NumPy views of CPU segment tensors, for copies of ascending runs.

    A run of rows of a per-layer cache is one slice of each of its 64 segment
    tensors. NumPy makes those 64 slices in ~0.2 µs each against ~1.4 µs for a
    torch view, so one 2 MiB block moves about twice as fast (measured 200-240
    µs against 440-540 µs with ``torch.cat``); from a few blocks up both run at
    memory speed. For one source (a cross-layer cache, the CPU tier) NumPy's
    copy is ``memcpy``, which moved scattered 2 MiB rows at 0.92 of a
    contiguous torch ``copy_`` of the same bytes against 0.75 for torch's own
    row copies (single-threaded, this project's 2-core VM). NumPy copies bytes
    (uint8, no arithmetic) and releases the GIL while it does. ``None`` when
    torch was built without NumPy.
    """
    try:
        return tuple(source.detach().numpy() for source in sources)
    except RuntimeError:  # a torch built without NumPy support: torch's own path
        return None
