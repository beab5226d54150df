"""A toy async engine loop (no model) that awaits kvtier over a real trace.

The bundled Mooncake sample (``kvtier/data/mooncake_sample.jsonl``) is replayed
in arrival order through a device prefix cache (:class:`kvtier.KVCacheManager`)
backed by a CPU tier and a disk tier in a temporary directory, with the
:class:`kvtier.offload.OffloadManager` in eager mode. Each step the engine:

1. admits waiting requests: device lookup, lower-tier lookup, allocation;
2. asks kvtier for the step's plan (loads start now);
3. "computes" the scheduled prompts: writes bytes derived from each block's
   hash into the device KV cache, then tells kvtier the step is computed
   (stores start now);
4. yields to the event loop, collects finished loads and checks every loaded
   block byte for byte (a mismatch stops the program with an error).

Each step's plan is printed. Run it with ``python examples/async_engine_loop.py``.
"""

from __future__ import annotations

import hashlib
import tempfile
from array import array
from pathlib import Path

import anyio
import torch

from kvtier import BlockHasher, KVCacheConfig, KVCacheManager, Request
from kvtier.hashing import make_block_hash_with_group_id
from kvtier.offload import OffloadManager, SchedulerOutput, StepPlan
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier
from kvtier.traces import bundled_trace_path, expand_prompt, read_mooncake_trace

TRACE = bundled_trace_path()
BLOCK_SIZE = 256
LAYOUT = BlockLayout(
    num_layers=2, block_size=BLOCK_SIZE, num_kv_heads=1, head_size=8, dtype="float16"
)
DEVICE_BLOCKS, CPU_BLOCKS, DISK_BLOCKS = 320, 384, 2048
MAX_RUNNING = 4
REQUESTS = 60


