"""CPU tier <-> Redis through the pipeline's mover, beside the staged way, same run.

Blocks of an 8B-class model (2 MiB); the CPU slots of each batch are a random
sample of the CPU tier (short runs, as in a full tier). Two ways move the same
batches between the CPU tier's rows and a real ``redis-server`` (started on a
free 127.0.0.1 port), alternating in random order:

- *mover*: :class:`~kvtier.mover.BlockMover`, which hands the Redis tier every
  run of CPU rows in one ``write_from_parts`` / ``read_into_parts`` call: each
  value is framed from, and each payload copied into, its CPU row;
- *staged*: what the mover did before the Redis tier took parts: the CPU
  tier gathers into (or scatters from) a staging buffer and the Redis tier
  stores from (or loads into) it, so every byte is copied once more.

Prints GB/s and staged time / mover time. The round trips, not the copies,
dominate: the gain is the copy saved per block. See benchmarks/redis_tier.py
for the Redis tier against raw redis-py.

    python benchmarks/redis_mover.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import torch

from kvtier.mover import BlockMover
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.redis import RedisTier
from tests.redis_server import RedisServer, redis_binary

LAYOUT = BlockLayout(32, 16, 8, 128)  # 2 MiB per block
CPU_SLOTS = 256


async def measure(url: str, batch: int, repeat: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    size = batch * LAYOUT.block_bytes
    times: dict[str, list[float]] = {
        "mover_store": [],
        "staged_store": [],
        "mover_load": [],
        "staged_load": [],
    }
    async with (
        RedisTier(LAYOUT, CPU_SLOTS, model="benchmark", url=url) as redis,
        CpuTier(LAYOUT, CPU_SLOTS) as cpu,
    ):
        rows = cpu.slot_view(range(CPU_SLOTS))
        if rows is None:
            raise SystemExit("expected a view of the CPU tier")
        rows.copy_(torch.randint(0, 256, rows.shape, dtype=torch.uint8))
        mover = BlockMover()
        staging = torch.empty(batch, LAYOUT.block_bytes, dtype=torch.uint8)
        slots = list(range(batch))
        generation = 0
        for rep in range(repeat + 1):  # the first round warms up and is dropped
            for name in rng.sample(list(times), len(times)):
                generation += 1
                keys = [(generation * batch + i).to_bytes(4, "big") * 9 for i in range(batch)]
                cpu_slots = rng.sample(range(CPU_SLOTS), batch)
                expected = rows[cpu_slots].clone()
                if name.endswith("load"):
                    await redis.write_from(slots, keys, expected)
                    rows[cpu_slots] = 0
                start = time.perf_counter()
                if name == "mover_store":
                    await mover.move(cpu, cpu_slots, redis, slots, keys)
                elif name == "staged_store":
                    await cpu.read_into(cpu_slots, keys, staging)
                    await redis.write_from(slots, keys, staging)
                elif name == "mover_load":
                    await mover.move(redis, slots, cpu, cpu_slots, keys)
                else:
                    await redis.read_into(slots, keys, staging)
                    await cpu.write_from(cpu_slots, keys, staging)
                elapsed = time.perf_counter() - start
                if name.endswith("store"):
                    await redis.read_into(slots, keys, staging)
                    moved = staging
                else:
                    moved = rows[cpu_slots]
                if not torch.equal(moved, expected):
                    raise SystemExit(f"{name} moved different bytes")
                if rep:
                    times[name].append(elapsed)
    return {name: size / statistics.median(values) / 1e9 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = RedisServer(redis_binary(), Path(tempfile.mkdtemp(prefix="kvtier-redis-")) / "redis")
    server.start()
    try:
        rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            result = anyio.run(measure, server.url, batch, args.repeat, batch)
            rows.append({"blocks": batch, **result})
    finally:
        server.stop()
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"2 MiB blocks, scattered CPU slots, median of {args.repeat}: GB/s")
    for row in rows:
        for direction in ("store", "load"):
            mover, staged = row[f"mover_{direction}"], row[f"staged_{direction}"]
            print(
                f"  {row['blocks']:>4} blocks {direction}: mover {mover:.2f}, staged {staged:.2f}"
                f" (mover {mover / staged:.2f}x)"
            )


if __name__ == "__main__":
    main()
