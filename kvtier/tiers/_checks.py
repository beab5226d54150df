"""Argument checks and byte views shared by the tiers' batched reads and writes.

Every tier validates a batch the same way before touching memory or files:
slots are integers in range, the buffer is ``uint8 [len(slots), row_bytes]``
with one key per slot. :func:`byte_rows` views an engine's cache tensor as
byte rows without copying, and :func:`ascending_run` finds the fast path of
slots that form one run.
"""

from __future__ import annotations

import ctypes
import itertools
import operator
from collections.abc import Callable, Sequence

import attrs
import torch

from kvtier.errors import ConfigError, InvalidRequestError
from kvtier.tiers._memory import any_overlap, grid_overlaps_itself

__all__ = [
    "ascending_run",
    "check_batch",
    "byte_rows",
    "check_buffer",
    "check_buffers",
    "check_parts",
    "check_keys",
    "check_slots",
    "copy_back",
    "host_rows",
    "part_row_views",
    "row_views",
    "slot_index",
    "tensor_bytes",
]


def check_slots(slots: Sequence[int], num_slots: int, *, tier: str) -> list[int]:
    """Slots as a list of ints, each in ``[0, num_slots)``.

    Raises:
        InvalidRequestError: A slot is not an integer or is out of range.
    """
    try:
        out = [slot_index(s) for s in slots]
    except TypeError as exc:
        raise InvalidRequestError(f"tier {tier}: slots must be integers") from exc
    if out:
        low, high = min(out), max(out)
        if low < 0 or high >= num_slots:
            bad = low if low < 0 else high
            raise InvalidRequestError(f"tier {tier}: slot {bad} is out of range [0, {num_slots})")
    return out


def slot_index(value: object) -> int:
    """``value`` as a slot number: an integer (NumPy's or torch's too), never a bool or a float.

    (A torch boolean tensor, say a block mask passed by mistake, would index
    as 0 and 1.)

    Raises:
        TypeError: ``value`` is a boolean or not an integer.
    """
    if isinstance(value, bool) or getattr(value, "dtype", None) is torch.bool:
        raise TypeError("a boolean is not a slot")  # an int to Python and to torch
    return operator.index(value)  # type: ignore[arg-type]


def check_buffer(
    tensor: object, slots: Sequence[int], keys: Sequence[bytes], row_bytes: int, *, tier: str
) -> torch.Tensor:
    """``tensor`` after checking it is ``uint8 [len(slots), row_bytes]`` and keys match.

    Raises:
        InvalidRequestError: Wrong type, dtype or shape, or as many keys as slots.
    """
    _check_keys(slots, keys, tier=tier)
    return _rows_buffer(tensor, len(slots), row_bytes, tier=tier, what="buffer")


def check_parts(
    parts: object,
    slots: Sequence[int],
    keys: Sequence[bytes],
    row_bytes: int,
    *,
    tier: str,
    written: bool,
) -> list[torch.Tensor]:
    """``parts`` as a list, each ``uint8 [rows, row_bytes]``, rows adding up to ``len(slots)``.

    Args:
        parts: The buffers of one batch, in batch order.
        slots: The batch's slots.
        keys: One key per slot.
        row_bytes: Bytes per row.
        tier: The tier's name, for errors.
        written: The parts will be written into, so they must not share memory
            (see :func:`~kvtier.tiers._memory.any_overlap`).

    Raises:
        InvalidRequestError: Not a sequence of tensors, a part of the wrong
            dtype or shape, rows that do not add up, keys that do not match,
            or (``written``) parts whose memory may overlap.
    """
    _check_keys(slots, keys, tier=tier)
    if isinstance(parts, torch.Tensor) or not isinstance(parts, Sequence):
        raise InvalidRequestError(
            f"tier {tier}: parts must be a sequence of tensors, got {type(parts).__name__}"
        )
    checked = [
        _rows_buffer(part, None, row_bytes, tier=tier, what=f"part {index}")
        for index, part in enumerate(parts)
    ]
    total = sum(part.shape[0] for part in checked)
    if total != len(slots):
        raise InvalidRequestError(f"tier {tier}: parts hold {total} rows for {len(slots)} slots")
    if written and any_overlap(part for part in checked if part.shape[0]):
        raise InvalidRequestError(f"tier {tier}: parts to read into share memory")
    return checked


