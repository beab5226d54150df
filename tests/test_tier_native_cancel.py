"""Tier calls cancelled by asyncio itself (``asyncio.wait_for``, ``task.cancel()``).

anyio waits for a worker thread when its own cancel scope is cancelled; an
engine's ``asyncio.wait_for`` around a tier call is not anyio's. The tiers'
threads must still end before the call raises: else a close frees memory, or
releases a directory, under a copy or a scan still running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvtier.tiers import disk_dir
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
BB = LAYOUT.block_bytes


def slow(func: Any, ended: list[str], name: str) -> Any:
    """``func`` taking 0.3 s, recording its end."""

    def call(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        try:
            return func(*args, **kwargs)
        finally:
            ended.append(name)

    return call


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["cpu", "device"])
async def test_a_copy_timed_out_by_asyncio_has_ended_when_the_timeout_is_raised(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier: CpuTier | DeviceTier
    if kind == "cpu":
        tier = CpuTier(LAYOUT, 8, offload_min_bytes=1)
        await tier.__aenter__()
    else:
        tier = DeviceTier(torch.zeros(8, BB, dtype=torch.uint8), LAYOUT, offload_min_bytes=1)
    copier = tier._live_copier()
    ended: list[str] = []
    monkeypatch.setattr(copier.rows, "copy", slow(copier.rows.copy, ended, "copy"))
    data = torch.randint(0, 256, (2, BB), dtype=torch.uint8)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tier.write_from([0, 1], [b""] * 2, data), 0.05)
    assert ended == ["copy"]  # not running on while the caller goes on (and closes)
    await tier.aclose()


@pytest.mark.asyncio
async def test_an_open_timed_out_by_asyncio_gives_the_directory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT)) as first:
        await first.write_from([0], [b"\1" * 32], torch.zeros(1, BB, dtype=torch.uint8))
    ended: list[str] = []
    monkeypatch.setattr(disk_dir, "scan", slow(disk_dir.scan, ended, "scan"))
    tier = DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tier.__aenter__(), 0.05)
    assert ended == ["scan"]
    assert not tier.closed
    monkeypatch.undo()
    async with DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT)) as again:
        assert [key for _, key in await again.recover()] == [b"\1" * 32]


@pytest.mark.asyncio
async def test_a_discard_timed_out_by_asyncio_has_deleted_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT))
    async with tier:
        await tier.write_from([0], [b"\1" * 32], torch.zeros(1, BB, dtype=torch.uint8))
        ended: list[str] = []
        monkeypatch.setattr(BlockFiles, "unlink", slow(BlockFiles.unlink, ended, "unlink"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tier.discard([0]), 0.05)
        assert ended == ["unlink"]
        assert not (tmp_path / ((b"\1" * 32).hex() + ".kvb")).exists()


@pytest.mark.asyncio
async def test_a_discard_timed_out_while_the_disk_threads_are_busy_still_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete is never skipped: a forgotten block's file must not come back at restart."""
    key_a, key_b = b"\1" * 32, b"\2" * 32
    per = DiskTier.bytes_per_block(LAYOUT)
    async with DiskTier(tmp_path, LAYOUT, 8 * per, max_workers=1) as tier:
        await tier.write_from([0, 1], [key_a, key_b], torch.zeros(2, BB, dtype=torch.uint8))
        reading, go_on = threading.Event(), threading.Event()
        read = BlockFiles.read

        def busy_read(*args: Any, **kwargs: Any) -> Any:
            reading.set()
            go_on.wait(10)  # a load holds the tier's only worker thread
            return read(*args, **kwargs)

        monkeypatch.setattr(BlockFiles, "read", busy_read)
        ended: list[str] = []
        monkeypatch.setattr(BlockFiles, "unlink", slow(BlockFiles.unlink, ended, "unlink"))
        load = asyncio.create_task(
            tier.read_into([1], [key_b], torch.empty(1, BB, dtype=torch.uint8))
        )
        await asyncio.to_thread(reading.wait, 10)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tier.discard([0]), 0.05)
            assert ended == ["unlink"]  # ended before the timeout was raised
        finally:
            go_on.set()
            await load
        assert not (tmp_path / (key_a.hex() + ".kvb")).exists()
    monkeypatch.undo()
    async with DiskTier(tmp_path, LAYOUT, 8 * per) as again:
        assert [key for _, key in await again.recover()] == [key_b]


