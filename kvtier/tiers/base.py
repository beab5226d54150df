"""The ``BlockStore`` protocol every tier implements, and the block layout.

A tier holds whole blocks (every layer's K and V of ``block_size`` tokens) in
numbered *slots*. Bytes cross the protocol in kvtier's canonical block order:
layer-major, then K before V, then the layer's ``[block_size, num_kv_heads,
head_size]`` page, as a ``uint8`` tensor of shape ``[n, block_bytes]``. Tiers
are third-party pluggable: implement the protocol, no inheritance needed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import attrs
import cbor2
import torch

from kvtier.errors import ConfigError
from kvtier.spec import DTYPE_SIZES, FullAttentionSpec

__all__ = ["BlockKey", "BlockLayout", "BlockStore", "ProbingStore", "keys_text"]

BlockKey = bytes
"""What a tier stores a block under: its prefix-cache hash (group id included)."""


def keys_text(keys: Sequence[BlockKey], limit: int = 4) -> str:
    """Keys for a message or a log line: a count and the first hex digits of a few."""
    shown = ", ".join(f"{key.hex()[:16]}…" for key in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _dtype_name(value: object) -> str:
    return str(value).removeprefix("torch.")


def _dtype(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in DTYPE_SIZES:
        raise ConfigError(
            f"{attribute.name} {value!r} is not a known KV cache dtype; "
            f"known: {', '.join(sorted(DTYPE_SIZES))}"
        )


@attrs.frozen
class BlockLayout:
    """The shape of one KV block, shared by every tier of a stack.

    Attributes:
        num_layers: Attention layers.
        block_size: Tokens per block.
        num_kv_heads: KV heads per layer.
        head_size: Elements per head.
        dtype: Element type name (``"float16"``, ``"bfloat16"``…).
    """

    num_layers: int = attrs.field(validator=_positive)
    block_size: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_size: int = attrs.field(validator=_positive)
    dtype: str = attrs.field(default="float16", converter=_dtype_name, validator=_dtype)

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, num_layers: int) -> BlockLayout:
        """The layout of ``num_layers`` layers of a full-attention group."""
        return cls(num_layers, spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_SIZES[self.dtype]

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """``(block_size, num_kv_heads, head_size)``: one layer's K (or V) of a block."""
        return (self.block_size, self.num_kv_heads, self.head_size)

    @property
    def page_bytes(self) -> int:
        """Bytes of one layer's K (or V) of one block."""
        return self.block_size * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one layer's K and V of one block."""
        return 2 * self.page_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one whole block (all layers, K and V)."""
        return self.num_layers * self.layer_block_bytes

    @property
    def torch_dtype(self) -> torch.dtype:
        """The element type as a ``torch.dtype``."""
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def fingerprint(self) -> bytes:
        """16 bytes that differ for any two different layouts (stored with blocks)."""
        fields = ["kvtier.layout.v1", self.num_layers, self.block_size]
        fields += [self.num_kv_heads, self.head_size, self.dtype]
        return hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()[:16]


@runtime_checkable
class BlockStore(Protocol):
    """A tier: numbered slots that each hold one block's bytes.

    Reads and writes are batched and asynchronous. A tier is an async context
    manager: entering opens it (a disk tier scans its directory), ``aclose()``
    releases it and is idempotent; any other call after it raises
    :class:`~kvtier.errors.ClosedError`. Slots are managed by the caller
    (:class:`~kvtier.tiers.index.TierIndex`); the tier only stores bytes.

    Errors: :class:`~kvtier.errors.BlockMissingError` when a slot's bytes are
    absent or fail verification (a miss, never wrong data);
    :class:`~kvtier.errors.TierIOError` when the backend fails.

    Optional, looked up with ``getattr`` by the transfer pipeline's
    :class:`~kvtier.mover.BlockMover` (a tier without them is moved through a
    staging buffer): ``slot_view(slots) -> torch.Tensor | None``, the tier's
    own rows for an ascending run of slots, for the other tier to copy into or
    out of in place (the CPU tier); and ``in_memory = True``, declaring that a
    call is a memory copy with no I/O round trip, so a batch may be moved as
    several calls, one per run of the other tier's slots (the device and CPU
    tiers; not disk or Redis, whose one call over many blocks runs them in
    parallel); ``read_into_parts(slots, keys, parts)`` and
    ``write_from_parts(slots, keys, parts)``, one call for a batch held in
    several buffers taken in order (each ``uint8 [rows, block_bytes]``, the
    rows adding up to ``len(slots)``), which the mover then uses for all the
    runs at once instead of a call per run (the device and CPU tiers). A
    parts call that finds blocks missing raises one
    :class:`~kvtier.errors.BlockMissingError` naming their slots, after
    filling the other parts; one that names no slots makes every block of
    the call count as missing.
    """

    @property
    def name(self) -> str:
        """The tier's name, reported as ``medium`` in events."""
        ...

    @property
    def layout(self) -> BlockLayout:
        """The block layout."""
        ...

    @property
    def num_slots(self) -> int:
        """Capacity in blocks."""
        ...

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        ...

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        """Copy the blocks in ``slots`` into ``out`` (``uint8 [len(slots), block_bytes]``).

        ``out`` may be a strided view and may live on another device. Tiers
        that store keys verify them: a slot holding another key is missing.
        """
        ...

    async def write_from(
        self, slots: Sequence[int], keys: Sequence[BlockKey], data: torch.Tensor
    ) -> None:
        """Store ``data`` (``uint8 [len(slots), block_bytes]``) into ``slots``."""
        ...

    async def discard(self, slots: Sequence[int]) -> None:
        """Forget the blocks in ``slots`` (persistent tiers delete them)."""
        ...

    async def recover(self) -> Sequence[tuple[int, BlockKey]]:
        """``(slot, key)`` of every valid block found on open (empty when volatile)."""
        ...

    async def aclose(self) -> None:
        """Release the tier's resources; idempotent."""
        ...

    async def __aenter__(self) -> Self:
        """Open the tier."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the tier."""
        ...


@runtime_checkable
class ProbingStore(Protocol):
    """A tier that other processes write too (Redis), which can be asked what it holds.

    Such a tier reads and writes blocks by key: its slots are this process's
    bookkeeping only, so a block found by :meth:`contains` can be entered
    under any free slot (see :mod:`kvtier.offload.remote`). Implement both
    methods beside :class:`BlockStore`'s; no inheritance is needed.
    """

    async def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each block is stored now (it may go at any time).

        Raises:
            TierIOError: The backend failed or timed out.
        """
        ...

    def adopt(self, slots: Sequence[int], keys: Sequence[BlockKey]) -> None:
        """Record that ``slots`` now stand for ``keys``, found by :meth:`contains`."""
        ...


@runtime_checkable
class SweepingStore(Protocol):
    """A lasting tier whose medium can hold blocks outside its slots (a disk directory).

    A disk tier keeps blocks it does not map: ones written with a larger
    capacity, or files it could not read at open. A reset (the weights
    changed: every block is stale) must delete those too, or a later open
    would serve them. Implement this beside :class:`BlockStore`'s methods;
    no inheritance is needed.
    """

    async def discard_unmapped(self) -> int:
        """Delete every block the medium holds outside the tier's slots; how many went.

        Blocks in slots, and keys being written or deleted, are left alone.
        A cancelled call still finishes the deletes it started.

        Raises:
            TierIOError: The medium could not be listed, or a block could not be
                deleted (it is tried again at close).
        """
        ...
