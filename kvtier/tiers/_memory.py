"""Where tensors' bytes live: address spans (to refuse aliasing) and NumPy views."""

from __future__ import annotations

import bisect
import heapq
import itertools
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

    Only tensors on the same device are compared (a tensor without elements
    shares none), and only pairs whose address ranges intersect are looked at
    closely: row slices of one tensor (the parts of a column-major buffer,
    say) are told apart exactly, and so are views with contiguous rows on one
    row grid that interleave (``x[0::2]`` and ``x[1::2]``; a K and a V view of
    ``[num_blocks, 2, …]``); any other pair whose ranges intersect counts as
    overlapping (conservative).

    O(n log n) for n tensors, however many of their ranges intersect: tensors
    are grouped by row grid (storage, strides, columns, element size), the
    tensors of a grid by phase (offset modulo the row stride), and each phase's
    tensors are runs of rows of one grid, sorted and compared with neighbours.
    """
    by_device: dict[torch.device, list[tuple[int, int, torch.Tensor]]] = {}
    for tensor in tensors:
        start, end = _span(tensor)
        if start < end:
            by_device.setdefault(tensor.device, []).append((start, end, tensor))
    for items in by_device.values():
        items.sort(key=lambda item: item[0])
        if _any_meet(items) and _grids_overlap(items):
            return True
    return False


def _any_meet(items: Sequence[tuple[int, int, object]]) -> bool:
    """Whether two of some ``(start, end, …)`` ranges, sorted by start, intersect."""
    reach = -1
    for start, end, _ in items:
        if start < reach:
            return True
        reach = max(reach, end)
    return False


def _other_colour_meets(items: Sequence[tuple[int, int, int]]) -> bool:
    """Whether two nonempty ``(start, end, colour)`` ranges of different colours intersect.

    ``items`` are sorted by start. The sweep keeps the farthest end seen, its
    colour, and the farthest end of any other colour: the farthest a range of
    another colour than the next one's reaches is one of the two. (A range of
    another colour than the farthest one's that does not meet it starts past
    its end, so becomes the farthest.)
    """
    reach, reach_colour, other_reach = -1, None, -1
    for start, end, colour in items:
        if colour == reach_colour:
            if other_reach > start:
                return True
            reach = max(reach, end)
        elif reach > start:
            return True
        else:
            reach, reach_colour, other_reach = end, colour, reach
    return False


_Grid = tuple[int, int, int, int, int]  # storage, row stride, column stride, columns, element size


def _grids_overlap(items: Sequence[tuple[int, int, torch.Tensor]]) -> bool:
    """:func:`any_overlap` for tensors on one device, sorted by start and nonempty.

    Two tensors on different row grids, or on a grid whose rows do not advance
    (a row stride of 0), may share memory when their ranges intersect; two on
    one grid are told apart by :func:`_grid_overlaps`.
    """
    colours: dict[_Grid, int] = {}
    coloured: list[tuple[int, int, int]] = []
    grids: dict[_Grid, list[tuple[int, int]]] = {}  # (storage offset, rows) of each tensor
    for index, (start, end, tensor) in enumerate(items):
        (rows, cols), (row_stride, col_stride) = tensor.shape, tensor.stride()
        if row_stride <= 0:
            coloured.append((start, end, -1 - index))  # a colour of its own
            continue
        grid = (
            tensor.untyped_storage().data_ptr(),
            row_stride,
            col_stride,
            cols,
            tensor.element_size(),
        )
        coloured.append((start, end, colours.setdefault(grid, len(colours))))
        grids.setdefault(grid, []).append((int(tensor.storage_offset()), int(rows)))
    if _other_colour_meets(coloured):
        return True
    return any(
        _grid_overlaps(parts, row_stride, col_stride, cols)
        for (_, row_stride, col_stride, cols, _), parts in grids.items()
        if len(parts) > 1
    )


def _grid_overlaps(
    parts: Sequence[tuple[int, int]], row_stride: int, col_stride: int, cols: int
) -> bool:
    """Whether two tensors on one row grid (``row_stride > 0``) may share memory.

    Args:
        parts: ``(storage offset, rows)`` of each tensor, in elements.
        row_stride: The grid's row stride, in elements.
        col_stride: Its column stride.
        cols: Its columns.

    A tensor's rows are rows ``first … first + rows - 1`` of the grid at its
    phase (``offset = first * row_stride + phase``). Two tensors at one phase
    share memory when their rows do, or (for strides whose grid overlaps
    itself) when the grid spanning both does and their ranges intersect; at two
    phases, when their ranges intersect and (for contiguous rows apart) a row
    of one starts less than ``cols`` elements from a row of the other.
    """
    phases: dict[int, list[tuple[int, int]]] = {}
    for offset, rows in parts:
        first, phase = divmod(offset, row_stride)
        phases.setdefault(phase, []).append((first, rows))
    extent = (cols - 1) * col_stride + 1  # elements a row's range covers
    if any(_runs_overlap(runs, row_stride, col_stride, cols, extent) for runs in phases.values()):
        return True
    if len(phases) < 2:
        return False
    ranges = sorted(
        (offset, offset + (rows - 1) * row_stride + extent, offset % row_stride)
        for offset, rows in parts
    )
    if col_stride != 1 or row_stride < cols:
        return _other_colour_meets(ranges)  # rows of any two phases may meet
    return _near_phases_meet(ranges, row_stride, cols)


def _runs_overlap(
    runs: list[tuple[int, int]], row_stride: int, col_stride: int, cols: int, extent: int
) -> bool:
    """Whether two ``(first, rows)`` runs of rows of one grid at one phase may share memory."""
    runs.sort()
    if any(first < prev + rows for (prev, rows), (first, _) in itertools.pairwise(runs)):
        return True  # two runs share a row (runs sorted by first row meet a neighbour)
    if col_stride == 1 and row_stride >= cols:
        return False  # contiguous rows, apart: the grid never overlaps itself
    # Runs now lie apart, in order. Whether the grid spanning two runs overlaps
    # itself grows with its rows only (it is monotone in them), and those grow
    # with the later run; so for each run, only the farthest later run whose
    # range its own range reaches needs a look.
    starts = [first * row_stride for first, _ in runs]
    for index, (first, rows) in enumerate(runs):
        last = bisect.bisect_left(starts, starts[index] + (rows - 1) * row_stride + extent) - 1
        if last > index:
            span_rows = runs[last][0] + runs[last][1] - first
            if grid_overlaps_itself(span_rows, cols, row_stride, col_stride):
                return True
    return False


def _near_phases_meet(ranges: Sequence[tuple[int, int, int]], row_stride: int, cols: int) -> bool:
    """Whether two ``(start, end, phase)`` ranges of contiguous rows apart may share memory.

    ``ranges`` are sorted by start and share no row with a range at the same
    phase. Two at different phases meet when their ranges intersect and the
    phases lie less than ``cols`` apart around the row period. A sweep keeps
    the phases of the ranges still open, sorted, and looks at the nearest one
    on either side of each new range's phase.
    """
    open_ends: list[tuple[int, int]] = []  # heap of (end, phase)
    counts: dict[int, int] = {}
    open_phases: list[int] = []  # sorted, distinct
    for start, end, phase in ranges:
        while open_ends and open_ends[0][0] <= start:
            _, closed = heapq.heappop(open_ends)
            counts[closed] -= 1
            if not counts[closed]:
                del counts[closed]
                del open_phases[bisect.bisect_left(open_phases, closed)]
        at = bisect.bisect_left(open_phases, phase)
        present = at < len(open_phases) and open_phases[at] == phase
        if len(open_phases) > present:  # a phase other than ``phase`` is open
            after = open_phases[(at + present) % len(open_phases)]
            for other in (open_phases[at - 1], after):  # ``at - 1`` wraps around too
                gap = (other - phase) % row_stride
                if other != phase and (gap < cols or gap > row_stride - cols):
                    return True
        heapq.heappush(open_ends, (end, phase))
        if phase not in counts:
            bisect.insort(open_phases, phase)
        counts[phase] = counts.get(phase, 0) + 1
    return False


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