@pytest.mark.asyncio
async def test_a_pinned_tier_closed_under_an_asyncio_timeout_still_unpins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The close waits for the copy in flight, then unpins, then lets the timeout through."""
    from kvtier.tiers import cpu as cpu_module

    unpinned: list[bool] = []
    monkeypatch.setattr(cpu_module, "_unregister", lambda storage, gpu: unpinned.append(True))
    tier = CpuTier(LAYOUT, 8, offload_min_bytes=1)
    await tier.__aenter__()
    tier._pinned = True  # as a pinned tier on a CUDA host is
    copier = tier._live_copier()
    ended: list[str] = []
    monkeypatch.setattr(copier.rows, "copy", slow(copier.rows.copy, ended, "copy"))
    write = asyncio.create_task(
        tier.write_from([0, 1], [b""] * 2, torch.zeros(2, BB, dtype=torch.uint8))
    )
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tier.aclose(), 0.1)
    await write
    assert ended == ["copy"]
    assert unpinned == [True]
    assert not tier._pinned


@pytest.mark.asyncio
async def test_a_call_cancelled_before_its_thread_starts_never_runs() -> None:
    """Waiting for a thread (its limiter full) is not running: the call is dropped."""
    import anyio

    from kvtier.tiers._threads import run_to_end

    limiter = anyio.CapacityLimiter(1)
    release, ran = asyncio.Event(), []
    await limiter.acquire()  # the only thread is taken
    call = asyncio.create_task(run_to_end(ran.append, "ran", limiter=limiter))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    limiter.release()
    release.set()
    await asyncio.sleep(0.1)
    assert ran == []


@pytest.mark.asyncio
async def test_a_failing_undo_does_not_hide_the_cancellation() -> None:
    from kvtier.tiers._threads import run_to_end

    def undo(_: object) -> None:
        raise OSError("the undo failed")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run_to_end(time.sleep, 0.3, undo=undo), 0.05)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_a_base_exception_of_the_call_comes_out_as_raised() -> None:
    from kvtier.tiers._threads import run_to_end

    def stop() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        await run_to_end(stop)


async def _hammer(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` on every turn of the loop until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_an_undo_runs_however_often_the_caller_is_cancelled() -> None:
    from kvtier.tiers._threads import run_to_end

    log: list[str] = []
    started = threading.Event()

    def work() -> int:
        started.set()
        time.sleep(0.2)
        log.append("done")
        return 1

    call = asyncio.create_task(run_to_end(work, undo=lambda _: log.append("undone")))
    while not started.is_set():  # cancelled before it starts, it would never run
        await asyncio.sleep(0.01)
    await _hammer(call)  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await call
    assert log == ["done", "undone"]


@pytest.mark.asyncio
async def test_a_cancelled_call_keeps_its_limiter_token_until_its_thread_ends() -> None:
    """A tier's max_workers bound holds although a caller went away."""
    import threading

    import anyio

    from kvtier.tiers._threads import run_to_end

    limiter = anyio.CapacityLimiter(1)
    lock, running, peak = threading.Lock(), [0], [0]
    started = threading.Event()

    def work() -> None:
        started.set()
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    first = asyncio.create_task(run_to_end(work, limiter=limiter))
    while not started.is_set():  # running: its thread holds the token
        await asyncio.sleep(0.01)
    first.cancel()
    second = asyncio.create_task(run_to_end(work, limiter=limiter))
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert peak == [1]