def check_buffers(
    buffers: object,
    slots: Sequence[int],
    keys: Sequence[bytes],
    row_bytes: int,
    *,
    tier: str,
    one: bool,
    written: bool,
) -> list[torch.Tensor]:
    """A batch's buffers as a list: ``one`` buffer (``read_into`` / ``write_from``) or parts.

    One buffer is checked by :func:`check_buffer` (its errors name "buffer"),
    parts by :func:`check_parts`.

    Raises:
        InvalidRequestError: As :func:`check_buffer` or :func:`check_parts`.
    """
    if one:
        return [check_buffer(buffers, slots, keys, row_bytes, tier=tier)]
    return check_parts(buffers, slots, keys, row_bytes, tier=tier, written=written)


def check_batch(
    slots: Sequence[int],
    keys: Sequence[bytes],
    buffers: object,
    *,
    num_slots: int,
    row_bytes: int,
    tier: str,
    one: bool,
    written: bool,
    max_key_bytes: int,
    unique: bool,
) -> tuple[list[int], list[torch.Tensor]]:
    """A batch of a tier that names blocks by key: slots, buffers, then keys, checked.

    Args:
        slots: The batch's slots.
        keys: One key per slot, each ``bytes`` of 1..``max_key_bytes``.
        buffers: ``one`` buffer (``read_into`` / ``write_from``) or parts.
        num_slots: The tier's capacity.
        row_bytes: Bytes per block.
        tier: The tier's name, for errors.
        one: ``buffers`` is one buffer, not parts.
        written: The buffers will be written into (see :func:`check_parts`).
        max_key_bytes: Longest key.
        unique: No slot and no key may appear twice.

    Returns:
        The slots as a list of ints and the buffers as a list.

    Raises:
        InvalidRequestError: The first check that fails, in that order.
    """
    slot_list = check_slots(slots, num_slots, tier=tier)
    parts = check_buffers(buffers, slot_list, keys, row_bytes, tier=tier, one=one, written=written)
    check_keys(keys, max_key_bytes, tier=tier)
    if unique and (len(set(slot_list)) != len(slot_list) or len(set(keys)) != len(keys)):
        raise InvalidRequestError(f"tier {tier}: a batch repeats a slot or a key")
    return slot_list, parts


def check_keys(keys: Sequence[object], max_key_bytes: int, *, tier: str) -> None:
    """Each key is ``bytes`` of 1..``max_key_bytes``.

    Raises:
        InvalidRequestError: The first key that is not.
    """
    for key in keys:
        if not isinstance(key, bytes) or not 0 < len(key) <= max_key_bytes:
            got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
            raise InvalidRequestError(
                f"tier {tier}: keys must be 1..{max_key_bytes} bytes, got {got}"
            )


def _check_keys(slots: Sequence[int], keys: Sequence[bytes], *, tier: str) -> None:
    if len(keys) != len(slots):
        raise InvalidRequestError(f"tier {tier}: {len(slots)} slots but {len(keys)} keys")


