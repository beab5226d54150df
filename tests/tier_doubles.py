"""Test doubles for tiers: an in-memory store and a fault-injecting wrapper."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import anyio
import torch

from kvtier.errors import BlockMissingError, ClosedError, TierIOError
from kvtier.tiers.base import BlockKey, BlockLayout, BlockStore

SMALL = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")


class MemoryStore:
    """A minimal key-verifying tier in host memory (calls are copies: ``in_memory``)."""

    verify_keys = True
    in_memory = True

    def __init__(self, num_slots: int, layout: BlockLayout = SMALL, name: str = "mem") -> None:
        self.name = name
        self.layout = layout
        self.num_slots = num_slots
        self.closed = False
        self.data = torch.zeros((num_slots, layout.block_bytes), dtype=torch.uint8)
        self.keys: list[BlockKey | None] = [None] * num_slots

    def _check(self) -> None:
        if self.closed:
            raise ClosedError(f"tier {self.name} is closed")

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        self._check()
        bad = tuple(
            s for s, k in zip(slots, keys, strict=True) if self.verify_keys and self.keys[s] != k
        )
        if bad:
            raise BlockMissingError("key mismatch", tier=self.name, slots=bad)
        out.copy_(self.data[list(slots)])

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        self._check()
        self.data[list(slots)] = data.to("cpu")
        for slot, key in zip(slots, keys, strict=True):
            self.keys[slot] = key

    async def discard(self, slots: Sequence[int]) -> None:
        self._check()
        for slot in slots:
            self.keys[slot] = None

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        return []

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class ViewStore(MemoryStore):
    """A MemoryStore that exposes ascending slot runs as a tensor view (like a
    CPU tier, it does not verify keys)."""

    verify_keys = False
    views = 0

    def slot_view(self, slots: Sequence[int]) -> torch.Tensor | None:
        self._check()
        self.views += 1
        return self.data[slots[0] : slots[-1] + 1]


class FaultInjectingStore:
    """Wraps a tier; fails or stalls chosen calls. Counts calls.

    Attributes:
        read_error / write_error / discard_error: Raised (once) by the next
            read / write / discard (a discard raises after the inner one ran).
        read_gate / discard_gate: When set, reads / discards wait for this
            event first (``discard_started`` is set as a discard reaches it).
    """

    def __init__(self, inner: BlockStore) -> None:
        self.inner = inner
        self.read_error: BaseException | None = None
        self.write_error: BaseException | None = None
        self.read_gate: anyio.Event | None = None
        self.discard_error: BaseException | None = None
        self.discard_gate: anyio.Event | None = None
        self.discard_started = anyio.Event()
        self.reads = 0
        self.writes = 0
        self.discards = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def layout(self) -> BlockLayout:
        return self.inner.layout

    @property
    def num_slots(self) -> int:
        return self.inner.num_slots

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        self.reads += 1
        if self.read_gate is not None:
            await self.read_gate.wait()
        if self.read_error is not None:
            error, self.read_error = self.read_error, None
            raise error
        await self.inner.read_into(slots, keys, out)

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        self.writes += 1
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error
        await self.inner.write_from(slots, keys, data)

    async def discard(self, slots: Sequence[int]) -> None:
        self.discards += 1
        self.discard_started.set()
        if self.discard_gate is not None:
            await self.discard_gate.wait()
        await self.inner.discard(slots)
        if self.discard_error is not None:
            error, self.discard_error = self.discard_error, None
            raise error

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        return await self.inner.recover()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class GatedStore:
    """Wraps a tier for tests driven from another thread than the tier's loop.

    While ``open`` is False, reads and writes wait (reads also while
    ``reads_open`` is False); ``fail`` makes that many next reads or writes
    raise ``TierIOError``; ``lose`` makes that many next reads raise
    ``BlockMissingError`` naming the middle slot of the read (after copying
    the others, as a tier does, and garbling its row); every write first sleeps ``write_delay``
    seconds. All are plain attributes the test thread sets.
    """

    def __init__(self, inner: BlockStore) -> None:
        self.inner = inner
        self.open = True
        self.reads_open = True
        self.write_delay = 0.0
        self.fail = 0
        self.lose = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def layout(self) -> BlockLayout:
        return self.inner.layout

    @property
    def num_slots(self) -> int:
        return self.inner.num_slots

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def _gate(self, read: bool = False) -> None:
        while not self.open or (read and not self.reads_open):
            await anyio.sleep(0.0005)
        if self.fail > 0:
            self.fail -= 1
            raise TierIOError(f"tier {self.name}: injected failure", tier=self.name)

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        await self._gate(read=True)
        await self.inner.read_into(slots, keys, out)
        if self.lose > 0 and slots:
            self.lose -= 1
            out[len(slots) // 2].fill_(0xEE)  # what a bad block leaves
            raise BlockMissingError.of_slots(self.name, [slots[len(slots) // 2]])

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        if self.write_delay:
            await anyio.sleep(self.write_delay)
        await self._gate()
        await self.inner.write_from(slots, keys, data)

    async def discard(self, slots: Sequence[int]) -> None:
        await self.inner.discard(slots)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
