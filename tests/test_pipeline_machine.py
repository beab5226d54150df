"""A hypothesis state machine over the transfer pipeline and a tier index.

Rules post stores (device → CPU) and loads (CPU → device), inject faults,
wait for completion and cancel the pipeline's owner. After every step the
index's invariants hold (no slot both free and pinned, maps consistent); once
completions are awaited every one of them is resolved, every store or load
that succeeded moved exactly the bytes written, and no pin is left behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
from collections.abc import Sequence
from typing import Protocol

import anyio
import anyio.from_thread
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.completion import Completion
from kvtier.errors import TierFullError, TierIOError
from kvtier.tiers.base import BlockKey, BlockStore
from kvtier.tiers.index import TierIndex
from kvtier.transfer import LoadTask, StoreTask, TransferPipeline, TransferResult
from tests.tier_doubles import SMALL, FaultInjectingStore, MemoryStore, ViewStore

NUM_KEYS = 12
DEVICE_SLOTS = 8
CPU_SLOTS = 4


async def all_tasks_blocked() -> None:
    """``anyio.wait_all_tasks_blocked`` (the same test) without its 0.1 s naps.

    anyio's asyncio version sleeps 0.1 s whenever some task can still run,
    which made most of this machine's time sleeping (19 ms a step).
    """
    this = asyncio.current_task()
    for attempt in itertools.count():
        waiting = (
            task is this or (task._fut_waiter is not None and not task._fut_waiter.done())  # type: ignore[attr-defined]
            for task in asyncio.all_tasks()
        )
        if all(waiting):
            return
        await asyncio.sleep(0 if attempt < 100 else 0.001)


class Faults(Protocol):
    """Where a machine injects faults: errors for the next read or write, a gate for loads."""

    read_error: BaseException | None
    write_error: BaseException | None
    load_gate: anyio.Event | None


class CpuFaults:
    """Faults on a FaultInjectingStore CPU tier: a load starts with its read."""

    def __init__(self, cpu: FaultInjectingStore) -> None:
        self.cpu = cpu

    @property
    def read_error(self) -> BaseException | None:
        return self.cpu.read_error

    @read_error.setter
    def read_error(self, error: BaseException | None) -> None:
        self.cpu.read_error = error

    @property
    def write_error(self) -> BaseException | None:
        return self.cpu.write_error

    @write_error.setter
    def write_error(self, error: BaseException | None) -> None:
        self.cpu.write_error = error

    @property
    def load_gate(self) -> anyio.Event | None:
        return self.cpu.read_gate

    @load_gate.setter
    def load_gate(self, gate: anyio.Event | None) -> None:
        self.cpu.read_gate = gate


def key(i: int) -> bytes:
    return b"key-%04d" % i


def payload(i: int) -> torch.Tensor:
    return torch.full((SMALL.block_bytes,), i + 1, dtype=torch.uint8)


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.device, self.cpu, self.faults = self.make_tiers()
        self.index = TierIndex("cpu", CPU_SLOTS)
        self.outstanding: list[tuple[str, Completion[TransferResult], int, int]] = []
        self.store_sources: dict[str, set[int]] = {}
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._start_pipeline()

    def make_tiers(self) -> tuple[BlockStore, BlockStore, Faults]:
        """The device and CPU tiers, and where faults are injected (the CPU tier's calls)."""
        device = MemoryStore(DEVICE_SLOTS, name="gpu")
        device.verify_keys = False
        cpu = FaultInjectingStore(MemoryStore(CPU_SLOTS, name="cpu"))
        return device, cpu, CpuFaults(cpu)

    def cpu_data(self) -> torch.Tensor:
        cpu = self.cpu
        assert isinstance(cpu, FaultInjectingStore)
        assert isinstance(cpu.inner, MemoryStore)
        return cpu.inner.data

    def device_data(self) -> torch.Tensor:
        assert isinstance(self.device, MemoryStore)
        return self.device.data

    def _start_pipeline(self) -> None:
        self.pipeline = TransferPipeline(max_batch_blocks=3)
        self._pipeline_cm = self.portal.wrap_async_context_manager(self.pipeline)
        self._pipeline_cm.__enter__()

    def teardown(self) -> None:
        self._pipeline_cm.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)

    def submit(self, task: StoreTask | LoadTask) -> Completion[TransferResult]:
        """Post a task and let the pipeline run until it is idle again.

        Waiting keeps each step deterministic (hypothesis replays steps); a
        task stalled at a read gate stays in flight.
        """

        async def post() -> Completion[TransferResult]:
            completion = await self.pipeline.submit(task)
            await all_tasks_blocked()
            return completion

        return self.portal.call(post)

    def busy_device_slots(self) -> set[int]:
        """Device slots an in-flight task reads or writes (an engine leaves them be)."""
        busy = set()
        for kind, completion, _, where in self.outstanding:
            if kind == "load":
                busy.add(where)
            else:
                busy |= self.store_sources[completion.name]
        return busy

    # -- rules ---------------------------------------------------------------------

    @rule(i=st.integers(0, NUM_KEYS - 1), device_slot=st.integers(0, DEVICE_SLOTS - 1))
    def store(self, i: int, device_slot: int) -> None:
        if self.index.contains(key(i)) or device_slot in self.busy_device_slots():
            return
        self.device_data()[device_slot] = payload(i)
        try:
            reservation = self.index.reserve([key(i)])
        except TierFullError:
            return
        slots = list(reservation.slots)
        if not slots:
            return
        task = StoreTask(self.device, [device_slot], self.cpu, slots, [key(i)], None, self.index)
        completion = self.submit(task)
        self.outstanding.append(("store", completion, i, slots[0]))
        self.store_sources[completion.name] = {device_slot}

    @rule(i=st.integers(0, NUM_KEYS - 1), device_slot=st.integers(0, DEVICE_SLOTS - 1))
    def load(self, i: int, device_slot: int) -> None:
        if not self.index.contains(key(i)) or device_slot in self.busy_device_slots():
            return
        (slot,) = self.index.pin([key(i)])
        task = LoadTask(self.cpu, [slot], self.device, [device_slot], [key(i)], self.index, None)
        completion = self.submit(task)
        self.outstanding.append(("load", completion, i, device_slot))

    @rule(write=st.booleans())
    def inject_fault(self, write: bool) -> None:
        error = TierIOError("injected", tier="cpu")
        if write:
            self.faults.write_error = error
        else:
            self.faults.read_error = error

    @precondition(lambda self: self.outstanding)
    @rule()
    def complete(self) -> None:
        async def wait_all() -> None:
            for _, completion, _, _ in self.outstanding:
                with contextlib.suppress(Exception):  # failed or cancelled: checked below
                    await completion

        self.portal.call(wait_all)
        for kind, completion, i, where in self.outstanding:
            assert completion.done()
            if completion.state.value != "done":
                continue
            if kind == "store":
                if self.index.slot_of(key(i)) == where:  # unless evicted since, legitimately
                    assert torch.equal(self.cpu_data()[where], payload(i))
            else:
                assert torch.equal(self.device_data()[where], payload(i))
        self.outstanding = []
        assert self.index.num_pinned == 0

    @rule(i=st.integers(0, NUM_KEYS - 1), device_slot=st.integers(0, DEVICE_SLOTS - 1))
    def cancel_owner(self, i: int, device_slot: int) -> None:
        """Cancel the pipeline's owner with a load stalled mid-flight."""
        self.faults.load_gate = anyio.Event()  # never set: the load waits until cancelled
        self.load(i, device_slot)
        cancelled = asyncio.CancelledError()
        # Exit the pipeline's context as a cancelled owner would; the portal
        # reports the cancellation back as a futures CancelledError.
        with contextlib.suppress(asyncio.CancelledError, concurrent.futures.CancelledError):
            self._pipeline_cm.__exit__(type(cancelled), cancelled, None)
        self.faults.load_gate = None
        for _, completion, _, _ in self.outstanding:
            assert completion.done()
        self.outstanding = []
        assert self.index.num_pinned == 0
        assert self.index.num_reserved == 0
        self._start_pipeline()

    @invariant()
    def index_is_consistent(self) -> None:
        self.index.check_invariants()


