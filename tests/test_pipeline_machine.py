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

import anyio
import anyio.from_thread
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.completion import Completion
from kvtier.errors import TierFullError, TierIOError
from kvtier.tiers.index import TierIndex
from kvtier.transfer import LoadTask, StoreTask, TransferPipeline, TransferResult
from tests.tier_doubles import SMALL, FaultInjectingStore, MemoryStore

NUM_KEYS = 12
DEVICE_SLOTS = 8
CPU_SLOTS = 4


def key(i: int) -> bytes:
    return b"key-%04d" % i


def payload(i: int) -> torch.Tensor:
    return torch.full((SMALL.block_bytes,), i + 1, dtype=torch.uint8)


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.device = MemoryStore(DEVICE_SLOTS, name="gpu")
        self.device.verify_keys = False
        self.cpu = FaultInjectingStore(MemoryStore(CPU_SLOTS, name="cpu"))
        self.index = TierIndex("cpu", CPU_SLOTS)
        self.outstanding: list[tuple[str, Completion[TransferResult], int, int]] = []
        self.store_sources: dict[str, int] = {}
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._start_pipeline()

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
            await anyio.wait_all_tasks_blocked()
            return completion

        return self.portal.call(post)

    def busy_device_slots(self) -> set[int]:
        """Device slots an in-flight task reads or writes (an engine leaves them be)."""
        busy = set()
        for kind, completion, _, where in self.outstanding:
            if kind == "load":
                busy.add(where)
            else:
                busy.add(self.store_sources[completion.name])
        return busy

    # -- rules ---------------------------------------------------------------------

    @rule(i=st.integers(0, NUM_KEYS - 1), device_slot=st.integers(0, DEVICE_SLOTS - 1))
    def store(self, i: int, device_slot: int) -> None:
        if self.index.contains(key(i)) or device_slot in self.busy_device_slots():
            return
        self.device.data[device_slot] = payload(i)
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
        self.store_sources[completion.name] = device_slot

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
            self.cpu.write_error = error
        else:
            self.cpu.read_error = error

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
                cpu = self.cpu.inner
                assert isinstance(cpu, MemoryStore)
                if self.index.slot_of(key(i)) == where:  # unless evicted since, legitimately
                    assert torch.equal(cpu.data[where], payload(i))
            else:
                assert torch.equal(self.device.data[where], payload(i))
        self.outstanding = []
        assert self.index.num_pinned == 0

    @rule(i=st.integers(0, NUM_KEYS - 1), device_slot=st.integers(0, DEVICE_SLOTS - 1))
    def cancel_owner(self, i: int, device_slot: int) -> None:
        """Cancel the pipeline's owner with a load stalled mid-flight."""
        self.cpu.read_gate = anyio.Event()  # never set: the load waits until cancelled
        self.load(i, device_slot)
        cancelled = asyncio.CancelledError()
        # Exit the pipeline's context as a cancelled owner would; the portal
        # reports the cancellation back as a futures CancelledError.
        with contextlib.suppress(asyncio.CancelledError, concurrent.futures.CancelledError):
            self._pipeline_cm.__exit__(type(cancelled), cancelled, None)
        self.cpu.read_gate = None
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
