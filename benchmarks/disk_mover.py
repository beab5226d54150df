"""Disk <-> CPU tier through the pipeline's mover, beside staging and raw file I/O.

Blocks of an 8B-class model (2 MiB). The CPU slots of each batch are a random
sample of the CPU tier (as a full tier's free slots are), so they form short
runs. Three ways move the same blocks between the same files' worth of bytes
and the same CPU rows, alternating, in the same run:

- *mover*: :class:`~kvtier.mover.BlockMover`, which hands the disk tier every
  run of CPU rows in one ``read_into_parts`` / ``write_from_parts`` call:
  each block goes straight between its file and its CPU row;
- *staged*: what the mover did before the disk tier took parts: the disk
  tier reads into (or writes from) a staging buffer, and the CPU tier
  scatters (or gathers) the rows, so every byte is copied twice;
- *raw*: plain ``open``/``readinto`` (loads) or ``open(..., "wb")``/``write``
  (stores) of files of the same size straight from and into the same CPU
  rows, in one thread, with no checksum: the bound for the tier.

Stores write new keys over the disk tier's full slots (a full cache's steady
state); loads read blocks back (mostly from the page cache, both sides).
Prints GB/s and the ratios mover / raw and mover / staged.

    python benchmarks/disk_mover.py --dir /tmp/kvtier-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import torch

from kvtier.mover import BlockMover
from kvtier.tiers._checks import tensor_bytes
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier

LAYOUT = BlockLayout(32, 16, 8, 128, "float16")  # 2 MiB per block
CPU_SLOTS = 256


def _raw(root: Path, rows: torch.Tensor, slots: list[int], *, read: bool) -> None:
    for index, slot in enumerate(slots):
        row = tensor_bytes(rows[slot])
        if read:
            with open(root / f"raw-{index}", "rb") as handle:
                handle.readinto(row)
        else:
            with open(root / f"raw-{index}", "wb") as handle:
                handle.write(row)


async def measure(root: Path, batch: int, repeat: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    raw_dir = root / "raw"
    raw_dir.mkdir(parents=True)
    capacity = batch * DiskTier.bytes_per_block(LAYOUT)
    times: dict[str, list[float]] = {}
    cpu = CpuTier(LAYOUT, CPU_SLOTS)
    disk = DiskTier(root / "tier", LAYOUT, capacity)
    mover = BlockMover()
    staging = torch.empty(batch, LAYOUT.block_bytes, dtype=torch.uint8)
    disk_slots = list(range(batch))
    async with cpu, disk:
        rows = cpu.slot_view(range(CPU_SLOTS))
        assert rows is not None
        rows.copy_(torch.randint(0, 256, rows.shape, dtype=torch.uint8))
        generation = 0

        def keys() -> list[bytes]:
            return [(generation * batch + i).to_bytes(4, "big") * 9 for i in range(batch)]

        async def store_mover(cpu_slots: list[int]) -> None:
            await mover.move(cpu, cpu_slots, disk, disk_slots, keys())

        async def store_staged(cpu_slots: list[int]) -> None:
            await cpu.read_into(cpu_slots, keys(), staging)
            await disk.write_from(disk_slots, keys(), staging)

        async def store_raw(cpu_slots: list[int]) -> None:
            await anyio.to_thread.run_sync(lambda: _raw(raw_dir, rows, cpu_slots, read=False))

        async def load_mover(cpu_slots: list[int]) -> None:
            await mover.move(disk, disk_slots, cpu, cpu_slots, keys())

        async def load_staged(cpu_slots: list[int]) -> None:
            await disk.read_into(disk_slots, keys(), staging)
            await cpu.write_from(cpu_slots, keys(), staging)

        async def load_raw(cpu_slots: list[int]) -> None:
            await anyio.to_thread.run_sync(lambda: _raw(raw_dir, rows, cpu_slots, read=True))

        cases: dict[str, Callable[[list[int]], Awaitable[None]]] = {
            "store_mover": store_mover,
            "store_staged": store_staged,
            "store_raw": store_raw,
        }
        loads: dict[str, Callable[[list[int]], Awaitable[None]]] = {
            "load_mover": load_mover,
            "load_staged": load_staged,
            "load_raw": load_raw,
        }
        for name in (*cases, *loads):
            times[name] = []
        for rep in range(repeat + 1):  # the first round warms up and is dropped
            for name in rng.sample(list(cases), len(cases)):
                generation += 1  # stores always write new blocks
                cpu_slots = rng.sample(range(CPU_SLOTS), batch)
                start = time.perf_counter()
                await cases[name](cpu_slots)
                if rep:
                    times[name].append(time.perf_counter() - start)
            await store_mover(rng.sample(range(CPU_SLOTS), batch))  # what loads read back
            await anyio.to_thread.run_sync(lambda: _raw(raw_dir, rows, disk_slots, read=False))
            for _ in range(max(2, 32 // batch)):
                for name in rng.sample(list(loads), len(loads)):
                    cpu_slots = rng.sample(range(CPU_SLOTS), batch)
                    start = time.perf_counter()
                    await loads[name](cpu_slots)
                    if rep:
                        times[name].append(time.perf_counter() - start)
        # Each way must have moved the right bytes: one checked round of each.
        source = rng.sample(range(CPU_SLOTS), batch)
        expected = rows[source].clone()
        generation += 1
        for store, load in ((store_mover, load_mover), (store_staged, load_staged)):
            await store(source)
            target = rng.sample(range(CPU_SLOTS), batch)
            rows[target] = 0
            await load(target)
            if not torch.equal(rows[target], expected):
                raise SystemExit(f"{store.__name__} / {load.__name__} moved different bytes")
            rows[source] = expected
    shutil.rmtree(root / "tier")
    shutil.rmtree(raw_dir)
    size = batch * LAYOUT.block_bytes
    return {name: size / statistics.median(values) / 1e9 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvtier-disk-mover-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        result = anyio.run(measure, root, batch, args.repeat, batch)
        rows.append({"blocks": batch, **result})
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"2 MiB blocks, scattered CPU slots, median of {args.repeat}: GB/s")
    for row in rows:
        for direction in ("store", "load"):
            mover, staged, raw = (row[f"{direction}_{way}"] for way in ("mover", "staged", "raw"))
            print(
                f"  {row['blocks']:>4} blocks {direction}: mover {mover:.2f}, staged {staged:.2f},"
                f" raw {raw:.2f}; mover/raw {mover / raw:.2f}, mover/staged {mover / staged:.2f}"
            )


if __name__ == "__main__":
    main()
