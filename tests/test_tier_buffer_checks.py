"""Caller buffers the device and CPU tiers must refuse, or handle, without wrong bytes.

Aliases of a tier's own memory, rows that overlap, buffers without bytes,
misaligned storages, odd slot values, and opening races.
"""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.tiers import cpu as cpu_module
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.gpu import DeviceTier

SMALL = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
BB = SMALL.block_bytes
NUM = 16
CUDA = torch.cuda.is_available()


def rand_bytes(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


async def snapshot(tier: DeviceTier | CpuTier) -> torch.Tensor:
    out = torch.empty(NUM, BB, dtype=torch.uint8)
    await tier.read_into(range(NUM), [b""] * NUM, out)
    return out


def one_allocation_per_layer_tier() -> tuple[DeviceTier, torch.Tensor]:
    """A per-layer tier whose K and V tensors are views of one allocation (vLLM's style)."""
    whole = rand_bytes(NUM, SMALL.block_bytes)
    pages = whole.view(SMALL.torch_dtype).view(NUM, SMALL.num_layers, 2, *SMALL.page_shape)
    tensors = [pages[:, layer, kv] for layer in range(SMALL.num_layers) for kv in (0, 1)]
    return DeviceTier(tensors, SMALL), whole


@pytest.mark.asyncio
async def test_a_buffer_aliasing_the_cpu_tier_is_refused_and_nothing_changes() -> None:
    async with CpuTier(SMALL, NUM) as tier:
        await tier.write_from(range(NUM), [b""] * NUM, rand_bytes(NUM, BB))
        before = await snapshot(tier)
        run = tier.slot_view(range(6))
        assert run is not None
        aliases = {
            "strided": (run[0:6:2], [2, 4, 0]),  # scattered slots: torch would not notice
            "contiguous": (run[0:2], [3, 5]),
            "one row": (run[1:2], [1]),
        }
        for name, (alias, slots) in aliases.items():
            for call in (tier.read_into, tier.write_from):
                with pytest.raises(InvalidRequestError, match="overlaps the tier's own memory"):
                    await call(slots, [b""] * len(slots), alias)
            assert torch.equal(await snapshot(tier), before), name
        # A copy of the same rows is a different buffer and works.
        copy = run[0:6:2].clone()
        await tier.read_into([2, 4, 0], [b""] * 3, copy)
        assert torch.equal(copy, before[[2, 4, 0]])


@pytest.mark.asyncio
async def test_a_buffer_aliasing_an_engine_cache_is_refused() -> None:
    tier, whole = one_allocation_per_layer_tier()
    before = await snapshot(tier)
    for alias, slots in ((whole[1:4], [2, 0, 1]), (whole[1:2], [5]), (whole[::2][:3], [7, 3, 9])):
        for call in (tier.read_into, tier.write_from):
            with pytest.raises(InvalidRequestError, match="overlaps"):
                await call(slots, [b""] * len(slots), alias)
    assert torch.equal(await snapshot(tier), before)
    await tier.aclose()


def misaligned(rows: int) -> torch.Tensor:
    """``uint8 [rows, BB]`` at a 16-byte aligned address in a storage whose base is not.

    ``torch.from_numpy`` of an offset slice: ``Tensor.view(complex128)`` checks
    the storage offset, which is 13 here although the address is aligned.
    """
    raw = np.zeros(rows * BB + 64, np.uint8)
    skewed = torch.from_numpy(raw[(-raw.ctypes.data) % 16 + 3 :])
    start = (-skewed.data_ptr()) % 16
    view = skewed[start : start + rows * BB].view(rows, BB)
    assert view.data_ptr() % 16 == 0
    assert view.storage_offset() % 16 != 0
    return view


@pytest.mark.asyncio
async def test_buffers_and_caches_in_misaligned_storages_move_the_right_bytes() -> None:
    async with CpuTier(SMALL, NUM) as tier:
        data = rand_bytes(3, BB)
        source = misaligned(3)
        source.copy_(data)
        await tier.write_from([9, 2, 5], [b""] * 3, source)
        out = misaligned(3)
        await tier.read_into([9, 2, 5], [b""] * 3, out)
        assert torch.equal(out, data)
    cache = misaligned(NUM)
    cache.copy_(rand_bytes(NUM, BB))
    device = DeviceTier(cache, SMALL)
    out = torch.empty(2, BB, dtype=torch.uint8)
    await device.read_into([4, 1], [b""] * 2, out)
    assert torch.equal(out, cache[[4, 1]])
    await device.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["per-layer", "cross-layer", "cpu"])
