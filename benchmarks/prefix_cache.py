"""Prefix-cache throughput and memory: kvtier's KVCacheManager beside vLLM's.

Replays a Mooncake-format trace: each row is expanded into token ids
(:func:`kvtier.traces.expand_prompt`), then, per request in arrival order, the
prompt is hashed, ``get_computed_blocks`` finds the prefix hit,
``allocate_slots`` allocates the rest, and the request stays live until
``--concurrency`` newer ones were admitted (then it is freed, FIFO).

vLLM's own manager runs the same loop on the same token ids in a subprocess
under ``--peer-python`` (a venv made by ``../shared/tools/setup-vllm-peer``;
vLLM is never a kvtier dependency), so both are measured in one run. Printed:
hit ratio (hit tokens must be equal), requests/s and µs per block with and
without hashing, bookkeeping bytes per device block (tracemalloc over building
a pool of ``--memory-blocks``), and kvtier/vLLM ratios.

    python benchmarks/prefix_cache.py                       # kvtier only
    python benchmarks/prefix_cache.py --peer-python /work/vllm-peer/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import Any

from kvtier import BlockHasher, BlockPool, KVCacheConfig, KVCacheManager, Request
from kvtier.traces import expand_prompt, read_mooncake_trace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = ROOT / "kvtier" / "data" / "mooncake_sample.jsonl"
WORKER = Path(__file__).resolve().parent / "vllm_peer_worker.py"


def replay(
    prompts: list[list[int]],
    hasher: BlockHasher,
    num_blocks: int,
    concurrency: int,
    max_model_len: int,
    *,
    prebuilt: list[Request] | None = None,
) -> tuple[float, int, int]:
    """Run the loop once; returns (seconds, hit tokens, rejected requests)."""
    manager = KVCacheManager(
        KVCacheConfig.full_attention(num_blocks, hasher.block_size, dtype="float32"),
        max_model_len,
    )
    live: deque[Request] = deque()
    hit_tokens = rejected = 0
    gc.collect()
    start = time.perf_counter()
    for index, tokens in enumerate(prompts):
        request = prebuilt[index] if prebuilt is not None else Request(str(index), tokens, hasher)
        computed, num_computed = manager.get_computed_blocks(request)
        new = manager.allocate_slots(
            request, request.num_tokens - num_computed, num_computed, computed
        )
        hit_tokens += num_computed
        if new is None:
            rejected += 1
            continue
        live.append(request)
        if len(live) > concurrency:
            manager.free(live.popleft())
    while live:
        manager.free(live.popleft())
    return time.perf_counter() - start, hit_tokens, rejected


def measure_kvtier(
    args: argparse.Namespace, prompts: list[list[int]], hash_name: str
) -> dict[str, Any]:
    hasher = BlockHasher(args.block_size, hash_name, seed="bench")
    with_hashing, without_hashing = [], []
    hits: set[int] = set()
    rejected = 0
    for _ in range(args.repeat):
        seconds, hit, rejected = replay(
            prompts, hasher, args.num_blocks, args.concurrency, args.max_model_len
        )
        with_hashing.append(seconds)
        hits.add(hit)
        prebuilt = [Request(str(i), tokens, hasher) for i, tokens in enumerate(prompts)]
        seconds, hit, _ = replay(
            prompts,
            hasher,
            args.num_blocks,
            args.concurrency,
            args.max_model_len,
            prebuilt=prebuilt,
        )
        without_hashing.append(seconds)
        hits.add(hit)
    if len(hits) != 1:
        raise SystemExit(f"kvtier hit tokens differ between runs: {sorted(hits)}")
    return {
        "impl": "kvtier",
        "hit_tokens": hits.pop(),
        "rejected": rejected,
        "seconds_with_hashing": statistics.median(with_hashing),
        "seconds_without_hashing": statistics.median(without_hashing),
        "pool_bytes_per_block": pool_bytes_per_block(args.memory_blocks),
    }


def pool_bytes_per_block(num_blocks: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pool = BlockPool(num_blocks, enable_caching=True)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del pool
    return (after - before) / num_blocks


def measure_vllm(
    args: argparse.Namespace, prompts: list[list[int]], hash_name: str
) -> dict[str, Any] | None:
    if not args.peer_python:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.pkl"
        with path.open("wb") as out:
            pickle.dump({"block_size": args.block_size, "requests": prompts}, out, protocol=5)
        command = [
            args.peer_python,
            str(WORKER),
            "--input",
            str(path),
            "--num-blocks",
            str(args.num_blocks),
            "--hash",
            hash_name,
            "--concurrency",
            str(args.concurrency),
            "--repeat",
            str(args.repeat),
            "--max-model-len",
            str(args.max_model_len),
            "--memory-blocks",
            str(args.memory_blocks),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"vLLM peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def report(
    hash_name: str,
    blocks: int,
    requests: int,
    total_tokens: int,
    ours: dict[str, Any],
    peer: dict[str, Any] | None,
) -> list[str]:
    lines = [f"hash {hash_name}"]

    def row(
        label: str, mine: float, theirs: float | None, fmt: str, higher_is_better: bool
    ) -> None:
        line = f"  {label:<28}{mine:>14{fmt}}"
        if theirs is not None:
            ratio = mine / theirs if higher_is_better else theirs / mine
            line += f"{theirs:>14{fmt}}{ratio:>10.2f}x"
        lines.append(line)

    lines.append(
        f"  {'':<28}{'kvtier':>14}"
        + (f"{'vLLM ' + peer['version']:>14}{'gain':>11}" if peer else "")
    )
    ours_hits = ours["hit_tokens"] / total_tokens
    row(
        "hit ratio (tokens)",
        100 * ours_hits,
        100 * peer["hit_tokens"] / total_tokens if peer else None,
        ".2f",
        True,
    )
    for mode, key in (
        ("with hashing", "seconds_with_hashing"),
        ("without hashing", "seconds_without_hashing"),
    ):
        theirs = peer[key] if peer else None
        row(
            f"{mode}: requests/s",
            requests / ours[key],
            requests / theirs if theirs else None,
            ",.1f",
            True,
        )
        row(
            f"{mode}: µs/block",
            1e6 * ours[key] / blocks,
            1e6 * theirs / blocks if theirs else None,
            ".3f",
            False,
        )
    row(
        "pool bytes/block",
        ours["pool_bytes_per_block"],
        peer["pool_bytes_per_block"] if peer else None,
        ".1f",
        False,
    )
    if peer:
        same = "yes" if peer["hit_tokens"] == ours["hit_tokens"] else "NO"
        lines.append(
            f"  same hit tokens: {same} ({ours['hit_tokens']:,} vs {peer['hit_tokens']:,}); "
            f"rejected {ours['rejected']} vs {peer['rejected']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=16384)
    parser.add_argument("--hash", choices=["sha256", "xxhash"], action="append")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1_000_000)
    parser.add_argument("--memory-blocks", type=int, default=1_000_000)
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("KVTIER_VLLM_PEER_PYTHON"),
        help="python of a venv with vLLM (../shared/tools/setup-vllm-peer)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()

    trace = read_mooncake_trace(args.trace, limit=args.limit)
    cache: dict[int, Any] = {}
    prompts = [expand_prompt(row, cache=cache) for row in trace]
    total_tokens = sum(len(p) for p in prompts)
    blocks = sum(-(-len(p) // args.block_size) for p in prompts)
    results = []
    text = [
        f"trace {args.trace.name}: {len(prompts)} requests, {total_tokens:,} prompt tokens, "
        f"{blocks:,} blocks of {args.block_size}; pool {args.num_blocks:,} blocks, "
        f"concurrency {args.concurrency}, median of {args.repeat}"
    ]
    if not args.peer_python:
        text.append("(no --peer-python: vLLM not measured; see ../shared/tools/setup-vllm-peer)")
    for hash_name in args.hash or ["sha256", "xxhash"]:
        ours = measure_kvtier(args, prompts, hash_name)
        peer = measure_vllm(args, prompts, hash_name)
        results.append({"hash": hash_name, "kvtier": ours, "vllm": peer})
        text.extend(report(hash_name, blocks, len(prompts), total_tokens, ours, peer))
        if peer and peer["hit_tokens"] != ours["hit_tokens"]:
            print("\n".join(text))
            raise SystemExit("hit tokens differ between kvtier and vLLM")
    if args.json:
        print(
            json.dumps(
                {
                    "trace": str(args.trace),
                    "requests": len(prompts),
                    "tokens": total_tokens,
                    "blocks": blocks,
                    "results": results,
                }
            )
        )
    else:
        print("\n".join(text))


if __name__ == "__main__":
    main()