@pytest.mark.asyncio
async def test_a_disk_close_cancelled_at_once_keeps_the_directory_until_its_write_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[str] = []
    monkeypatch.setattr(BlockFiles, "write", slow(BlockFiles.write, ended, "write"))
    tier = DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT))
    await tier.__aenter__()
    write = asyncio.create_task(
        tier.write_from([0], [b"\1" * 32], torch.zeros(1, BB, dtype=torch.uint8))
    )
    await asyncio.sleep(0.05)
    close = asyncio.create_task(tier.aclose())
    await asyncio.sleep(0)
    close.cancel()  # before its wait for the write began
    with pytest.raises(asyncio.CancelledError):
        await close
    assert ended == ["write"]  # the directory was let go only after it
    await write


@pytest.mark.asyncio
@pytest.mark.parametrize("when", ["waiting for the copy", "draining"])
async def test_a_cancelled_close_drains_every_stream_before_it_unpins(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies queued on CUDA streams end before the memory goes, whatever cancels the close."""
    from kvtier.tiers import _copy
    from kvtier.tiers import cpu as cpu_module

    events: list[str] = []

    def drain(stream: object) -> None:
        time.sleep(0.1)
        events.append(f"drain {stream}")

    monkeypatch.setattr(_copy, "drain", drain)
    monkeypatch.setattr(cpu_module, "_unregister", lambda storage, gpu: events.append("unpin"))
    tier = CpuTier(LAYOUT, 8, offload_min_bytes=1)
    await tier.__aenter__()
    tier._pinned = True
    copier = tier._live_copier()
    copier._streams[(0, True)] = "A"  # type: ignore[assignment]  # as after copies to a GPU
    copier._streams[(0, False)] = "B"  # type: ignore[assignment]
    monkeypatch.setattr(copier.rows, "copy", slow(copier.rows.copy, events, "copy"))
    write = asyncio.create_task(tier.write_from([0], [b""], torch.zeros(1, BB, dtype=torch.uint8)))
    await asyncio.sleep(0.05)
    close = asyncio.create_task(tier.aclose())
    await asyncio.sleep(0.01 if when == "waiting for the copy" else 0.35)
    close.cancel()
    with pytest.raises(asyncio.CancelledError):
        await close
    await write
    assert events == ["copy", "drain A", "drain B", "unpin"]


@pytest.mark.asyncio
async def test_cleanup_runs_once_and_promptly_however_often_its_caller_is_cancelled() -> None:
    from kvtier.tiers._threads import run_to_end

    ran: list[str] = []

    def cleanup() -> None:
        time.sleep(0.1)
        ran.append("ran")

    call = asyncio.create_task(run_to_end(cleanup, must_run=True))
    await asyncio.sleep(0)  # called (a task cancelled before its first step never calls)
    await _hammer(call)  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await call
    assert ran == ["ran"]


@pytest.mark.asyncio
async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    from kvtier.tiers._threads import ThreadEvent

    event = ThreadEvent()
    wait = asyncio.create_task(event.wait())
    for _ in range(100):
        await asyncio.sleep(0)
        wait.cancel()
    await asyncio.sleep(0)
    assert len(event._waiters) <= 1  # the one now waiting
    event.set()
    with pytest.raises(asyncio.CancelledError):
        await wait


def test_two_closes_on_two_loops_at_once_run_one_close(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.tiers import _close_gate
    from kvtier.tiers._threads import ThreadEvent

    class SlowEvent(ThreadEvent):
        def __init__(self) -> None:
            time.sleep(0.002)  # widens the window between the check and the set
            super().__init__()

    monkeypatch.setattr(_close_gate, "ThreadEvent", SlowEvent)

    async def close(gate: _close_gate.CloseGate, firsts: list[bool]) -> None:
        async with gate.closing() as first:
            firsts.append(first)
            await asyncio.sleep(0.01)

    for _ in range(10):
        gate, firsts = _close_gate.CloseGate(), []
        closers = [threading.Thread(target=asyncio.run, args=(close(gate, firsts),)) for _ in "ab"]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(10)
        assert sorted(firsts) == [False, True]


class _QueuedCopy:
    """A CUDA event stand-in for a copy queued on a stream: it writes ``part`` later."""

    def __init__(self, part: torch.Tensor) -> None:
        self.thread = threading.Thread(target=self._dma, args=(part,))
        self.thread.start()

    @staticmethod
    def _dma(part: torch.Tensor) -> None:
        time.sleep(0.3)
        part.fill_(0xEE)  # the "GPU" writes the caller's buffer


@pytest.mark.asyncio
async def test_a_small_queued_copy_has_ended_when_asyncio_times_the_read_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait for a copy queued on a CUDA stream is never given up.

    Only the CUDA pieces are stand-ins (the stream, the queued copy and its
    event): the read is a small one, queued on the event loop's thread, and
    its wait needs a worker thread, which a full thread limiter delays past
    the caller's ``asyncio.wait_for``. The caller's buffer must be settled
    when the timeout is raised, not written afterwards.
    """
    import anyio.to_thread

    from kvtier.tiers import _copy

    tier = CpuTier(LAYOUT, 4)
    await tier.__aenter__()
    copier = tier._live_copier()
    stream = SimpleNamespace(device=-1)  # torch.cuda.device(-1) selects nothing
    monkeypatch.setattr(copier, "_cuda_stream", lambda parts, read: stream)
    monkeypatch.setattr(copier, "_async_ok", lambda part: True)
    queued: list[_QueuedCopy] = []

    def enqueue(stream: object, slots: list[int], parts: list[torch.Tensor], *, read: bool) -> Any:
        queued.append(_QueuedCopy(parts[0]))
        return queued[-1]

    monkeypatch.setattr(copier, "_enqueue", enqueue)
    monkeypatch.setattr(_copy, "event_done", lambda event: not event.thread.is_alive())
    monkeypatch.setattr(_copy, "wait_event", lambda event, device: event.thread.join())
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        busy = asyncio.create_task(anyio.to_thread.run_sync(time.sleep, 0.2))
        await asyncio.sleep(0.05)  # the only token is taken
        out = torch.zeros(1, BB, dtype=torch.uint8)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tier.read_into([0], [b""], out), 0.05)
        assert not queued[0].thread.is_alive()  # the copy ended before the call did
        assert int(out[0, 0]) == 0xEE
        await busy
    finally:
        limiter.total_tokens = tokens
        for copy in queued:
            copy.thread.join()
        await tier.aclose()


@pytest.mark.asyncio
async def test_hung_deletes_do_not_starve_asyncios_default_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes run in the disk tier's own threads: a file system stuck in unlink (a
    hung NFS server) must not hold up CUDA waits, DNS lookups or the engine's own
    ``asyncio.to_thread`` calls, which share asyncio's default executor."""
    go_on = threading.Event()
    unlink = BlockFiles.unlink

    def stuck_unlink(self: BlockFiles, key_: bytes) -> None:
        go_on.wait(10)
        unlink(self, key_)

    keys = [bytes([i]) * 32 for i in range(40)]
    async with DiskTier(
        tmp_path, LAYOUT, 64 * DiskTier.bytes_per_block(LAYOUT), max_workers=2
    ) as tier:
        await tier.write_from(list(range(40)), keys, torch.zeros(40, BB, dtype=torch.uint8))
        monkeypatch.setattr(BlockFiles, "unlink", stuck_unlink)
        discards = [asyncio.create_task(tier.discard([slot])) for slot in range(40)]
        try:
            await asyncio.sleep(0.05)
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 2) == "ran"
        finally:
            go_on.set()
            await asyncio.gather(*discards)
    assert not list(tmp_path.glob("*.kvb"))