async def test_buffers_without_distinct_bytes_are_refused(kind: str) -> None:
    tier: DeviceTier | CpuTier
    if kind == "cpu":
        tier = await CpuTier(SMALL, NUM).__aenter__()
    elif kind == "per-layer":
        tier, _ = one_allocation_per_layer_tier()
    else:
        tier = DeviceTier(rand_bytes(NUM, BB), SMALL)
    before = await snapshot(tier)
    flat = torch.zeros(2 * BB, dtype=torch.uint8)
    bad = {
        "rows overlap": flat.as_strided((2, BB), (8, 1)),
        "rows overlap ": torch.zeros(1, BB, dtype=torch.uint8).expand(2, BB),
        "meta device": torch.empty(2, BB, dtype=torch.uint8, device="meta"),
        "must be dense": torch.zeros(2, BB, dtype=torch.uint8).to_sparse(),
    }
    for message, buffer in bad.items():
        for call in (tier.read_into, tier.write_from):
            with pytest.raises(InvalidRequestError, match=message.strip()):
                await call([1, 0], [b""] * 2, buffer)
    assert torch.equal(await snapshot(tier), before)
    # Column-strided rows do not overlap and stay accepted.
    wide = torch.empty(2, 2 * BB, dtype=torch.uint8)[:, ::2]
    await tier.read_into([1, 0], [b""] * 2, wide)
    assert torch.equal(wide, before[[1, 0]])
    await tier.aclose()


@pytest.mark.asyncio
async def test_booleans_are_not_slots_but_ranges_and_numpy_ints_are() -> None:
    async with CpuTier(SMALL, NUM) as tier:
        data = rand_bytes(2, BB)
        with pytest.raises(InvalidRequestError, match="slots must be integers"):
            await tier.write_from([True, 0], [b""] * 2, data)  # type: ignore[list-item]
        await tier.write_from([0, 1], [b""] * 2, torch.zeros_like(data))
        mask = torch.tensor([False, True])  # a block mask passed by mistake: not slots 0 and 1
        for slots in (mask, list(mask), np.array([False, True])):
            with pytest.raises(InvalidRequestError, match="slots must be integers"):
                await tier.write_from(slots, [b""] * 2, data)  # type: ignore[arg-type]
        held = torch.empty(2, BB, dtype=torch.uint8)
        await tier.read_into([0, 1], [b""] * 2, held)
        assert not held.any()  # nothing written
        await tier.write_from(torch.tensor([3, 4]), [b""] * 2, data)  # type: ignore[arg-type]
        out = torch.empty(2, BB, dtype=torch.uint8)
        await tier.read_into(range(3, 5), [b""] * 2, out)
        assert torch.equal(out, data)
        one = torch.empty(1, BB, dtype=torch.uint8)
        await tier.read_into([np.int64(4)], [b""], one)  # type: ignore[list-item]
        assert torch.equal(one[0], data[1])


@pytest.mark.asyncio
async def test_closing_a_cpu_tier_while_it_opens_leaves_it_closed_and_empty() -> None:
    tier = CpuTier(SMALL, 4096)
    failures: list[BaseException] = []

    async def enter() -> None:
        try:
            await tier.__aenter__()
        except ClosedError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        await anyio.sleep(0)  # ``enter`` now waits for its allocation thread
        await tier.aclose()
    assert len(failures) == 1
    assert "closed while opening" in str(failures[0])
    assert tier.closed
    with pytest.raises(ClosedError):
        tier.slot_view([0])
    assert "closed" in repr(tier)


