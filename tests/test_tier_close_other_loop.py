"""A tier closed from another event loop than the one its operation runs on.

An engine's loop may close a tier while the offload runtime's loop (a
blocking portal) runs a batch on it: the close must wait for the batch and
then return, although the batch ends on the other loop.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
import torch

from kvtier.errors import ClosedError
from kvtier.tiers._disk_io import BlockFiles
from kvtier.tiers.base import BlockLayout, BlockStore
from kvtier.tiers.cpu import CpuTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gpu import DeviceTier

LAYOUT = BlockLayout(num_layers=2, block_size=4, num_kv_heads=2, head_size=8, dtype="float16")
BB = LAYOUT.block_bytes


def held_tier(
    kind: str,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    entered: threading.Event,
    release: threading.Event,
    portal: anyio.from_thread.BlockingPortal,
) -> BlockStore:
    """An open tier whose copies or file writes (in worker threads) wait for ``release``."""

    def hold() -> None:
        entered.set()
        release.wait(10)

    if kind == "disk":
        real = BlockFiles.write

        def write(self: BlockFiles, *args: Any, **kwargs: Any) -> Any:
            hold()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(BlockFiles, "write", write)
        disk = DiskTier(path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT), max_workers=1)
        portal.call(disk.__aenter__)
        return disk
    tier: CpuTier | DeviceTier
    if kind == "cpu":
        tier = CpuTier(LAYOUT, 8, offload_min_bytes=1)
        portal.call(tier.__aenter__)
    else:
        tier = DeviceTier(torch.zeros(8, BB, dtype=torch.uint8), LAYOUT, offload_min_bytes=1)
    copier = tier._live_copier()
    copy = copier.rows.copy

    def gated(*args: Any, **kwargs: Any) -> None:
        hold()
        copy(*args, **kwargs)

    monkeypatch.setattr(copier.rows, "copy", gated)
    return tier


@pytest.mark.parametrize("kind", ["cpu", "device", "disk"])
def test_a_close_on_another_loop_waits_for_the_batch_and_returns(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    data = torch.randint(0, 256, (2, BB), dtype=torch.uint8)
    outcome: dict[str, object] = {}
    with anyio.from_thread.start_blocking_portal() as portal:
        tier = held_tier(kind, tmp_path, monkeypatch, entered, release, portal)
        batch = portal.start_task_soon(tier.write_from, [0, 1], [b"\1" * 32, b"\2" * 32], data)
        assert entered.wait(10)

        def close_elsewhere() -> None:
            anyio.run(tier.aclose)
            outcome["closed"] = batch.done()  # only after the batch ended

        closer = threading.Thread(target=close_elsewhere, daemon=True)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()  # waiting for the batch
        release.set()
        batch.result(timeout=10)
        closer.join(20)
        assert not closer.is_alive(), "the close was never woken"
    assert outcome == {"closed": True}


def test_a_disk_write_past_its_open_check_when_another_loop_closes_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a call's open check and its batch's start (its checks; a device
    batch's copy to host) a close on another loop must not find nothing running,
    let the directory go, and have the write land in it afterwards."""
    checking, go_on = threading.Event(), threading.Event()
    disk = DiskTier(tmp_path, LAYOUT, 8 * DiskTier.bytes_per_block(LAYOUT))
    checked = disk._checked

    def slow_checked(*args: Any, **kwargs: Any) -> Any:
        checking.set()
        go_on.wait(10)  # the engine's loop is busy here (a device batch's copy)
        return checked(*args, **kwargs)

    data = torch.randint(0, 256, (1, BB), dtype=torch.uint8)
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(disk.__aenter__)
        monkeypatch.setattr(disk, "_checked", slow_checked)
        write = portal.start_task_soon(disk.write_from, [0], [b"\1" * 32], data)
        assert checking.wait(10)
        closing = threading.Thread(target=anyio.run, args=(disk.aclose,))
        closing.start()
        closing.join(0.2)
        go_on.set()
        closing.join(10)
        with pytest.raises(ClosedError):
            write.result(10)
    assert not list(tmp_path.glob("*.kvb"))
