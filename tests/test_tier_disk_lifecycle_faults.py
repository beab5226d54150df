"""DiskTier: errors of the opening scan, discards against cancellation and writes, fork, open.

A scan error that is the process's (``EMFILE``…) fails the open instead of
opening an empty index over files that stay; a cancelled discard still
deletes its files, and a write of a key being deleted is refused; a forked
child lets go of the directory lock; concurrent entrants share one open;
with ``fsync`` the directories an open creates are synced.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import stat
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from structlog.testing import capture_logs

from kvtier.errors import ClosedError, InvalidRequestError, TierIOError
from kvtier.tiers import _disk_io
from kvtier.tiers._dir_lock import DirectoryLock
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk_dir import LAYOUT_SUFFIX
from tests.factories import entries
from tests.test_tier_disk_close_restart import LAYOUT, blocks, read

PER_BLOCK = DiskTier.bytes_per_block(LAYOUT)
WAIT = 60.0  # seconds a hang is waited for before the test fails (never reached when correct)


def tier_at(path: Path, slots: int = 16, *, fsync: bool = False) -> DiskTier:
    return DiskTier(path, LAYOUT, slots * PER_BLOCK, fsync=fsync)


def key(i: int) -> bytes:
    return bytes([i]) * 36


def name(i: int) -> str:
    return key(i).hex() + ".kvb"


async def fill(path: Path, n: int) -> None:
    async with tier_at(path) as tier:
        await tier.write_from(list(range(n)), [key(i) for i in range(n)], blocks(n))


# -- 1. scan errors: the process's fail the open, the file's are skipped --------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT])
async def test_a_scan_error_of_the_process_fails_the_open_and_keeps_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    await fill(tmp_path, 4)
    real = _disk_io.open_trusted

    def exhausted(path: Path, flags: int) -> int:
        raise OSError(failure, os.strerror(failure))  # every file alike: not the file's fault

    monkeypatch.setattr(_disk_io, "open_trusted", exhausted)
    tier = tier_at(tmp_path, slots=4)
    with pytest.raises(TierIOError, match=os.strerror(failure)):
        await tier.__aenter__()
    assert {p.name for p in entries(tmp_path)} == {name(i) for i in range(4)}
    monkeypatch.setattr(_disk_io, "open_trusted", real)
    # The lock was released: the same tier opens on a retry, with every block.
    async with tier:
        assert [slot for slot, _ in await tier.recover()] == [0, 1, 2, 3]
        assert torch.equal(await read(tier, [0, 1, 2, 3], [key(i) for i in range(4)]), blocks(4))


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", [errno.EIO, errno.EACCES, errno.EPERM])
async def test_a_scan_error_of_one_file_skips_and_keeps_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    await fill(tmp_path, 3)
    real = _disk_io.open_trusted

    def one_bad(path: Path, flags: int) -> int:
        if path.name == name(1):
            raise OSError(failure, os.strerror(failure), str(path))
        return real(path, flags)

    monkeypatch.setattr(_disk_io, "open_trusted", one_bad)
    async with tier_at(tmp_path) as tier:
        assert [slot for slot, _ in await tier.recover()] == [0, 2]
    assert (tmp_path / name(1)).exists()


# -- 2. a cancelled discard still deletes its files --------------------------------------


@pytest.mark.asyncio
async def test_a_discard_cancelled_before_its_thread_runs_still_deletes_the_file(
    tmp_path: Path,
) -> None:
    async with tier_at(tmp_path) as tier:
        await tier.write_from([0, 1], [key(1), key(2)], blocks(2))
        with anyio.CancelScope() as scope:
            scope.cancel()  # a timeout around the call that has already expired
            await tier.discard([0])
        assert not (tmp_path / name(1)).exists()
        await tier.write_from([0], [key(3)], blocks(1, seed=3))  # slot 0 reused
    async with tier_at(tmp_path) as tier:
        assert list(await tier.recover()) == [(0, key(3)), (1, key(2))]
        assert torch.equal(await read(tier, [0], [key(3)]), blocks(1, seed=3))


# -- 3. a write of a key being discarded is refused ---------------------------------------


@pytest.mark.asyncio
async def test_a_write_of_a_key_whose_discard_is_deleting_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blocks(2)
    entered, release = threading.Event(), threading.Event()
    real = BlockFiles.unlink

    def slow_unlink(self: BlockFiles, k: bytes) -> None:  # a busy disk
        entered.set()
        release.wait(WAIT)
        real(self, k)

    async with tier_at(tmp_path) as tier:
        await tier.write_from([0], [key(1)], data[:1])
        monkeypatch.setattr(BlockFiles, "unlink", slow_unlink)
        async with anyio.create_task_group() as group:
            group.start_soon(tier.discard, [0])
            try:
                assert await anyio.to_thread.run_sync(entered.wait, WAIT)
                with pytest.raises(InvalidRequestError, match="being written or deleted"):
                    await tier.write_from([5], [key(1)], data[1:])
            finally:
                release.set()  # (before the group waits for the discard)
        monkeypatch.setattr(BlockFiles, "unlink", real)
        await tier.write_from([5], [key(1)], data[1:])  # once deleted, the key is free
        assert torch.equal(await read(tier, [5], [key(1)]), data[1:])
    async with tier_at(tmp_path) as tier:
        assert list(await tier.recover()) == [(5, key(1))]


# -- 4. a forked child lets go of the directory lock ----------------------------------------


def _locked_by_another(path: Path) -> bool:
    """Whether another open file description holds ``path``'s flock."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _refused(coroutine: Coroutine[object, object, None], error: type[BaseException]) -> bool:
    """Whether the coroutine stops at its first step raising ``error`` (StopIteration: returns)."""
    try:
        coroutine.send(None)
    except error:
        return True
    coroutine.close()
    return False


