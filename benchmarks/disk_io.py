"""DiskTier write and verified-read throughput beside raw file I/O, same run.

Blocks of an 8B-class model (2 MiB). For each batch size the same number of
blocks is written and read back twice in the same directory: by ``DiskTier``
(header + checksum, temp file + rename, verification on read, worker threads)
and by plain ``open``/``write``/``close`` and ``read`` of files of the same
size in one thread ("raw"). Reads mostly hit the page cache on both sides.
Prints GB/s, the ratio, and the process's peak RSS.

    python benchmarks/disk_io.py --dir /tmp/kvtier-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import torch

from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier

LAYOUT = BlockLayout(32, 16, 8, 128, "float16")  # 2 MiB per block


def raw_write(root: Path, data: torch.Tensor) -> None:
    for index in range(data.shape[0]):
        with open(root / f"raw-{index}", "wb") as handle:
            handle.write(_row_bytes(data, index))


def raw_read(root: Path, n: int, size: int) -> None:
    buffer = bytearray(size)
    for index in range(n):
        with open(root / f"raw-{index}", "rb") as handle:
            handle.readinto(buffer)


_ROW_CACHE: dict[int, bytes] = {}


def _row_bytes(data: torch.Tensor, index: int) -> bytes:
    if index not in _ROW_CACHE:
        buffer = bytearray(data.shape[1])
        torch.frombuffer(buffer, dtype=torch.uint8).copy_(data[index])
        _ROW_CACHE[index] = bytes(buffer)
    return _ROW_CACHE[index]


async def measure(root: Path, batch: int, repeat: int) -> dict[str, float]:
    data = torch.randint(0, 256, (batch, LAYOUT.block_bytes), dtype=torch.uint8)
    for index in range(batch):
        _row_bytes(data, index)  # raw writes get their bytes ready-made, like the tier's rows
    keys = [index.to_bytes(4, "big") * 9 for index in range(batch)]
    slots = list(range(batch))
    out = torch.empty_like(data)
    times: dict[str, list[float]] = {
        "tier_write": [],
        "raw_write": [],
        "tier_read": [],
        "raw_read": [],
    }
    tier_dir, raw_dir = root / "tier", root / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    async with DiskTier(tier_dir, LAYOUT, (batch + 1) * (LAYOUT.block_bytes + 200)) as tier:
        for _ in range(repeat):
            start = time.perf_counter()
            await tier.write_from(slots, keys, data)
            times["tier_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await anyio.to_thread.run_sync(raw_write, raw_dir, data)
            times["raw_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await tier.read_into(slots, keys, out)
            times["tier_read"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await anyio.to_thread.run_sync(raw_read, raw_dir, batch, LAYOUT.block_bytes)
            times["raw_read"].append(time.perf_counter() - start)
    if not torch.equal(out, data):
        raise SystemExit("read back different bytes")
    shutil.rmtree(tier_dir)
    shutil.rmtree(raw_dir)
    _ROW_CACHE.clear()
    size = batch * LAYOUT.block_bytes
    return {name: size / statistics.median(values) / 1e9 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvtier-disk-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        result = anyio.run(measure, root, batch, args.repeat)
        rows.append({"blocks": batch, **result})
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"rows": rows, "peak_rss_mib": peak_rss_mib}))
        return
    print(f"2 MiB blocks in {root} (median of {args.repeat}); GB/s tier / raw (ratio)")
    for row in rows:
        w = row["tier_write"] / row["raw_write"]
        r = row["tier_read"] / row["raw_read"]
        print(
            f"  {row['blocks']:>4} blocks: write {row['tier_write']:.2f} / {row['raw_write']:.2f}"
            f" ({w:.2f}), verified read {row['tier_read']:.2f} / {row['raw_read']:.2f} ({r:.2f})"
        )
    print(f"  peak RSS {peak_rss_mib:.0f} MiB; pid {os.getpid()}")


if __name__ == "__main__":
    main()
