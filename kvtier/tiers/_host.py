"""How much host memory this machine (or its container) can still hand out.

A CPU tier fills its whole storage when it opens (zeroed, then pinned on
CUDA machines), so a capacity larger than the memory left would page the
machine into the OOM killer instead of failing. :func:`host_shortfall` lets
the tier refuse first, from what Linux reports: ``MemAvailable`` in
``/proc/meminfo``, and the room left under every cgroup v2 memory limit
from this process's cgroup up to the root (a limit's usage counts the
inactive page cache as reclaimable, as ``MemAvailable`` does). Where none
of it can be read (another OS) nothing is refused.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

__all__ = ["available_host_bytes", "format_bytes", "host_shortfall"]

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def _mem_available() -> int | None:
    try:
        with MEMINFO.open(encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _own_cgroup() -> PurePosixPath:
    """This process's cgroup v2 path (``/`` when unknown or in a namespace's root)."""
    try:
        for line in SELF_CGROUP.read_text(encoding="ascii").splitlines():
            if line.startswith("0::"):
                return PurePosixPath(line[3:] or "/")
    except OSError:
        pass
    return PurePosixPath("/")


def _room(directory: Path) -> int | None:
    """Bytes left under one cgroup's ``memory.max``; None without a limit (or unreadable)."""
    try:
        limit = (directory / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        used = int((directory / "memory.current").read_text(encoding="ascii"))
        return max(0, int(limit) - used + _inactive_file(directory))
    except (OSError, ValueError):
        return None


def _inactive_file(directory: Path) -> int:
    """The cgroup's inactive page cache (reclaimable without swapping); 0 if unknown."""
    try:
        for line in (directory / "memory.stat").read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == "inactive_file":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """The least room under the memory limits of this process's cgroup and its ancestors."""
    own = _own_cgroup()
    rooms = []
    for level in (own, *own.parents):
        room = _room(CGROUP / level.relative_to("/"))
        if room is not None:
            rooms.append(room)
    return min(rooms) if rooms else None


def available_host_bytes() -> int | None:
    """Bytes of host memory that can still be allocated; None when unknown."""
    known = [room for room in (_mem_available(), _cgroup_room()) if room is not None]
    return min(known) if known else None


def format_bytes(count: int) -> str:
    """``count`` bytes in GiB, or MiB below one GiB (for messages)."""
    if count >= 1 << 30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"


def host_shortfall(nbytes: int) -> str | None:
    """Why ``nbytes`` of host memory cannot be allocated now, or None if they can (or unknown)."""
    available = available_host_bytes()
    if available is None or nbytes <= available:
        return None
    return (
        f"{format_bytes(nbytes)} of host memory asked, {format_bytes(available)} "
        "available on this machine"
    )
