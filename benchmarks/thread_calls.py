"""A tier's worker-thread round trip: ``run_to_end`` beside anyio's ``to_thread.run_sync``.

Every copy a tier runs off the event loop, and every disk call, goes
through :func:`kvtier.tiers._threads.run_to_end`, which waits for the
thread under asyncio's own cancellation too. This times both on a function
that returns at once (the round trip alone), alternating, and prints the
ratio.

    python benchmarks/thread_calls.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import anyio
import anyio.to_thread

from kvtier.tiers._threads import run_to_end


def _nothing() -> int:
    return 1


async def _measure(calls: int, repeats: int, tokens: int) -> tuple[float, float]:
    """Median seconds per call: anyio's, then run_to_end (with a limiter if ``tokens``)."""
    limiter = anyio.CapacityLimiter(tokens) if tokens else None
    plain: list[float] = []
    ours: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            await anyio.to_thread.run_sync(_nothing, limiter=limiter)
        plain.append((time.perf_counter() - start) / calls)
        start = time.perf_counter()
        for _ in range(calls):
            await run_to_end(_nothing, limiter=limiter)
        ours.append((time.perf_counter() - start) / calls)
    return statistics.median(plain), statistics.median(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument(
        "--limiter", type=int, default=0, help="a limiter of this many tokens (0: none)"
    )
    args = parser.parse_args()
    plain, ours = asyncio.run(_measure(args.calls, args.repeats, args.limiter))
    which = f"limiter of {args.limiter}" if args.limiter else "no limiter"
    print(
        f"worker-thread round trip ({which}), median of {args.repeats} x {args.calls} calls: "
        f"anyio.to_thread.run_sync {plain * 1e6:.1f} µs, run_to_end {ours * 1e6:.1f} µs, "
        f"ratio {ours / plain:.2f}"
    )


if __name__ == "__main__":
    main()