def block_bytes(request: Request, position: int) -> torch.Tensor:
    """The KV bytes the 'model' computes for a block: derived from its hash only."""
    key = make_block_hash_with_group_id(request.block_hashes[position], 0)
    seed = hashlib.sha256(key).digest()
    data = bytearray(seed * (-(-LAYOUT.block_bytes // len(seed))))
    return torch.frombuffer(data, dtype=torch.uint8)[: LAYOUT.block_bytes]


def describe(plan: StepPlan) -> str:
    sources: dict[str, int] = {}
    for spec in plan.loads:
        for tier, _ in spec.sources:
            sources[tier] = sources.get(tier, 0) + 1
    loads = ", ".join(f"{n} from {tier}" for tier, n in sorted(sources.items())) or "none"
    return f"loads: {len(plan.loads)} requests ({loads}); stores: {plan.num_store_blocks} blocks"


class ToyEngine:
    """Schedules prefills (no decode) over the device cache and kvtier."""

    def __init__(self, offload: OffloadManager, kvm: KVCacheManager, cache: torch.Tensor) -> None:
        self.offload, self.kvm, self.cache = offload, kvm, cache
        self.waiting: list[Request] = []
        self.loading: dict[str, tuple[Request, int, int]] = {}  # id -> (request, first, count)
        self.ready: list[Request] = []
        self.verified = 0

    def admit(self) -> None:
        """Look up and allocate waiting requests while there is room."""
        while self.waiting and len(self.loading) + len(self.ready) < MAX_RUNNING:
            request = self.waiting[0]
            computed, num_computed = self.kvm.get_computed_blocks(request)
            external, _ = self.offload.get_num_new_matched_tokens(request, num_computed)
            blocks = self.kvm.allocate_slots(
                request,
                request.num_tokens - num_computed,
                num_computed,
                computed,
                delay_cache_blocks=True,
            )
            if blocks is None:
                return  # the device is full until running requests and transfers end
            self.waiting.pop(0)
            held = self.kvm.get_blocks(request.request_id)
            self.offload.update_state_after_alloc(request, held, external)
            if external:
                first = num_computed // BLOCK_SIZE
                self.loading[request.request_id] = (request, first, external // BLOCK_SIZE)
            else:
                self.ready.append(request)

    def run_step(self) -> StepPlan:
        """Plan with kvtier, 'compute' the ready prompts, then let their stores start."""
        for request in self.ready:  # cached at schedule time, as vLLM does
            self.kvm.cache_blocks(request, request.num_tokens)
        plan = self.offload.build_step(
            SchedulerOutput(
                num_scheduled_tokens={r.request_id: r.num_tokens for r in self.ready},
                new_requests={
                    r.request_id: self.kvm.get_block_ids(r.request_id) for r in self.ready
                },
            )
        )
        for request in self.ready:  # the forward pass writes every full block's KV
            for position, block in enumerate(self.kvm.get_blocks(request.request_id).blocks[0]):
                if position < len(request.block_hashes):
                    self.cache[block.block_id] = block_bytes(request, position)
            self.kvm.free(request)  # prefill only: the request ends after this step
            self.offload.request_finished(request)
        self.offload.step_computed(plan.step_id)
        self.ready = []
        return plan

    def collect(self) -> None:
        """Finished loads: check every loaded block, then the request can compute."""
        for finished in self.offload.take_finished():
            request, first, count = self.loading.pop(finished.request_id)
            ids = self.kvm.get_block_ids(request.request_id)[0]
            for position in range(first, first + count):
                if ids[position] in finished.failed_block_ids:
                    continue  # the forward pass recomputes it
                if not torch.equal(self.cache[ids[position]], block_bytes(request, position)):
                    raise SystemExit(f"{request.request_id}: wrong bytes loaded")
                self.verified += 1
            self.ready.append(request)

    async def serve(self) -> None:
        step = 0
        while self.waiting or self.loading or self.ready:
            step += 1
            self.admit()
            if not self.ready and not self.loading:  # blocked on the device's room
                await self.offload.wait_idle()  # stores hold device blocks until they end
                self.admit()
                if not self.ready and not self.loading:
                    request = self.waiting.pop(0)
                    print(f"{request.request_id}: larger than the device cache, skipped")
                    continue
            plan = self.run_step()
            print(f"step {step:3d}: {describe(plan)}")
            await anyio.sleep(0)  # transfers run while the engine would compute
            if self.loading and not self.ready:
                await self.offload.wait_for_loads(list(self.loading))
            self.collect()


async def main() -> None:
    trace = read_mooncake_trace(TRACE, limit=REQUESTS)
    hasher = BlockHasher(BLOCK_SIZE)
    cache = torch.zeros((DEVICE_BLOCKS, LAYOUT.block_bytes), dtype=torch.uint8)
    kvm = KVCacheManager(KVCacheConfig.full_attention(DEVICE_BLOCKS, BLOCK_SIZE), 1 << 20)
    expanded: dict[int, array[int]] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-example-") as tmp:
        tiers = [
            CpuTier(LAYOUT, CPU_BLOCKS),
            DiskTier(Path(tmp) / "disk", LAYOUT, DISK_BLOCKS * DiskTier.bytes_per_block(LAYOUT)),
        ]
        offload = OffloadManager(
            kvm.block_pool, DeviceTier(cache, LAYOUT), tiers, block_size=BLOCK_SIZE, mode="eager"
        )
        engine = ToyEngine(offload, kvm, cache)
        engine.waiting = [
            Request(f"req-{i}", expand_prompt(row, cache=expanded), hasher)
            for i, row in enumerate(trace)
        ]
        async with offload:
            await engine.serve()
            await offload.wait_idle()
            stats = offload.stats()
    print(
        f"{len(trace)} requests: {stats.device_hit_blocks} blocks hit on the device, "
        f"{engine.verified} loaded from lower tiers and verified byte for byte"
    )
    for name, tier in stats.tiers.items():
        print(
            f"  {name}: hits {tier.hits}/{tier.queries} blocks, stored {tier.stores}, "
            f"loaded {tier.loads}, evicted {tier.evictions}, demoted in {tier.demotions}, "
            f"failed {tier.failed_transfers}"
        )


if __name__ == "__main__":
    anyio.run(main)
