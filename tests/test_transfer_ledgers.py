"""A ledger (index) that raises fails its own transfer only; task slots are strict ints.

Seen in review: a raising ``commit`` crashed the worker, cancelled the host
scope and the batch-mates that copied fine; a raise while settling cancelled
work stranded every queued completion and leaked its reservations.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import torch

from kvtier.completion import Completion
from kvtier.errors import InvalidRequestError, LedgerError
from kvtier.tasks import TransferResult
from kvtier.tiers.index import TierIndex
from kvtier.transfer import StoreTask, TransferPipeline
from tests.tier_doubles import FaultInjectingStore, MemoryStore


def keys_for(*ids: int) -> list[bytes]:
    return [i.to_bytes(4, "big") * 8 for i in ids]


def fill(store: MemoryStore, slots: list[int], keys: list[bytes]) -> None:
    data = torch.randint(0, 256, (len(slots), store.layout.block_bytes), dtype=torch.uint8)
    store.data[slots] = data
    for slot, k in zip(slots, keys, strict=True):
        store.keys[slot] = k


class Ledger:
    """Records calls; raises from the ones named in ``fail``."""

    def __init__(self, *fail: str) -> None:
        self.calls: list[str] = []
        self.fail = set(fail)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise ValueError(f"ledger {name} failed")

    def commit(self, keys: Sequence[bytes]) -> None:
        self._call("commit")

    def abort(self, keys: Sequence[bytes]) -> None:
        self._call("abort")

    def unpin(self, keys: Sequence[bytes]) -> None:
        self._call("unpin")

    def remove(self, keys: Sequence[bytes]) -> None:
        self._call("remove")


@pytest.mark.asyncio
async def test_a_raising_commit_fails_that_transfer_and_the_rest_of_its_batch_lands() -> None:
    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    fill(dev, [1, 2], keys_for(1, 2))
    bad, good, source = Ledger("commit"), Ledger(), Ledger("unpin")
    async with TransferPipeline() as pipeline:
        first = pipeline.submit_nowait(StoreTask(dev, [1], cpu, [1], keys_for(1), source, bad))
        second = pipeline.submit_nowait(StoreTask(dev, [2], cpu, [2], keys_for(2), None, good))
        with pytest.raises(LedgerError, match="ledger commit failed") as info:
            await first
        assert isinstance(info.value.__cause__, ValueError)
        assert isinstance(await second, TransferResult)
        assert (bad.calls, source.calls, good.calls) == (["commit"], ["unpin"], ["commit"])
        assert torch.equal(cpu.data[2], dev.data[2])
        # The pipeline still serves.
        again = pipeline.submit_nowait(StoreTask(dev, [2], cpu, [3], keys_for(2)))
        assert (await again).n_blocks == 1


@pytest.mark.asyncio
async def test_a_raising_abort_while_cancelling_strands_no_queued_completion() -> None:
    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    fill(dev, [1, 2, 3], keys_for(1, 2, 3))
    ledgers = [Ledger("abort"), Ledger(), Ledger()]
    completions: list[Completion[TransferResult]] = []
    with anyio.CancelScope() as scope:
        async with TransferPipeline() as pipeline:
            for slot, ledger in zip([1, 2, 3], ledgers, strict=True):
                task = StoreTask(dev, [slot], cpu, [slot], keys_for(slot), None, ledger)
                completions.append(pipeline.submit_nowait(task))
            scope.cancel()  # before any worker ran: all three are queued
    assert [c.cancelled() for c in completions] == [True, True, True]
    assert [ledger.calls for ledger in ledgers] == [["abort"], ["abort"], ["abort"]]


def test_task_slots_must_be_integers_not_floats_or_booleans() -> None:
    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    for bad in ([2.9999], [True]):
        with pytest.raises(InvalidRequestError, match="slots must be integers"):
            StoreTask(dev, bad, cpu, [1], keys_for(1))  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="slots must be integers"):
            StoreTask(dev, [1], cpu, bad, keys_for(1))  # type: ignore[arg-type]
    assert StoreTask(dev, range(2), cpu, [3, 4], keys_for(1, 2)).src_slots == (0, 1)


@pytest.mark.asyncio
async def test_a_task_without_its_reservation_or_pin_is_refused_before_it_copies() -> None:
    from kvtier.tasks import LoadTask
    from kvtier.tiers.index import TierIndex

    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    fill(dev, [1, 2], keys_for(1, 2))
    index = TierIndex("cpu", 8)
    resident = index.reserve(keys_for(7)).slots  # a block another request stored
    index.commit(keys_for(7))
    fill(cpu, list(resident), keys_for(7))
    before = cpu.data.clone()
    async with TransferPipeline() as pipeline:
        # Never reserved: it would overwrite the resident block's bytes.
        unreserved = StoreTask(dev, [1], cpu, list(resident), keys_for(1), None, index)
        with pytest.raises(InvalidRequestError, match="is not reserved at slot"):
            await pipeline.submit(unreserved)
        # Reserved, but at another slot than the task names.
        slot = index.reserve(keys_for(1)).slots[0]
        elsewhere = StoreTask(dev, [1], cpu, [slot + 1], keys_for(1), None, index)
        with pytest.raises(InvalidRequestError, match="is not reserved at slot"):
            pipeline.submit_nowait(elsewhere)
        assert torch.equal(cpu.data, before)  # nothing copied
        # Resident but not pinned: a load must pin its source first.
        with pytest.raises(InvalidRequestError, match="is not pinned at slot"):
            await pipeline.submit(LoadTask(cpu, list(resident), dev, [3], keys_for(7), index))
        # The right calls pass and settle.
        done = await pipeline.submit(StoreTask(dev, [1], cpu, [slot], keys_for(1), None, index))
        assert (await done).n_blocks == 1
        index.pin(keys_for(7))
        load = LoadTask(cpu, list(resident), dev, [3], keys_for(7), index)
        assert (await (await pipeline.submit(load))).n_blocks == 1
        # A key that is not bytes is a typed error when the task is built: a
        # bytearray cannot be hashed, and a worker batching it would fail.
        for bad in ("a", ["a"], bytearray(b"a"), memoryview(b"a")):
            with pytest.raises(InvalidRequestError, match="block keys must be bytes"):
                StoreTask(dev, [2], cpu, [slot], [bad], None, index)  # type: ignore[list-item]
    assert index.contains(keys_for(1)[0])
    assert index.num_pinned == 0
    assert index.num_reserved == 0
    assert torch.equal(dev.data[3], cpu.data[resident[0]])


@pytest.mark.asyncio
async def test_a_reservation_or_pin_named_by_two_queued_transfers_is_refused() -> None:
    """Review repro: the second task's commit was refused whole, stranding k3 for good."""
    from kvtier.tasks import LoadTask
    from kvtier.tiers.index import TierIndex

    device, cpu = MemoryStore(8, name="gpu"), MemoryStore(4, name="cpu")
    index = TierIndex("cpu", 4)
    k1, k2, k3 = keys_for(1, 2, 3)
    fill(device, [0, 1, 2], [k1, k2, k3])
    async with TransferPipeline() as pipeline:
        reservation = index.reserve([k1, k2, k3])
        slot = dict(zip(reservation.keys, reservation.slots, strict=True))
        first = pipeline.submit_nowait(
            StoreTask(device, [0, 1], cpu, [slot[k1], slot[k2]], [k1, k2], dst_ledger=index)
        )
        with pytest.raises(InvalidRequestError, match="reservation is named by another queued"):
            pipeline.submit_nowait(
                StoreTask(device, [0, 2], cpu, [slot[k1], slot[k3]], [k1, k3], dst_ledger=index)
            )
        await first
        third = pipeline.submit_nowait(  # k3's reservation was never spent: still usable
            StoreTask(device, [2], cpu, [slot[k3]], [k3], dst_ledger=index)
        )
        await third
        assert index.num_reserved == 0
        # Pins: a key pinned once serves one load, pinned twice two.
        (source,) = index.pin([k1])
        load = LoadTask(cpu, [source], device, [5], [k1], src_ledger=index)
        done = pipeline.submit_nowait(load)
        with pytest.raises(InvalidRequestError, match=r"its 1 pin\(s\) are named by more queued"):
            pipeline.submit_nowait(LoadTask(cpu, [source], device, [6], [k1], src_ledger=index))
        await done
        index.pin([k1])
        index.pin([k1])
        both = [
            pipeline.submit_nowait(LoadTask(cpu, [source], device, [d], [k1], src_ledger=index))
            for d in (6, 7)
        ]
        for completion in both:
            await completion
    assert index.num_pinned == 0
    assert index.clear()
    index.check_invariants()


