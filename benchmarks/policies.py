"""Eviction policies' hit ratios against LRU and Belady's bound, on a Mooncake trace.

Each request's chain of hash ids (at the trace's own 512-token granularity) is
replayed through every registered eviction policy with
:func:`kvtier.policies.simulation.simulate` (prefix hits, chains touched tail
first, the cache shrunk back to capacity), and through
:func:`~kvtier.policies.simulation.belady`, the offline optimum, at capacities
given as fractions of the trace's distinct blocks. For each policy it prints
the hit ratio, the gain over LRU and the share of the LRU-to-Belady gap it
closes, and their averages over the capacities. A prefix-aware policy
(``prefix_slru``, ``class_lru``) is told each block's depth, chain length and
parent, and the request's tag: ``--tags output`` (the default for traces)
tags a request with ⌊log₂ output_length⌋, a stand-in for the ``max_tokens``
an engine knows when the request arrives; ``--tags shuffled`` gives the same
tags to random requests (a control: a policy that gains from them then gains
from the labels, not from their link to reuse); ``--tags none`` leaves them
out. Chat requests are untagged (every answer has the same length).

``--workload chat`` replays the multi-round chat workload of ``kvtier replay``
instead (:func:`kvtier.replay.workloads.chat_workload`: a shared system
prompt, each round's prompt the whole conversation so far), cut into
``--block-size``-token blocks whose keys chain like prefix-cache hashes.

    python benchmarks/policies.py                       # the full synthetic trace
    python benchmarks/policies.py --trace kvtier/data/mooncake_sample.jsonl
    python benchmarks/policies.py --workload chat --users 64 --rounds 8 --block-size 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from array import array
from pathlib import Path

from kvtier.policies import EVICTION_POLICIES, make_eviction_policy
from kvtier.policies.simulation import belady, chain_keys, simulate
from kvtier.replay.workloads import chat_workload
from kvtier.traces import TraceRequest, read_mooncake_trace

DEFAULT_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic.jsonl"
)


def token_chain(prompt: list[int], block_size: int) -> list[bytes]:
    """Keys of a prompt's full blocks, each hashing its parent's key and its tokens."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(prompt) - block_size + 1, block_size):
        tokens = array("q", prompt[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


def trace_tags(rows: list[TraceRequest], mode: str) -> list[int | str | None] | None:
    """Each request's tag for ``--tags mode``."""
    if mode == "none":
        return None
    tags: list[int | str | None] = [row.tag for row in rows]
    if mode == "shuffled":
        random.Random(0).shuffle(tags)
    return tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--workload", choices=("trace", "chat"), default="trace")
    parser.add_argument("--users", type=int, default=16, help="chat: conversations")
    parser.add_argument("--rounds", type=int, default=6, help="chat: rounds per user")
    parser.add_argument("--block-size", type=int, default=64, help="chat: tokens per block")
    parser.add_argument("--capacities", default="0.01,0.05,0.10,0.25,0.50")
    parser.add_argument("--policies", default=",".join(EVICTION_POLICIES))
    parser.add_argument("--tags", choices=("output", "shuffled", "none"), default="output")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.workload == "chat":
        workload = chat_workload(users=args.users, rounds=args.rounds)
        chains = [token_chain(list(p), args.block_size) for p in workload.prompts]
        label = f"{workload.name} ({args.block_size}-token blocks)"
        tags = None
    else:
        rows_in = list(read_mooncake_trace(args.trace))
        chains = [chain_keys(row.hash_ids) for row in rows_in]
        tags = trace_tags(rows_in, args.tags)
        label = f"{args.trace.name} (tags: {args.tags})"
    distinct = len({key for chain in chains for key in chain})
    names = args.policies.split(",")
    rows = []
    start = time.perf_counter()
    for fraction in (float(f) for f in args.capacities.split(",")):
        capacity = max(1, int(distinct * fraction))
        bound = belady(chains, capacity).hit_ratio
        ratios = {
            name: simulate(
                chains, capacity, make_eviction_policy(name, capacity), tags=tags
            ).hit_ratio
            for name in names
        }
        rows.append({"fraction": fraction, "capacity": capacity, "belady": bound, **ratios})
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"workload": label, "distinct_blocks": distinct, "rows": rows}))
        return
    print(
        f"{label}: {len(chains)} requests, {distinct} distinct blocks; "
        f"hit ratio (blocks), gain over LRU, share of the LRU-Belady gap closed; {seconds:.1f} s"
    )
    print(f"{'capacity':>14} {'belady':>8} " + " ".join(f"{n:>24}" for n in names))
    gaps: dict[str, list[float]] = {name: [] for name in names}
    for row in rows:
        lru, bound = row["lru"], row["belady"]
        cells = []
        for name in names:
            share = (row[name] - lru) / (bound - lru) if bound > lru else 0.0
            gaps[name].append(share)
            cells.append(f"{row[name]:7.2%} {row[name] - lru:+6.2%} {share:+6.0%}")
        label = f"{row['fraction']:.0%} ({row['capacity']})"
        print(f"{label:>14} {bound:8.2%} " + " ".join(f"{c:>24}" for c in cells))
    averages = " ".join(f"{sum(v) / len(v):>+24.1%}" for v in gaps.values())
    print(f"{'mean gap closed':>23} " + averages)


if __name__ == "__main__":
    main()