TestPipelineMachine = PipelineMachine.TestCase


class PartsDevice(MemoryStore):
    """A device double taking parts, whose parts calls fail or stall on demand.

    ``read_error`` fails the next parts read (a store), ``write_error`` the
    next parts write (a load), ``load_gate`` holds parts writes until set.
    """

    verify_keys = False

    def __init__(self, num_slots: int) -> None:
        super().__init__(num_slots, name="gpu")
        self.read_error: BaseException | None = None
        self.write_error: BaseException | None = None
        self.load_gate: anyio.Event | None = None

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        if self.read_error is not None:
            error, self.read_error = self.read_error, None
            raise error
        at = 0
        for part in parts:
            await self.read_into(
                slots[at : at + part.shape[0]], keys[at : at + part.shape[0]], part
            )
            at += part.shape[0]

    async def write_from_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error
        at = 0
        for part in parts:
            await self.write_from(
                slots[at : at + part.shape[0]], keys[at : at + part.shape[0]], part
            )
            at += part.shape[0]


class PartsPipelineMachine(PipelineMachine):
    """The same rules with a CPU tier exposing views and a device taking parts.

    Batches then move straight between the device and the CPU tier's rows in
    one parts call (``direct_min_bytes`` of one block), and faults and the
    stalled load of ``cancel_owner`` hit those calls.
    """

    def make_tiers(self) -> tuple[BlockStore, BlockStore, Faults]:
        device = PartsDevice(DEVICE_SLOTS)
        return device, ViewStore(CPU_SLOTS, name="cpu"), device

    @rule(
        first=st.integers(0, NUM_KEYS - 3),
        device_slots=st.lists(
            st.integers(0, DEVICE_SLOTS - 1), min_size=2, max_size=3, unique=True
        ),
    )
    def store_several(self, first: int, device_slots: list[int]) -> None:
        """One task of several blocks: CPU slots that are not one run take a parts call."""
        keys = [key(first + n) for n in range(len(device_slots))]
        if (
            any(self.index.contains(k) for k in keys)
            or set(device_slots) & self.busy_device_slots()
        ):
            return
        for n, device_slot in enumerate(device_slots):
            self.device_data()[device_slot] = payload(first + n)
        try:
            reservation = self.index.reserve(keys)
        except TierFullError:
            return
        slots = list(reservation.slots)
        if len(slots) != len(keys):
            self.index.abort(keys)
            return
        task = StoreTask(self.device, device_slots, self.cpu, slots, keys, None, self.index)
        completion = self.submit(task)
        for n, slot in enumerate(slots):
            self.outstanding.append(("store", completion, first + n, slot))
        self.store_sources[completion.name] = set(device_slots)

    @rule(
        first=st.integers(0, NUM_KEYS - 3),
        device_slots=st.lists(
            st.integers(0, DEVICE_SLOTS - 1), min_size=2, max_size=3, unique=True
        ),
    )
    def load_several(self, first: int, device_slots: list[int]) -> None:
        keys = [key(first + n) for n in range(len(device_slots))]
        if (
            not all(self.index.contains(k) for k in keys)
            or set(device_slots) & self.busy_device_slots()
        ):
            return
        slots = self.index.pin(keys)
        task = LoadTask(self.cpu, slots, self.device, device_slots, keys, self.index, None)
        completion = self.submit(task)
        for n, device_slot in enumerate(device_slots):
            self.outstanding.append(("load", completion, first + n, device_slot))

    def cpu_data(self) -> torch.Tensor:
        assert isinstance(self.cpu, ViewStore)
        return self.cpu.data

    def _start_pipeline(self) -> None:
        self.pipeline = TransferPipeline(max_batch_blocks=3, direct_min_bytes=SMALL.block_bytes)
        self._pipeline_cm = self.portal.wrap_async_context_manager(self.pipeline)
        self._pipeline_cm.__enter__()


TestPartsPipelineMachine = PartsPipelineMachine.TestCase
