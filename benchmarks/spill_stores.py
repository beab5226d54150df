"""What spilling stores past a full CPU tier buys: prefill saved with and without it.

Replays the bundled Mooncake trace (3,993 requests) through the replay's
default device + CPU + disk stack (16 KiB blocks) with the CPU tier shrunk to
each size given, twice in the same process: with ``spill_stores`` off (the
baseline: stores the CPU tier has no room for are dropped) and on (they go
straight to disk). Every reused block is checked byte for byte by the replay.
Prints, per CPU size, the prefill tokens saved by each run, their ratio, the
blocks dropped (by each run) and spilled, and the wall times' ratio. How
many stores find the CPU tier full depends on how fast the copies end, so
the figures vary a little from run to run.

    python benchmarks/spill_stores.py --cpu-blocks 64 256 4096
"""

from __future__ import annotations

import argparse
import logging
import tomllib

import anyio

from kvtier.config import KvtierConfig, parse_config
from kvtier.replay import ReplayReport, Workload, default_config_path, replay, trace_workload


def stack(cpu_blocks: int, *, spill: bool) -> KvtierConfig:
    """The replay's default stack with a CPU tier of ``cpu_blocks`` blocks."""
    raw = tomllib.loads(default_config_path().read_text(encoding="utf-8"))
    block_bytes = parse_config(raw).layout.block_bytes
    for tier in raw["tiers"]:
        if tier["kind"] == "cpu":
            tier["capacity"] = cpu_blocks * block_bytes
    raw["offload"]["spill_stores"] = spill  # the stack's prefetch (wait_complete) spills too
    return parse_config(raw)


def run(config: KvtierConfig, workload: Workload) -> ReplayReport:
    return anyio.run(lambda: replay(config, workload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-blocks", type=int, nargs="+", default=[64, 256, 4096])
    parser.add_argument("--limit", type=int, default=None, help="replay the first N requests")
    args = parser.parse_args()
    logging.getLogger("kvtier").setLevel(logging.ERROR)
    workload = trace_workload(limit=args.limit)
    print(
        "cpu blocks   saved, dropping   saved, spilling   ratio   dropped   spilled   "
        "dropped, spilling   wall time ratio"
    )
    for blocks in args.cpu_blocks:
        base = run(stack(blocks, spill=False), workload)
        spill = run(stack(blocks, spill=True), workload)
        if base.failed_loads or spill.failed_loads:
            raise SystemExit("a load failed: the figures would not compare like with like")
        ratio = spill.saved_tokens / base.saved_tokens if base.saved_tokens else float("inf")
        print(
            f"{blocks:>10,}   {base.saved_ratio:>15.1%}   {spill.saved_ratio:>15.1%}   "
            f"{ratio:>5.2f}   {base.tiers[0].dropped_stores:>7,}   "
            f"{sum(t.spilled_blocks for t in spill.tiers):>7,}   "
            f"{spill.tiers[0].dropped_stores:>17,}   "
            f"{spill.seconds / base.seconds:>15.2f}"
        )


if __name__ == "__main__":
    main()
