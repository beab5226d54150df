"""The transfer pipeline with real async tasks, a memory tier and injected faults."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import torch

from kvtier.completion import CompletionState
from kvtier.errors import (
    BlockMissingError,
    ClosedError,
    ConfigError,
    InvalidRequestError,
    TierIOError,
    TransferCancelledError,
)
from kvtier.tiers.base import BlockKey, BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from kvtier.transfer import LoadTask, StoreTask, TransferPipeline
from tests.tier_doubles import SMALL, FaultInjectingStore, MemoryStore, ViewStore


class Ledger:
    """Records how the pipeline settles a task's slots."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[BlockKey, ...]]] = []

    def _record(self, name: str, keys: Sequence[BlockKey]) -> None:
        self.calls.append((name, tuple(keys)))

    def commit(self, keys: Sequence[BlockKey]) -> None:
        self._record("commit", keys)

    def abort(self, keys: Sequence[BlockKey]) -> None:
        self._record("abort", keys)

    def unpin(self, keys: Sequence[BlockKey]) -> None:
        self._record("unpin", keys)

    def remove(self, keys: Sequence[BlockKey]) -> None:
        self._record("remove", keys)


def keys_for(*ids: int) -> list[BlockKey]:
    return [i.to_bytes(4, "big") * 8 for i in ids]


