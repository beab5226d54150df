"""A hypothesis state machine over an engine driving the OffloadManager.

Random steps: new requests (sharing prefixes, so lower tiers hit, and
sometimes reusing the id of a request that ended, whose transfers may still
run), a step (compute, plan, store), finishing or preempting requests, the
device dropping its free cached blocks (so later requests load them),
transfers held back and released late, injected transfer failures and
blocks found bad (a load keeps the positions before the first one), and
resets of every cache with a change of weights (the bytes computed for a
hash change, so a block from before the reset loaded after it is caught); one
machine stacks a small CPU tier over a second one, so stores spill past it,
loads stage through it and its evictions are demoted. Real
KVCacheManager, real tiers and pipeline (synchronous mode: a background event
loop). Checked after every step: no lower-tier slot both free and pinned, no
device block stored twice while in flight, loads only into blocks without a
computed hash, every loaded block's bytes are the bytes its hash was computed
with, the engine is told about each load at most once (exactly once for the
requests it keeps), never about the load of a request that ended (a new
request of its id would take it for its own); at the end, nothing leaks in
any tier or in the device pool.
"""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvtier import KVCacheConfig, KVCacheManager, Request
from kvtier.hashing import make_block_hash_with_group_id
from kvtier.offload import OffloadManager, SchedulerOutput
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from tests.offload_env import _HASHER, BS, LAYOUT, pattern
from tests.tier_doubles import GatedStore

GPU_BLOCKS = 10
CPU_SLOTS = 8
PREFIXES = [list(range(p * 10_000, p * 10_000 + 6 * BS)) for p in range(2)]
TIMEOUT = 30.0


