"""How much host memory this machine (or its container) can still hand out.

A CPU tier fills its whole storage when it opens (zeroed, then pinned on
CUDA machines), so a capacity larger than the memory left would page the
machine into the OOM killer instead of failing. :func:`host_shortfall` lets
the tier refuse first, from what Linux reports: ``MemAvailable`` in
``/proc/meminfo``, and the room left under a cgroup v2 memory limit. Where
neither can be read (another OS) nothing is refused.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_host_bytes", "host_shortfall"]

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def _mem_available() -> int | None:
    try:
        with MEMINFO.open(encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        used = int((CGROUP / "memory.current").read_text(encoding="ascii"))
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_host_bytes() -> int | None:
    """Bytes of host memory that can still be allocated; None when unknown."""
    known = [room for room in (_mem_available(), _cgroup_room()) if room is not None]
    return min(known) if known else None


def host_shortfall(nbytes: int) -> str | None:
    """Why ``nbytes`` of host memory cannot be allocated now, or None if they can (or unknown)."""
    available = available_host_bytes()
    if available is None or nbytes <= available:
        return None
    return (
        f"{nbytes / 2**30:.2f} GiB of host memory asked, {available / 2**30:.2f} GiB "
        "available on this machine: lower the capacity"
    )
