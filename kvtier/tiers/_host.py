"""How much host memory this machine (or its container) can still hand out.

A CPU tier fills its whole storage when it opens (zeroed, then pinned on
CUDA machines), so a capacity larger than the memory left would page the
machine into the OOM killer instead of failing. :func:`host_shortfall` lets
the tier refuse first, from what Linux reports: ``MemAvailable`` in
``/proc/meminfo``, and the room left under every cgroup memory limit
from this process's cgroup up to the root, in the v2 hierarchy and in the
v1 ``memory`` controller's (a limit's usage counts the inactive page cache
as reclaimable, as ``MemAvailable`` does). Where none of it can be read
(another OS) nothing is refused.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Final

import attrs

__all__ = ["available_host_bytes", "format_bytes", "headroom", "host_shortfall"]

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


@attrs.frozen
class _Hierarchy:
    """Where one cgroup version keeps its memory limits, and how it spells them."""

    mount: PurePosixPath
    """The hierarchy's mount, relative to :data:`CGROUP`."""
    limit: str
    usage: str
    inactive: str
    """The ``memory.stat`` line of reclaimable (inactive) page cache."""

    def no_limit(self, text: str) -> bool:
        # v1 reports "no limit" as the largest page-aligned counter (about 2**63).
        return text == "max" or (text.isdigit() and int(text) >= _V1_UNLIMITED)


_V1_UNLIMITED = 1 << 62
_V2 = _Hierarchy(PurePosixPath("."), "memory.max", "memory.current", "inactive_file")
_V1 = _Hierarchy(
    PurePosixPath("memory"),
    "memory.limit_in_bytes",
    "memory.usage_in_bytes",
    "total_inactive_file",
)


def _own_cgroups() -> list[tuple[_Hierarchy, PurePosixPath]]:
    """This process's memory cgroups: the v2 one and the v1 ``memory`` controller's.

    A hierarchy that ``/proc/self/cgroup`` does not name is left out; either
    path may be ``/`` (unknown, or the root of a cgroup namespace).
    """
    own: list[tuple[_Hierarchy, PurePosixPath]] = []
    try:
        lines = SELF_CGROUP.read_text(encoding="ascii").splitlines()
    except OSError:
        lines = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            own.append((_V2, PurePosixPath(path or "/")))
        elif "memory" in controllers.split(","):
            own.append((_V1, PurePosixPath(path or "/")))
    if not own:
        own.append((_V2, PurePosixPath("/")))
    return own


def _room(hierarchy: _Hierarchy, directory: Path) -> int | None:
    """Bytes left under one cgroup's limit; None without a limit (or unreadable)."""
    try:
        limit = (directory / hierarchy.limit).read_text(encoding="ascii").strip()
        if hierarchy.no_limit(limit):
            return None
        used = int((directory / hierarchy.usage).read_text(encoding="ascii"))
        return max(0, int(limit) - used + _inactive_file(directory, hierarchy.inactive))
    except (OSError, ValueError):
        return None


def _inactive_file(directory: Path, name: str) -> int:
    """The cgroup's inactive page cache (reclaimable without swapping); 0 if unknown."""
    try:
        for line in (directory / "memory.stat").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room() -> int | None:
    """The least room under the memory limits of this process's cgroups and their ancestors.

    Inside a container the path ``/proc/self/cgroup`` names may be the
    host's, absent from the container's mount; the walk up then finds the
    levels that exist (the mount's root is the container's own cgroup).
    """
    rooms = []
    for hierarchy, own in _own_cgroups():
        mount = CGROUP / hierarchy.mount
        for level in (own, *own.parents):
            room = _room(hierarchy, mount / level.relative_to("/"))
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


HEADROOM_MAX: Final = 4 << 30


def headroom(available: int) -> int:
    """Bytes kept free for the rest of the process: a tenth of what is available, 4 GiB at most.

    A tier that took every available byte passed the check and then got the
    process OOM-killed (a 16 GiB CPU tier beside a 6 GiB device cache on a
    23 GiB machine): the process, its allocator and the page cache need room.
    """
    return min(available // 10, HEADROOM_MAX)


def host_shortfall(nbytes: int) -> str | None:
    """Why ``nbytes`` of host memory cannot be allocated now, or None if they can (or unknown)."""
    available = available_host_bytes()
    if available is None or nbytes <= available - headroom(available):
        return None
    return (
        f"{format_bytes(nbytes)} of host memory asked, {format_bytes(available)} "
        f"available on this machine, {format_bytes(headroom(available))} of it kept free"
    )
