"""A small real stack for offload tests: a device pool, a device tier, CPU and disk tiers.

Device blocks are "computed" by writing bytes derived from their block hash
into the KV cache tensor, so every load can be checked byte for byte.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from kvtier import BlockHasher, BlockPool, KVCacheBlocks, Request
from kvtier.block import KVCacheBlock
from kvtier.hashing import make_block_hash_with_group_id
from kvtier.offload import OffloadManager, SchedulerOutput, StepPlan, WriteMode
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier

BS = 16
LAYOUT = BlockLayout(num_layers=2, block_size=BS, num_kv_heads=1, head_size=8, dtype="float16")
_HASHER = BlockHasher(BS, "sha256", seed="offload-tests")
DEADLINE = 10.0
"""Seconds a test waits for transfers: a hang fails it instead of stalling the suite."""


def disk_tier(path: Path, blocks: int = 16, name: str = "disk") -> DiskTier:
    """A disk tier of ``blocks`` blocks of :data:`LAYOUT` under ``path``."""
    return DiskTier(path, LAYOUT, blocks * DiskTier.bytes_per_block(LAYOUT), name=name)


async def recovered(path: Path, blocks: int = 16, name: str = "disk") -> dict[bytes, int]:
    """What a new process finds on the disk directory: key -> slot."""
    async with disk_tier(path, blocks, name) as disk:
        return {k: slot for slot, k in await disk.recover()}


def pattern(key: bytes) -> torch.Tensor:
    """The bytes a device block holding ``key`` contains."""
    seed = hashlib.sha256(key).digest()
    repeats = -(-LAYOUT.block_bytes // len(seed))
    return torch.frombuffer(bytearray(seed * repeats), dtype=torch.uint8)[: LAYOUT.block_bytes]


class Env:
    """A device pool of ``gpu_blocks`` (block 0 is the null block) over real tiers.

    The KV cache lives on ``device`` (a CUDA one for the tests that need it).
    """

    def __init__(
        self,
        *,
        gpu_blocks: int = 16,
        cpu_blocks: int = 8,
        mode: WriteMode = "eager",
        disk: Path | None = None,
        disk_blocks: int = 16,
        tiers: list[BlockStore] | None = None,
        device: str = "cpu",
        **options: object,
    ) -> None:
        self.pool = BlockPool(gpu_blocks)
        self.cache = torch.zeros((gpu_blocks, LAYOUT.block_bytes), dtype=torch.uint8, device=device)
        self.device = DeviceTier(self.cache, LAYOUT)
        if tiers is None:
            tiers = [CpuTier(LAYOUT, cpu_blocks)]
            if disk is not None:
                tiers.append(disk_tier(disk, disk_blocks))
        self.tiers = tiers
        self.manager = OffloadManager(
            self.pool,
            self.device,
            tiers,
            block_size=BS,
            mode=mode,
            **options,  # type: ignore[arg-type]
        )
        self._count = 0

    def request(
        self,
        num_blocks: int,
        *,
        extra: int = 3,
        like: Request | None = None,
        tag: int | str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """A request of ``num_blocks`` full blocks plus ``extra`` tokens (a fresh prompt,
        or ``like``'s), tagged ``tag``, named ``request_id`` (default: a fresh id)."""
        self._count += 1
        if like is not None:
            tokens = list(like.all_token_ids)
        else:
            start = self._count * 100_000
            tokens = list(range(start, start + num_blocks * BS + extra))
        return Request(request_id or f"req-{self._count}", tokens, _HASHER, tag=tag)

    def compute(self, request: Request, blocks: list[KVCacheBlock], first: int = 0) -> None:
        """Hash ``blocks`` (positions ``first``…) into the prefix cache and write their bytes."""
        full = min(first + len(blocks), len(request.block_hashes))
        padded = [self.pool.null_block] * first + list(blocks)
        self.pool.cache_full_blocks(request, padded, first, full, BS, 0)
        for block in blocks:
            if block.block_hash is not None:
                self.cache[block.block_id] = pattern(block.block_hash)

    def alloc(self, request: Request, num_blocks: int) -> KVCacheBlocks:
        """New device blocks for the request's first ``num_blocks`` positions, computed."""
        blocks = self.pool.get_new_blocks(num_blocks)
        self.compute(request, blocks)
        return KVCacheBlocks((blocks,))

    def fresh(self, num_blocks: int) -> list[KVCacheBlock]:
        """New device blocks holding garbage (load targets)."""
        blocks = self.pool.get_new_blocks(num_blocks)
        for block in blocks:
            self.cache[block.block_id] = 0xEE
        return blocks

    def holds(self, block: KVCacheBlock, request: Request, position: int) -> bool:
        """The device block holds the bytes of the request's block ``position``."""
        from kvtier.hashing import make_block_hash_with_group_id

        key = make_block_hash_with_group_id(request.block_hashes[position], 0)
        return torch.equal(self.cache[block.block_id].cpu(), pattern(key))

    def cpu_keys(self) -> set[bytes]:
        return {key for _, key in self.manager.indexes[0].blocks()}


def scheduled(
    new: dict[str, KVCacheBlocks] | None = None,
    cached: dict[str, list[int]] | None = None,
    tokens: dict[str, int] | None = None,
) -> SchedulerOutput:
    """A scheduler output: ``new`` requests with their blocks, ``cached`` with added ids."""
    new = new or {}
    cached = cached or {}
    counts = dict(tokens or {})
    for rid in [*new, *cached]:
        counts.setdefault(rid, BS)
    return SchedulerOutput(
        num_scheduled_tokens=counts,
        new_requests={rid: tuple(blocks.get_block_ids()) for rid, blocks in new.items()},
        cached_requests={rid: (ids,) for rid, ids in cached.items()},
    )


def key(request: Request, position: int) -> bytes:
    """The lower tiers' key of the request's block ``position`` (group 0)."""
    return make_block_hash_with_group_id(request.block_hashes[position], 0)


def plan_store(
    env: Env, request: Request, blocks: KVCacheBlocks | int
) -> tuple[KVCacheBlocks, StepPlan]:
    """Schedule ``request`` with its computed ``blocks`` (or that many new ones): the blocks
    and the step's plan (its stores start at ``step_computed``)."""
    if isinstance(blocks, int):
        blocks = env.alloc(request, blocks)
    env.manager.update_state_after_alloc(request, blocks, 0)
    return blocks, env.manager.build_step(scheduled(new={request.request_id: blocks}))


async def store(
    env: Env, request: Request, blocks: KVCacheBlocks | int, *, release: bool = False
) -> KVCacheBlocks:
    """Schedule ``request`` with its computed ``blocks`` (or that many new ones) and let the
    eager store land; with ``release``, the request then finishes and frees its blocks."""
    blocks, plan = plan_store(env, request, blocks)
    env.manager.step_computed(plan.step_id)
    await env.manager.wait_idle()
    if release:
        env.manager.request_finished(request)
        env.pool.free_blocks(reversed(blocks.blocks[0]))
    return blocks


def start_load(env: Env, request: Request, num_blocks: int) -> KVCacheBlocks:
    """Look ``request`` up, allocate fresh blocks for its first ``num_blocks`` and start
    their load (its lookup must answer them all); the target blocks."""
    assert env.manager.get_num_new_matched_tokens(request, 0)[0] == num_blocks * BS
    targets = KVCacheBlocks((env.fresh(num_blocks),))
    env.manager.update_state_after_alloc(request, targets, num_blocks * BS)
    env.manager.build_step(scheduled(new={request.request_id: targets}))
    return targets


def store_blocking(env: Env, request: Request, num_blocks: int) -> KVCacheBlocks:
    """:func:`store` for a manager entered with ``with`` (a synchronous engine)."""
    blocks = env.alloc(request, num_blocks)
    env.manager.update_state_after_alloc(request, blocks, 0)
    plan = env.manager.build_step(scheduled(new={request.request_id: blocks}))
    env.manager.step_computed(plan.step_id)
    assert env.manager.wait_idle_blocking(DEADLINE)
    return blocks
