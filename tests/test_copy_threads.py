"""CPU copies split across worker threads (``copy_threads``): same bytes, bounded staging, settled.

Blocks are 8B-class (2 MiB), so batches split into runs exactly as in use.
What the tests observe or break is the outside world: ``anyio.to_thread``
(which threads ran, a thread that fails or cannot start) and torch's
``empty`` (how much staging a run allocates).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError, TierIOError
from kvtier.tiers import _rows
from kvtier.tiers._copy import RowCopier
from kvtier.tiers._rows import split_parts
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from tests.test_tier_gpu_cpu import canonical, cross_layer_cache, keys_for, per_layer_cache
from tests.test_tier_parts import split

LAYOUT = BlockLayout(num_layers=32, block_size=16, num_kv_heads=8, head_size=128, dtype="float16")
BB = LAYOUT.block_bytes  # 2 MiB: one share's minimum
POOL = 40
BATCH = 12  # 24 MiB: three runs of four blocks with copy_threads=3

RunSync = Callable[..., Awaitable[Any]]


def _bytes(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BB), dtype=torch.uint8, generator=generator)


class Threads:
    """``anyio.to_thread.run_sync`` wrapped: records the copy runs' threads, or breaks them.

    Only calls that bring their own limiter (a copier's runs) are touched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real: RunSync = anyio.to_thread.run_sync
        self.idents: list[int] = []
        self.limiters: list[object] = []
        self.default_borrowed: list[float] = []
        self.before: Callable[[int], None] = lambda number: None
        self.start_fails: set[int] = set()
        monkeypatch.setattr(anyio.to_thread, "run_sync", self._run_sync)

    async def _run_sync(self, func: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        limiter = kwargs.get("limiter")
        if limiter is None:
            return await self.real(func, *args, **kwargs)
        number = len(self.limiters)
        self.limiters.append(limiter)
        if number in self.start_fails:
            raise RuntimeError("can't start new thread")

        def in_thread() -> Any:
            self.idents.append(threading.get_ident())
            self.default_borrowed.append(
                anyio.from_thread.run_sync(
                    lambda: anyio.to_thread.current_default_thread_limiter().borrowed_tokens
                )
            )
            self.before(number)
            return func(*args)

        return await self.real(in_thread, limiter=limiter)


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Threads:
    return Threads(monkeypatch)


class StagingSizes:
    """torch for ``kvtier.tiers._rows``, recording the rows of every buffer it allocates."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def empty(self, shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        self.rows.append(shape[0])
        return torch.empty(shape, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@pytest.fixture
def staging(monkeypatch: pytest.MonkeyPatch) -> StagingSizes:
    sizes = StagingSizes()
    monkeypatch.setattr(_rows, "torch", sizes)
    return sizes


@given(
    sizes=st.lists(st.integers(0, 9), max_size=12),
    shares=st.integers(1, 6),
)
def test_split_parts_cuts_the_batch_into_in_order_runs_of_near_equal_length(
    sizes: list[int], shares: int
) -> None:
    n = sum(sizes)
    ids = torch.arange(n).unsqueeze(1)
    runs = split_parts(split(ids, sizes), shares)
    if n == 0:
        assert runs == []
        return
    assert len(runs) == min(shares, n)
    assert runs[0][0] == 0
    assert runs[-1][1] == n
    lengths = [end - begin for begin, end, _ in runs]
    assert max(lengths) - min(lengths) <= 1
    for (begin, end, run), following in zip(runs, [*runs[1:], None], strict=True):
        assert end > begin
        assert all(part.shape[0] for part in run)  # no empty parts
        assert torch.equal(torch.cat(run).squeeze(1), torch.arange(begin, end))
        if following is not None:
            assert following[0] == end


def _tier(
    kind: str, copy_threads: int, staging_bytes: int = 64 << 20
) -> tuple[DeviceTier | CpuTier, Any]:
    if kind == "cpu":
        tier = CpuTier(
            LAYOUT,
            POOL,
            offload_min_bytes=0,
            staging_bytes=staging_bytes,
            copy_threads=copy_threads,
        )
        return tier, None
    cache = (
        per_layer_cache(LAYOUT, POOL) if kind == "per-layer" else cross_layer_cache(LAYOUT, POOL)
    )
    device = DeviceTier(
        cache, LAYOUT, offload_min_bytes=0, staging_bytes=staging_bytes, copy_threads=copy_threads
    )
    return device, cache


def _parts(n: int, rng: random.Random) -> list[torch.Tensor]:
    """Buffers for ``n`` rows: plain, row-strided and column-major ones, some empty."""
    makers = [
        lambda k: torch.zeros(k, BB, dtype=torch.uint8),
        lambda k: torch.zeros(k, BB + 64, dtype=torch.uint8)[:, 32 : 32 + BB],
        lambda k: torch.zeros(BB, k, dtype=torch.uint8).t(),
    ]
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(rng.choice([0, 1, 2, 5]), n - sum(sizes)))
    return [rng.choice(makers)(size) for size in sizes]


@pytest.mark.parametrize("kind", ["per-layer", "cross-layer", "cpu"])
@pytest.mark.parametrize("staging_bytes", [64 << 20, 4 * BB])
@pytest.mark.parametrize("seed", range(2))
def test_a_copy_split_across_threads_moves_the_same_bytes(
    threads: Threads, staging: StagingSizes, kind: str, staging_bytes: int, seed: int
) -> None:
    rng = random.Random(f"{kind}{staging_bytes}{seed}")

    async def main() -> None:
        tier, cache = _tier(kind, 3, staging_bytes)
        async with tier:
            initial = _bytes(POOL, seed)
            if cache is None:
                await tier.write_from(range(POOL), keys_for(range(POOL)), initial)
            slots = rng.sample(range(POOL), BATCH)
            expected = initial[slots] if cache is None else canonical(cache, slots)
            reference = torch.empty(BATCH, BB, dtype=torch.uint8)
            await tier.read_into(slots, keys_for(slots), reference)  # one buffer: 3 runs too
            assert torch.equal(reference, expected)

            threads.idents.clear()
            staging.rows.clear()
            parts = _parts(BATCH, rng)
            await tier.read_into_parts(slots, keys_for(slots), parts)
            assert torch.equal(torch.cat([*parts, reference[:0]]), expected)
            assert len(threads.idents) == 3  # three runs, each in a thread of its own
            assert len(set(threads.idents)) == 3
            # Each run stages at most a third of the budget.
            assert all(rows <= max(1, staging_bytes // BB // 3) for rows in staging.rows)

            targets = rng.sample(range(POOL), BATCH)
            fresh = _bytes(BATCH, seed + 100)
            sources = _parts(BATCH, rng)
            at = 0
            for source in sources:
                source.copy_(fresh[at : at + source.shape[0]])
                at += source.shape[0]
            await tier.write_from_parts(targets, keys_for(targets), sources)
            back = torch.empty(BATCH, BB, dtype=torch.uint8)
            await tier.read_into(targets, keys_for(targets), back)
            assert torch.equal(back, fresh)

    anyio.run(main)


@pytest.mark.parametrize(
    ("copy_threads", "torch_threads", "nbytes", "expected"),
    [
        (None, 1, 64 << 20, 1),
        (None, 2, 64 << 20, 2),
        (4, 1, 64 << 20, 4),
        (4, 1, 5 << 20, 2),  # shares of at least 2 MiB
        (4, 1, 1 << 20, 1),
    ],
)
def test_shares_follow_copy_threads_or_torchs_thread_count(
    copy_threads: int | None, torch_threads: int, nbytes: int, expected: int
) -> None:
    copier = RowCopier(
        [torch.zeros(4, 8, dtype=torch.uint8)],
        tier="t",
        offload_min_bytes=0,
        staging_bytes=1 << 20,
        copy_threads=copy_threads,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        assert copier._shares(nbytes) == expected
    finally:
        torch.set_num_threads(before)


def test_a_failed_run_fails_the_call_after_the_others_settle(threads: Threads) -> None:
    done: list[int] = []

    def before(number: int) -> None:
        if number == 0:
            raise RuntimeError("injected copy failure")
        time.sleep(0.2)  # the other run is still copying when the first fails
        done.append(number)

    threads.before = before

    async def main() -> None:
        tier, cache = _tier("cross-layer", 2)
        async with tier:
            slots = list(range(10, 20))
            out = torch.zeros(10, BB, dtype=torch.uint8)
            with pytest.raises(TierIOError, match="injected copy failure"):
                await tier.read_into(slots, keys_for(slots), out)
            assert done == [1]  # the other run had finished when the error came
            assert torch.equal(out[5:], canonical(cache, slots[5:]))
            threads.before = lambda number: None
            await tier.read_into(slots, keys_for(slots), out)  # and the tier serves on
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


def test_a_cancelled_caller_returns_only_after_every_run_settled(threads: Threads) -> None:
    started: list[int] = []
    done: list[int] = []
    lock = threading.Lock()
    scopes: list[anyio.CancelScope] = []

    def before(number: int) -> None:
        with lock:
            started.append(number)
            both = len(started) == 2
        if both:  # cancel the caller while both runs are in their threads
            anyio.from_thread.run_sync(scopes[0].cancel)
        time.sleep(0.2)
        done.append(number)

    threads.before = before

    async def main() -> None:
        tier, cache = _tier("per-layer", 2)
        async with tier:
            slots = list(range(20, 30))
            out = torch.zeros(10, BB, dtype=torch.uint8)
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await tier.read_into(slots, keys_for(slots), out)
            assert scope.cancelled_caught
            assert sorted(done) == [0, 1]  # both runs had finished copying
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


def test_a_thread_that_cannot_start_is_a_typed_error(threads: Threads) -> None:
    threads.start_fails = {1}

    async def main() -> None:
        tier, cache = _tier("cross-layer", 2)
        async with tier:
            slots = list(range(10))
            out = torch.zeros(10, BB, dtype=torch.uint8)
            with pytest.raises(TierIOError, match="can't start new thread"):
                await tier.read_into(slots, keys_for(slots), out)
            threads.start_fails = set()
            await tier.read_into(slots, keys_for(slots), out)
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


def test_runs_take_threads_from_the_copiers_own_limiter(threads: Threads) -> None:
    async def main() -> None:
        tier, cache = _tier("per-layer", 4)
        async with tier:
            slots = list(range(16))
            out = torch.zeros(16, BB, dtype=torch.uint8)
            await tier.read_into(slots, keys_for(slots), out)
            assert torch.equal(out, canonical(cache, slots))
            default = anyio.to_thread.current_default_thread_limiter()
            assert len(threads.limiters) == 4
            assert all(limiter is not default for limiter in threads.limiters)

    anyio.run(main)
    assert threads.default_borrowed == [0, 0, 0, 0]  # none held a default-limiter token


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_copy_threads_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="copy_threads"):
        CpuTier(LAYOUT, 4, copy_threads=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="copy_threads"):
        DeviceTier(cross_layer_cache(LAYOUT, 4), LAYOUT, copy_threads=bad)  # type: ignore[arg-type]
