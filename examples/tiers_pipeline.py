"""The data plane by hand: device -> CPU -> disk and back, through awaited transfers.

What an engine's offload code does with kvtier's tiers, without the offload
manager (``examples/async_engine_loop.py`` shows that one):

1. wrap the engine's KV cache (here per-layer tensors, on CUDA when present)
   as a ``DeviceTier``; open a ``CpuTier`` and a ``DiskTier``, each with a
   ``TierIndex`` that owns its slots;
2. store blocks device -> CPU: reserve CPU slots, post a ``StoreTask``, and
   release the request's device blocks in the completion's callback;
3. demote them CPU -> disk, then load them disk -> device into other device
   blocks, and check every byte;
4. reopen the disk directory as a new process would: ``recover()`` finds the
   blocks again.

Run: ``python examples/tiers_pipeline.py``
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import anyio
import torch

from kvtier.completion import Completion
from kvtier.tasks import LoadTask, StoreTask, TransferResult
from kvtier.tiers import BlockLayout, CpuTier, DeviceTier, DiskTier, TierIndex
from kvtier.transfer import TransferPipeline

LAYOUT = BlockLayout(num_layers=4, block_size=16, num_kv_heads=2, head_size=64, dtype="float16")
DEVICE_BLOCKS = 64


def engine_cache(device: torch.device) -> list[torch.Tensor]:
    """The engine's per-layer cache: [K0, V0, K1, V1, ...], random contents."""
    shape = (DEVICE_BLOCKS, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_size)
    return [torch.randn(shape, device=device).half() for _ in range(2 * LAYOUT.num_layers)]


def block_bytes(cache: list[torch.Tensor], block: int) -> torch.Tensor:
    """One device block as kvtier stores it: each layer's K page, then its V page."""
    return torch.cat([page[block].reshape(-1).view(torch.uint8).cpu() for page in cache])


async def main(directory: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = engine_cache(device)
    blocks = [5, 17, 42]  # the engine's device blocks of one request
    keys = [hashlib.sha256(f"block-{b}".encode()).digest() for b in blocks]
    before = [block_bytes(cache, b) for b in blocks]
    freed: list[str] = []

    gpu = DeviceTier(cache, LAYOUT)
    disk_bytes = 16 * DiskTier.bytes_per_block(LAYOUT)
    async with (
        CpuTier(LAYOUT, num_slots=32) as cpu,
        DiskTier(directory, LAYOUT, disk_bytes) as disk,
        TransferPipeline() as pipeline,
    ):
        cpu_index = TierIndex(cpu.name, cpu.num_slots)
        disk_index = TierIndex(disk.name, disk.num_slots)

        # Device -> CPU. The engine keeps the device blocks until the store ends.
        cpu_slots = cpu_index.reserve(keys).slots
        store = StoreTask(gpu, blocks, cpu, cpu_slots, keys, dst_ledger=cpu_index)
        done: Completion[TransferResult] = await pipeline.submit(store)
        done.add_done_callback(lambda _: freed.append("request-1"))
        print("device -> cpu :", await done)

        # CPU -> disk: the CPU copies stay pinned (unevictable) until it ends.
        disk_slots = disk_index.reserve(keys).slots
        cpu_index.pin(keys)
        demote = StoreTask(
            cpu, cpu_slots, disk, disk_slots, keys, src_ledger=cpu_index, dst_ledger=disk_index
        )
        print("cpu -> disk   :", await (await pipeline.submit(demote)))

        # Disk -> device, into other device blocks (the engine allocated them).
        targets = [60, 61, 62]
        disk_index.pin(keys)
        load = LoadTask(disk, disk_slots, gpu, targets, keys, src_ledger=disk_index)
        print("disk -> device:", await (await pipeline.submit(load)))

    assert freed == ["request-1"]
    for target, expected in zip(targets, before, strict=True):
        assert torch.equal(block_bytes(cache, target), expected), "wrong bytes"
    print(f"{len(blocks)} blocks of {LAYOUT.block_bytes} bytes came back byte for byte")

    async with DiskTier(directory, LAYOUT, disk_bytes) as reopened:  # a warm restart
        recovered = await reopened.recover()
        index = TierIndex(reopened.name, reopened.num_slots)
        index.restore(recovered)
        assert sorted(key for _, key in recovered) == sorted(keys)
        print(f"warm restart: {len(recovered)} blocks found on disk again")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="kvtier-example-") as root:
        anyio.run(main, Path(root) / "disk")
