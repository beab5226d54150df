"""BlockMover: one batch of blocks from one tier to another, with as few copies as it can.

The :class:`~kvtier.transfer.TransferPipeline` hands each batch it takes to a
mover (one per direction). A tier that keeps its blocks in one tensor (the CPU
tier) can expose an ascending run of its slots as a view (``slot_view``); the
other tier then gathers straight into that view, or scatters straight from
it, and every byte is copied once. Otherwise bytes pass through a staging
buffer (pinned where CUDA is present): a read into it, then a write out of
it, so every byte is copied twice.

A batch whose slots on the view side form one run moves with one call. Else,
when the other tier is ``in_memory`` (its calls are memory copies: the device
tier), the mover sorts the batch by the view side's slots and cuts it into
ascending runs: the runs of at least ``direct_min_bytes`` move directly, all
in one ``read_into_parts`` / ``write_from_parts`` call when the other tier has
it (else a call per run), and the short runs left over share the staging
buffer, in chunks of at most ``staging_bytes``. One call matters: as a call
per run, scattered 2 MiB blocks each ran their copy inline on the event loop
(a single block is under ``offload_min_bytes``), holding the loop for most of
the batch, and paid the calls' checks and waits once per block (see
docs/benchmarks.md for the figures); a CUDA tier would have gathered, copied
and waited once per block instead of once per chunk. With a tier whose calls
are I/O on the other side, one call over the whole batch runs its blocks in
parallel (worker threads, pipelined round trips), which a call per run would
give up (a disk → CPU batch of 128 scattered 2 MiB blocks with ``O_DIRECT``
took 15 % longer run by run): the disk and Redis tiers take every run,
however short, in one parts call, straight between their files or values and
the CPU tier's rows (no staging: for the disk tier 1.6-1.7x faster from 16
scattered 2 MiB blocks up); a third-party I/O tier without parts calls gets
the whole batch staged.
A tier's free slots fragment as blocks are evicted
in LRU order, so in a full cache most batches are not one run: on the
bundled Mooncake trace (16 KiB blocks) nine in ten blocks moved between the
device and the CPU tier arrived in batches of several runs (about nine blocks
each). For large blocks (an 8B-class model's 2 MiB) even a run of one block
moves directly, which copies each byte once instead of twice; for small blocks
the staging copy costs less than a call per run.

Blocks that fail verification in one call do not stop the others: the mover
reads every run and chunk, then raises one
:class:`~kvtier.errors.BlockMissingError` naming all the source slots that
failed, so each bad block is found at its first failed read. Any other error
stops the batch at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Sequence

import torch

from kvtier.errors import BlockMissingError, ConfigError
from kvtier.tiers.base import BlockKey, BlockStore

__all__ = ["DIRECT_MIN_BYTES", "BlockMover"]

DIRECT_MIN_BYTES = 1 << 20
"""Default least bytes for a run of slots to move without staging (1 MiB).

Below it the staging copy of the run's bytes (at several GB/s) costs less
than the fixed cost of one more pair of tier calls (tens of µs; a per-layer
device tier makes a call per layer and K/V)."""


def _ascending_run(slots: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(slots))


def _slot_view(store: BlockStore, slots: Sequence[int]) -> torch.Tensor | None:
    """The tier's rows for an ascending run of slots, if it can expose them."""
    slot_view = getattr(store, "slot_view", None)
    if slot_view is None or not _ascending_run(slots):
        return None
    view = slot_view(slots)
    return view if isinstance(view, torch.Tensor) else None


def _runs(slots: Sequence[int]) -> list[list[int]]:
    """Positions of ``slots`` sorted by slot and cut into runs of consecutive slots."""
    order = sorted(range(len(slots)), key=slots.__getitem__)
    runs: list[list[int]] = []
    for position in order:
        if runs and slots[position] == slots[runs[-1][-1]] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


