"""flush_on_close: the CPU tier written to disk at shutdown, beside raw file writes.

An offload manager over a device tier, a CPU tier and a disk tier (blocks of
an 8B-class model, 2 MiB) stores ``--blocks`` blocks into the CPU tier, then
is left with ``flush_on_close=True``: the exit copies them to disk. Timed:
the whole exit (the flush, then closing the pipeline and the tiers) and,
alternating in the same run, *raw*: plain ``open(..., "wb")`` / ``write`` of
as many files of the same size from the same CPU rows, in one thread, with
no checksum, in the same directory. Prints GB/s and exit / raw.

    python benchmarks/flush.py --blocks 128 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import torch

from kvtier import BlockHasher, BlockPool, KVCacheBlocks, Request
from kvtier.offload import OffloadManager, SchedulerOutput
from kvtier.tiers._checks import tensor_bytes
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier

LAYOUT = BlockLayout(32, 16, 8, 128, "float16")  # 2 MiB per block


def _raw(root: Path, rows: torch.Tensor) -> None:
    for index in range(rows.shape[0]):
        with open(root / f"raw-{index}", "wb") as handle:
            handle.write(tensor_bytes(rows[index]))


async def _flush_once(root: Path, cache: torch.Tensor, blocks: int, seed: int) -> dict[str, float]:
    pool = BlockPool(blocks + 1)
    cpu = CpuTier(LAYOUT, blocks)
    disk = DiskTier(root / "disk", LAYOUT, blocks * DiskTier.bytes_per_block(LAYOUT))
    manager = OffloadManager(
        pool, DeviceTier(cache, LAYOUT), [cpu, disk], block_size=16, flush_on_close=True
    )
    hasher = BlockHasher(16, "sha256", seed=f"flush-bench-{seed}")
    request = Request("r", list(range(seed, seed + blocks * 16 + 1)), hasher)
    await manager.__aenter__()
    try:
        new = pool.get_new_blocks(blocks)
        pool.cache_full_blocks(request, new, 0, blocks, 16, 0)
        computed = KVCacheBlocks((new,))
        manager.update_state_after_alloc(request, computed, 0)
        plan = manager.build_step(
            SchedulerOutput(
                num_scheduled_tokens={"r": blocks * 16},
                new_requests={"r": tuple(computed.get_block_ids())},
                cached_requests={},
            )
        )
        manager.step_computed(plan.step_id)
        await manager.wait_idle()
    except BaseException:
        await manager.__aexit__(None, None, None)
        raise
    start = time.perf_counter()
    await manager.__aexit__(None, None, None)  # the flush, then closing everything
    seconds = time.perf_counter() - start
    stats = manager.stats().tiers["disk"]
    if stats.flushed != blocks:
        raise SystemExit(f"flushed {stats.flushed} of {blocks} blocks")
    return {"exit": seconds, "copies": stats.store_seconds}


async def measure(root: Path, blocks: int, repeat: int) -> dict[str, float]:
    cache = torch.randint(0, 256, (blocks + 1, LAYOUT.block_bytes), dtype=torch.uint8)
    exits: list[float] = []
    copies: list[float] = []
    raws: list[float] = []
    for index in range(repeat):
        order = ("flush", "raw") if index % 2 == 0 else ("raw", "flush")
        for case in order:
            work = root / f"{case}-{index}"
            work.mkdir()
            if case == "flush":
                times = await _flush_once(work, cache, blocks, index * 1_000_000)
                exits.append(times["exit"])
                copies.append(times["copies"])
            else:
                start = time.perf_counter()
                await anyio.to_thread.run_sync(_raw, work, cache[1:])
                raws.append(time.perf_counter() - start)
            shutil.rmtree(work)
    nbytes = blocks * LAYOUT.block_bytes
    exit_gbps = nbytes / statistics.median(exits) / 1e9
    copy_gbps = nbytes / statistics.median(copies) / 1e9
    raw_gbps = nbytes / statistics.median(raws) / 1e9
    return {
        "blocks": blocks,
        "exit_gbps": exit_gbps,
        "copy_gbps": copy_gbps,
        "raw_gbps": raw_gbps,
        "exit_over_raw": exit_gbps / raw_gbps,
        "copy_over_raw": copy_gbps / raw_gbps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=128, help="blocks flushed (2 MiB each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (median)")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="kvtier-flush-"))
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=base))
    try:
        result = anyio.run(measure, root, args.blocks, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['blocks']} blocks of 2 MiB: exit {result['exit_gbps']:.2f} GB/s "
        f"(copies alone {result['copy_gbps']:.2f}), raw writes {result['raw_gbps']:.2f} GB/s; "
        f"exit / raw {result['exit_over_raw']:.2f}, copies / raw {result['copy_over_raw']:.2f}"
    )


if __name__ == "__main__":
    main()