def _child(tier: DiskTier, path: Path, data: torch.Tensor, report: int, go_on: int) -> str:
    """The forked child's checks.

    No event loop here (the coroutines are stepped by hand) and no torch
    call (its thread pools do not survive a fork).
    """
    checks: list[tuple[str, Callable[[], bool]]] = [  # in order: the first failure is reported
        ("the child's copy is not closed", lambda: tier.closed),
        (
            "closing the child's descriptor released the parent's lock",
            lambda: _locked_by_another(path),
        ),
        (
            "the child's copy wrote",
            lambda: _refused(tier.write_from([1], [key(1)], data), ClosedError),
        ),
        ("the child's aclose waited", lambda: _refused(tier.aclose(), StopIteration)),
    ]
    for problem, check in checks:
        if not check():
            return problem
    os.write(report, b"checked ")
    if not select.select([go_on], [], [], WAIT)[0] or not os.read(go_on, 1):
        return "the parent never closed"
    if _locked_by_another(path):  # the parent closed: no copy of the lock is left here
        return "the child still holds the lock"
    return "ok"


def _read_report(fd: int) -> bytes:
    ready = select.select([fd], [], [], WAIT)[0]
    return os.read(fd, 4096) if ready else b"(no report)"


@pytest.mark.asyncio
async def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path: Path) -> None:
    tier = tier_at(tmp_path)
    await tier.__aenter__()
    await tier.write_from([0], [key(0)], blocks(1))
    data = blocks(1, seed=1)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        result = "crashed"
        try:
            result = _child(tier, tmp_path, data, report_w, go_r)
        finally:
            os.write(report_w, result.encode())
            os._exit(0)
    try:
        assert await anyio.to_thread.run_sync(_read_report, report_r) == b"checked "
        assert not tier.closed  # the parent's tier is untouched
        assert torch.equal(await read(tier, [0], [key(0)]), blocks(1))
        await tier.aclose()
        async with tier_at(tmp_path) as again:  # while the child lives
            assert list(await again.recover()) == [(0, key(0))]
        os.write(go_w, b"!")
        assert await anyio.to_thread.run_sync(_read_report, report_r) == b"ok"
    finally:
        os.write(go_w, b"!")
        _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
        for fd in (report_r, report_w, go_r, go_w):
            os.close(fd)
        await tier.aclose()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_released_lock_never_closes_its_descriptor_number_again(tmp_path: Path) -> None:
    lock = DirectoryLock(os.open(tmp_path, os.O_RDONLY))
    lock.release()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT, 0o600)  # may reuse the number
    try:
        lock.release()
        os.fstat(other)  # still open
    finally:
        os.close(other)


