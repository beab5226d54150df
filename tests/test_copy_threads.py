"""CPU copies split across worker threads (``copy_threads``): same bytes, bounded staging."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import anyio
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvtier.errors import ConfigError, TierIOError
from kvtier.tiers import _copy
from kvtier.tiers._copy import RowCopier
from kvtier.tiers._rows import SegmentRows, split_parts
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier
from tests.test_tier_gpu_cpu import (
    BB,
    NUM_BLOCKS,
    SMALL,
    canonical,
    cross_layer_cache,
    keys_for,
    per_layer_cache,
    rand_bytes,
)
from tests.test_tier_parts import columnar, split, strided


@pytest.fixture
def small_shares() -> Iterator[None]:
    """Shares of one 512-byte block, so test batches split as 2 MiB blocks would."""
    with mock.patch.object(_copy, "SHARE_MIN_BYTES", BB):
        yield


class Spy:
    """Records, for each ``SegmentRows.copy`` call, its thread and first slot."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.staged_rows: list[int] = []
        self._copy = SegmentRows.copy
        self._staged = SegmentRows._staged

    def copy(self, rows: SegmentRows, slots: list[int], *args: Any, **kwargs: Any) -> None:
        self.calls.append((threading.get_ident(), slots[0]))
        self._copy(rows, slots, *args, **kwargs)

    def staged(
        self, rows: SegmentRows, slots: list[int], staged: Any, chunk: int, **kw: Any
    ) -> None:
        self.staged_rows.append(chunk)
        self._staged(rows, slots, staged, chunk, **kw)

    def __enter__(self) -> Spy:
        self._patches = [
            mock.patch.object(SegmentRows, "copy", autospec=True, side_effect=self.copy),
            mock.patch.object(SegmentRows, "_staged", autospec=True, side_effect=self.staged),
        ]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for patch in self._patches:
            patch.stop()


@given(
    sizes=st.lists(st.integers(0, 9), max_size=12),
    shares=st.integers(1, 6),
)
def test_split_parts_cuts_the_batch_into_in_order_runs_of_near_equal_length(
    sizes: list[int], shares: int
) -> None:
    n = sum(sizes)
    ids = torch.arange(n).unsqueeze(1)
    parts = split(ids, sizes)
    runs = split_parts(parts, shares)
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


def _tier(kind: str, threads: int, staging_bytes: int) -> tuple[Any, Any]:
    if kind == "cpu":
        return CpuTier(
            SMALL,
            NUM_BLOCKS,
            offload_min_bytes=0,
            staging_bytes=staging_bytes,
            copy_threads=threads,
        ), None
    cache = per_layer_cache() if kind == "per-layer" else cross_layer_cache()
    tier = DeviceTier(
        cache, SMALL, offload_min_bytes=0, staging_bytes=staging_bytes, copy_threads=threads
    )
    return tier, cache


def _parts(n: int, rng: random.Random) -> list[torch.Tensor]:
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(rng.choice([0, 1, 2, 7, 30]), n - sum(sizes)))
    makers = [strided, columnar, lambda k: torch.zeros(k, BB, dtype=torch.uint8)]
    return [rng.choice(makers)(size) for size in sizes]