class ValueLedger(Ledger):
    """A ledger that compares by value, and so is not hashable (as an attrs class)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ValueLedger)


@pytest.mark.asyncio
async def test_an_unhashable_ledger_is_fine() -> None:
    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    fill(dev, [1, 2], keys_for(1, 2))
    first, second = ValueLedger(), ValueLedger()  # equal, yet two ledgers
    async with TransferPipeline() as pipeline:
        a = pipeline.submit_nowait(StoreTask(dev, [1], cpu, [1], keys_for(1), None, first))
        b = pipeline.submit_nowait(StoreTask(dev, [1], cpu, [2], keys_for(1), None, second))
        await a
        await b
    assert first.calls == second.calls == ["commit"]


@pytest.mark.asyncio
async def test_a_base_exception_in_a_callback_runs_the_other_callbacks_and_settles_all() -> None:
    """A ``BaseException`` from a callback ends the pipeline, but skips no cleanup.

    The interrupted completion's later callbacks still run (they release a
    request's blocks), and the tasks behind it are cancelled and aborted.
    (Not ``KeyboardInterrupt`` itself: asyncio lets that one out of the event
    loop from any task, past the test.)
    """
    dev, cpu = MemoryStore(8, name="gpu"), MemoryStore(8, name="cpu")
    fill(dev, [1, 2], keys_for(1, 2))
    first_ledger, second_ledger = Ledger(), Ledger()
    ran: list[str] = []

    class Interrupt(BaseException):
        pass

    def interrupt(_: Completion[TransferResult]) -> None:
        raise Interrupt

    with pytest.RaisesGroup(Interrupt, flatten_subgroups=True, allow_unwrapped=True):
        async with TransferPipeline(max_batch_blocks=1) as pipeline:
            first = pipeline.submit_nowait(
                StoreTask(dev, [1], cpu, [1], keys_for(1), None, first_ledger)
            )
            second = pipeline.submit_nowait(
                StoreTask(dev, [2], cpu, [2], keys_for(2), None, second_ledger)
            )
            first.add_done_callback(interrupt)
            first.add_done_callback(lambda c: ran.append(c.state.value))
            second.add_done_callback(lambda c: ran.append(c.state.value))
            await anyio.sleep_forever()
    assert ran == ["done", "cancelled"]
    assert first_ledger.calls == ["commit"]
    assert second_ledger.calls == ["abort"]


def gated_device(
    n: int,
) -> tuple[MemoryStore, FaultInjectingStore, MemoryStore, TierIndex, list[bytes]]:
    """A device of ``n`` filled blocks (and the wrapper that can hold its reads), a CPU tier
    of four slots and its index, and the blocks' keys."""
    inner = MemoryStore(8, name="gpu")
    keys = keys_for(*range(1, n + 1))
    fill(inner, list(range(n)), keys)
    return inner, FaultInjectingStore(inner), MemoryStore(4, name="cpu"), TierIndex("cpu", 4), keys