def test_a_fork_waits_for_a_lock_being_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork from another thread while a lock closes its descriptor must not copy it."""
    from kvtier.tiers import _dir_lock

    lock, _ = _dir_lock.open_locked(tmp_path, os.O_RDONLY)
    closing, go = threading.Event(), threading.Event()
    order: list[str] = []
    real_close = os.close

    def close(fd: int) -> None:
        closing.set()
        go.wait(10)
        real_close(fd)
        order.append("closed")

    monkeypatch.setattr(_dir_lock.os, "close", close)
    releaser = threading.Thread(target=lock.release)
    releaser.start()
    assert closing.wait(10)

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        order.append("forked")
        os.waitpid(pid, 0)

    forker = threading.Thread(target=fork)
    forker.start()
    forker.join(0.2)  # waits for the release to end
    go.set()
    releaser.join(10)
    forker.join(10)
    assert order == ["closed", "forked"]


# -- 5. concurrent entrants share one open --------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_opens_of_one_tier_open_it_once(tmp_path: Path) -> None:
    await fill(tmp_path, 2)
    tier = tier_at(tmp_path)
    entered: list[DiskTier] = []

    async def enter() -> None:
        entered.append(await tier.__aenter__())

    with capture_logs() as logs:
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(enter)
    assert entered == [tier] * 3
    assert [e["event"] for e in logs].count("tier_open") == 1
    assert [slot for slot, _ in await tier.recover()] == [0, 1]
    await tier.write_from([2], [key(2)], blocks(1, seed=2))
    await tier.aclose()
    with pytest.raises(ClosedError):
        await tier.__aenter__()


@pytest.mark.asyncio
async def test_a_cancelled_open_leaves_the_tier_open_not_half_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(tmp_path, 2)
    entered, release = threading.Event(), threading.Event()
    real = BlockFiles.verify

    def slow_verify(self: BlockFiles, path: Path) -> tuple[int, bytes] | None:
        entered.set()
        release.wait(WAIT)
        return real(self, path)

    monkeypatch.setattr(BlockFiles, "verify", slow_verify)
    tier = tier_at(tmp_path)
    try:
        async with anyio.create_task_group() as group:

            async def open_cancelled() -> None:
                with anyio.CancelScope() as scope:
                    group.start_soon(cancel_when_scanning, scope)
                    await tier.__aenter__()

            async def cancel_when_scanning(scope: anyio.CancelScope) -> None:
                await anyio.to_thread.run_sync(entered.wait, WAIT)
                scope.cancel()
                release.set()

            group.start_soon(open_cancelled)
    finally:
        release.set()
    try:
        assert await tier.__aenter__() is tier  # not "in use by another open DiskTier"
        assert [slot for slot, _ in await tier.recover()] == [0, 1]
    finally:
        await tier.aclose()


# -- 6. fsync: what the open creates is synced ----------------------------------------------


@pytest.mark.asyncio
async def test_fsync_syncs_the_directories_and_the_mark_an_open_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    def inode(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_dev, info.st_ino

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "a" / "b" / "cache"
    async with tier_at(root, fsync=True):
        pass
    (mark,) = root.glob("*" + LAYOUT_SUFFIX)
    expected = [inode(p) for p in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", root, mark)]
    assert set(expected) <= set(synced)
    assert all(stat.S_ISDIR(os.stat(p).st_mode) for p in (tmp_path, root))
    synced.clear()
    async with tier_at(root, fsync=True):  # nothing created: nothing synced at open
        pass
    assert synced == []
    async with tier_at(tmp_path / "plain" / "cache"):  # fsync=False: never
        pass
    assert synced == []


@pytest.mark.asyncio
async def test_fsync_syncs_the_directory_after_a_discard_and_a_failed_sync_retries_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset's deletes must survive a power loss, or old blocks come back."""
    root = tmp_path / "cache"
    events: list[str] = []
    real_fsync, real_unlink = os.fsync, BlockFiles.unlink
    fail_sync = False

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append("sync")
            if fail_sync:
                raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    def unlink(self: BlockFiles, key_: bytes) -> None:
        events.append("unlink")
        real_unlink(self, key_)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(BlockFiles, "unlink", unlink)
    async with tier_at(root, fsync=True) as tier:
        await tier.write_from([0, 1, 2], [key(0), key(1), key(2)], blocks(3))
        events.clear()
        await tier.discard([0, 1])
        assert events == ["unlink", "unlink", "sync"]
        fail_sync = True
        with pytest.raises(TierIOError):
            await tier.discard([2])
        fail_sync = False
        events.clear()
    assert events == ["unlink", "sync"]  # tried again at close
    async with tier_at(root) as tier:
        assert await tier.recover() == []


