"""``any_overlap``: never misses shared bytes, and scales as O(n log n) on structured parts.

The reference below is the pairwise sweep ``any_overlap`` used to be: it
compared each tensor with every tensor whose address range was still open, so
parts whose ranges all intersect (row slices of a column-major buffer,
interleaved ``buf[i::n]`` views) cost n²/2 comparisons. The grouped version
must agree with it, or be less conservative only where no byte is shared.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from types import FrameType

import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtier.tiers._memory import _span, any_overlap, grid_overlaps_itself

_DTYPES = (torch.uint8, torch.int16, torch.int32)


def _pairwise_reference(tensors: Sequence[torch.Tensor]) -> bool:
    """The former ``any_overlap``: a sweep comparing each open pair (O(n²) at worst)."""
    by_device: dict[torch.device, list[tuple[int, int, int, torch.Tensor]]] = {}
    for index, tensor in enumerate(tensors):
        start, end = _span(tensor)
        by_device.setdefault(tensor.device, []).append((start, end, index, tensor))
    for items in by_device.values():
        active: list[tuple[int, torch.Tensor]] = []
        for start, end, _, tensor in sorted(items, key=lambda item: item[:3]):
            active = [(other_end, other) for other_end, other in active if other_end > start]
            if any(_reference_may_share(other, tensor) for _, other in active):
                return True
            active.append((end, tensor))
    return False


def _reference_may_share(a: torch.Tensor, b: torch.Tensor) -> bool:
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
        phase = shift % row_stride
        return phase < cols or phase > row_stride - cols
    first = shift // row_stride
    low, high = min(0, first), max(a.shape[0], first + b.shape[0])
    if grid_overlaps_itself(high - low, a.shape[1], row_stride, col_stride):
        return True
    return first < a.shape[0] and first + b.shape[0] > 0


def _bytes_of(tensor: torch.Tensor) -> set[int]:
    """Every byte address an element of 2-D ``tensor`` covers (brute force)."""
    base, size = tensor.data_ptr(), tensor.element_size()
    (rows, cols), (row_stride, col_stride) = tensor.shape, tensor.stride()
    return {
        base + (i * row_stride + j * col_stride) * size + k
        for i in range(rows)
        for j in range(cols)
        for k in range(size)
    }


def _check_against_brute_force(tensors: list[torch.Tensor]) -> None:
    places = [_bytes_of(tensor) for tensor in tensors]
    shared = any(a & b for i, a in enumerate(places) for b in places[i + 1 :])
    found, before = any_overlap(tensors), _pairwise_reference(tensors)
    if shared:
        assert found, "shared bytes missed"
    if found:
        assert before, "more conservative than the pairwise sweep"
    if found != before:
        assert not shared  # less conservative only where no byte is shared


_VIEW = st.tuples(
    st.sampled_from(_DTYPES),
    st.booleans(),  # the second storage
    st.integers(0, 4),  # rows (0: no elements)
    st.integers(1, 5),  # columns
    st.integers(0, 12),  # row stride
    st.integers(0, 3),  # column stride
    st.integers(0, 40),  # storage offset
)


@given(st.lists(_VIEW, min_size=2, max_size=5))
def test_any_overlap_never_misses_shared_bytes(
    views: list[tuple[torch.dtype, bool, int, int, int, int, int]],
) -> None:
    # The farthest element: offset 40 + 4 rows of 12 + 5 columns of 3, 89 elements
    # of up to 4 bytes (356): every view drawn fits in 1 KiB (256 bytes did not).
    storages = (torch.zeros(1024, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8))
    tensors = [
        storages[second].view(dtype).as_strided((rows, cols), (row_stride, col_stride), offset)
        for dtype, second, rows, cols, row_stride, col_stride, offset in views
    ]
    _check_against_brute_force(tensors)


_RUNS = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=4)


@given(
    st.integers(1, 16),  # row stride
    st.integers(1, 6),  # columns
    st.sampled_from((1, 1, 0, 2, 4, 7, 16)),  # column stride
    st.lists(st.tuples(st.integers(0, 15), _RUNS), min_size=1, max_size=3),
)
def test_parts_of_one_grid_match_brute_force(
    row_stride: int, cols: int, col_stride: int, phases: list[tuple[int, list[tuple[int, int]]]]
) -> None:
    """Runs of rows of one grid at a few phases (each ``(gap, rows)`` after the last run)."""
    storage = torch.zeros(1024, dtype=torch.uint8)
    tensors = []
    for phase, runs in phases:
        first = 0
        for gap, rows in runs:
            first += gap
            offset = phase % row_stride + first * row_stride
            tensors.append(storage.as_strided((rows, cols), (row_stride, col_stride), offset))
            first += rows
    _check_against_brute_force(tensors)


def _profile_events(call: Callable[[], bool]) -> tuple[int, bool]:
    """Python and C calls (and returns) made while ``call`` runs: a count of work, not time."""
    events = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal events
        events += 1

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return events, result


def _column_major_parts(n: int, row_bytes: int = 64) -> list[torch.Tensor]:
    """``n`` one-row parts of a column-major buffer: their address ranges all intersect."""
    return list(torch.zeros(row_bytes, n, dtype=torch.uint8).t().split(1))


def _interleaved_parts(n: int, row_bytes: int = 64) -> list[torch.Tensor]:
    """``buf[i::n]`` for ``i < n``: two rows each, their address ranges all intersect."""
    buffer = torch.zeros(2 * n, row_bytes, dtype=torch.uint8)
    return [buffer[i::n] for i in range(n)]


def _assert_near_linear_work(make: Callable[[int], list[torch.Tensor]]) -> None:
    small, large = 128, 512
    small_events, small_found = _profile_events(lambda: any_overlap(make(small)))
    parts = make(large)
    large_events, large_found = _profile_events(lambda: any_overlap(parts))
    assert not small_found
    assert not large_found
    # O(n log n) grows ~4.6x from 128 to 512 tensors; the pairwise sweep grew 16x
    # (n²/2 comparisons: ~3.4-5M profile events at 512, against ~60 per tensor now).
    assert large_events < 150 * large, large_events
    assert large_events < 6 * small_events, (small_events, large_events)
    # The fast path still tells an overlap: the first part again.
    assert any_overlap([*parts, parts[0]])


def test_column_major_row_slices_take_near_linear_work() -> None:
    _assert_near_linear_work(_column_major_parts)


def test_interleaved_views_take_near_linear_work() -> None:
    _assert_near_linear_work(_interleaved_parts)


def test_structured_parts_agree_with_the_pairwise_sweep() -> None:
    column_major = _column_major_parts(24, row_bytes=8)
    interleaved = _interleaved_parts(24, row_bytes=8)
    rows = torch.zeros(48, 8, dtype=torch.uint8)
    flat = torch.zeros(256, dtype=torch.uint8)

    def grid(
        row_stride: int, cols: int, *at: tuple[int, int], col_stride: int = 1
    ) -> list[torch.Tensor]:
        return [flat.as_strided((n, cols), (row_stride, col_stride), o) for o, n in at]

    cases = [
        column_major,
        [*column_major, column_major[5]],
        [*column_major[:5], column_major[4].t().contiguous().t(), *column_major[5:]],  # a copy
        interleaved,
        [*interleaved, rows.view(-1).as_strided((2, 8), (24 * 8, 1), 4)],  # straddles phases
        [rows[:, :4], rows[:, 4:], rows[:3, 3:5]],
        [rows[0::2], rows[1::2], rows[2::4]],
        # Row slices 4 apart of a grid whose columns lie 4 elements apart share memory.
        grid(1, 2, *((i, 1) for i in range(8)), col_stride=4),
        grid(8, 3, (7, 2), (16, 1)),  # phases 7 and 0 meet across the period's end
        grid(8, 3, (1, 2), (5, 2), (10, 1)),  # phase 2 meets phase 1 (below), not 5
        grid(8, 3, (1, 3), (5, 2), (12, 1)),  # phase 4 meets phase 5 (above), not 1
        grid(9, 3, (0, 2), (3, 2), (6, 1)),  # interleaved, apart
        grid(2, 3, (0, 1), (1, 1)),  # rows longer than their stride: any two phases meet
        grid(2, 1, (0, 3), (1, 3), col_stride=5),
    ]
    for tensors in cases:
        assert any_overlap(tensors) == _pairwise_reference(tensors)
        _check_against_brute_force(tensors)