class PinnedStandIn:
    """CUDA stand-ins: the tier's storage reports pinned, and unpins are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.unpinned: list[int] = []
        allocate = CpuTier._allocate

        def pinned_allocate(tier: CpuTier) -> tuple[torch.Tensor, bool]:
            return allocate(tier)[0], True

        def unregister(storage: torch.Tensor, device: int) -> None:
            self.unpinned.append(storage.data_ptr())

        monkeypatch.setattr(CpuTier, "_allocate", pinned_allocate)
        monkeypatch.setattr(cpu_module, "_unregister", unregister)


@pytest.mark.asyncio
async def test_a_pinned_cpu_tier_closed_by_cancellation_still_unpins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``async with`` exits in a cancelled scope when the engine shuts down."""
    pins = PinnedStandIn(monkeypatch)
    tier = CpuTier(SMALL, 8)
    closer: list[None] = []
    with anyio.CancelScope() as scope:
        async with tier:
            scope.cancel()
            await anyio.sleep(0)  # cancelled here: __aexit__ closes in the cancelled scope
    assert tier.closed
    assert len(pins.unpinned) == 1
    await tier.aclose()  # idempotent
    with anyio.CancelScope() as scope:  # a second close cancelled while waiting: returns
        scope.cancel()
        await tier.aclose()
        closer.append(None)
    assert len(pins.unpinned) == 1
    assert closer == [None]


@pytest.mark.asyncio
async def test_a_second_cpu_tier_close_waits_for_the_first_to_unpin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pins = PinnedStandIn(monkeypatch)
    release = threading.Event()
    unregister = cpu_module._unregister

    def slow_unregister(storage: torch.Tensor, device: int) -> None:
        release.wait(10)
        unregister(storage, device)

    monkeypatch.setattr(cpu_module, "_unregister", slow_unregister)
    tier = CpuTier(SMALL, 8)
    await tier.__aenter__()
    seen: list[int] = []

    async def second() -> None:
        await tier.aclose()
        seen.append(len(pins.unpinned))

    async with anyio.create_task_group() as tg:
        tg.start_soon(tier.aclose)
        await anyio.sleep(0.01)
        tg.start_soon(second)
        await anyio.sleep(0.05)
        assert seen == []  # still waiting for the first close's unpin
        release.set()
    assert seen == [1]


def gate_copies(
    tier: CpuTier | DeviceTier, started: threading.Event, release: threading.Event
) -> None:
    """Make the tier's copies (in worker threads) say they started, then wait for ``release``."""
    copier = tier._live_copier()
    copy = copier.rows.copy

    def gated(*args: object, **kwargs: object) -> None:
        started.set()
        release.wait(10)
        copy(*args, **kwargs)  # type: ignore[arg-type]

    copier.rows.copy = gated  # type: ignore[method-assign]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["cpu", "device"])
async def test_closing_a_tier_waits_for_a_copy_running_in_a_worker_thread(kind: str) -> None:
    """A worker thread's copy cannot be stopped: close must not free (or unpin) under it."""
    if kind == "cpu":
        tier: CpuTier | DeviceTier = CpuTier(SMALL, 64, offload_min_bytes=1)
        await tier.__aenter__()
    else:
        tier = DeviceTier(torch.zeros(64, BB, dtype=torch.uint8), SMALL, offload_min_bytes=1)
    release, started = threading.Event(), threading.Event()
    gate_copies(tier, started, release)
    order: list[str] = []

    async def write() -> None:
        await tier.write_from(list(range(8)), [b""] * 8, rand_bytes(8, BB))
        order.append("copy ended")

    async def close(name: str) -> None:
        await anyio.to_thread.run_sync(started.wait, 10)
        if name == "closed":
            threading.Timer(0.1, release.set).start()
        else:
            await anyio.sleep(0.02)  # after the first close began
        await tier.aclose()
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        tg.start_soon(close, "closed")
        tg.start_soon(close, "closed again")  # a second close waits for the first
    assert order[0] == "copy ended"
    assert sorted(order[1:]) == ["closed", "closed again"]


