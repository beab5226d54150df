"""Positional file I/O for block files: trusted opens, whole reads and writes.

:func:`open_trusted` opens a file only if this user could have written it
as a block file: never through a symbolic link (``O_NOFOLLOW``), never
blocking on a FIFO (``O_NONBLOCK``), and only a regular file with one link,
owned by the effective user, with no group or other permission bits.
:func:`read_all` and :func:`write_all` finish the short transfers that
``preadv`` / ``pwritev`` may return (FUSE and network file systems do),
restarting at an aligned offset for ``O_DIRECT``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["O_SAFE", "UntrustedFileError", "open_trusted", "read_all", "write_all"]

O_SAFE: Final = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
"""Flags of every open of a block file or directory: no link followed, no FIFO waited on."""


class UntrustedFileError(OSError):
    """A directory entry that is not a block file this user wrote (link, FIFO, foreign owner)."""


def open_trusted(path: Path, flags: int) -> int:
    """``os.open`` without following links, then check the file is ours.

    Raises:
        FileNotFoundError: No such file.
        UntrustedFileError: A symlink, not a regular file (a socket or a
            device whose open fails with ``ENXIO`` included), more than one
            link, another owner, or group/other permission bits.
        OSError: Any other error of the open.
    """
    try:
        fd = os.open(path, flags | O_SAFE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFileError(errno.ELOOP, "a symbolic link", str(path)) from exc
        if exc.errno == errno.ENXIO or _not_regular(path):  # a socket, a device, a directory
            raise UntrustedFileError(exc.errno, "not a regular file", str(path)) from exc
        raise
    try:
        info = os.fstat(fd)  # NFS and FUSE can fail it (ESTALE, EIO, ENOTCONN)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_nlink != 1
            or info.st_uid != os.geteuid()
            or info.st_mode & 0o077
        ):
            raise UntrustedFileError(errno.EPERM, "not a private regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_regular(path: Path) -> bool:
    """Whether ``path`` names something other than a regular file (a failed open's cause)."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False  # gone, or unreadable: the open's own error says it


def write_all(
    fd: int, parts: list[memoryview], size: int, *, align: int = 1, offset: int = 0
) -> None:
    """``pwritev`` the parts at ``offset``, finishing short writes.

    A retry starts at the last ``align``-byte boundary written (``O_DIRECT``
    needs aligned offsets and buffers: the parts are then one page-aligned
    view written at offset 0, so its slices at aligned offsets stay aligned).

    Raises:
        OSError: A write moved no bytes, or a retry did not get past the next
            ``align`` boundary (``EIO`` both: retrying again could loop for
            ever), or the write failed.
    """
    if not _all(os.pwritev, fd, parts, size, offset, align, "write"):
        raise OSError(errno.EIO, "a write moved no bytes")


def read_all(fd: int, parts: list[memoryview], size: int, offset: int, *, align: int = 1) -> bool:
    """``preadv`` ``size`` bytes at ``offset`` into the parts, finishing short reads.

    A short read (legitimate on FUSE or network file systems) goes on from
    the last ``align``-byte boundary read, as :func:`write_all` does.

    Returns:
        False if the file ended first.

    Raises:
        OSError: The read failed, or a retry did not get past the next
            ``align`` boundary (``EIO``).
    """
    return _all(os.preadv, fd, parts, size, offset, align, "read")


def _all(
    move: Callable[[int, list[memoryview], int], int],
    fd: int,
    parts: list[memoryview],
    size: int,
    offset: int,
    align: int,
    what: str,
) -> bool:
    """``move`` (``os.preadv`` or ``os.pwritev``) ``size`` bytes, short calls taken up again.

    Returns:
        False when a call moved no bytes (a read: the file ended).
    """
    done = move(fd, parts, offset)
    floor = -1
    while done < size:
        floor = _resume_at(done, align, floor, what)
        moved = move(fd, _rest(parts, floor), offset + floor)
        if moved <= 0:
            return False
        done = floor + moved
    return True


def _resume_at(done: int, align: int, floor: int, what: str) -> int:
    """The ``align`` boundary a retry starts at, past the previous retry's ``floor``.

    Raises:
        OSError: ``EIO``: the last call did not cross the next boundary, so
            each retry would start over from the same place.
    """
    resume = done - done % align
    if resume <= floor:
        raise OSError(errno.EIO, f"a {what} made no progress past byte {resume}")
    return resume


def _rest(parts: list[memoryview], offset: int) -> list[memoryview]:
    """The parts' bytes from ``offset`` on, as views (no copy)."""
    rest: list[memoryview] = []
    for part in parts:
        if offset >= len(part):
            offset -= len(part)
            continue
        rest.append(part[offset:])
        offset = 0
    return rest
