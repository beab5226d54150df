"""Async mode on CUDA: a job waits for the engine's streams as they stood when it was planned.

No GPU here: the engine's stream and its events are stand-ins (the event a
job waits for is recorded by ``kvtier.offload.runtime.mark`` at planning, and
waited for through ``wait_event``), so what is checked is the ordering, not
CUDA itself (``tests/test_offload_cuda.py`` has the CUDA tests).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from kvtier import KVCacheBlocks, Request
from kvtier.offload import lifecycle, runtime
from tests.offload_env import Env, key, scheduled


class PlannedEvent:
    """A CUDA event stand-in: done once the test says the engine's work has run."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()

    def synchronize(self) -> None:
        self.done.wait(10)


@pytest.fixture
def engine_events(monkeypatch: pytest.MonkeyPatch) -> list[PlannedEvent]:
    """Pretend a tier is on a GPU; collect the events jobs are planned behind."""
    events: list[PlannedEvent] = []

    def mark(stream: object) -> PlannedEvent:
        events.append(PlannedEvent())
        return events[-1]

    stream = SimpleNamespace(device=-1)  # torch.cuda.device(-1) selects nothing
    monkeypatch.setattr(lifecycle, "current_streams", lambda tiers: [stream])
    monkeypatch.setattr(runtime, "mark", mark)
    return events


def finish_engine_work(events: list[PlannedEvent]) -> None:
    for event in events:
        event.done.set()


def plan_store(env: Env) -> tuple[Request, KVCacheBlocks]:
    """A request of two computed blocks, its store planned and started (not awaited)."""
    req = env.request(2)
    blocks = env.alloc(req, 2)
    env.manager.update_state_after_alloc(req, blocks, 0)
    plan = env.manager.build_step(scheduled(new={req.request_id: blocks}))
    env.manager.step_computed(plan.step_id)
    return req, blocks


@pytest.mark.asyncio
async def test_an_async_store_waits_for_the_engine_work_queued_before_it_was_planned(
    engine_events: list[PlannedEvent],
) -> None:
    env = Env()
    async with env.manager as manager:
        req, _ = plan_store(env)
        assert engine_events  # recorded as the store was planned, on the engine's thread
        await anyio.sleep(0.05)
        assert env.cpu_keys() == set()  # the forward pass has not run: nothing copied
        finish_engine_work(engine_events)
        with anyio.fail_after(10):
            await manager.wait_idle()
        assert env.cpu_keys() == {key(req, 0), key(req, 1)}


@pytest.mark.asyncio
async def test_a_job_waiting_for_the_engine_still_runs_when_the_manager_closes(
    engine_events: list[PlannedEvent],
) -> None:
    """Only the job settles what its plan holds: cancelled, it must still start."""
    env = Env()
    manager = env.manager
    with anyio.CancelScope() as owner:
        async with manager:
            _, blocks = plan_store(env)
            await anyio.sleep(0.05)
            assert manager.indexes[0].num_reserved == 2  # the store's slots, held by its plan
            threading.Timer(0.1, finish_engine_work, [engine_events]).start()
            owner.cancel()  # the engine shuts down while the job waits for its stream
            await anyio.sleep_forever()
    assert manager.indexes[0].num_reserved == 0  # settled on close, nothing leaked
    assert all(block.ref_cnt == 1 for block in blocks.blocks[0])  # only the request's own


@pytest.mark.asyncio
async def test_a_failed_wait_for_the_engine_fails_the_job_not_the_manager(
    engine_events: list[PlannedEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA error surfacing as the job waits is the store's error, as one in its copy is."""

    def broken(self: PlannedEvent) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(PlannedEvent, "query", broken)
    env = Env()
    async with env.manager as manager:
        plan_store(env)
        with anyio.fail_after(10):
            await manager.wait_idle()
        assert env.cpu_keys() == set()
        assert manager.indexes[0].num_reserved == 0  # aborted
        assert manager.stats().tiers["cpu"].failed_transfers == 2


@pytest.mark.asyncio
async def test_demotions_a_failed_wait_kept_from_running_are_not_failed_transfers(
    engine_events: list[PlannedEvent], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A demotion that never ran is aborted, not counted, whether its job started or not."""
    env = Env(cpu_blocks=2, disk=tmp_path / "disk")
    async with env.manager as manager:
        plan_store(env)  # fills the CPU tier
        finish_engine_work(engine_events)
        with anyio.fail_after(10):
            await manager.wait_idle()

        def broken(self: PlannedEvent) -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(PlannedEvent, "query", broken)
        plan_store(env)  # must evict both CPU blocks: two demotions to disk, never run
        assert manager.indexes[1].num_reserved == 2
        with anyio.fail_after(10):
            await manager.wait_idle()
        stats = manager.stats().tiers
        assert stats["cpu"].failed_transfers == 2  # the store itself failed
        assert (stats["disk"].failed_transfers, stats["disk"].demotions) == (0, 0)
        assert manager.indexes[1].num_reserved == 0  # aborted
