"""The offload manager's bookkeeping records (internal).

Only the engine's thread mutates these: transfer jobs report outcomes
(:class:`StoreOutcome`, :class:`LoadOutcome`) into a queue, and the manager
applies them at the start of its next call.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from kvtier.block import KVCacheBlock
from kvtier.policies.hints import BlockHint
from kvtier.tiers.base import BlockKey
from kvtier.tiers.index import TierIndex

__all__ = [
    "Demotion",
    "LoadEvent",
    "LoadOutcome",
    "RequestState",
    "Stage",
    "StoreEvent",
    "StoreOutcome",
]


@attrs.define(eq=False)
class Demotion:
    """Blocks evicted from tier ``level`` copied to ``level + 1`` before their slots are reused."""

    level: int
    src_slots: list[int]
    dst_slots: list[int]
    keys: list[BlockKey]
    hints: list[BlockHint | None] | None = None  # the blocks' last hints above, for the policy


@attrs.define(eq=False)
class StoreEvent:
    """Device blocks being copied into lower tier ``level`` (0: the first).

    A store goes to the first lower tier; the blocks it has no room for
    spill into the next tier down with room (``level`` > 0), see
    :class:`~kvtier.offload.stores.StorePlanner`.
    """

    event_id: int
    step_id: int
    block_ids: tuple[int, ...]  # device blocks, referenced: released when the event ends
    keys: Sequence[BlockKey]
    slots: Sequence[int]
    demotions: list[Demotion]
    request_ids: set[str]
    reports: int = 0
    dispatched: bool = False
    local_done: bool = False
    seconds: float = 0.0
    error: BaseException | None = None
    hints: Sequence[BlockHint | None] | None = None  # one per key: its place in its chain
    level: int = 0  # the lower tier written


@attrs.define(eq=False)
class Stage:
    """Blocks held only by tier ``level`` (> 0), staged into the first tier.

    ``dst_slots`` (set when the load starts) has a first-tier slot per key,
    or -1 for a block loaded straight into the device.
    """

    level: int
    src_slots: list[int]
    keys: list[BlockKey]
    dst_slots: list[int] = attrs.field(factory=list)


@attrs.define(eq=False)
class LoadEvent:
    """A request's blocks being loaded into the device."""

    event_id: int
    request_id: str
    targets: list[KVCacheBlock]  # touched: released when the event ends
    keys: list[BlockKey]
    pins: list[tuple[TierIndex, BlockKey]]  # source pins, released when the event ends
    first_slots: list[int] = attrs.field(factory=list)  # slot in the first tier per key, or -1
    stages: list[Stage] = attrs.field(factory=list)
    demotions: list[Demotion] = attrs.field(factory=list)
    first_block: int = 0
    failed: list[int] = attrs.field(factory=list)  # device blocks whose source was gone
    dispatched: bool = False
    positions: list[int] = attrs.field(factory=list)  # the hash position of each key

    def staged_keys(self) -> list[BlockKey]:
        """Keys given a first-tier slot by their stage (reserved there)."""
        return [
            key
            for stage in self.stages
            if stage.dst_slots  # empty until the load starts
            for key, slot in zip(stage.keys, stage.dst_slots, strict=True)
            if slot >= 0
        ]


@attrs.define(eq=False)
class RequestState:
    """What the manager tracks for one request."""

    request_id: str
    block_ids: list[list[int]]  # live ids per group (eager stores read these)
    stored_upto: int = 0  # eager: positions before this were considered
    load: LoadEvent | None = None
    store_events: set[int] = attrs.field(factory=set)
    finished: bool = False
    tag: int | str | None = None  # the request's tag, for its blocks' hints

    @property
    def busy(self) -> bool:
        """A load or a store of the request is still in flight."""
        return self.load is not None or bool(self.store_events)


@attrs.frozen
class StoreOutcome:
    """A store job ended (``error`` None: every block written)."""

    event_id: int
    error: BaseException | None
    demotions: tuple[float | None, ...]
    """Per demotion that ran, in order: the seconds its copy took, or None if it failed.

    Shorter than the event's demotions when the job ended before starting
    them all (its wait for the engine failed, or it was cancelled): those
    never ran, and their reservations are aborted without counting a failure.
    """
    seconds: float = 0.0


@attrs.frozen
class LoadOutcome:
    """A load job ended; ``missing`` are keys whose bytes proved absent or corrupt.

    ``seconds`` holds ``(tier level, seconds spent reading from it)`` pairs;
    ``demotions`` is as :attr:`StoreOutcome.demotions`. ``cut``: with an
    ``error``, the first position that failed when every position before it
    was loaded again and arrived (None: nothing arrived).
    """

    event_id: int
    request_id: str
    error: BaseException | None
    missing: tuple[tuple[int, BlockKey], ...] = ()
    demotions: tuple[float | None, ...] = ()
    seconds: tuple[tuple[int, float], ...] = ()
    cut: int | None = None