@pytest.mark.parametrize("kind", ["per-layer", "cross-layer", "cpu"])
@pytest.mark.parametrize("staging_bytes", [64 << 20, 4 * BB])
@pytest.mark.parametrize("seed", range(3))
def test_a_copy_split_across_threads_moves_the_same_bytes(
    small_shares: None, kind: str, staging_bytes: int, seed: int
) -> None:
    rng = random.Random(f"{kind}{staging_bytes}{seed}")

    async def main() -> None:
        tier, cache = _tier(kind, 3, staging_bytes)
        async with tier:
            initial = rand_bytes(NUM_BLOCKS, BB)
            if cache is None:
                await tier.write_from(range(NUM_BLOCKS), keys_for(range(NUM_BLOCKS)), initial)
            slots = rng.sample(range(NUM_BLOCKS), 90)
            reference = torch.empty(90, BB, dtype=torch.uint8)
            await tier.read_into(slots, keys_for(slots), reference)  # one buffer: 3 shares too
            expected = initial[slots] if cache is None else canonical(cache, slots)
            assert torch.equal(reference, expected)
            parts = _parts(90, rng)
            with Spy() as spy:
                await tier.read_into_parts(slots, keys_for(slots), parts)
            assert torch.equal(torch.cat([*parts, reference[:0]]), reference)
            assert len({thread for thread, _ in spy.calls}) == 3  # three worker threads
            assert sorted(first for _, first in spy.calls) == sorted(slots[i] for i in (0, 30, 60))
            if spy.staged_rows:  # each run stages a third of the budget at most
                assert max(spy.staged_rows) <= max(1, staging_bytes // BB // 3)

            targets = rng.sample(range(NUM_BLOCKS), 90)
            fresh = rand_bytes(90, BB)
            sources = _parts(90, rng)
            at = 0
            for source in sources:
                source.copy_(fresh[at : at + source.shape[0]])
                at += source.shape[0]
            await tier.write_from_parts(targets, keys_for(targets), sources)
            back = torch.empty(90, BB, dtype=torch.uint8)
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


def _slow_copy(done: list[int], fail_first: int) -> Any:
    real = SegmentRows.copy

    def copy(rows: SegmentRows, slots: list[int], *args: Any, **kwargs: Any) -> None:
        if slots[0] == fail_first:
            raise RuntimeError("injected copy failure")
        time.sleep(0.2)
        real(rows, slots, *args, **kwargs)
        done.append(slots[0])

    return copy


def test_a_failed_share_fails_the_call_after_the_others_settle(small_shares: None) -> None:
    done: list[int] = []

    async def main() -> None:
        tier, cache = _tier("cross-layer", 2, 64 << 20)
        async with tier:
            slots = list(range(10, 30))
            out = torch.zeros(20, BB, dtype=torch.uint8)
            with (
                mock.patch.object(
                    SegmentRows, "copy", autospec=True, side_effect=_slow_copy(done, fail_first=10)
                ),
                pytest.raises(TierIOError, match="injected copy failure"),
            ):
                await tier.read_into(slots, keys_for(slots), out)
            assert done == [20]  # the other share had finished when the error came
            assert torch.equal(out[10:], canonical(cache, slots[10:]))
            await tier.read_into(slots, keys_for(slots), out)  # and the tier serves on
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


def test_a_cancelled_caller_returns_only_after_every_share_settled(small_shares: None) -> None:
    done: list[int] = []
    started: list[int] = []
    lock = threading.Lock()
    scopes: list[anyio.CancelScope] = []
    real = SegmentRows.copy

    def copy(rows: SegmentRows, slots: list[int], *args: Any, **kwargs: Any) -> None:
        with lock:
            started.append(slots[0])
            both = len(started) == 2
        if both:  # cancel the caller while both runs are in their threads
            anyio.from_thread.run_sync(scopes[0].cancel)
        time.sleep(0.2)
        real(rows, slots, *args, **kwargs)
        done.append(slots[0])

    async def main() -> None:
        tier, cache = _tier("per-layer", 2, 64 << 20)
        async with tier:
            slots = list(range(100, 140))
            out = torch.zeros(40, BB, dtype=torch.uint8)
            with mock.patch.object(SegmentRows, "copy", autospec=True, side_effect=copy):
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await tier.read_into(slots, keys_for(slots), out)
                assert scope.cancelled_caught
                assert sorted(done) == [100, 120]  # both runs had finished copying
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_copy_threads_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="copy_threads"):
        CpuTier(SMALL, 4, copy_threads=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="copy_threads"):
        DeviceTier(cross_layer_cache(num_blocks=4), SMALL, copy_threads=bad)  # type: ignore[arg-type]


def test_a_thread_that_cannot_start_is_a_typed_error(small_shares: None) -> None:
    real = anyio.to_thread.run_sync
    calls: list[int] = []

    async def second_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("can't start new thread")
        return await real(*args, **kwargs)

    async def main() -> None:
        tier, cache = _tier("cross-layer", 2, 64 << 20)
        async with tier:
            slots = list(range(20))
            out = torch.zeros(20, BB, dtype=torch.uint8)
            with (
                mock.patch.object(anyio.to_thread, "run_sync", second_fails),
                pytest.raises(TierIOError, match="can't start new thread"),
            ):
                await tier.read_into(slots, keys_for(slots), out)
            await tier.read_into(slots, keys_for(slots), out)
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)


def test_runs_take_threads_from_the_copiers_own_limiter(small_shares: None) -> None:
    seen: list[int] = []
    real = SegmentRows.copy

    def copy(rows: SegmentRows, slots: list[int], *args: Any, **kwargs: Any) -> None:
        borrowed = anyio.from_thread.run_sync(
            lambda: anyio.to_thread.current_default_thread_limiter().borrowed_tokens
        )
        seen.append(borrowed)
        real(rows, slots, *args, **kwargs)

    async def main() -> None:
        tier, cache = _tier("per-layer", 4, 64 << 20)
        async with tier:
            slots = list(range(40))
            out = torch.zeros(40, BB, dtype=torch.uint8)
            with mock.patch.object(SegmentRows, "copy", autospec=True, side_effect=copy):
                await tier.read_into(slots, keys_for(slots), out)
            assert torch.equal(out, canonical(cache, slots))

    anyio.run(main)
    assert seen == [0, 0, 0, 0]  # four runs, none holding a token of the default limiter
