"""Offload jobs cancelled mid-copy report only once the copy has ended.

Seen in review: a cancelled job pushed its outcome at once, while the copy it
had posted kept running in the pipeline's task group; the manager then freed
the device blocks and slots the copy was still reading or writing.
"""

from __future__ import annotations

import anyio
import pytest
import torch

from kvtier.errors import TransferCancelledError
from kvtier.offload._state import LoadOutcome, StoreEvent, StoreOutcome
from kvtier.offload.jobs import run_store
from kvtier.transfer import TransferPipeline
from tests.tier_doubles import GatedStore, MemoryStore


@pytest.mark.asyncio
async def test_a_cancelled_store_reports_after_its_copy_ends() -> None:
    device, lower = MemoryStore(4, name="gpu"), MemoryStore(4, name="cpu")
    device.data[:] = torch.arange(4, dtype=torch.uint8)[:, None]
    gated = GatedStore(lower)
    gated.open = False  # the copy waits inside the pipeline
    keys = [bytes([i]) * 32 for i in (1, 2)]
    device.keys[1:3] = keys  # the device double verifies keys too
    event = StoreEvent(7, 0, (1, 2), keys, [0, 1], [], {"r"})
    seen: list[tuple[bool, StoreOutcome | LoadOutcome]] = []

    def push(outcome: StoreOutcome | LoadOutcome) -> None:
        seen.append((gated.open, outcome))  # was the copy allowed to finish yet?

    job = anyio.CancelScope()

    async def store(pipeline: TransferPipeline) -> None:
        with job:
            await run_store(pipeline, device, [gated], push, event)

    async with TransferPipeline() as pipeline, anyio.create_task_group() as jobs:
        jobs.start_soon(store, pipeline)
        await anyio.sleep(0.05)  # the store is in the pipeline, waiting at the gate
        job.cancel()
        await anyio.sleep(0.05)
        assert seen == []  # cancelled, but the copy has not ended: nothing reported
        gated.open = True
    assert len(seen) == 1
    copy_ended, outcome = seen[0]
    assert copy_ended
    assert isinstance(outcome, StoreOutcome)
    assert isinstance(outcome.error, TransferCancelledError)
    assert torch.equal(lower.data[:2], device.data[1:3])  # the copy ran to its end