@pytest.mark.asyncio
async def test_a_refused_settle_still_settles_the_keys_the_ledger_holds() -> None:
    """Review: a commit or unpin refused whole left the task's other keys held for good."""
    from kvtier.tasks import LoadTask

    inner, device, cpu, index, keys = gated_device(3)
    async with TransferPipeline() as pipeline:
        slots = list(index.reserve(keys).slots)
        device.read_gate = anyio.Event()
        store = pipeline.submit_nowait(StoreTask(device, [0, 1, 2], cpu, slots, keys, None, index))
        await anyio.wait_all_tasks_blocked()
        index.abort(keys[2:])  # a caller's slip while the copy runs
        device.read_gate.set()
        with pytest.raises(LedgerError):
            await store
        assert index.num_reserved == 0
        assert [index.contains(k) for k in keys] == [True, True, False]
        pinned = index.pin(keys[:2])
        cpu_gated = FaultInjectingStore(cpu)
        cpu_gated.read_gate = anyio.Event()
        load = pipeline.submit_nowait(LoadTask(cpu_gated, pinned, inner, [5, 6], keys[:2], index))
        await anyio.wait_all_tasks_blocked()
        index.unpin(keys[1:2])  # another slip: one pin released twice
        cpu_gated.read_gate.set()
        with pytest.raises(LedgerError):
            await load
    assert index.num_pinned == 0
    index.check_invariants()


@pytest.mark.asyncio
async def test_a_key_reserved_again_elsewhere_while_its_copy_ran_is_not_committed() -> None:
    """Settling by key would commit (or abort) the new reservation, at a slot never written."""
    _, device, cpu, index, keys = gated_device(2)
    async with TransferPipeline() as pipeline:
        slots = list(index.reserve(keys).slots)
        device.read_gate = anyio.Event()
        done = pipeline.submit_nowait(StoreTask(device, [0, 1], cpu, slots, keys, None, index))
        await anyio.wait_all_tasks_blocked()
        index.abort(keys[1:])  # a caller's slip while the copy runs...
        index.reserve([keys_for(9)[0]])  # ...the freed slot goes to another block...
        (elsewhere,) = index.reserve(keys[1:]).slots  # ...and the key to another slot
        assert elsewhere != slots[1]
        device.read_gate.set()
        with pytest.raises(LedgerError):
            await done
        assert index.contains(keys[0])  # its own reservation: committed
        assert not index.contains(keys[1])  # not made visible at a slot never written
        index.check_task_slots(keys[1:], [elsewhere], written=True)  # still reserved
        index.abort(keys[1:])
    index.check_invariants()