@pytest.mark.asyncio
async def test_a_parent_the_open_cannot_sync_is_logged_and_the_tier_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory above the tier's may be write-and-search only (mode 1733): not its to sync."""
    real = os.open
    parent = tmp_path / "dropbox"
    parent.mkdir()

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == parent and flags & getattr(os, "O_DIRECTORY", 0):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(os, "open", open_)
    with capture_logs() as logs:
        async with tier_at(parent / "cache", fsync=True) as store:
            await store.write_from([0], [key(1)], blocks(1))
    assert "tier_parent_sync_failed" in [entry["event"] for entry in logs]


def test_a_forked_child_can_fork_in_turn() -> None:
    """The fork lock taken for a fork is let go in the child too (a worker's own workers)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(10)  # a hang ends the child: the parent sees the signal
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0)
        os.waitpid(grandchild, 0)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.asyncio
async def test_a_parent_whose_fsync_fails_fails_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a parent that cannot be opened is skipped: an fsync error is the disk's."""
    real = os.fsync
    parent = os.stat(tmp_path)

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == (parent.st_dev, parent.st_ino):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TierIOError, match="Input/output error"):
        async with tier_at(tmp_path / "cache", fsync=True):
            pass


@pytest.mark.asyncio
async def test_an_open_waits_a_moment_for_a_lock_being_let_go(tmp_path: Path) -> None:
    """A forked child's copy of the last holder's descriptor closes a moment later."""
    async with tier_at(tmp_path):
        pass
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the child's copy, say
    threading.Timer(0.03, os.close, (held,)).start()
    async with tier_at(tmp_path):  # not refused as "in use"
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
async def test_a_layout_mark_that_fails_for_want_of_room_or_io_fails_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Only a directory read-only on purpose is used unmarked.

    A directory left unmarked while the tier writes blocks into it would let
    a later open with another layout delete them all instead of refusing.
    """
    from kvtier.tiers import disk_dir

    real_open = os.open

    def no_room_for_the_mark(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(LAYOUT_SUFFIX) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(disk_dir.os, "open", no_room_for_the_mark)
    tier = tier_at(tmp_path / "cache")
    with pytest.raises(TierIOError):
        await tier.__aenter__()
    monkeypatch.undo()
    assert not list((tmp_path / "cache").glob("*.kvb"))
    async with tier_at(tmp_path / "cache") as tier:  # room again: opened and marked
        assert list((tmp_path / "cache").glob("*" + LAYOUT_SUFFIX))
        await tier.write_from([0], [key(0)], blocks(1, 0))