@pytest.mark.parametrize("kind", ["cpu", "device"])
def test_a_second_close_from_another_event_loop_waits_and_returns(kind: str) -> None:
    """The offload runtime's loop closes; an engine's loop closes too, meanwhile."""
    tier: CpuTier | DeviceTier
    if kind == "cpu":
        tier = CpuTier(SMALL, 64, offload_min_bytes=1)
    else:
        tier = DeviceTier(torch.zeros(64, BB, dtype=torch.uint8), SMALL, offload_min_bytes=1)
    release, started, first_closed = threading.Event(), threading.Event(), threading.Event()

    async def first_loop() -> None:
        if isinstance(tier, CpuTier):
            await tier.__aenter__()
        gate_copies(tier, started, release)

        async def close() -> None:
            await anyio.to_thread.run_sync(started.wait, 10)
            await tier.aclose()
            first_closed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(tier.write_from, list(range(8)), [b""] * 8, rand_bytes(8, BB))
            tg.start_soon(close)

    async def second_loop() -> bool:
        await anyio.to_thread.run_sync(started.wait, 10)
        await anyio.sleep(0.05)  # the first close has begun on the other loop
        threading.Timer(0.1, release.set).start()
        with anyio.fail_after(10):
            await tier.aclose()
        return release.is_set()

    with anyio.from_thread.start_blocking_portal() as portal:
        first = portal.start_task_soon(first_loop)
        assert anyio.run(second_loop)  # returned, and only after the copy was let go
        first.result(timeout=10)
    assert first_closed.is_set()


@pytest.mark.asyncio
async def test_concurrent_opens_allocate_once() -> None:
    tier = CpuTier(SMALL, 4096)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(tier.__aenter__)
    assert [e["event"] for e in logs].count("tier_open") == 1
    data = rand_bytes(1, BB)
    await tier.write_from([7], [b""], data)
    view = tier.slot_view([7])
    assert view is not None
    assert torch.equal(view, data)
    await tier.aclose()


@pytest.mark.asyncio
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
async def test_small_scattered_cuda_copies_do_not_block_the_loop_on_engine_work() -> None:
    cache = torch.zeros(NUM, BB, dtype=torch.uint8, device="cuda")
    tier = DeviceTier(cache, SMALL)
    out = torch.empty(3, BB, dtype=torch.uint8, device="cuda")
    seen_busy: list[bool] = []

    async def watch() -> None:
        while not done.is_set():
            seen_busy.append(not torch.cuda.current_stream().query())
            await anyio.sleep(0)

    done = anyio.Event()
    torch.cuda._sleep(2_000_000_000)  # engine work queued on the current stream
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await tier.read_into([5, 1, 9], [b""] * 3, out)  # scattered: an index tensor
        done.set()
    # The loop ran the watcher while the engine's work was still queued.
    assert any(seen_busy)
    torch.cuda.synchronize()
    assert not out.any()
    await tier.aclose()


def test_row_views_refuse_rows_that_are_not_contiguous_host_memory() -> None:
    from kvtier.tiers._checks import part_row_views, row_views

    by_column = torch.zeros(512, 4, dtype=torch.uint8).t()
    with pytest.raises(InvalidRequestError, match="contiguous"):
        row_views(by_column)
    with pytest.raises(InvalidRequestError, match="contiguous"):
        part_row_views([torch.zeros(2, 512, dtype=torch.uint8), by_column])
    rows = torch.arange(8, dtype=torch.uint8).view(2, 4)
    views = part_row_views([rows[:1], torch.zeros(0, 4, dtype=torch.uint8), rows[1:]])
    assert bytes(views(0)) == bytes([0, 1, 2, 3])
    assert bytes(views(1)) == bytes([4, 5, 6, 7])