class BlockMover:
    """Copies batches of blocks between two tiers (see the module doc).

    Args:
        staging_bytes: Most bytes of the staging buffer (at least one block is
            always allowed); it is allocated on first use and kept (pinned,
            at its full size).
        direct_min_bytes: Least bytes of a run of slots that moves directly
            (without staging) when the batch is not one run and the other
            tier's calls are memory copies (an I/O tier with parts calls
            takes every run).

    Raises:
        ConfigError: A size is not a positive integer.
    """

    def __init__(
        self, *, staging_bytes: int = 256 << 20, direct_min_bytes: int = DIRECT_MIN_BYTES
    ) -> None:
        for name, value in (
            ("staging_bytes", staging_bytes),
            ("direct_min_bytes", direct_min_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.staging_bytes = staging_bytes
        self.direct_min_bytes = direct_min_bytes
        self._staging: torch.Tensor | None = None

    @property
    def staging_rows(self) -> int:
        """Rows of the staging buffer allocated so far (0 before the first staged copy)."""
        return 0 if self._staging is None else self._staging.shape[0]

    def release(self) -> None:
        """Drop the staging buffer (a later staged copy allocates a new one)."""
        self._staging = None

    async def move(
        self,
        src: BlockStore,
        src_slots: Sequence[int],
        dst: BlockStore,
        dst_slots: Sequence[int],
        keys: Sequence[BlockKey],
    ) -> None:
        """Copy the blocks in ``src_slots`` of ``src`` to ``dst_slots`` of ``dst``.

        Raises:
            BlockMissingError: Source blocks were absent or failed verification
                (all of them named). The others were copied, except those that
                shared a staging chunk with a named one: move them again.
            KVTierError: Any other error of either tier (the copy stopped).
        """
        view = _slot_view(dst, dst_slots)
        if view is not None:  # gather straight into the destination's slots
            await src.read_into(src_slots, keys, view)
            return
        view = _slot_view(src, src_slots)
        if view is not None:  # scatter straight from the source's slots
            await dst.write_from(dst_slots, keys, view)
            return
        missing: list[int] = []
        staged = await self._direct_runs(src, src_slots, dst, dst_slots, keys, missing)
        await self._staged(
            src,
            [src_slots[i] for i in staged],
            dst,
            [dst_slots[i] for i in staged],
            [keys[i] for i in staged],
            missing,
        )
        if missing:
            raise BlockMissingError.of_slots(src.name, missing)

    async def _direct_runs(
        self,
        src: BlockStore,
        src_slots: Sequence[int],
        dst: BlockStore,
        dst_slots: Sequence[int],
        keys: Sequence[BlockKey],
        missing: list[int],
    ) -> list[int]:
        """Move the long runs of the side with views directly; the positions left to stage."""
        into_dst = hasattr(dst, "slot_view")
        other = src if into_dst else dst
        parts = getattr(other, "read_into_parts" if into_dst else "write_from_parts", None)
        in_memory = getattr(other, "in_memory", False)
        if not (into_dst or hasattr(src, "slot_view")) or not (in_memory or parts is not None):
            # No side has views, or the other tier's calls are I/O and take one
            # buffer: one call over the whole batch runs its blocks in parallel
            # there.
            return list(range(len(keys)))
        # A memory copy pays per part; an I/O tier's one parts call takes every
        # run, however short, straight to or from its rows (no staging).
        min_blocks = -(-self.direct_min_bytes // src.layout.block_bytes) if in_memory else 1
        side, side_slots = (dst, dst_slots) if into_dst else (src, src_slots)
        left: list[int] = []
        direct: list[tuple[list[int], torch.Tensor]] = []
        for run in _runs(side_slots):
            view = None
            if len(run) >= min_blocks:
                view = _slot_view(side, [side_slots[i] for i in run])
            if view is None:
                left.extend(run)
            else:
                direct.append((run, view))
        calls = [(run, [view]) for run, view in direct]
        if parts is not None and direct:  # every run in one call
            calls = [([i for run, _ in direct for i in run], [view for _, view in direct])]
        other_slots = src_slots if into_dst else dst_slots
        for positions, views in calls:
            slots = [other_slots[i] for i in positions]
            run_keys = [keys[i] for i in positions]
            if parts is not None:
                call = parts(slots, run_keys, views)
            elif into_dst:
                call = src.read_into(slots, run_keys, views[0])
            else:
                call = dst.write_from(slots, run_keys, views[0])
            if into_dst:
                await _collect_missing(call, slots, missing)
            else:  # the source's view is its memory: nothing to verify on the way
                await call
        return left

    async def _staged(
        self,
        src: BlockStore,
        src_slots: Sequence[int],
        dst: BlockStore,
        dst_slots: Sequence[int],
        keys: Sequence[BlockKey],
        missing: list[int],
    ) -> None:
        if not keys:
            return
        block_bytes = src.layout.block_bytes
        chunk = max(1, min(len(keys), self.staging_bytes // block_bytes))
        staging = self._buffer(chunk, block_bytes)
        for begin in range(0, len(keys), chunk):
            end = min(begin + chunk, len(keys))
            buffer = staging[: end - begin]
            if await _collect_missing(
                src.read_into(src_slots[begin:end], keys[begin:end], buffer),
                src_slots[begin:end],
                missing,
            ):
                await dst.write_from(dst_slots[begin:end], keys[begin:end], buffer)

    def _buffer(self, rows: int, block_bytes: int) -> torch.Tensor:
        """The staging buffer, of at least ``rows`` rows of ``block_bytes``.

        In host memory it grows as batches need. Pinned (CUDA present), it is
        allocated at its full size at once: torch's caching host allocator
        keeps every pinned block it ever gave out (rounded up to a power of
        two), so growing would hold up to four times ``staging_bytes``.
        """
        buffer = self._staging
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != block_bytes:
            pinned = torch.cuda.is_available()
            if pinned:
                rows = max(rows, self.staging_bytes // block_bytes)
            buffer = torch.empty((rows, block_bytes), dtype=torch.uint8, pin_memory=pinned)
            self._staging = buffer
        return buffer


async def _collect_missing(
    call: Awaitable[None], src_slots: Sequence[int], missing: list[int]
) -> bool:
    """Await a copy; on ``BlockMissingError`` add its slots to ``missing``. True if it succeeded."""
    try:
        await call
    except BlockMissingError as exc:
        missing.extend(exc.slots or src_slots)
        return False
    return True
