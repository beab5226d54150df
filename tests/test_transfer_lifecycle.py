"""The pipeline's batch bound and closing it from another task than its owner."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import pytest
import torch

from kvtier.completion import Completion, CompletionState
from kvtier.errors import BlockMissingError, ClosedError, KVTierError
from kvtier.tiers.base import BlockKey
from kvtier.tiers.index import TierIndex
from kvtier.transfer import StoreTask, TransferPipeline, TransferResult
from tests.test_transfer import fill, keys_for
from tests.tier_doubles import FaultInjectingStore, MemoryStore


class CountingStore(MemoryStore):
    """A MemoryStore that records how many blocks each read moves."""

    def __init__(self, num_slots: int, name: str) -> None:
        super().__init__(num_slots, name=name)
        self.read_sizes: list[int] = []

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        self.read_sizes.append(len(slots))
        await super().read_into(slots, keys, out)


@pytest.mark.asyncio
async def test_a_batch_never_exceeds_max_batch_blocks() -> None:
    inner = CountingStore(32, name="gpu")
    device = FaultInjectingStore(inner)
    cpu = MemoryStore(32, name="cpu")
    keys = keys_for(*range(12))
    data = fill(inner, list(range(12)), keys)
    device.read_gate = anyio.Event()
    async with TransferPipeline(max_batch_blocks=3) as pipeline:
        completions = [pipeline.submit_nowait(StoreTask(device, [0, 1], cpu, [0, 1], keys[:2]))]
        await anyio.wait_all_tasks_blocked()  # the worker holds the first task at the gate
        for first in range(2, 12, 2):  # five more tasks of two blocks queue up
            slots = [first, first + 1]
            completions.append(
                pipeline.submit_nowait(
                    StoreTask(device, slots, cpu, slots, keys[first : first + 2])
                )
            )
        device.read_gate.set()
        for completion in completions:
            assert (await completion).n_blocks == 2
    assert max(inner.read_sizes) <= 3
    assert sum(inner.read_sizes) == 12
    assert torch.equal(cpu.data[:12], data)


@pytest.mark.asyncio
async def test_tasks_that_repeat_a_key_of_the_batch_wait_for_the_next_batch() -> None:
    """Two loads of one block (a tier such as the disk refuses a batch reading a key twice)."""
    inner = CountingStore(16, name="disk")
    device = FaultInjectingStore(inner)
    cpu = MemoryStore(16, name="gpu")
    keys = keys_for(0, 1, 2)
    data = fill(inner, [0, 1, 2], keys)
    device.read_gate = anyio.Event()
    async with TransferPipeline() as pipeline:
        completions = [pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys[:1]))]
        await anyio.wait_all_tasks_blocked()
        for slot, dst in ((1, 5), (1, 6), (2, 7)):  # the second repeats the first's key
            completions.append(
                pipeline.submit_nowait(StoreTask(device, [slot], cpu, [dst], [keys[slot]]))
            )
        device.read_gate.set()
        for completion in completions:
            assert (await completion).n_blocks == 1
    assert inner.read_sizes == [1, 1, 2]
    assert torch.equal(cpu.data[[0, 5, 6, 7]], data[[0, 1, 1, 2]])


@pytest.mark.asyncio
async def test_a_task_larger_than_the_bound_still_runs_alone() -> None:
    inner = CountingStore(16, name="gpu")
    cpu = MemoryStore(16, name="cpu")
    keys = keys_for(*range(5))
    data = fill(inner, list(range(5)), keys)
    async with TransferPipeline(max_batch_blocks=2) as pipeline:
        big = pipeline.submit_nowait(
            StoreTask(inner, list(range(4)), cpu, list(range(4)), keys[:4])
        )
        small = pipeline.submit_nowait(StoreTask(inner, [4], cpu, [4], keys[4:]))
        assert (await big).n_blocks == 4
        assert (await small).n_blocks == 1
    assert inner.read_sizes == [4, 1]
    assert torch.equal(cpu.data[:5], data)


@pytest.mark.asyncio
async def test_aclose_from_another_task_finishes_queued_work_and_the_owner_exits_cleanly() -> None:
    device, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    data = fill(device, [0, 1, 2], keys_for(0, 1, 2))
    async with TransferPipeline(max_batch_blocks=1) as pipeline:
        completions = [
            pipeline.submit_nowait(StoreTask(device, [i], cpu, [i], keys_for(i))) for i in range(3)
        ]
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.aclose)
                group.start_soon(pipeline.aclose)  # twice, concurrently: idempotent
        assert pipeline.closed
        assert all(c.state is CompletionState.DONE for c in completions)
        with pytest.raises(ClosedError):
            pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys_for(0)))
    await pipeline.aclose()
    assert torch.equal(cpu.data[:3], data)


@pytest.mark.asyncio
async def test_aclose_by_the_owner_without_a_with_block_closes_everything() -> None:
    device, cpu = MemoryStore(4, name="gpu"), MemoryStore(4, name="cpu")
    fill(device, [0], keys_for(0))
    pipeline = TransferPipeline()
    await pipeline.__aenter__()
    done = pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys_for(0)))
    with anyio.fail_after(10):
        await pipeline.aclose()
    assert done.state is CompletionState.DONE
    await pipeline.__aexit__(None, None, None)  # after aclose: nothing left to do


@pytest.mark.asyncio
async def test_a_submit_cancelled_as_a_worker_makes_room_queues_nothing_or_returns() -> None:
    # A submit waits for room in a full queue; the worker takes the queued
    # task (making room) in the same loop tick as the submitter is cancelled.
    # If submit raises, its task must not run: its caller aborts the
    # reservation and may hand the slot to another block at once.
    inner = MemoryStore(8, name="gpu")
    device = FaultInjectingStore(inner)
    keys = keys_for(0, 1, 2, 7)
    fill(inner, [0, 1, 2], keys[:3])
    device.read_gate = anyio.Event()
    cpu = MemoryStore(8, name="cpu")
    index = TierIndex("cpu", 8)
    slot = dict(zip(keys[:3], index.reserve(keys[:3]).slots, strict=True))

    def task(i: int) -> StoreTask:
        return StoreTask(device, [i], cpu, [slot[keys[i]]], [keys[i]], None, index)

    raised: list[BaseException] = []
    async with TransferPipeline(queue_size=1) as pipeline:
        await anyio.wait_all_tasks_blocked()
        first = pipeline.submit_nowait(task(0))  # the worker takes it, waits at the gate
        await anyio.wait_all_tasks_blocked()
        second = pipeline.submit_nowait(task(1))  # fills the queue
        scope = anyio.CancelScope()

        async def submitter() -> None:
            with scope:
                try:
                    await pipeline.submit(task(2))  # waits for room
                except BaseException as exc:
                    raised.append(exc)
                    raise

        async def canceller() -> None:
            await first.settled()  # resumes in the tick the worker takes the next task
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(submitter)
            group.start_soon(canceller)
            await anyio.wait_all_tasks_blocked()
            device.read_gate.set()
        await second
        await anyio.wait_all_tasks_blocked()
        assert len(raised) == 1  # the race this test is about happened
        index.abort([keys[2]])  # what a caller told "nothing queued" does
        new = index.reserve([keys[3]])
        assert new.slots == (slot[keys[2]],)  # the freed slot goes to another block
        await anyio.sleep(0.05)
    assert cpu.keys[slot[keys[2]]] is None  # the cancelled task never ran
    assert index.num_reserved == 1  # the new block's reservation, untouched


@pytest.mark.asyncio
async def test_a_callback_interrupt_while_the_worker_cancels_leftovers_resolves_them_all() -> None:
    class Interrupt(BaseException):
        pass

    inner = MemoryStore(8, name="gpu")
    device = FaultInjectingStore(inner)
    keys = keys_for(*range(4))
    fill(inner, list(range(4)), keys)
    device.read_gate = anyio.Event()  # never set: the first move hangs
    cpu = MemoryStore(8, name="cpu")
    index = TierIndex("cpu", 8)
    slots = index.reserve(keys).slots
    pipeline = TransferPipeline(max_batch_blocks=1)
    completions = []

    def interrupt(_: object) -> None:
        raise Interrupt

    with pytest.RaisesGroup(Interrupt):
        with anyio.CancelScope() as scope:
            async with pipeline:
                for i in range(4):
                    completions.append(
                        pipeline.submit_nowait(
                            StoreTask(device, [i], cpu, [slots[i]], [keys[i]], None, index)
                        )
                    )
                completions[1].add_done_callback(interrupt)
                await anyio.wait_all_tasks_blocked()
                scope.cancel()
    assert [c.state for c in completions] == [CompletionState.CANCELLED] * 4
    assert index.num_reserved == 0  # every reservation aborted
    assert index.num_free == 8
    with anyio.fail_after(5):
        await pipeline.aclose()


@pytest.mark.asyncio
async def test_submits_waiting_for_room_are_queued_first_come_first_served() -> None:
    inner = CountingStore(16, name="gpu")
    device = FaultInjectingStore(inner)
    cpu = MemoryStore(16, name="cpu")
    keys = keys_for(*range(8))
    fill(inner, list(range(8)), keys)
    device.read_gate = anyio.Event()
    order: list[int] = []

    def task(i: int) -> StoreTask:
        return StoreTask(device, [i], cpu, [i], [keys[i]])

    async with TransferPipeline(queue_size=1, max_batch_blocks=1) as pipeline:
        await anyio.wait_all_tasks_blocked()
        first = pipeline.submit_nowait(task(0))  # the worker takes it, waits at the gate
        await anyio.wait_all_tasks_blocked()
        pipeline.submit_nowait(task(1))  # fills the queue

        async def submitter(i: int) -> None:
            done = await pipeline.submit(task(i))
            done.add_done_callback(lambda _: order.append(i))

        async with anyio.create_task_group() as group:
            for i in range(2, 8):
                group.start_soon(submitter, i)
                await anyio.wait_all_tasks_blocked()  # each waits, in this order
            with pytest.raises(anyio.WouldBlock):  # the room is theirs first
                pipeline.submit_nowait(task(1))
            device.read_gate.set()
        await first
    assert order == list(range(2, 8))
    assert torch.equal(cpu.data[:8], inner.data[:8])


@pytest.mark.asyncio
async def test_a_submit_that_queues_as_the_pipeline_closes_is_refused_not_left_waiting() -> None:
    """A newcomer queued behind a woken submit in the tick the owner was cancelled;
    the woken one found the queue closed and left: nobody woke the newcomer again."""
    inner = MemoryStore(8, name="gpu")
    device = FaultInjectingStore(inner)
    cpu = MemoryStore(8, name="cpu")
    keys = keys_for(*range(4))
    fill(inner, list(range(4)), keys)
    device.read_gate = anyio.Event()  # never set: the worker holds the first task

    def task(i: int) -> StoreTask:
        return StoreTask(device, [i], cpu, [i], [keys[i]])

    pipeline = TransferPipeline(queue_size=1, max_batch_blocks=1)
    entered, go = anyio.Event(), anyio.Event()
    outcome: dict[str, str] = {}
    owner = anyio.CancelScope()

    async def host() -> None:
        with owner:
            async with pipeline:
                entered.set()
                await anyio.sleep_forever()

    async def submitter(name: str, i: int, start: anyio.Event | None) -> None:
        if start is not None:
            await start.wait()
        try:
            await pipeline.submit(task(i))
            outcome[name] = "queued"
        except ClosedError:
            outcome[name] = "refused"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(host)
            await entered.wait()
            pipeline.submit_nowait(task(0))
            await anyio.wait_all_tasks_blocked()  # the worker holds it
            pipeline.submit_nowait(task(1))  # the queue is full
            group.start_soon(submitter, "waiting", 2, None)
            group.start_soon(submitter, "newcomer", 3, go)
            await anyio.wait_all_tasks_blocked()
            go.set()  # the newcomer runs first in the next tick...
            owner.cancel()  # ...as the owner, and with it the workers, is cancelled
    assert outcome == {"waiting": "refused", "newcomer": "refused"}


# -- failures inside a batch, and the owner's body failing ------------------------------


class RemoteStore(CountingStore):
    """A key-verifying tier whose calls are I/O (think Redis): never gathered into directly."""

    in_memory = False


@pytest.mark.asyncio
async def test_one_bad_block_fails_its_task_and_the_rest_move_again_together() -> None:
    """A corrupt block costs one more copy of the batch, not one copy per task."""
    remote, device = RemoteStore(32, name="disk"), MemoryStore(32, name="gpu")
    index = TierIndex("disk", 32)
    keys = keys_for(*range(16))
    slots = list(index.reserve(keys).slots)
    index.commit(keys)
    data = fill(remote, slots, keys)
    remote.keys[slots[5]] = keys_for(99)[0]  # expired, or another block's bytes
    index.pin(keys)
    async with TransferPipeline() as pipeline:
        completions = [
            pipeline.submit_nowait(StoreTask(remote, [s], device, [i], [k], index))
            for i, (s, k) in enumerate(zip(slots, keys, strict=True))
        ]
        for completion in completions:
            await completion.settled()
    assert remote.read_sizes == [16, 15]
    states = [c.state for c in completions]
    assert states == [CompletionState.FAILED if i == 5 else CompletionState.DONE for i in range(16)]
    error = completions[5].exception()
    assert isinstance(error, BlockMissingError)
    assert error.slots == (slots[5],)
    good = [i for i in range(16) if i != 5]
    assert torch.equal(device.data[good], data[good])
    assert not index.contains(keys[5])  # a miss from now on
    assert index.num_pinned == 0


@pytest.mark.asyncio
async def test_a_body_that_raises_cancels_the_queued_tasks_and_its_error_comes_out_unwrapped() -> (
    None
):
    device, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    keys = keys_for(0, 1, 2, 3)
    fill(device, [0, 1, 2, 3], keys)
    index = TierIndex("cpu", 8)
    slots = index.reserve(keys).slots
    completions: list[Completion[TransferResult]] = []

    async def owner() -> None:
        async with TransferPipeline(max_batch_blocks=1) as pipeline:
            completions.extend(
                pipeline.submit_nowait(StoreTask(device, [i], cpu, [s], [k], None, index))
                for i, (s, k) in enumerate(zip(slots, keys, strict=True))
            )
            raise ValueError("the engine's bug")

    with pytest.raises(ValueError, match="the engine's bug"):  # not an exception group
        await owner()
    assert [c.state for c in completions] == [CompletionState.CANCELLED] * 4
    assert index.num_reserved == 0


class StrayCancelStore(MemoryStore):
    """A tier with a bug: its read raises asyncio's CancelledError though nothing cancelled it."""

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        future.result()


@pytest.mark.asyncio
async def test_a_tier_raising_a_stray_cancellation_fails_its_task_and_the_pipeline_goes_on() -> (
    None
):
    """A CancelledError nothing asked for is the tier's bug: loud, and only its task fails."""
    device, cpu = StrayCancelStore(8, name="gpu"), MemoryStore(8, name="cpu")
    keys = keys_for(0, 1)
    fill(cpu, [1], keys[1:])
    reached = False
    async with TransferPipeline() as pipeline:
        completion = pipeline.submit_nowait(StoreTask(device, [0], cpu, [0], keys[:1]))
        await completion.settled()
        assert isinstance(completion.exception(), KVTierError)
        assert "raised CancelledError unasked" in str(completion.exception())
        load = await pipeline.submit(StoreTask(cpu, [1], device, [1], keys[1:]))
        assert (await load).n_blocks == 1  # the pipeline still serves
        reached = True
    assert reached