def fill(store: MemoryStore, slots: list[int], keys: list[BlockKey], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(
        0, 256, (len(slots), store.layout.block_bytes), dtype=torch.uint8, generator=generator
    )
    store.data[slots] = data
    for slot, key in zip(slots, keys, strict=True):
        store.keys[slot] = key
    return data


@pytest.mark.asyncio
async def test_store_then_load_round_trip_settles_ledgers() -> None:
    device, cpu = MemoryStore(16, name="gpu"), MemoryStore(8, name="cpu")
    keys = keys_for(1, 2, 3)
    data = fill(device, [5, 2, 9], keys)
    src_ledger, dst_ledger = Ledger(), Ledger()
    async with TransferPipeline() as pipeline:
        done = await pipeline.submit(
            StoreTask(device, [5, 2, 9], cpu, [0, 1, 2], keys, src_ledger, dst_ledger)
        )
        result = await done
        assert (result.direction, result.n_blocks, result.bytes) == (
            "store",
            3,
            3 * SMALL.block_bytes,
        )
        assert result.seconds >= 0
        assert torch.equal(cpu.data[:3], data)
        assert dst_ledger.calls == [("commit", tuple(keys))]
        assert src_ledger.calls == [("unpin", tuple(keys))]

        device.data.zero_()
        loaded = await (await pipeline.submit(LoadTask(cpu, [0, 1, 2], device, [3, 4, 7], keys)))
        assert loaded.direction == "load"
        assert torch.equal(device.data[[3, 4, 7]], data)


@pytest.mark.asyncio
async def test_small_tasks_are_batched_into_one_copy() -> None:
    device = FaultInjectingStore(MemoryStore(64, name="gpu"))
    cpu = MemoryStore(64, name="cpu")
    inner = device.inner
    assert isinstance(inner, MemoryStore)
    all_keys = keys_for(*range(20))
    data = fill(inner, list(range(20)), all_keys)
    pipeline = TransferPipeline()
    async with pipeline:
        completions = [
            pipeline.submit_nowait(StoreTask(device, [i], cpu, [40 + i], [all_keys[i]]))
            for i in range(20)
        ]
        results = [await c for c in completions]
    assert device.reads == 1  # all twenty moved by one read
    assert all(r.n_blocks == 1 for r in results)
    assert torch.equal(cpu.data[40:60], data)


@pytest.mark.asyncio
async def test_batched_tasks_share_the_copys_time_by_blocks() -> None:
    """Summed over tasks (as the offload stats do), seconds add up to the copies' time."""
    device = FaultInjectingStore(MemoryStore(64, name="gpu"))
    cpu = MemoryStore(64, name="cpu")
    inner = device.inner
    assert isinstance(inner, MemoryStore)
    all_keys = keys_for(*range(4))
    fill(inner, list(range(4)), all_keys)
    async with TransferPipeline() as pipeline:
        one = pipeline.submit_nowait(StoreTask(device, [0], cpu, [10], all_keys[:1]))
        three = pipeline.submit_nowait(
            StoreTask(device, [1, 2, 3], cpu, [11, 12, 13], all_keys[1:])
        )
        first, second = await one, await three
    assert device.reads == 1  # one copy for both
    assert first.seconds > 0
    assert second.seconds == pytest.approx(3 * first.seconds)


@pytest.mark.asyncio
async def test_slot_view_fast_path_gathers_straight_into_the_destination() -> None:
    device, cpu = MemoryStore(16, name="gpu"), ViewStore(16, name="cpu")
    keys = keys_for(1, 2, 3, 4)
    data = fill(device, [3, 1, 4, 0], keys)
    async with TransferPipeline() as pipeline:
        await (await pipeline.submit(StoreTask(device, [3, 1, 4, 0], cpu, [6, 7, 8, 9], keys)))
        assert cpu.views == 1
        assert torch.equal(cpu.data[6:10], data)
        # Not an ascending run: through the staging buffer.
        await (await pipeline.submit(StoreTask(device, [3, 1], cpu, [2, 0], keys[:2])))
        assert torch.equal(cpu.data[[2, 0]], data[:2])
        assert cpu.views == 1
        # A load from an ascending run scatters straight from the source's rows.
        device.data.zero_()
        await (await pipeline.submit(LoadTask(cpu, [6, 7, 8, 9], device, [9, 2, 5, 11], keys)))
        assert cpu.views == 2
        assert torch.equal(device.data[[9, 2, 5, 11]], data)


@pytest.mark.asyncio
async def test_staging_is_bounded_and_chunked() -> None:
    device, cpu = MemoryStore(32, name="gpu"), MemoryStore(32, name="cpu")
    keys = keys_for(*range(10))
    data = fill(device, list(range(10)), keys)
    pipeline = TransferPipeline(staging_bytes=3 * SMALL.block_bytes)
    async with pipeline:
        await (
            await pipeline.submit(
                StoreTask(device, list(range(10)), cpu, list(range(31, 21, -1)), keys)
            )
        )
        assert max(mover.staging_rows for mover in pipeline._movers.values()) == 3
    assert torch.equal(cpu.data[list(range(31, 21, -1))], data)


@pytest.mark.asyncio
async def test_a_failing_task_fails_alone_and_its_missing_blocks_are_removed() -> None:
    cpu, device = MemoryStore(16, name="cpu"), MemoryStore(16, name="gpu")
    keys = keys_for(1, 2, 3)
    data = fill(cpu, [0, 1, 2], keys)
    cpu.keys[1] = keys_for(99)[0]  # slot 1 now holds another block
    ledgers = [Ledger() for _ in range(3)]
    async with TransferPipeline() as pipeline:
        completions = [
            pipeline.submit_nowait(LoadTask(cpu, [i], device, [10 + i], [keys[i]], ledgers[i]))
            for i in range(3)
        ]
        with pytest.raises(BlockMissingError):
            await completions[1]
        assert (await completions[0]).n_blocks == 1
        assert (await completions[2]).n_blocks == 1
    assert ledgers[1].calls == [("remove", (keys[1],)), ("unpin", (keys[1],))]
    assert ledgers[0].calls == [("unpin", (keys[0],))]
    assert torch.equal(device.data[[10, 12]], data[[0, 2]])
    assert not device.data[11].any()  # never wrong bytes


@pytest.mark.asyncio
async def test_write_failure_aborts_the_reservation_and_the_pipeline_keeps_serving() -> None:
    device = MemoryStore(8, name="gpu")
    disk = FaultInjectingStore(MemoryStore(8, name="disk"))
    disk.write_error = TierIOError("ENOSPC", tier="disk")
    keys = keys_for(1)
    fill(device, [0], keys)
    src, dst = Ledger(), Ledger()
    async with TransferPipeline() as pipeline:
        failed = await pipeline.submit(StoreTask(device, [0], disk, [3], keys, src, dst))
        with pytest.raises(TierIOError, match="ENOSPC"):
            await failed
        assert failed.state is CompletionState.FAILED
        assert isinstance(failed.exception(), TierIOError)
        assert dst.calls == [("abort", tuple(keys))]
        assert src.calls == [("unpin", tuple(keys))]
        again = await pipeline.submit(StoreTask(device, [0], disk, [3], keys))
        assert (await again).n_blocks == 1


@pytest.mark.asyncio
async def test_full_queue_pushes_back() -> None:
    device = FaultInjectingStore(MemoryStore(8, name="gpu"))
    cpu = MemoryStore(8, name="cpu")
    fill(device.inner, [0, 1, 2, 3], keys_for(0, 1, 2, 3))  # type: ignore[arg-type]
    device.read_gate = anyio.Event()
    async with TransferPipeline(queue_size=1, max_batch_blocks=1) as pipeline:
        first = pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys_for(0)))
        await anyio.wait_all_tasks_blocked()  # the worker took it and waits at the gate
        second = pipeline.submit_nowait(StoreTask(device, [1], cpu, [1], keys_for(1)))
        with pytest.raises(anyio.WouldBlock):
            pipeline.submit_nowait(StoreTask(device, [2], cpu, [2], keys_for(2)))
        # Loads have their own queue: not blocked by stores.
        load = pipeline.submit_nowait(LoadTask(cpu, [5], device, [5], keys_for(5)))
        device.read_gate.set()
        await first
        await second
        with pytest.raises(BlockMissingError):
            await load  # cpu slot 5 holds nothing


