"""Block transfer throughput: DeviceTier <-> CpuTier beside a raw copy of the same bytes.

Blocks of an 8B-class model (32 layers, 8 KV heads, head size 128, 16 tokens,
fp16: 64 KiB per layer-block, 2 MiB per block). For each device layout
(per-layer: 64 tensors [K0, V0, …]; cross-layer: one tensor) and batch size,
device slots are a random sample of the pool (engine blocks are scattered) and:

* ``store`` moves device -> CPU tier, ``load`` CPU tier -> device;
* ``direct``: the CPU slots are one ascending run, so the device tier gathers
  into (or scatters from) ``CpuTier.slot_view`` in one pass (the pipeline's
  fast path);
* ``staged``: the CPU slots are scattered too, and bytes pass through a
  staging buffer (pinned on CUDA) with one call on each tier;
* ``mover``: the same scattered CPU slots moved by the pipeline's
  :class:`~kvtier.mover.BlockMover`, which moves each run of CPU slots of at
  least 1 MiB (every 2 MiB block here) straight to or from the CPU tier's rows
  and stages only the rest.

Two baselines, measured in the same run:

* ``raw``: one contiguous ``copy_`` of the same number of bytes between a
  device-side and a host-side tensor (pinned host on CUDA): the bound no
  gather of scattered blocks reaches;
* ``gather``: plain torch moving the same bytes from and to the same places,
  one ``index_select`` / indexed assignment per cache tensor (64 per-layer
  tensors, or one cross-layer tensor): what a hand-written offloader does.

``--access`` chooses which bytes each repeat moves:

* ``hot`` (default): every repeat moves the same blocks (tier and baselines
  alike), so on a CPU "device" a small batch's bytes stay in the last-level
  cache between repeats;
* ``fresh``: every repeat moves other blocks, as an engine's offloads do
  (each store moves blocks just computed, each load blocks not yet on the
  device): the tier and the gather baseline take the next of a cycle of
  random samples of the pool, the CPU rows the next run of rows, and the raw
  copy the next rows of two pool-sized buffers.

On a machine without CUDA the "device" tensors are CPU tensors. Each
number is the median of ``--repeats`` timed runs (more for small batches, until
``--min-blocks`` blocks moved) after warm-up runs; tier runs alternate with
one baseline at a time (tier/raw, then tier/gather), in an order that rotates
every repeat.

    python benchmarks/transfer.py                 # table
    python benchmarks/transfer.py --json          # machine-readable
    python benchmarks/transfer.py --threads 1 --batches 1,16,128,512
    python benchmarks/transfer.py --threads 1 --access fresh

Sections: ``run_device_cpu(args)`` is this benchmark; another section (e.g.
pipeline overhead) can be added as its own ``run_…(args)`` and listed in
``SECTIONS``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import torch

from kvtier.mover import BlockMover
from kvtier.tiers._copy import OFFLOAD_MIN_BYTES
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier

LAYOUT = BlockLayout(num_layers=32, block_size=16, num_kv_heads=8, head_size=128, dtype="float16")
GB = 1e9
T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def _timed_alternately(
    fns: list[Callable[[], Awaitable[None]]], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn so drift hits them all.

    The order rotates every repeat, so each case follows each other one as
    often: a case run right after the slow plain-torch scatter finds cold
    caches, which in a fixed order always fell on the same case.
    """
    for _ in range(warmup):
        for fn in fns:
            await fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for repeat in range(repeats):
        shift = repeat % len(fns)
        for index in [*range(shift, len(fns)), *range(shift)]:
            start = time.perf_counter()
            await fns[index]()
            _sync(device)
            times[index].append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def _segments(cache: torch.Tensor | list[torch.Tensor], pool: int) -> list[torch.Tensor]:
    """The cache as byte tensors ``[pool, segment bytes]``: 64 per-layer ones, or one."""
    tensors = cache if isinstance(cache, list) else [cache]
    return [t.view(torch.uint8).view(pool, -1) for t in tensors]


def _gather_raw(
    segments: list[torch.Tensor], samples: list[list[int]], host: torch.Tensor, pin: bool
) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """Plain torch store and load of the same bytes from the same places.

    One ``index_select`` (store) or ``cache[index] = part`` (load) per segment tensor
    between the cache and a host tensor ``[segments, n, segment bytes]``: what
    a hand-written offloader does, with no kvtier code in the way. Each call
    takes the next of ``samples`` (device slots), cyclically.
    """
    indexes = _Cycle([torch.tensor(slots, device=segments[0].device) for slots in samples])
    n = len(samples[0])
    width = segments[0].shape[1]
    parts = host.view(-1)[: len(segments) * n * width].view(len(segments), n, -1)
    staged = torch.empty_like(parts[0], device=segments[0].device)

    async def store() -> None:
        index = indexes.next()
        for segment, part in zip(segments, parts, strict=True):
            if segment.device.type == "cpu":
                torch.index_select(segment, 0, index, out=part)
            else:
                torch.index_select(segment, 0, index, out=staged)
                part.copy_(staged, non_blocking=pin)

    async def load() -> None:
        index = indexes.next()
        for segment, part in zip(segments, parts, strict=True):
            segment[index] = part.to(segment.device, non_blocking=pin)

    return store, load


