"""The disk tier's directory: claiming it, and the warm-restart scan.

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
claiming one slot when there are several; files it cannot read, and blocks
of slots beyond the capacity (written with a larger one), are left alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Final

from kvtier.errors import ConfigError
from kvtier.log import get_logger
from kvtier.tiers._disk_io import SUFFIX, TMP_PREFIX, BlockFiles
from kvtier.tiers.base import BlockKey

__all__ = ["LAYOUT_SUFFIX", "check_direct_io", "claim_directory", "claim_layout", "scan"]

_log = get_logger("kvtier.tiers.disk")
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
LAYOUT_SUFFIX: Final = ".layout"


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (existing ones are left alone).

    (``Path.mkdir(mode=..., parents=True)`` gives the parents the umask's
    mode, often 0755: a ``--workdir a/b`` would leave ``a`` and ``a/b``
    listable by every user.)

    Raises:
        FileExistsError: ``path`` is a file, or a link to one.
        OSError: A directory cannot be created.
    """
    missing: list[Path] = []
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
    if not missing and not path.is_dir():
        raise FileExistsError(errno.EEXIST, "not a directory", str(path))


def claim_directory(path: Path, name: str) -> int:
    """Create or check the directory (ours, private, not a link) and lock it.

    Args:
        path: The directory.
        name: The tier's name, for messages.

    Returns:
        The descriptor holding the lock (closing it releases the lock).

    Raises:
        ConfigError: The path is a symlink or not a directory, belongs to
            another user, or another open DiskTier holds it.
        OSError: It cannot be created, tightened or locked.
    """
    try:
        make_private_dirs(path)
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
    lock = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(lock)
        raise ConfigError(f"tier {name}: {path} is in use by another open DiskTier") from exc
    except BaseException:
        os.close(lock)
        raise
    return lock


def claim_layout(path: Path, fingerprint: bytes, name: str) -> None:
    """Mark the (claimed) directory with this layout; refuse one marked with another.

    A directory without any mark (made by an older kvtier) is marked now;
    its blocks of other layouts are dropped by the scan as before. One
    that cannot be marked (made read-only by its owner) is used unmarked,
    with a warning: it can serve reads, and its writes fail anyway.

    Raises:
        ConfigError: The directory is marked with another layout.
        OSError: The directory cannot be listed.
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
        os.close(os.open(path / ours, flags, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:  # EACCES, EROFS: a directory kept read-only on purpose
        _log.warning("tier_layout_unmarked", tier=name, error=str(exc))


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
    larger capacity before) is skipped and kept, as an unreadable file is:
    reopening with that capacity finds it again, and the smaller tier never
    writes such a slot. Two files claiming one slot (one left by a delete
    that failed, or by a crash in the middle of a batch) are both dropped:
    nothing says which is the block the slot holds, and a miss is safe.

    Returns:
        ``(slot, key)`` of every valid block, by slot.
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
