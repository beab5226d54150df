"""Replay a token-id trace through vLLM v1's own ``KVCacheManager`` (the peer side).

This worker is not part of kvtier and never imports it. ``benchmarks/prefix_cache.py``
expands a trace into per-request token-id lists, pickles them, and runs this script
under a separate throwaway venv that has vLLM installed (CPU only), so that kvtier's
manager and vLLM's can be compared in one run. The replay loop here is the same one
kvtier's side runs: look up the prefix hit, allocate slots for the rest of the prompt,
keep at most ``--concurrency`` requests live and free the oldest in FIFO order.

Input: a pickle holding ``{"block_size": int, "requests": list[list[int]]}``.
Output: one JSON object on stdout; vLLM's log output goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries only the JSON

import torch
import vllm
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256, xxhash
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.request import Request

HASH_FNS: dict[str, Callable[[Any], bytes]] = {"sha256": sha256, "xxhash": xxhash}


def make_manager(block_size: int, num_blocks: int, max_model_len: int) -> KVCacheManager:
    """One full-attention group, caching on, no stats or events (as in vLLM's tests)."""
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    return KVCacheManager(
        config,
        max_model_len=max_model_len,
        scheduler_block_size=block_size,
        hash_block_size=block_size,
        enable_caching=True,
        log_stats=False,
        enable_kv_cache_events=False,
    )


def replay(manager: KVCacheManager, reqs: Iterable[Request], concurrency: int) -> tuple[int, int]:
    """Run the shared replay loop; return (hit_tokens, rejected)."""
    hit_tokens = 0
    rejected = 0
    live: deque[Request] = deque()
    for req in reqs:
        blocks, n, _ = manager.get_computed_blocks(req)
        new = manager.allocate_slots(req, req.num_tokens - n, n, blocks)
        hit_tokens += n
        if new is None:
            rejected += 1
            continue
        live.append(req)
        if len(live) > concurrency:
            manager.free(live.popleft())
    while live:
        manager.free(live.popleft())
    return hit_tokens, rejected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--hash", choices=sorted(HASH_FNS), default="sha256")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1_000_000)
    parser.add_argument("--memory-blocks", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.concurrency < 0:
        parser.error("--repeat must be >= 1 and --concurrency >= 0")

    with open(args.input, "rb") as f:
        data = pickle.load(f)
    block_size: int = data["block_size"]
    token_lists: list[list[int]] = data["requests"]
    hash_fn = HASH_FNS[args.hash]
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(block_size, hash_fn)
    params = SamplingParams(max_tokens=1)
    ids = [str(i) for i in range(len(token_lists))]

    def make_request(request_id: str, tokens: list[int]) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=tokens,
            sampling_params=params,
            pooling_params=None,
            block_hasher=hasher,
        )

    results: set[tuple[int, int]] = set()
    with_hashing: list[float] = []
    without_hashing: list[float] = []
    for _ in range(args.repeat):
        manager = make_manager(block_size, args.num_blocks, args.max_model_len)
        gc.collect()
        start = time.perf_counter()
        result = replay(manager, map(make_request, ids, token_lists), args.concurrency)
        with_hashing.append(time.perf_counter() - start)
        results.add(result)
    hit_tokens, rejected = result
    for _ in range(args.repeat):
        manager = make_manager(block_size, args.num_blocks, args.max_model_len)
        reqs = list(map(make_request, ids, token_lists))
        gc.collect()
        start = time.perf_counter()
        results.add(replay(manager, reqs, args.concurrency))
        without_hashing.append(time.perf_counter() - start)
        del reqs
    if len(results) != 1:
        print(f"vllm_peer_worker: replay results differ across repeats: {results}", file=sys.stderr)
        return 1

    del manager
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    pool = BlockPool(
        num_gpu_blocks=args.memory_blocks, enable_caching=True, hash_block_size=block_size
    )
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del pool

    report = {
        "impl": "vllm",
        "version": vllm.__version__,
        "hash": args.hash,
        "block_size": block_size,
        "num_blocks": args.num_blocks,
        "concurrency": args.concurrency,
        "requests": len(token_lists),
        "total_tokens": sum(map(len, token_lists)),
        "hit_tokens": hit_tokens,
        "rejected": rejected,
        "blocks": sum(-(-len(t) // block_size) for t in token_lists),
        "seconds_with_hashing": statistics.median(with_hashing),
        "seconds_without_hashing": statistics.median(without_hashing),
        "pool_bytes_per_block": (after - before) / args.memory_blocks,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