@pytest.mark.asyncio
async def test_cancelling_the_owner_resolves_every_completion() -> None:
    device = FaultInjectingStore(MemoryStore(8, name="gpu"))
    cpu = MemoryStore(8, name="cpu")
    fill(device.inner, list(range(4)), keys_for(0, 1, 2, 3))  # type: ignore[arg-type]
    device.read_gate = anyio.Event()  # never set: transfers hang until cancelled
    ledgers = [Ledger() for _ in range(4)]
    completions = []
    with anyio.CancelScope() as scope:
        async with TransferPipeline(max_batch_blocks=1) as pipeline:
            for i in range(4):
                completions.append(
                    pipeline.submit_nowait(
                        StoreTask(device, [i], cpu, [i], keys_for(i), ledgers[i], ledgers[i])
                    )
                )
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert all(c.cancelled() for c in completions)
    for completion in completions:
        with pytest.raises(TransferCancelledError):
            await completion
    for i, ledger in enumerate(ledgers):
        assert ledger.calls == [("abort", tuple(keys_for(i))), ("unpin", tuple(keys_for(i)))]


@pytest.mark.asyncio
async def test_closed_pipeline_and_lifecycle() -> None:
    device, cpu = MemoryStore(4, name="gpu"), MemoryStore(4, name="cpu")
    pipeline = TransferPipeline()
    task = StoreTask(device, [0], cpu, [0], keys_for(0))
    with pytest.raises(ClosedError):
        pipeline.submit_nowait(task)
    async with pipeline:
        pass
    await pipeline.aclose()  # idempotent
    assert pipeline.closed
    with pytest.raises(ClosedError):
        await pipeline.submit(task)
    with pytest.raises(ClosedError):
        async with pipeline:
            pass


