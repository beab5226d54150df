"""Values that go in and out of the offload manager each step.

:class:`SchedulerOutput` is what the engine scheduled this step (kvtier's own
type, with the fields of vLLM's that planning reads); :class:`StepPlan` is what
the manager decided to move. Both are attrs value classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import attrs

__all__ = [
    "FinishedLoad",
    "HitInfo",
    "LoadSpec",
    "SchedulerOutput",
    "StepPlan",
    "StoreSpec",
    "WriteMode",
]

WriteMode = Literal["eager", "lazy", "selective"]
"""When device blocks are copied down: as soon as computed (``eager``, write
through), when about to be evicted (``lazy``, write back), or once hit often
enough (``selective``)."""

BlockIds = tuple[Sequence[int], ...]
"""Device block ids, one sequence per KV cache group."""


def _freeze_ids(value: Mapping[str, BlockIds | None]) -> dict[str, BlockIds | None]:
    return {
        req: None if ids is None else tuple(tuple(group) for group in ids)
        for req, ids in value.items()
    }


@attrs.frozen
class SchedulerOutput:
    """What the engine scheduled in one step.

    Attributes:
        num_scheduled_tokens: Tokens computed this step, per request id.
        new_requests: Requests scheduled for the first time (or resumed after
            preemption): their full block ids, one list per group.
        cached_requests: Requests scheduled before: the block ids *added*
            this step (``None``: none added).
        preempted: Requests preempted this step (their blocks were freed).
    """

    num_scheduled_tokens: Mapping[str, int] = attrs.field(factory=dict)
    new_requests: Mapping[str, BlockIds] = attrs.field(factory=dict, converter=_freeze_ids)
    cached_requests: Mapping[str, BlockIds | None] = attrs.field(
        factory=dict, converter=_freeze_ids
    )
    preempted: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)


@attrs.frozen
class StoreSpec:
    """Device blocks copied down in one transfer.

    Attributes:
        event_id: The store event (completions are reported against it).
        tier: The tier written: the first lower tier, or, for the blocks it
            had no room for, the tier below it they spill into (see
            :mod:`kvtier.offload.stores`).
        device_block_ids: Source device blocks.
        slots: Destination slots, one per block.
    """

    event_id: int
    tier: str
    device_block_ids: tuple[int, ...]
    slots: tuple[int, ...]


@attrs.frozen
class LoadSpec:
    """A request's blocks loaded back into the device.

    Attributes:
        event_id: The load event.
        request_id: The request the blocks are for.
        device_block_ids: Destination device blocks (hash positions
            ``first_block`` onward).
        sources: ``(tier, slot)`` of each block: where it is read from (a block
            held only by a slower tier is staged through the first one).
        first_block: The position in the request's hash chain of the first
            block loaded.
    """

    event_id: int
    request_id: str
    device_block_ids: tuple[int, ...]
    sources: tuple[tuple[str, int], ...]
    first_block: int


@attrs.frozen
class StepPlan:
    """What one :meth:`~kvtier.offload.OffloadManager.build_step` decided.

    Attributes:
        step_id: Increases by one per step.
        loads: Loads started this step, one per request.
        stores: Stores planned this step, one per tier written (more than
            one only when blocks spilled past a full first tier; each is
            its own event). Every mode's stores start when the
            engine calls ``step_computed(step_id)`` (a lazy store's freed
            blocks may still be written by a forward pass under asynchronous
            scheduling).
    """

    step_id: int
    loads: tuple[LoadSpec, ...] = ()
    stores: tuple[StoreSpec, ...] = ()

    @property
    def num_load_blocks(self) -> int:
        """Blocks loaded by this plan."""
        return sum(len(spec.device_block_ids) for spec in self.loads)

    @property
    def num_store_blocks(self) -> int:
        """Blocks stored by this plan."""
        return sum(len(spec.device_block_ids) for spec in self.stores)


@attrs.frozen
class FinishedLoad:
    """A request whose load ended (reported once, by ``take_finished``).

    Attributes:
        request_id: The request.
        ok: Every block arrived and was verified.
        failed_block_ids: Device blocks that did not get their bytes: the
            engine must recompute those positions (and everything after).
            They are the load's last positions: the ones before them arrived
            (a bad block costs its position and the ones after it).
    """

    request_id: str
    ok: bool
    failed_block_ids: tuple[int, ...] = ()


@attrs.frozen
class HitInfo:
    """Where a request's prompt blocks were found when it was looked up.

    Attributes:
        device_blocks: Blocks the device prefix cache held.
        tier_blocks: Blocks found in each lower tier (by tier name), beyond
            the device hit, in the order of the stack.
        tokens_to_compute: Prompt tokens left to compute.
        levels: The lower tier (its index in the stack) holding each block
            found beyond the device hit, in order: what a
            :class:`~kvtier.policies.prefetch.PrefetchPolicy` decides on.
        loaded_blocks: How many of those, from the first, the manager's
            prefetch policy loads (the lookup's answer); the rest were
            declined and are counted in ``tokens_to_compute``. Defaults to
            every block found.
    """

    device_blocks: int
    tier_blocks: Mapping[str, int]
    tokens_to_compute: int
    levels: tuple[int, ...] = ()
    loaded_blocks: int = attrs.field(
        default=attrs.Factory(lambda self: len(self.levels), takes_self=True)
    )

    @property
    def declined_blocks(self) -> int:
        """Blocks found below that the prefetch policy left to compute."""
        return len(self.levels) - self.loaded_blocks