def _rows_buffer(
    tensor: object, rows: int | None, row_bytes: int, *, tier: str, what: str
) -> torch.Tensor:
    """``tensor`` after checking it is ``uint8 [rows, row_bytes]`` (any rows when None)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidRequestError(f"tier {tier}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise InvalidRequestError(f"tier {tier}: {what} must be dense, got {tensor.layout}")
    if tensor.is_meta:
        raise InvalidRequestError(f"tier {tier}: {what} is on the meta device (it has no bytes)")
    shape = tuple(tensor.shape)
    expected = (shape[0] if rows is None and len(shape) == 2 else rows, row_bytes)
    if tensor.dtype != torch.uint8 or shape != expected:
        wanted = ["rows" if rows is None else rows, row_bytes]
        raise InvalidRequestError(
            f"tier {tier}: {what} must be uint8 [{', '.join(map(str, wanted))}], "
            f"got {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
        )
    if _overlaps_itself(tensor):
        raise InvalidRequestError(
            f"tier {tier}: {what} rows overlap (strides {list(tensor.stride())})"
        )
    return tensor


def _overlaps_itself(tensor: torch.Tensor) -> bool:
    """True when two elements of a 2-D tensor share memory (e.g. an ``expand``)."""
    (rows, cols), (row_stride, col_stride) = tensor.shape, tensor.stride()
    return grid_overlaps_itself(rows, cols, row_stride, col_stride)


def ascending_run(slots: Sequence[int]) -> int | None:
    """The first slot when ``slots`` is ``first, first + 1, …`` (non-empty), else None."""
    if not slots or any(b != a + 1 for a, b in itertools.pairwise(slots)):
        return None
    return slots[0]


def byte_rows(tensor: torch.Tensor, rows: int, row_bytes: int, *, what: str) -> torch.Tensor:
    """``tensor`` viewed as ``uint8 [rows, row_bytes]`` without copying.

    The row stride may be anything; each row's bytes must be contiguous.

    Raises:
        ConfigError: The tensor cannot be viewed that way.
    """
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        raise ConfigError(f"{what} must be a dense (strided) tensor, got {tensor.layout}")
    if tensor.dim() == 0 or tensor.shape[0] != rows or tensor.numel() == 0:
        raise ConfigError(f"{what} must have {rows} blocks in its first dimension")
    if not tensor[0].is_contiguous():
        raise ConfigError(f"{what}: each block's bytes must be contiguous in memory")
    try:
        return tensor.view(torch.uint8).view(rows, row_bytes)
    except RuntimeError as exc:
        raise ConfigError(f"{what} cannot be viewed as bytes [{rows}, {row_bytes}]") from exc


def tensor_bytes(row: torch.Tensor) -> memoryview:
    """The writable bytes of a contiguous CPU tensor, without copying or NumPy.

    The view aliases the tensor's memory, and its exporter holds the tensor:
    the memory lives as long as any view made from it, so a socket writer
    that keeps a view past the call that made it (asyncio's transport does,
    from Python 3.12, after a cancelled round trip) never reads memory that
    was freed or reused.
    """
    size = row.numel() * row.element_size()
    buffer = (ctypes.c_ubyte * size).from_address(row.data_ptr())
    buffer.owner = row  # type: ignore[attr-defined]  # ctypes instances take attributes
    return memoryview(buffer).cast("B")


def copy_back(parts: Sequence[torch.Tensor], host: Sequence[torch.Tensor]) -> None:
    """Fill the parts that were read through a host copy (``host[i]`` is not ``parts[i]``)."""
    for part, rows in zip(parts, host, strict=True):
        if rows is not part:
            part.copy_(rows)


def host_rows(rows: torch.Tensor) -> bool:
    """Whether ``rows`` (``[n, …]``) is host memory whose rows are each contiguous."""
    return rows.device.type == "cpu" and (rows.shape[0] == 0 or rows[0].is_contiguous())


@attrs.frozen(eq=False)
class _RowSlices:
    """Row ``index`` of a contiguous tensor as a slice of one view of its bytes.

    Holds the tensor, so the memory the view aliases lives as long as this does.
    """

    owner: torch.Tensor
    whole: memoryview
    size: int

    def __call__(self, index: int) -> memoryview:
        return self.whole[index * self.size : (index + 1) * self.size]


def row_views(rows: torch.Tensor) -> Callable[[int], memoryview]:
    """``index -> the bytes of rows[index]``: slices of one view when ``rows`` is contiguous.

    ``rows`` is a CPU tensor ``[n, …]`` whose rows are each contiguous. The
    function returned holds ``rows``, so the views stay valid while it lives.

    Raises:
        InvalidRequestError: ``rows`` is not host memory with contiguous rows
            (a view would cover other bytes than the row's).
    """
    if not host_rows(rows):
        raise InvalidRequestError("row views need host memory whose rows are each contiguous")
    if rows.is_contiguous() and rows.shape[0]:
        whole = tensor_bytes(rows)
        return _RowSlices(rows, whole, len(whole) // rows.shape[0])
    return lambda index: tensor_bytes(rows[index])


def part_row_views(parts: Sequence[torch.Tensor]) -> Callable[[int], memoryview]:
    """``index -> the bytes of row index`` of consecutive CPU parts taken in order.

    Each part is a CPU tensor ``[rows, …]`` whose rows are each contiguous;
    the function returned holds the parts (see :func:`row_views`).
    """
    if len(parts) == 1:
        return row_views(parts[0])
    views = [row_views(part) for part in parts]
    where = [(number, row) for number, part in enumerate(parts) for row in range(part.shape[0])]
    return lambda index: views[where[index][0]](where[index][1])
