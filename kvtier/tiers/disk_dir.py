"""The disk tier's directory: its namespace, claiming it, and the warm-restart scan.

A :class:`~kvtier.tiers.disk.DiskTier` trusts the files of a directory only
when no one else could have put them there: the directory must be a real
directory (not a symlink) owned by this process's user, is tightened to
the owner's bits (``0700`` when created; group and other bits are removed,
the owner's are never added, so a directory made read-only stays so), and
is locked with ``flock`` so that a second open tier cannot
delete the first one's temp files. An empty file named after the layout's
fingerprint (``<hex>.layout``) marks whose blocks the directory holds: a
tier of another layout refuses the directory instead of deleting its blocks
(a changed dtype in a config would otherwise wipe a persistent cache). The
scan then verifies every block file and offers the valid ones back; torn,
corrupt, foreign and stray temp files are deleted, as are all the files
claiming one slot when there are several; a file it cannot read for a
reason of the file's own (:data:`SKIPPED_ERRORS`), and blocks of slots
beyond the capacity (written with a larger one), are left alone. Any other
error (``EMFILE``, ``ENOMEM``…: the process's or the system's) fails the
open: it would hit every file alike, and an index opened empty over files
that stay would have the next restart drop them all as ambiguous.

With ``fsync`` on, what opening creates is made durable before the tier
serves: each directory it created and the parent of the topmost one, and
the layout mark with its directory (nothing when all existed already).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Final

import cbor2

from kvtier.errors import ConfigError
from kvtier.log import get_logger
from kvtier.tiers._dir_lock import DirectoryLock, open_locked
from kvtier.tiers._disk_io import FILE_ERRORS, SUFFIX, TMP_PREFIX, BlockFiles
from kvtier.tiers.base import BlockKey, BlockLayout

__all__ = [
    "LAYOUT_SUFFIX",
    "SKIPPED_ERRORS",
    "check_direct_io",
    "claim_directory",
    "claim_layout",
    "listed_keys",
    "namespace_fingerprint",
    "prepare_directory",
    "scan",
]

_log = get_logger("kvtier.tiers.disk")
_LOCK_WAIT = 0.1  # seconds an open waits for a directory lock being let go
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_READ_ONLY: Final = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""Why a layout mark may fail in a directory kept read-only on purpose (then used unmarked)."""
LAYOUT_SUFFIX: Final = ".layout"
SKIPPED_ERRORS: Final = FILE_ERRORS | frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EOVERFLOW", "EFBIG", "ETXTBSY")
    if hasattr(errno, name)
)
"""Errors verifying a block file at open that concern that file alone: damage
(:data:`~kvtier.tiers._disk_io.FILE_ERRORS`: ``EIO``, ``EBADMSG``…), its
permissions (``EACCES``, ``EPERM``), its size (``EOVERFLOW``, ``EFBIG``) or its
use (``ETXTBSY``). The scan skips such a file and keeps it. Every other
error (``EMFILE``, ``ENFILE``, ``ENOMEM``, ``ENOBUFS``, ``EAGAIN``, a network
file system's ``ETIMEDOUT``… and any errno not listed) fails the open: it is
the process's or the system's, or unknown, and skipping would skip every file."""


def namespace_fingerprint(layout: BlockLayout, model: str) -> bytes:
    """The 16 bytes a disk tier's blocks and directory mark carry: layout, and model if any."""
    if not model:
        return layout.fingerprint()
    fields = ["kvtier.disk.namespace.v1", model, layout.fingerprint()]
    return hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()[:16]


