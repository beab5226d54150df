"""Memory tiers larger than the host memory left are refused before anything is allocated.

The machine's memory is faked the way Linux reports it: a ``meminfo`` file
and a cgroup v2 directory in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.errors import TierIOError
from kvtier.tiers import _host
from kvtier.tiers.base import BlockLayout
from kvtier.tiers.cpu import CpuTier

LAYOUT = BlockLayout(num_layers=2, block_size=16, num_kv_heads=2, head_size=64)  # 16 KiB
MiB = 1 << 20


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with 64 MiB available and no cgroup limit (until a test writes one)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000000 kB\nMemFree:  1000 kB\nMemAvailable:  65536 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(_host, "MEMINFO", meminfo)
    monkeypatch.setattr(_host, "CGROUP", cgroup)
    return tmp_path


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_room(machine: Path) -> None:
    assert _host.available_host_bytes() == 64 * MiB
    (machine / "cgroup" / "memory.max").write_text("max\n")
    (machine / "cgroup" / "memory.current").write_text(f"{10 * MiB}\n")
    assert _host.available_host_bytes() == 64 * MiB  # no limit
    (machine / "cgroup" / "memory.max").write_text(f"{40 * MiB}\n")
    assert _host.available_host_bytes() == 30 * MiB
    (machine / "meminfo").write_text("MemTotal: 5 kB\n")  # no MemAvailable line
    assert _host.available_host_bytes() == 30 * MiB
    (machine / "cgroup" / "memory.max").write_text("lots\n")
    assert _host.available_host_bytes() is None  # nothing readable: nothing refused
    assert _host.host_shortfall(1 << 50) is None


def test_a_shortfall_names_what_was_asked_and_what_is_left(machine: Path) -> None:
    assert _host.host_shortfall(64 * MiB) is None
    message = _host.host_shortfall(64 * MiB + 1)
    assert message is not None
    assert "0.06 GiB of host memory asked, 0.06 GiB available" in message


@pytest.mark.asyncio
async def test_a_cpu_tier_larger_than_the_memory_left_fails_to_open(machine: Path) -> None:
    blocks = (64 * MiB) // LAYOUT.block_bytes
    async with CpuTier(LAYOUT, blocks, pin_memory=False) as fits:
        assert fits.slot_view([0]).shape == (1, LAYOUT.block_bytes)
    tier = CpuTier(LAYOUT, blocks + 1, pin_memory=False)
    with pytest.raises(TierIOError, match=r"tier cpu: .* GiB of host memory asked"):
        await tier.__aenter__()
    assert not tier.pinned
    async with CpuTier(LAYOUT, 4, pin_memory=False) as small:  # the tier class still serves
        assert small.num_slots == 4


SAMPLE = ["--workload", "sample", "--limit", "2", "--no-progress"]
STACK = """
[layout]
num_layers = 1
block_size = 16
num_kv_heads = 1
head_size = 8

[[tiers]]
kind = "cpu"
capacity = "{cpu}"
"""


def test_replay_refuses_a_stack_larger_than_the_memory_left(
    machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = machine / "big.toml"
    config.write_text(STACK.format(cpu="1GiB"))
    assert (
        main(["replay", str(config), "--workload", "sample", "--limit", "2", "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "tier cpu: 1.00 GiB of host memory asked, 0.06 GiB available" in err
    assert len(err.strip().splitlines()) == 1


def test_replay_names_the_implicit_device_cache_when_it_does_not_fit(
    machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = machine / "big-blocks.toml"  # 1 MiB blocks: 256 of them are more than 64 MiB
    config.write_text(STACK.format(cpu="16MiB").replace("head_size = 8", "head_size = 32768"))
    assert (
        main(["replay", str(config), "--workload", "sample", "--limit", "2", "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "the device cache (no device tier in the config" in err
    assert "tiers[0]" not in err
