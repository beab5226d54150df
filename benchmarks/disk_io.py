"""DiskTier write and verified-read throughput beside raw file I/O, same run.

Blocks of an 8B-class model (2 MiB). For each batch size the same number of
blocks is written and read back in the same directory by ``DiskTier``
(trailer + checksum, temp file + rename, verification on read, worker threads)
and by plain ``open``/``write``/``close`` and ``readinto`` of files of the same
size in one thread ("raw"), from and into the same tensors:

- *first fill*: both write into an empty directory (new files);
- *rewrite*: the tier writes new keys over its full slots (steady state of a
  cache: every write replaces an evicted block); raw rewrites its files in
  place (``open(..., "wb")``);
- *read*: both read every block into the same destination rows, alternately,
  several times per generation; reads mostly hit the page cache on both sides.

With ``--direct`` the tier opens files with ``O_DIRECT`` and so does raw,
through a page-aligned buffer (and a copy to or from the row, which O_DIRECT's
alignment rules make necessary for both).

Prints GB/s, the ratio tier / raw, and the process's peak RSS against a
budget: the RSS before any batch, plus the benchmark's own tensors (source and
two destinations), plus the tier's pooled buffers (one block file per worker),
plus 10 %. The run fails if the peak exceeds it.

    python benchmarks/disk_io.py --dir /tmp/kvtier-bench
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import anyio
import torch

from kvtier.tiers._checks import tensor_bytes
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.disk import DiskTier

LAYOUT = BlockLayout(32, 16, 8, 128, "float16")  # 2 MiB per block


def raw_write(root: Path, data: torch.Tensor) -> None:
    for index in range(data.shape[0]):
        with open(root / f"raw-{index}", "wb") as handle:
            handle.write(tensor_bytes(data[index]))


def raw_read(root: Path, out: torch.Tensor) -> None:
    for index in range(out.shape[0]):
        with open(root / f"raw-{index}", "rb") as handle:
            handle.readinto(tensor_bytes(out[index]))


def raw_write_direct(root: Path, data: torch.Tensor) -> None:
    buffer = mmap.mmap(-1, data.shape[1])  # page-aligned, as O_DIRECT wants
    staging = torch.frombuffer(buffer, dtype=torch.uint8)
    for index in range(data.shape[0]):
        staging.copy_(data[index])
        fd = os.open(root / f"raw-{index}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, buffer, 0)
        finally:
            os.close(fd)


def raw_read_direct(root: Path, out: torch.Tensor) -> None:
    buffer = mmap.mmap(-1, out.shape[1])
    staging = torch.frombuffer(buffer, dtype=torch.uint8)
    for index in range(out.shape[0]):
        fd = os.open(root / f"raw-{index}", os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buffer], 0)
        finally:
            os.close(fd)
        out[index].copy_(staging)


def _keys(batch: int, generation: int) -> list[bytes]:
    return [(generation * batch + index).to_bytes(4, "big") * 9 for index in range(batch)]


async def _timed(times: list[float], work) -> None:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    await work()
    times.append(time.perf_counter() - start)


async def measure(root: Path, batch: int, repeat: int, direct: bool) -> dict[str, float]:
    data = torch.randint(0, 256, (batch, LAYOUT.block_bytes), dtype=torch.uint8)
    slots = list(range(batch))
    out = torch.zeros_like(data)
    raw_out = torch.zeros_like(data)
    names = ["tier_fill", "raw_fill", "tier_write", "raw_write", "tier_read", "raw_read"]
    times: dict[str, list[float]] = {name: [] for name in names}
    run = anyio.to_thread.run_sync
    raw_write_fn, raw_read_fn = (
        (raw_write_direct, raw_read_direct) if direct else (raw_write, raw_read)
    )
    capacity = batch * DiskTier.bytes_per_block(LAYOUT)
    for generation in range(repeat):
        tier_dir, raw_dir = root / f"tier-{generation}", root / f"raw-{generation}"
        raw_dir.mkdir(parents=True)
        async with DiskTier(tier_dir, LAYOUT, capacity, direct_io=direct) as tier:
            keys = _keys(batch, 0)
            await _timed(times["tier_fill"], partial(tier.write_from, slots, keys, data))
            await _timed(times["raw_fill"], partial(run, raw_write_fn, raw_dir, data))
            keys = _keys(batch, 1)  # new blocks over every slot
            await _timed(times["tier_write"], partial(tier.write_from, slots, keys, data))
            await _timed(times["raw_write"], partial(run, raw_write_fn, raw_dir, data))
            for _ in range(max(3, 64 // batch)):  # reads are quick: more samples, alternating
                await _timed(times["tier_read"], partial(tier.read_into, slots, keys, out))
                await _timed(times["raw_read"], partial(run, raw_read_fn, raw_dir, raw_out))
        if not (torch.equal(out, data) and torch.equal(raw_out, data)):
            raise SystemExit("read back different bytes")
        shutil.rmtree(tier_dir)
        shutil.rmtree(raw_dir)
    size = batch * LAYOUT.block_bytes
    return {name: size / statistics.median(values) / 1e9 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--direct", action="store_true", help="DiskTier with O_DIRECT")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvtier-disk-"))
    root.mkdir(parents=True, exist_ok=True)
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        result = anyio.run(measure, root, batch, args.repeat, args.direct)
        rows.append({"blocks": batch, **result})
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    largest = max(row["blocks"] for row in rows)
    own = 3 * largest * LAYOUT.block_bytes + 4 * DiskTier.bytes_per_block(LAYOUT)  # 4 workers
    budget_mib = (baseline_mib + own / (1 << 20)) * 1.1
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"rows": rows, "peak_rss_mib": peak_rss_mib, "budget_mib": budget_mib}))
    else:
        _print(root, args, rows)
        print(f"  peak RSS {peak_rss_mib:.0f} MiB, budget {budget_mib:.0f} MiB")
    if peak_rss_mib > budget_mib:
        raise SystemExit(f"peak RSS {peak_rss_mib:.0f} MiB exceeds the budget")


def _print(root: Path, args: argparse.Namespace, rows: list[dict[str, float]]) -> None:
    mode = "O_DIRECT" if args.direct else "buffered"
    print(f"2 MiB blocks in {root}, {mode} (median of {args.repeat}); GB/s tier / raw (ratio)")
    for row in rows:
        parts = []
        for label, what in (("first fill", "fill"), ("rewrite", "write"), ("read", "read")):
            tier, raw = row[f"tier_{what}"], row[f"raw_{what}"]
            parts.append(f"{label} {tier:.2f} / {raw:.2f} ({tier / raw:.2f})")
        print(f"  {row['blocks']:>4} blocks: " + ", ".join(parts))


if __name__ == "__main__":
    main()
