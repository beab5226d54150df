"""Transfer-pipeline overhead per block, beyond the copy itself.

Moves a batch of blocks device → CPU twice in the same run: once by calling
the tiers directly (``read_into`` straight into the CPU tier's slot view,
exactly what the pipeline does for an ascending slot run) and once through
``TransferPipeline.submit`` + ``await completion``. The difference, divided by
the batch size, is the pipeline's overhead per block (target: < 5 µs for a
batch of 256). Small blocks keep the copy short so the overhead is visible;
the 8B-class block size is measured too.

    python benchmarks/pipeline_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio
import torch

from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from kvtier.transfer import StoreTask, TransferPipeline

LAYOUTS = {
    "tiny (2 layers x 16 tok x 1 head x 8, fp16: 1 KiB)": BlockLayout(2, 16, 1, 8, "float16"),
    "8B-class (32 layers x 16 tok x 8 heads x 128, fp16: 2 MiB)": BlockLayout(32, 16, 8, 128),
}


async def measure(
    layout: BlockLayout, batch: int, repeat: int, where: torch.device
) -> dict[str, float]:
    device_tensor = torch.zeros((batch * 2, layout.block_bytes), dtype=torch.uint8, device=where)
    device = DeviceTier(device_tensor.view(batch * 2, -1), layout)
    cpu = CpuTier(layout, batch, device=where)
    src = list(range(0, 2 * batch, 2))  # scattered device blocks
    dst = list(range(batch))
    keys = [i.to_bytes(8, "big") for i in range(batch)]
    direct, piped = [], []
    async with device, cpu, TransferPipeline(max_batch_blocks=batch) as pipeline:
        for _ in range(repeat + 1):
            start = time.perf_counter()
            view = cpu.slot_view(dst)
            if view is None:
                raise SystemExit("expected a slot view for an ascending run")
            await device.read_into(src, keys, view)
            direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            await (await pipeline.submit(StoreTask(device, src, cpu, dst, keys)))
            piped.append(time.perf_counter() - start)
    d, p = statistics.median(direct[1:]), statistics.median(piped[1:])
    return {"direct_s": d, "pipeline_s": p, "overhead_us_per_block": 1e6 * (p - d) / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the KV cache (CUDA: pinned CPU tier, copies on streams)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    where = torch.device(args.device)
    results = {}
    for name, layout in LAYOUTS.items():
        repeat = args.repeat if layout.block_bytes < (1 << 20) else max(3, args.repeat // 4)
        results[name] = anyio.run(measure, layout, args.batch, repeat, where)
    if args.json:
        print(json.dumps(results))
        return
    print(f"batch {args.batch} blocks, {where} -> CPU, median of runs")
    for name, r in results.items():
        direct, piped = 1e3 * r["direct_s"], 1e3 * r["pipeline_s"]
        print(
            f"  {name}: direct {direct:.3f} ms, pipeline {piped:.3f} ms,"
            f" overhead {r['overhead_us_per_block']:.2f} µs/block"
        )


if __name__ == "__main__":
    main()
