"""The simulated engine of ``kvtier replay``: real tiers, real pipeline, real bytes.

No model runs: "computing" a block writes bytes derived from its hash into
the device KV cache. Everything else is what an engine does with kvtier: the
device prefix-cache lookup (:class:`~kvtier.manager.KVCacheManager`), the
lower-tier lookup and allocation, the step plan, loads and stores through the
transfer pipeline, and deferred cleanup
(:class:`~kvtier.offload.OffloadManager`). Every block loaded from a lower
tier is compared with the bytes its hash was computed with; a mismatch stops
the replay with :class:`ReplayIntegrityError`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import anyio.lowlevel
import torch

from kvtier.block_hasher import BlockHasher
from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError, KVTierError
from kvtier.hashing import make_block_hash_with_group_id
from kvtier.manager import KVCacheManager
from kvtier.offload import OffloadManager, SchedulerOutput
from kvtier.replay.report import ReplayReport, tier_report
from kvtier.replay.workloads import Workload
from kvtier.request import Request
from kvtier.spec import KVCacheConfig
from kvtier.stack import lower_tiers, offload_manager
from kvtier.tiers._host import host_shortfall
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.gpu import DeviceTier

__all__ = ["ReplayIntegrityError", "block_bytes", "replay"]

MAX_RUNNING = 8


class ReplayIntegrityError(KVTierError):
    """A block loaded from a lower tier did not hold the bytes it was stored with."""


def block_bytes(layout: BlockLayout, key: bytes) -> torch.Tensor:
    """The bytes the simulated model computes for a block: derived from its key only."""
    seed = hashlib.sha256(key).digest()
    data = bytearray(seed * (-(-layout.block_bytes // len(seed))))
    return torch.frombuffer(data, dtype=torch.uint8)[: layout.block_bytes]


def _device_blocks(config: KvtierConfig, workload: Workload) -> int:
    """The device tier's blocks: configured, or room for the largest prompt twice."""
    first = config.tiers[0]
    block_size = config.layout.block_size
    largest = max((len(p) for p in workload.prompts), default=1)
    needed = -(-largest // block_size) + 1  # the pool's null block holds no tokens
    if first.kind == "device":
        blocks = config.blocks_of(first)
        if blocks < needed:
            raise ConfigError(
                f"tiers[0].capacity: {blocks} device blocks cannot hold the workload's "
                f"largest prompt ({needed - 1} blocks, plus the pool's null block)"
            )
        return blocks
    return max(256, 2 * needed + 1)


class _Engine:
    """Admits requests, plans steps with kvtier, computes, checks loaded bytes."""

    def __init__(
        self,
        config: KvtierConfig,
        kvm: KVCacheManager,
        offload: OffloadManager,
        cache: torch.Tensor,
        hasher: BlockHasher,
    ) -> None:
        self.config, self.kvm, self.offload, self.cache = config, kvm, offload, cache
        self.hasher = hasher
        self.block_size = config.layout.block_size
        self.waiting: list[Request] = []
        self.loading: dict[str, tuple[Request, int, int]] = {}
        self.ready: list[Request] = []
        self.verified = 0
        self.device_hit_tokens = 0
        self.loaded_tokens = 0
        self.failed_loads = 0
        self.partial_loads = 0
        self.finished = 0
        self.probed: set[str] = set()  # requests whose shared tiers were asked already

    def _bytes(self, request: Request, position: int) -> torch.Tensor:
        key = make_block_hash_with_group_id(request.block_hashes[position], 0)
        return block_bytes(self.config.layout, key).to(self.cache.device)

    def _verify(self, request: Request, position: int, block_id: int, what: str) -> None:
        if not torch.equal(self.cache[block_id], self._bytes(request, position)):
            raise ReplayIntegrityError(
                f"{request.request_id}: {what} {position} (device block {block_id}) "
                "holds wrong bytes"
            )
        self.verified += 1

    async def admit(self) -> None:
        while self.waiting and len(self.loading) + len(self.ready) < MAX_RUNNING:
            request = self.waiting[0]
            computed, num_computed = self.kvm.get_computed_blocks(request)
            if self.offload.probes and request.request_id not in self.probed:
                # Once per request: blocks other engines stored in a shared tier.
                self.probed.add(request.request_id)
                await self.offload.probe(request, num_computed)
            # The manager's prefetch policy ([offload] prefetch) decided how much
            # of the lower tiers' hit to load; the rest is computed.
            external, _ = self.offload.get_num_new_matched_tokens(request, num_computed)
            first = num_computed // self.block_size
            blocks = self.kvm.allocate_slots(
                request,
                request.num_tokens - num_computed,
                num_computed,
                computed,
                delay_cache_blocks=True,
            )
            if blocks is None:
                return
            self.waiting.pop(0)
            self.probed.discard(request.request_id)
            self.device_hit_tokens += num_computed
            held = self.kvm.get_blocks(request.request_id)
            for position in range(num_computed // self.block_size):
                self._verify(request, position, held.blocks[0][position].block_id, "device hit")
            self.offload.update_state_after_alloc(request, held, external)
            if external:
                self.loading[request.request_id] = (request, first, external // self.block_size)
            else:
                self.ready.append(request)

    def step(self) -> None:
        for request in self.ready:
            self.kvm.cache_blocks(request, request.num_tokens)
        plan = self.offload.build_step(
            SchedulerOutput(
                num_scheduled_tokens={r.request_id: r.num_tokens for r in self.ready},
                new_requests={
                    r.request_id: self.kvm.get_block_ids(r.request_id) for r in self.ready
                },
            )
        )
        for request in self.ready:  # the forward pass writes every full block
            for position, block in enumerate(self.kvm.get_blocks(request.request_id).blocks[0]):
                if position < len(request.block_hashes):
                    self.cache[block.block_id] = self._bytes(request, position)
            self.kvm.free(request)
            self.offload.request_finished(request)
            self.finished += 1
        self.offload.step_computed(plan.step_id)
        self.ready = []

    def collect(self) -> None:
        for finished in self.offload.take_finished():
            request, first, count = self.loading.pop(finished.request_id)
            ids = self.kvm.get_block_ids(request.request_id)[0]
            failed = set(finished.failed_block_ids)
            self.failed_loads += int(bool(failed))
            kept = any(ids[p] not in failed for p in range(first, first + count))
            self.partial_loads += int(bool(failed) and kept)
            for position in range(first, first + count):
                if ids[position] in failed:
                    continue  # recomputed by the forward pass
                self._verify(request, position, ids[position], "loaded block")
                self.loaded_tokens += self.block_size
            self.ready.append(request)

    async def run(self, progress: Callable[[int], None]) -> None:
        while self.waiting or self.loading or self.ready:
            await self.admit()
            if not self.ready and not self.loading:
                await self.offload.wait_idle()  # stores hold device blocks until they end
                await self.admit()
                if not self.ready and not self.loading:
                    raise ConfigError("the device tier is too small for the next request")
            before = self.finished
            self.step()
            # The forward pass: a real engine awaits the device here, which is
            # when the pipeline's transfers make progress on the event loop.
            await anyio.lowlevel.checkpoint()
            progress(self.finished - before)
            if self.loading and not self.ready:
                await self.offload.wait_for_loads(list(self.loading))
            self.collect()
        await self.offload.wait_idle()


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one kvtier error an exception group carries, or the group itself.

    The offload manager's task group wraps what the engine raised; a caller
    wants the :class:`ReplayIntegrityError` (or other kvtier error) itself.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    if len(leaves) == 1 and isinstance(leaves[0], KVTierError):
        return leaves[0]
    return group


async def replay(
    config: KvtierConfig,
    workload: Workload,
    *,
    progress: Callable[[int], None] | None = None,
    workdir: Path | None = None,
    wrap_tier: Callable[[BlockStore], BlockStore] | None = None,
) -> ReplayReport:
    """Replay ``workload`` through the stack ``config`` describes.

    Args:
        config: The stack (a disk tier without a path gets one under ``workdir``).
        workload: The prompts.
        progress: Called with the number of requests finished at each step.
        workdir: Where path-less disk tiers live (a temporary directory by default).
        wrap_tier: Called with each lower tier; the replay uses what it returns
            (to instrument tiers or inject faults).

    Raises:
        ReplayIntegrityError: A loaded block held wrong bytes.
        ConfigError: The stack cannot run the workload.
    """
    layout = config.layout
    device_blocks = _device_blocks(config, workload)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.tiers[0].kind == "device":
        what, advice = "tiers[0].capacity", "lower it"
    else:
        what = "the device cache (no device tier in the config: sized for the largest prompt)"
        advice = 'add a [[tiers]] kind = "device" with a capacity that fits'
    shortfall = host_shortfall(device_blocks * layout.block_bytes) if device.type == "cpu" else None
    if shortfall is not None:
        raise ConfigError(f"{what}: {device_blocks} device blocks: {shortfall}: {advice}")
    try:
        cache = torch.zeros((device_blocks, layout.block_bytes), dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch's allocators raise RuntimeError
        raise ConfigError(
            f"{what}: cannot allocate {device_blocks} device blocks of "
            f"{layout.block_bytes} bytes on {device}: {exc}".splitlines()[0]
        ) from exc
    kvm = KVCacheManager(KVCacheConfig.full_attention(device_blocks, layout.block_size), 1 << 30)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-")))
        tiers = lower_tiers(config, workdir=workdir)
        if wrap_tier is not None:
            tiers = [wrap_tier(tier) for tier in tiers]
        offload = offload_manager(config, kvm.block_pool, DeviceTier(cache, layout), tiers=tiers)
        hasher = BlockHasher(layout.block_size, config.offload.hash, seed=config.offload.hash_seed)
        engine = _Engine(config, kvm, offload, cache, hasher)
        engine.waiting = [
            Request(f"req-{i}", prompt, hasher, tag=workload.tag(i))
            for i, prompt in enumerate(workload.prompts)
        ]
        # Three clocks: opening the stack (allocating the CPU tier, a disk
        # tier's restart scan, connecting to Redis), the replay itself (first
        # request to last completion) and closing it (flush_on_close included).
        opening = time.perf_counter()
        try:
            async with offload:
                start = time.perf_counter()
                await engine.run(progress or (lambda _: None))
                end = time.perf_counter()
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
        closed = time.perf_counter()
        stats = offload.stats()  # after closing: a flush_on_close counts too
    return ReplayReport(
        workload=workload.name,
        requests=len(workload.prompts),
        prompt_tokens=workload.num_tokens,
        device_hit_tokens=engine.device_hit_tokens,
        loaded_tokens=engine.loaded_tokens,
        declined_tokens=sum(s.declined for s in stats.tiers.values()) * layout.block_size,
        prefetch=config.offload.prefetch,
        verified_blocks=engine.verified,
        failed_loads=engine.failed_loads,
        partial_loads=engine.partial_loads,
        seconds=end - start,
        device=str(device),
        tiers=tuple(tier_report(name, s) for name, s in stats.tiers.items()),
        open_seconds=start - opening,
        close_seconds=closed - end,
    )
