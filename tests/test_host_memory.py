"""Memory tiers larger than the host memory left are refused before anything is allocated.

The machine's memory is faked the way Linux reports it: a ``meminfo`` file
and cgroup v2 / v1 directories in ``tmp_path``.
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
    """A machine with 64 MiB available and no cgroup limit (until a test writes one).

    The process runs in cgroup ``/app/job``, below the cgroup root.
    """
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000000 kB\nMemFree:  1000 kB\nMemAvailable:  65536 kB\n")
    cgroup = tmp_path / "cgroup"
    (cgroup / "app" / "job").mkdir(parents=True)
    own = tmp_path / "self-cgroup"
    own.write_text("0::/app/job\n")
    monkeypatch.setattr(_host, "MEMINFO", meminfo)
    monkeypatch.setattr(_host, "CGROUP", cgroup)
    monkeypatch.setattr(_host, "SELF_CGROUP", own)
    return tmp_path


def _limit(directory: Path, limit: str, current: int, inactive_file: int | None = None) -> None:
    (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.current").write_text(f"{current}\n")
    if inactive_file is not None:
        (directory / "memory.stat").write_text(f"anon 5\ninactive_file {inactive_file}\n")


def test_available_memory_is_the_least_of_meminfo_and_every_cgroup_room(machine: Path) -> None:
    root = machine / "cgroup"
    app, job = root / "app", root / "app" / "job"
    assert _host.available_host_bytes() == 64 * MiB
    _limit(root, "max", 10 * MiB)
    assert _host.available_host_bytes() == 64 * MiB  # no limit anywhere
    _limit(job, str(40 * MiB), 10 * MiB)
    assert _host.available_host_bytes() == 30 * MiB  # the process's own cgroup
    _limit(job, str(40 * MiB), 10 * MiB, inactive_file=4 * MiB)
    assert _host.available_host_bytes() == 34 * MiB  # inactive page cache is reclaimable
    _limit(app, str(20 * MiB), 0)
    assert _host.available_host_bytes() == 20 * MiB  # a parent's tighter limit
    (machine / "meminfo").write_text("MemTotal: 5 kB\n")  # no MemAvailable line
    assert _host.available_host_bytes() == 20 * MiB
    _limit(app, "lots", 0)
    _limit(job, "lots", 0)
    assert _host.available_host_bytes() is None  # nothing readable: nothing refused
    assert _host.host_shortfall(1 << 50) is None
    (machine / "self-cgroup").write_text("12:pids:/x\n")  # no memory cgroup named: v2 root
    _limit(root, str(8 * MiB), MiB)
    assert _host.available_host_bytes() == 7 * MiB


def _v1_limit(directory: Path, limit: int, usage: int, inactive_file: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(
        f"cache 9\ninactive_file 1\ntotal_inactive_file {inactive_file}\n"
    )


V1_NO_LIMIT = 9223372036854771712  # what a v1 cgroup without a limit reports


def test_cgroup_v1_memory_limits_count_too(machine: Path) -> None:
    """A v1 ``memory`` controller (hybrid or v1-only hosts) limits like a v2 cgroup."""
    v1 = machine / "cgroup" / "memory"
    job = v1 / "app" / "job"
    (machine / "self-cgroup").write_text("12:pids:/app\n4:memory:/app/job\n1:cpu,cpuacct:/\n")
    _v1_limit(v1, V1_NO_LIMIT, 5 * MiB)
    _v1_limit(job, V1_NO_LIMIT, MiB)
    assert _host.available_host_bytes() == 64 * MiB  # no limit: MemAvailable decides
    _v1_limit(job, 40 * MiB, 10 * MiB, inactive_file=2 * MiB)
    assert _host.available_host_bytes() == 32 * MiB
    _v1_limit(v1 / "app", 20 * MiB, 15 * MiB)
    assert _host.available_host_bytes() == 5 * MiB  # a parent's tighter room
    # Hybrid hosts name both hierarchies: every limit counts.
    (machine / "self-cgroup").write_text("4:memory:/app/job\n0::/app/job\n")
    _limit(machine / "cgroup" / "app" / "job", str(3 * MiB), 0)
    assert _host.available_host_bytes() == 3 * MiB


def test_a_v1_path_missing_from_the_mount_falls_back_to_what_exists(machine: Path) -> None:
    """In a container, /proc/self/cgroup may name the host's path; the mount's root is ours."""
    v1 = machine / "cgroup" / "memory"
    (machine / "self-cgroup").write_text("4:memory:/host/slice/container-1\n")
    _v1_limit(v1, 24 * MiB, 4 * MiB)
    assert _host.available_host_bytes() == 20 * MiB
    (v1 / "memory.limit_in_bytes").write_text("garbage\n")
    assert _host.available_host_bytes() == 64 * MiB  # unreadable: MemAvailable alone


USABLE = 64 * MiB - 64 * MiB // 10  # a tenth of what is available is kept free


def test_a_shortfall_names_what_was_asked_and_what_is_left(machine: Path) -> None:
    assert _host.host_shortfall(USABLE) is None
    message = _host.host_shortfall(USABLE + 1)
    assert message is not None
    assert "57.6 MiB of host memory asked, 64.0 MiB available on this machine, 6.4 MiB" in message
    assert _host.format_bytes(3 << 30) == "3.00 GiB"


def test_the_headroom_is_a_tenth_of_what_is_available_and_4_gib_at_most() -> None:
    assert _host.headroom(10 << 30) == 1 << 30
    assert _host.headroom(400 << 30) == 4 << 30


@pytest.mark.asyncio
async def test_a_cpu_tier_larger_than_the_memory_left_fails_to_open(machine: Path) -> None:
    blocks = USABLE // LAYOUT.block_bytes
    async with CpuTier(LAYOUT, blocks, pin_memory=False) as fits:
        assert fits.slot_view([0]).shape == (1, LAYOUT.block_bytes)
    tier = CpuTier(LAYOUT, blocks + 1, pin_memory=False)
    with pytest.raises(TierIOError, match=r"tier cpu: 57\.6 MiB of host memory asked, 64\.0 MiB"):
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
    config = machine / "big.toml"  # 8 KiB blocks: the index of 131,072 slots fits (6 MiB)
    config.write_text(STACK.format(cpu="1GiB").replace("head_size = 8", "head_size = 128"))
    assert (
        main(["replay", str(config), "--workload", "sample", "--limit", "2", "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "tier cpu: 1.00 GiB of host memory asked, 64.0 MiB available" in err
    assert err.strip().endswith("lower the tier's capacity")
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
    assert 'add a [[tiers]] kind = "device" with a capacity that fits' in err
    assert "tiers[0]" not in err


def test_replay_refuses_a_tier_whose_index_does_not_fit(
    machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """512-byte blocks: 1 GiB is 2 M slots, 96 MiB of index on a 64 MiB machine."""
    config = machine / "small-blocks.toml"
    config.write_text(STACK.format(cpu="1GiB"))
    assert main(["replay", str(config), *SAMPLE]) == 2
    err = capsys.readouterr().err
    assert "tiers[0].capacity: 1073741824 bytes in 2097152 blocks: its index" in err
    assert err.strip().endswith("lower it, or use larger blocks")