class _Cycle(Generic[T]):
    """The items of a list in turn, forever (one item: always that one)."""

    def __init__(self, items: list[T]) -> None:
        self._items = items
        self._at = -1

    def next(self) -> T:
        self._at = (self._at + 1) % len(self._items)
        return self._items[self._at]


def _samples(rng: random.Random, pool: int, n: int, fresh: bool) -> list[list[int]]:
    """Device slot samples of ``n`` blocks: one (hot), or enough to sweep the pool twice (fresh)."""
    count = max(8, 2 * pool // n) if fresh else 1
    return [rng.sample(range(pool), n) for _ in range(count)]


def _runs(rng: random.Random, pool: int, n: int, fresh: bool) -> list[int]:
    """Starts of ``n``-row runs: row 0 (hot), or random starts (fresh), as many as ``_samples``."""
    if not fresh:
        return [0]
    return [rng.randrange(pool - n + 1) for _ in range(max(8, 2 * pool // n))]


def _make_cache(kind: str, pool: int, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    if kind == "cross-layer":
        shape = (pool, LAYOUT.num_layers, 2, *LAYOUT.page_shape)
        return torch.ones(shape, dtype=LAYOUT.torch_dtype, device=device)
    return [
        torch.ones((pool, *LAYOUT.page_shape), dtype=LAYOUT.torch_dtype, device=device)
        for _ in range(2 * LAYOUT.num_layers)
    ]


async def _device_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    pin = device.type == "cuda"
    fresh = args.access == "fresh"
    batches = [int(b) for b in args.batches.split(",")]
    largest = max(batches)
    pool = max(args.pool_blocks, largest)
    block = LAYOUT.block_bytes
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []

    # The raw copy's buffers: pool-sized when every repeat moves other rows.
    raw_rows = pool if fresh else largest
    host = torch.ones((raw_rows, block), dtype=torch.uint8, pin_memory=pin)
    dev_raw = torch.ones((raw_rows, block), dtype=torch.uint8, device=device)

    def raw_copy(
        dst: torch.Tensor, src: torch.Tensor, n: int, starts: _Cycle[int]
    ) -> Callable[[], Awaitable[None]]:
        async def copy() -> None:
            at = starts.next()
            dst[at : at + n].copy_(src[at : at + n], non_blocking=pin)

        return copy

    cpu = CpuTier(
        LAYOUT, pool, pin_memory=pin, device=device, offload_min_bytes=args.offload_min_bytes
    )
    async with cpu:
        for kind in ("per-layer", "cross-layer"):
            cache = _make_cache(kind, pool, device)
            tier = DeviceTier(cache, LAYOUT, offload_min_bytes=args.offload_min_bytes)
            for n in batches:
                samples = _samples(rng, pool, n, fresh)
                dev_slots = _Cycle(samples)
                cpu_slots = _Cycle(_samples(rng, pool, n, fresh))
                views: list[torch.Tensor] = []
                for at in _runs(rng, pool, n, fresh):
                    view = cpu.slot_view(range(at, at + n))
                    if view is None:
                        raise RuntimeError("slot_view of a run returned None")
                    views.append(view)
                cpu_views = _Cycle(views)
                keys = [b""] * n
                staging = host[:n]

                async def store_direct(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    v: _Cycle[torch.Tensor] = cpu_views,
                ) -> None:
                    slots = s.next()
                    await t.read_into(slots, [b""] * len(slots), v.next())

                async def load_direct(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    v: _Cycle[torch.Tensor] = cpu_views,
                ) -> None:
                    slots = s.next()
                    await t.write_from(slots, [b""] * len(slots), v.next())

                async def store_staged(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    c: _Cycle[list[int]] = cpu_slots,
                    b: torch.Tensor = staging,
                    k: list[bytes] = keys,
                ) -> None:
                    await t.read_into(s.next(), k, b)
                    await cpu.write_from(c.next(), k, b)

                async def load_staged(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    c: _Cycle[list[int]] = cpu_slots,
                    b: torch.Tensor = staging,
                    k: list[bytes] = keys,
                ) -> None:
                    await cpu.read_into(c.next(), k, b)
                    await t.write_from(s.next(), k, b)

                mover = BlockMover()

                async def store_scattered(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    c: _Cycle[list[int]] = cpu_slots,
                    k: list[bytes] = keys,
                    m: BlockMover = mover,
                ) -> None:
                    await m.move(t, s.next(), cpu, c.next(), k)

                async def load_scattered(
                    t: DeviceTier = tier,
                    s: _Cycle[list[int]] = dev_slots,
                    c: _Cycle[list[int]] = cpu_slots,
                    k: list[bytes] = keys,
                    m: BlockMover = mover,
                ) -> None:
                    await m.move(cpu, c.next(), t, s.next(), k)

                raw_starts = _Cycle(_runs(rng, raw_rows, n, fresh))
                raws = {
                    "store": raw_copy(host, dev_raw, n, raw_starts),
                    "load": raw_copy(dev_raw, host, n, raw_starts),
                }
                gathers = dict(
                    zip(
                        ("store", "load"),
                        _gather_raw(_segments(cache, pool), samples, host, pin),
                        strict=True,
                    )
                )
                cases = (
                    ("store", "direct", store_direct),
                    ("load", "direct", load_direct),
                    ("store", "staged", store_staged),
                    ("load", "staged", load_staged),
                    ("store", "mover", store_scattered),
                    ("load", "mover", load_scattered),
                )
                repeats = max(args.repeats, args.min_blocks // n)
                warmup = max(args.warmup, repeats // 8)
                for direction, path, fn in cases:
                    # Two alternations, not one of three: plain torch's indexed
                    # load runs at under 1 GB/s and leaves the caches cold for
                    # whatever runs after it, which skewed single-block ratios.
                    seconds, raw_seconds = await _timed_alternately(
                        [fn, raws[direction]], device, warmup, repeats
                    )
                    _, gather_seconds = await _timed_alternately(
                        [fn, gathers[direction]], device, warmup, repeats
                    )
                    tier_gbs = n * block / seconds / GB
                    raw_gbs = n * block / raw_seconds / GB
                    gather_gbs = n * block / gather_seconds / GB
                    rows.append(
                        {
                            "layout": kind,
                            "access": args.access,
                            "direction": direction,
                            "path": path,
                            "blocks": n,
                            "mib": n * block / (1 << 20),
                            "tier_gbs": tier_gbs,
                            "raw_gbs": raw_gbs,
                            "ratio": tier_gbs / raw_gbs,
                            "gather_gbs": gather_gbs,
                            "gather_ratio": tier_gbs / gather_gbs,
                        }
                    )
            await tier.aclose()
            del tier, cache
            gc.collect()
    return rows


def run_device_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Device <-> CPU tier throughput vs a raw copy; one dict per measured case."""
    torch.manual_seed(0)
    result: list[dict[str, Any]] = anyio.run(_device_cpu, args)
    return result


def _print_device_cpu(rows: list[dict[str, Any]]) -> None:
    header = f"{'layout':<12} {'dir':<6} {'path':<7} {'blocks':>6} {'MiB':>7}"
    print(
        f"{header} {'tier GB/s':>10} {'raw GB/s':>9} {'ratio':>6} {'gather GB/s':>11} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['layout']:<12} {r['direction']:<6} {r['path']:<7} {r['blocks']:>6} "
            f"{r['mib']:>7.0f} {r['tier_gbs']:>10.2f} {r['raw_gbs']:>9.2f} {r['ratio']:>6.2f}"
            f" {r['gather_gbs']:>11.2f} {r['gather_ratio']:>6.2f}"
        )


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], list[dict[str, Any]]], Any]] = {
    "device-cpu": (run_device_cpu, _print_device_cpu),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="device of the KV cache")
    parser.add_argument("--batches", default="1,16,128,512", help="blocks per transfer")
    parser.add_argument("--pool-blocks", type=int, default=640, help="device and CPU pool size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--min-blocks",
        type=int,
        default=512,
        help="small batches repeat until they moved this many blocks",
    )
    parser.add_argument(
        "--access",
        choices=("hot", "fresh"),
        default="hot",
        help="hot: every repeat moves the same blocks; fresh: other blocks each repeat",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--offload-min-bytes",
        type=int,
        default=OFFLOAD_MIN_BYTES,
        help="CPU copies this large run in a worker thread",
    )
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "block_bytes": LAYOUT.block_bytes,
        "offload_min_bytes": args.offload_min_bytes,
        "access": args.access,
    }
    results: dict[str, Any] = {"meta": meta}
    for name in args.section or list(SECTIONS):
        run, show = SECTIONS[name]
        results[name] = run(args)
        if not args.json:
            print(f"== {name}: {json.dumps(meta)}")
            show(results[name])
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
