"""What a disk tier that loses blocks costs: tokens still loaded under read faults.

Replays the bundled Mooncake sample through device + CPU + disk (small tiers,
so most lower-tier hits come from disk) with the disk tier wrapped: after
each read, every block read is lost with probability ``p`` (its row garbled,
the read raising ``BlockMissingError`` naming it), drawn once per block
(``--per-read``: again at each read). The replay checks every loaded byte.
Prints, for each ``p``, the tokens loaded against the fault-free run of the
same process (p = 0), with the loads that came back partly failed.

    python benchmarks/partial_loads.py --p 0.02 0.05 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import logging
import random
import tomllib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import anyio
import torch

from kvtier.config import KvtierConfig, parse_config
from kvtier.errors import BlockMissingError
from kvtier.replay import ReplayReport, default_config_path, replay, sample_workload
from kvtier.tiers.base import BlockKey, BlockStore


class LosingReads:
    """Forwards every call to ``inner``; a read loses each block with probability ``p``."""

    def __init__(self, inner: BlockStore, p: float, seed: int, *, per_read: bool) -> None:
        self.inner = inner
        self.p = p
        self.rng = random.Random(seed)
        self.per_read = per_read
        self.fate: dict[BlockKey, bool] = {}

    def __getattr__(self, attr: str) -> Any:  # name, layout, num_slots, closed, in_memory...
        return getattr(self.inner, attr)

    def _lost(self, key: BlockKey) -> bool:
        if self.per_read:
            return self.rng.random() < self.p
        if key not in self.fate:
            self.fate[key] = self.rng.random() < self.p
        return self.fate[key]

    def _lose(self, slots: Sequence[int], keys: Sequence[BlockKey], rows: list[Any]) -> None:
        bad = [i for i, key in enumerate(keys) if self._lost(key)]
        for i in bad:
            rows[i].fill_(0xEE)  # what a bad block leaves behind
        if bad:
            raise BlockMissingError.of_slots(self.inner.name, [slots[i] for i in bad])

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        await self.inner.read_into(slots, keys, out)
        self._lose(slots, keys, [out[i] for i in range(len(slots))])

    async def read_into_parts(
        self, slots: Sequence[int], keys: Sequence[BlockKey], parts: Sequence[torch.Tensor]
    ) -> None:
        await self.inner.read_into_parts(slots, keys, parts)  # type: ignore[attr-defined]
        self._lose(slots, keys, [part[i] for part in parts for i in range(part.shape[0])])

    async def __aenter__(self) -> LosingReads:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)


def small_stack(device_blocks: int, cpu_blocks: int, disk_blocks: int) -> KvtierConfig:
    """The replay's default config with tiers of these many blocks (disk: 4 KiB of header)."""
    raw = tomllib.loads(default_config_path().read_text(encoding="utf-8"))
    block_kib = parse_config(raw).layout.block_bytes // 1024
    sizes = {"device": device_blocks, "cpu": cpu_blocks, "disk": disk_blocks}
    for tier in raw["tiers"]:
        per_block = block_kib + (4 if tier["kind"] == "disk" else 0)
        tier["capacity"] = f"{sizes[tier['kind']] * per_block}KiB"
    return parse_config(raw)


def run(config: KvtierConfig, p: float, seed: int, per_read: bool) -> ReplayReport:
    def wrap(tier: BlockStore) -> BlockStore:
        if tier.name != "disk":
            return tier
        return LosingReads(tier, p, seed, per_read=per_read)  # type: ignore[return-value]

    return anyio.run(lambda: replay(config, sample_workload(), wrap_tier=wrap))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-read", action="store_true", help="draw a block's loss per read")
    parser.add_argument(
        "--blocks", type=int, nargs=3, default=[256, 384, 13_107], metavar=("DEVICE", "CPU", "DISK")
    )
    args = parser.parse_args()
    logging.getLogger("kvtier").setLevel(logging.ERROR)  # the injected losses are warnings
    config = small_stack(*args.blocks)
    base = run(config, 0.0, 0, args.per_read)
    print(f"fault-free: {base.loaded_tokens:,} tokens loaded, {base.failed_loads} failed loads")
    print("p      tokens loaded / fault-free   loads failed (partly)   disk blocks loaded")
    for p in args.p:
        reports = [run(config, p, seed, args.per_read) for seed in args.seeds]
        loaded = sum(r.loaded_tokens for r in reports) / len(reports)
        failed = sum(r.failed_loads for r in reports) / len(reports)
        disk = sum(t.loaded_blocks for r in reports for t in r.tiers if t.name == "disk")
        print(
            f"{p:<6} {loaded / base.loaded_tokens:>26.2f}   {failed:>21.1f}   "
            f"{disk / len(reports):>18.1f}"
        )


if __name__ == "__main__":
    main()
