"""RedisTier store/load throughput vs raw redis-py SET/GET pipelines, same server, same run.

Usage: ``.venv/bin/python benchmarks/redis_tier.py [--repeats N] [--sizes 64K,2M]``
(starts its own redis-server on a free 127.0.0.1 port).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import redis.asyncio as aioredis
import torch

from kvtier.tiers.base import BlockLayout
from kvtier.tiers.redis import RedisTier
from tests.redis_server import RedisServer, redis_binary

LAYOUTS = {
    "64K": BlockLayout(num_layers=4, block_size=16, num_kv_heads=4, head_size=64),
    "2M": BlockLayout(num_layers=32, block_size=16, num_kv_heads=8, head_size=128),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(url: str, layout: BlockLayout, batch: int, repeats: int) -> list[str]:
    data = torch.randint(0, 256, (batch, layout.block_bytes), dtype=torch.uint8)
    keys = [i.to_bytes(4, "big") * 9 for i in range(batch)]
    values = [bytes(bytearray(data[i].tolist())) for i in range(batch)]
    raw = aioredis.Redis.from_url(url)
    times: dict[str, list[float]] = {"raw store": [], "raw load": [], "kv store": [], "kv load": []}
    async with RedisTier(
        layout, max(batch, 1), model="benchmark", url=url, batch_size=batch
    ) as tier:
        out = torch.empty_like(data)
        slots = list(range(batch))

        async def raw_store() -> None:
            pipe = raw.pipeline(transaction=False)
            for i in range(batch):
                pipe.set(b"raw:%d" % i, values[i])
            await pipe.execute()

        async def raw_load() -> None:
            pipe = raw.pipeline(transaction=False)
            for i in range(batch):
                pipe.get(b"raw:%d" % i)
            await pipe.execute()

        async def kv_store() -> None:
            await tier.write_from(slots, keys, data)

        async def kv_load() -> None:
            await tier.read_into(slots, keys, out)

        # Stores, then loads (of what was stored). Within a direction raw and
        # kvtier alternate, the order flipping every round, so each follows
        # the other as often (what ran just before changes a round trip by
        # tens of percent on a shared VM); small batches repeat more (at
        # least 512 blocks moved per case), after two warm-up rounds.
        rounds = max(repeats, 512 // batch)
        for op, pair in (("store", (raw_store, kv_store)), ("load", (raw_load, kv_load))):
            for round_ in range(rounds + 2):
                for side in ("raw", "kv") if round_ % 2 == 0 else ("kv", "raw"):
                    start = time.perf_counter()
                    await pair[side == "kv"]()
                    if round_ >= 2:
                        times[f"{side} {op}"].append(time.perf_counter() - start)
        if not torch.equal(out, data):
            raise SystemExit("kvtier read back different bytes")
    await raw.aclose()
    size = batch * layout.block_bytes / 2**20
    rows = []
    for op in ("store", "load"):
        r, k = statistics.median(times[f"raw {op}"]), statistics.median(times[f"kv {op}"])
        p50, p99 = pct(times[f"kv {op}"], 0.5) * 1e3, pct(times[f"kv {op}"], 0.99) * 1e3
        rows.append(
            f"| {layout.block_bytes >> 10} KiB | {batch} | {op} | {size / k:,.0f} | "
            f"{size / r:,.0f} | {r / k:.0%} | {p50:.2f} | {p99:.2f} |"
        )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default="64K,2M")
    parser.add_argument("--batches", default="1,16,128")
    args = parser.parse_args()
    server = RedisServer(redis_binary(), Path(tempfile.mkdtemp()) / "redis")
    server.start()
    try:
        print("| block | batch | op | kvtier MiB/s | raw MiB/s | kvtier/raw | p50 ms | p99 ms |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for size in args.sizes.split(","):
            for batch in map(int, args.batches.split(",")):
                for row in await bench(server.url, LAYOUTS[size], batch, args.repeats):
                    print(row, flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    anyio.run(main)