def make_private_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents, each 0700 (existing ones are left alone).

    (``Path.mkdir(mode=..., parents=True)`` gives the parents the umask's
    mode, often 0755: a ``--workdir a/b`` would leave ``a`` and ``a/b``
    listable by every user.)

    Returns:
        The directories created, outermost first (made meanwhile by another
        process: not counted).

    Raises:
        FileExistsError: ``path`` is a file, or a link to one.
        OSError: A directory cannot be created.
    """
    missing: list[Path] = []
    created: list[Path] = []
    current = path
    while not os.path.lexists(current) and current.parent != current:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile; ``path`` itself is checked by the caller
            if directory == path and not directory.is_dir():
                raise
        else:
            created.append(directory)
    if not missing and not path.is_dir():
        raise FileExistsError(errno.EEXIST, "not a directory", str(path))
    return created


def claim_directory(path: Path, name: str) -> tuple[DirectoryLock, list[Path]]:
    """Create or check the directory (ours, private, not a link) and lock it.

    Args:
        path: The directory.
        name: The tier's name, for messages.

    Returns:
        The lock (releasing it closes its descriptor), and the directories
        created (see :func:`make_private_dirs`).

    Raises:
        ConfigError: The path is a symlink or not a directory, belongs to
            another user, or another open DiskTier holds it.
        OSError: It cannot be created, tightened or locked.
    """
    try:
        created = make_private_dirs(path)
    except FileExistsError as exc:  # a file (or a link to one) of that name
        raise ConfigError(f"tier {name}: {path} is a file, not a directory") from exc
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"tier {name}: {path} is not a directory (or is a symlink)")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"tier {name}: {path} belongs to uid {info.st_uid}, not to this "
            f"process (uid {os.geteuid()}): its files could have been planted"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~0o700:
        path.chmod(mode & 0o700)  # never adds a bit: a read-only directory stays read-only
    # The lock is on the directory itself: no extra file in it.
    # Registered as it opens, before it is locked: a fork from here on drops it.
    lock, fd = open_locked(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW)
    try:
        _flock(fd)
    except BlockingIOError as exc:
        lock.release()
        raise ConfigError(f"tier {name}: {path} is in use by another open DiskTier") from exc
    except BaseException:
        lock.release()
        raise
    return lock, created


def _flock(fd: int) -> None:
    """Lock ``fd``, waiting up to ``_LOCK_WAIT`` s for a holder that is letting go.

    A child forked a moment before the last holder closed may still hold a
    copy of its descriptor until the child's fork handler closes it (see
    :mod:`kvtier.tiers._dir_lock`): a close followed at once by a reopen
    must not be refused for that. A tier truly open elsewhere still is.

    Raises:
        BlockingIOError: The directory stayed locked.
    """
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def claim_layout(path: Path, fingerprint: bytes, name: str, *, fsync: bool = False) -> bool:
    """Mark the (claimed) directory with this layout; refuse one marked with another.

    A directory without any mark (made by an older kvtier) is marked now;
    its blocks of other layouts are dropped by the scan as before. One
    that cannot be marked because it is read-only (``EACCES``, ``EPERM``,
    ``EROFS``: made so by its owner) is used unmarked, with a warning: it
    can serve reads, and its writes fail anyway. Any other failure
    (``ENOSPC``, ``EIO``, ``EDQUOT``…) fails the open: an unmarked
    directory the tier writes into would let a later open with another
    layout delete its blocks instead of refusing it.

    Args:
        path: The directory.
        fingerprint: The layout's (and model's) fingerprint.
        name: The tier's name, for messages.
        fsync: ``fsync`` a mark made now (its directory is the caller's to sync).

    Returns:
        Whether the mark was made now.

    Raises:
        ConfigError: The directory is marked with another layout.
        OSError: The directory cannot be listed, or a mark made or synced
            (unless it is read-only).
    """
    ours = fingerprint.hex() + LAYOUT_SUFFIX
    others = sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name.endswith(LAYOUT_SUFFIX) and entry.name != ours
    )
    if others:
        raise ConfigError(
            f"tier {name}: {path} holds the blocks of another block layout or model "
            f"({others[0].removesuffix(LAYOUT_SUFFIX)[:16]}…, this one is "
            f"{fingerprint.hex()[:16]}…): give this layout and model their own directory, or "
            "delete that directory's files to reuse it"
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW
    try:
        mark = os.open(path / ours, flags, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _READ_ONLY:  # ENOSPC, EIO, EDQUOT…: the tier cannot work here
            raise
        _log.warning("tier_layout_unmarked", tier=name, error=str(exc))
        return False
    try:
        if fsync:
            os.fsync(mark)
    finally:
        os.close(mark)
    return True


def prepare_directory(
    files: BlockFiles, num_slots: int, name: str, created: list[Path]
) -> list[tuple[int, BlockKey]]:
    """Check ``O_DIRECT``, mark the layout, sync what was created, then scan.

    Args:
        files: The directory's block files.
        num_slots: The tier's capacity in blocks.
        name: The tier's name, for messages.
        created: The directories :func:`claim_directory` created.

    Returns:
        ``(slot, key)`` of every valid block (see :func:`scan`).

    Raises:
        ConfigError: ``O_DIRECT`` refused, or the directory holds another layout.
        OSError: The directory cannot be probed, marked, synced or scanned.
    """
    if files.direct:
        check_direct_io(files, name)
    marked = claim_layout(files.path, files.fingerprint, name, fsync=files.fsync)
    if files.fsync:  # cheap: only what this open created, once
        if created:
            _sync_parent(files, created[0].parent)
        synced = [*created]
        if marked and files.path not in synced:
            synced.append(files.path)
        for directory in synced:
            files.sync_directory(directory)
    return scan(files, num_slots, name)


def _sync_parent(files: BlockFiles, parent: Path) -> None:
    """Sync the directory above the ones an open created, as far as it can be.

    It is not the tier's: it may not be readable (a drop box like
    ``/var/lib/php/sessions``, mode 1733, can be written and searched but not
    opened: ``EACCES``), and then the new entry's durability is the file
    system's. A sync that fails (``EIO``) fails the open, as for the tier's
    own directory.
    """
    try:
        files.sync_directory(parent)
    except PermissionError as exc:  # it cannot be opened: a failed fsync is raised
        _log.warning("tier_parent_sync_failed", path=str(parent), error=str(exc))


def check_direct_io(files: BlockFiles, name: str) -> None:
    """Check that the directory's file system takes ``O_DIRECT``.

    Raises:
        ConfigError: It refuses ``O_DIRECT``.
        OSError: Another error of the probe.
    """
    try:
        files.probe_direct()
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, None):
            raise
        raise ConfigError(
            f"tier {name}: direct_io is not supported under {files.path}: {exc}"
        ) from exc


def scan(files: BlockFiles, num_slots: int, name: str) -> list[tuple[int, BlockKey]]:
    """Rebuild the index from the block files, dropping what does not verify.

    A valid block in a slot the tier does not have (it was opened with a
    larger capacity before) is skipped and kept, as a file unreadable for a
    reason of its own (:data:`SKIPPED_ERRORS`) is: reopening with that
    capacity finds it again, and the smaller tier never writes such a slot.
    Two files claiming one slot (one left by a delete that failed, or by a
    crash in the middle of a batch) are both dropped: nothing says which is
    the block the slot holds, and a miss is safe.

    Returns:
        ``(slot, key)`` of every valid block, by slot.

    Raises:
        OSError: The directory cannot be listed, or a block file cannot be
            verified for a reason that is not the file's (``EMFILE``…).
    """
    claims: dict[int, list[tuple[Path, BlockKey]]] = {}
    for entry in sorted(files.path.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            _drop(entry, "tier_temp_removed", name)
            continue
        if entry.suffix != SUFFIX:
            continue
        try:
            valid = files.verify(entry)
        except OSError as exc:  # unreadable is not invalid: keep the file, skip the block
            if exc.errno not in SKIPPED_ERRORS:  # the process's: every file would be skipped
                raise OSError(exc.errno, f"verifying {entry.name}: {exc.strerror or exc}") from exc
            _log.warning("tier_block_skipped", tier=name, file=entry.name, error=str(exc))
            continue
        if valid is None:
            _drop(entry, "tier_block_dropped", name)
            continue
        slot, key = valid
        if slot >= num_slots:  # a larger capacity's block: kept for it, never overwritten here
            _log.warning("tier_block_out_of_range", tier=name, file=entry.name, slot=slot)
            continue
        claims.setdefault(slot, []).append((entry, key))
    found: list[tuple[int, BlockKey]] = []
    for slot, claimants in sorted(claims.items()):
        if len(claimants) == 1:
            found.append((slot, claimants[0][1]))
            continue
        for entry, _ in claimants:  # which one the slot holds is unknown: a miss
            _drop(entry, "tier_block_dropped_ambiguous", name)
    return found


def _drop(entry: Path, event: str, name: str) -> None:
    """Delete a stray or invalid entry; one that cannot be deleted is logged and left."""
    try:
        entry.unlink(missing_ok=True)
    except OSError as exc:  # e.g. a directory named like a block
        _log.warning("tier_entry_kept", tier=name, file=entry.name, error=str(exc))
    else:
        _log.warning(event, tier=name, file=entry.name)


def listed_keys(path: Path) -> list[BlockKey]:
    """The keys of the block files in ``path`` (names ``<key hex>.kvb``), valid or not.

    Raises:
        OSError: The directory cannot be listed.
    """
    keys = []
    for name in os.listdir(path):
        if name.endswith(SUFFIX) and not name.startswith(TMP_PREFIX):
            try:
                keys.append(bytes.fromhex(name.removesuffix(SUFFIX)))
            except ValueError:  # not a name this tier makes: not its file
                continue
    return keys