class OffloadMachine(RuleBasedStateMachine):
    mode = "eager"
    slots: tuple[int, ...] = (CPU_SLOTS,)  # per lower tier, fastest first

    def __init__(self) -> None:
        super().__init__()
        self.kvm = KVCacheManager(KVCacheConfig.full_attention(GPU_BLOCKS, BS), 4096)
        self.cache = torch.zeros((GPU_BLOCKS, LAYOUT.block_bytes), dtype=torch.uint8)
        self.tiers = [
            GatedStore(CpuTier(LAYOUT, slots, name=f"cpu{level or ''}"))
            for level, slots in enumerate(self.slots)
        ]
        self.om = OffloadManager(
            self.kvm.block_pool,
            DeviceTier(self.cache, LAYOUT),
            self.tiers,
            block_size=BS,
            mode=self.mode,  # type: ignore[arg-type]
            lazy_free_target=8,
        )
        self.om.__enter__()
        self.count = 0
        self.requests: dict[str, Request] = {}
        self.phase: dict[str, str] = {}  # loading / ready / computed
        self.load_specs: dict[str, tuple[tuple[int, ...], int]] = {}
        self.expect_report: set[str] = set()
        self.reports: Counter[str] = Counter()
        self.ended: list[str] = []  # ids of requests that ended, to reuse
        self.weights = 0  # bumped by each reset: the bytes of every hash change

    # -- helpers -------------------------------------------------------------------

    def key(self, request: Request, position: int) -> bytes:
        return make_block_hash_with_group_id(request.block_hashes[position], 0)

    def data(self, key: bytes) -> torch.Tensor:
        """The bytes the current weights compute for the block of ``key``."""
        return pattern(key + self.weights.to_bytes(4, "little"))

    def collect(self) -> None:
        for finished in self.om.take_finished():
            rid = finished.request_id
            self.reports[rid] += 1
            assert self.reports[rid] == 1, f"load of {rid} reported twice"
            assert rid in self.requests, f"told of the load of {rid}, which ended"
            request = self.requests[rid]
            ids, first = self.load_specs.get(rid, ((), 0))
            failed = set(finished.failed_block_ids)
            for offset, block_id in enumerate(ids):
                if block_id not in failed:  # a verified load: the bytes must be exact
                    expected = self.data(self.key(request, first + offset))
                    assert torch.equal(self.cache[block_id], expected), "wrong bytes loaded"
            self.phase[rid] = "ready"

    # -- rules ---------------------------------------------------------------------

    def _end(self, rid: str) -> None:
        request = self.requests.pop(rid)
        self.phase.pop(rid)
        self.expect_report.discard(rid)
        self.om.request_finished(request)
        self.kvm.free(request)
        self.ended.append(rid)

    @rule(
        prefix=st.integers(0, 1),
        shared=st.integers(1, 6),
        tail=st.integers(0, 2),
        run=st.booleans(),
        reuse=st.integers(-1, 63),
    )
    def new_request(self, prefix: int, shared: int, tail: int, run: bool, reuse: int) -> None:
        self.count += 1
        rid = f"r{self.count}"
        if reuse >= 0 and self.ended:  # an ended request's id (its transfers may still run)
            rid = self.ended.pop(reuse % len(self.ended))
            self.reports[rid] = 0  # counted from now on: the new request's
            self.load_specs.pop(rid, None)
        tokens = PREFIXES[prefix][: shared * BS] + list(
            range(10**6 + self.count * 1000, 10**6 + self.count * 1000 + tail * BS + 5)
        )
        request = Request(rid, tokens, _HASHER)
        computed, num_computed = self.kvm.get_computed_blocks(request)
        external, _ = self.om.get_num_new_matched_tokens(request, num_computed)
        new = request.num_tokens - num_computed
        blocks = self.kvm.allocate_slots(
            request, new, num_computed, computed, delay_cache_blocks=True
        )
        if blocks is None:  # the pool is full: requests that computed end, as in an engine
            for done in [rid for rid, phase in self.phase.items() if phase == "computed"]:
                self._end(done)
            blocks = self.kvm.allocate_slots(
                request, new, num_computed, computed, delay_cache_blocks=True
            )
        if blocks is None:
            self.om.request_finished(request)
            return
        held = self.kvm.get_blocks(rid)
        if external:
            first = num_computed // BS
            for block in held.blocks[0][first : first + external // BS]:
                assert block.block_hash is None, "a load would overwrite a computed block"
        self.om.update_state_after_alloc(request, held, external)
        self.requests[rid] = request
        self.phase[rid] = "loading" if external else "ready"
        if external:
            self.expect_report.add(rid)
        if run:  # scheduled and computed in the same step, as most requests are
            self.step()

    @rule()
    def step(self) -> None:
        self.collect()
        ready = [rid for rid, phase in self.phase.items() if phase == "ready"]
        for rid in ready:  # caching at schedule time, as vLLM does
            self.kvm.cache_blocks(self.requests[rid], self.requests[rid].num_tokens)
        out = SchedulerOutput(
            num_scheduled_tokens=dict.fromkeys(ready, BS),
            new_requests={rid: self.kvm.get_block_ids(rid) for rid in ready},
        )
        plan = self.om.build_step(out)
        for spec in plan.stores:
            ids = spec.device_block_ids
            assert len(set(ids)) == len(ids)
        # No device block in two stores at once. (Checked on the live events,
        # not against in_flight_store_blocks read before build_step: a store
        # that ends in between is applied by build_step, which may then store
        # its blocks again, rightly.)
        live = [set(event.block_ids) for event in self.om._transfers.stores.values()]
        assert sum(map(len, live)) == len(set().union(*live)), (
            "a device block stored twice while in flight"
        )
        for spec in plan.loads:
            self.load_specs[spec.request_id] = (spec.device_block_ids, spec.first_block)
        for rid in ready:  # the forward pass writes every full block's bytes
            request = self.requests[rid]
            for position, block in enumerate(self.kvm.get_blocks(rid).blocks[0]):
                if position < len(request.block_hashes):
                    self.cache[block.block_id] = self.data(self.key(request, position))
            self.phase[rid] = "computed"
        self.om.step_computed(plan.step_id)

    @rule(pick=st.integers(0, 63))
    def finish(self, pick: int) -> None:
        # Drawn independently of the state: transfers end on another thread,
        # so which requests exist may differ when hypothesis replays a run.
        if self.requests:
            ids = sorted(self.requests)
            self._end(ids[pick % len(ids)])

    def _open(self) -> None:
        for tier in self.tiers:
            tier.open = True

    @rule()
    def hold_transfers(self) -> None:
        for tier in self.tiers:
            tier.open = False

    @rule()
    def release_transfers(self) -> None:
        self._open()

    @rule(level=st.integers(0, 1))
    def fail_next_transfer(self, level: int) -> None:
        self.tiers[level % len(self.tiers)].fail += 1

    @rule()
    def evict_device_cache(self) -> None:
        """The device drops its free cached blocks (as allocations would): the next
        requests of those prefixes load them from the CPU tier."""
        pool = self.kvm.block_pool
        pool.evict_blocks([block.block_id for block in pool.free_block_queue if block.block_hash])

    @rule(level=st.integers(0, 1))
    def lose_next_block(self, level: int) -> None:
        """The next read finds one of its blocks bad: a load keeps the positions before it."""
        self.tiers[level % len(self.tiers)].lose += 1

    @rule()
    def settle(self) -> None:
        self._open()
        assert self.om.wait_idle_blocking(TIMEOUT), "transfers did not end"
        self.collect()

    @rule(really=st.integers(0, 7))
    def new_weights(self, really: int) -> None:
        """The engine drains, resets the device cache and the lower tiers, and
        computes with new weights from then on (rare: it ends every request)."""
        if really != 7:
            return
        self._open()
        self.step()  # planned loads start at a step
        assert self.om.wait_idle_blocking(TIMEOUT), "transfers did not end"
        self.collect()
        for rid in list(self.requests):
            self._end(rid)
        assert self.om.wait_idle_blocking(TIMEOUT), "transfers did not end"
        self.collect()
        assert self.kvm.reset_prefix_cache()
        assert self.om.reset_cache_blocking()
        assert all(len(index) == 0 for index in self.om.indexes)
        self.weights += 1

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def indexes_are_consistent(self) -> None:
        for index in self.om.indexes:
            index.check_invariants()

    @invariant()
    def in_flight_blocks_are_referenced(self) -> None:
        blocks = self.kvm.block_pool.blocks
        assert all(blocks[i].ref_cnt > 0 for i in self.om.in_flight_store_blocks)

    def teardown(self) -> None:
        try:
            for tier in self.tiers:
                tier.open = True
                tier.fail = tier.lose = 0
            self.step()  # planned loads start at a step
            assert self.om.wait_idle_blocking(TIMEOUT)
            self.collect()
            for rid in self.expect_report:  # requests the engine kept
                assert self.reports[rid] == 1, f"load of {rid} never reported"
            for rid in list(self.requests):
                self._end(rid)
            assert self.om.wait_idle_blocking(TIMEOUT)
            self.om.take_finished()
            for index in self.om.indexes:
                assert index.num_pinned == 0
                assert index.num_reserved == 0
            assert not any(self.om.has_request(rid) for rid in self.phase)
            pool = self.kvm.block_pool
            assert pool.get_num_free_blocks() == GPU_BLOCKS - 1, "a device block leaked"
        finally:
            self.om.__exit__(None, None, None)


class LazyOffloadMachine(OffloadMachine):
    mode = "lazy"


class TieredOffloadMachine(OffloadMachine):
    """A small CPU tier over a second one: stores spill past it, loads stage through it,
    and its evictions are demoted."""

    slots = (3, 8)


TestOffloadMachine = OffloadMachine.TestCase
TestOffloadMachine.settings = settings(deadline=None)
TestLazyOffloadMachine = LazyOffloadMachine.TestCase
TestLazyOffloadMachine.settings = settings(deadline=None)
TestTieredOffloadMachine = TieredOffloadMachine.TestCase
TestTieredOffloadMachine.settings = settings(deadline=None)