@pytest.mark.asyncio
async def test_queued_tasks_finish_on_close() -> None:
    device, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    data = fill(device, [0, 1], keys_for(0, 1))
    async with TransferPipeline() as pipeline:
        completions = [
            pipeline.submit_nowait(StoreTask(device, [i], cpu, [i], keys_for(i))) for i in (0, 1)
        ]
    assert all(c.state is CompletionState.DONE for c in completions)
    assert torch.equal(cpu.data[:2], data)


def test_task_validation() -> None:
    a, b = MemoryStore(4), MemoryStore(4)
    with pytest.raises(InvalidRequestError, match="at least one"):
        StoreTask(a, [], b, [], [])
    with pytest.raises(InvalidRequestError, match="must be equal"):
        StoreTask(a, [0, 1], b, [0], keys_for(0, 1))
    other = MemoryStore(4, layout=BlockLayout(2, 4, 2, 8, "bfloat16"))
    with pytest.raises(InvalidRequestError, match="different block layouts"):
        LoadTask(a, [0], other, [0], keys_for(0))
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="queue_size"):
            TransferPipeline(queue_size=bad)


class FlakyPartsDevice(DeviceTier):
    """A real device tier whose parts calls fail once, after moving their first part."""

    failures = 1

    async def _fail_after_first(
        self,
        slots: Sequence[int],
        keys: Sequence[BlockKey],
        parts: Sequence[torch.Tensor],
        *,
        read: bool,
    ) -> None:
        first = parts[0].shape[0]
        if read:
            await super().read_into(slots[:first], keys[:first], parts[0])
        else:
            await super().write_from(slots[:first], keys[:first], parts[0])
        raise TierIOError("the device fell over mid-batch", tier=self.name)

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        if self.failures:
            self.failures -= 1
            await self._fail_after_first(slots, keys, parts, read=True)
        await super().read_into_parts(slots, keys, parts)

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        if self.failures:
            self.failures -= 1
            await self._fail_after_first(slots, keys, parts, read=False)
        await super().write_from_parts(slots, keys, parts)


@pytest.mark.asyncio
async def test_a_parts_call_failing_midway_fails_its_task_and_the_pipeline_keeps_serving() -> None:
    """Device <-> CPU through the one-call path for scattered CPU runs, with a device fault."""
    cache = torch.randint(0, 256, (32, SMALL.block_bytes), dtype=torch.uint8)
    device = FlakyPartsDevice(cache, SMALL)
    keys = keys_for(1, 2, 3, 4)
    device_slots, cpu_slots = [7, 3, 20, 11], [9, 2, 14, 3]  # CPU runs: 2-3, 9, 14
    async with (
        CpuTier(SMALL, 16) as cpu,
        TransferPipeline(direct_min_bytes=SMALL.block_bytes) as pipeline,
    ):
        src, dst = Ledger(), Ledger()
        failed = await pipeline.submit(
            StoreTask(device, device_slots, cpu, cpu_slots, keys, src, dst)
        )
        with pytest.raises(TierIOError, match="mid-batch"):
            await failed
        assert dst.calls == [("abort", tuple(keys))]  # nothing half-written is committed
        assert src.calls == [("unpin", tuple(keys))]
        stored = await pipeline.submit(StoreTask(device, device_slots, cpu, cpu_slots, keys))
        assert (await stored).n_blocks == 4
        rows = cpu.slot_view(range(16))
        assert rows is not None
        assert torch.equal(rows[cpu_slots], cache[device_slots])

        device.failures = 1
        back = [0, 30, 5, 6]
        src, dst = Ledger(), Ledger()
        failed = await pipeline.submit(LoadTask(cpu, cpu_slots, device, back, keys, src, dst))
        with pytest.raises(TierIOError, match="mid-batch"):
            await failed
        assert dst.calls == [("abort", tuple(keys))]
        assert src.calls == [("unpin", tuple(keys))]
        loaded = await pipeline.submit(LoadTask(cpu, cpu_slots, device, back, keys))
        assert (await loaded).n_blocks == 4
        assert torch.equal(cache[back], cache[device_slots])
