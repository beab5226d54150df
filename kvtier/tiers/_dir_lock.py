"""The ``flock`` a disk tier holds on its directory, which a forked child lets go of.

``flock`` locks belong to an open file description, and a forked child
shares its parent's: while the child lives (an engine worker forked after
the cache was set up), the lock would outlive the parent's ``aclose`` and a
reopen would be refused as "in use". A handler registered with
:func:`os.register_at_fork` therefore closes, in the child only, the
descriptor of every lock held at the fork. Closing the child's duplicate
does not release the parent's lock (the description stays open in the
parent), so the parent keeps the directory and the child holds nothing.
The child's locks are marked :attr:`DirectoryLock.forked`: the tier that
holds one is closed there, and never closes the descriptor number again (by
then it may be another file's).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

__all__ = ["DirectoryLock"]

_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()
"""The locks held in this process (weak: a lock's registration never keeps it alive)."""
_FORKING = threading.Lock()
"""Held across a fork, and across opening or closing a lock's descriptor: a fork
never sees a descriptor that is open but not registered, or registered but closed."""


def open_locked(path: str | os.PathLike[str], flags: int) -> tuple[DirectoryLock, int]:
    """Open ``path``'s descriptor and register it as a lock, with no fork in between.

    Returns:
        The lock and its descriptor (to ``flock``).
    """
    with _FORKING:
        fd = os.open(path, flags)
        return DirectoryLock(fd), fd


class DirectoryLock:
    """The descriptor holding a directory's ``flock`` (closing it releases the lock).

    Args:
        fd: An open descriptor of the directory, registered at once (before it
            is locked) so that no fork after this leaves it in a child.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._mutex = threading.Lock()  # release may race a release from another loop
        self.forked = False
        """This is a forked child's copy: the descriptor was closed at the fork."""
        _HELD.add(self)

    @property
    def fd(self) -> int | None:
        """The descriptor, None once released (or in a forked child)."""
        return self._fd

    def release(self) -> None:
        """Close the descriptor (releasing the lock); later calls do nothing."""
        with _FORKING, self._mutex:
            fd, self._fd = self._fd, None
            _HELD.discard(self)
            if fd is not None:
                os.close(fd)

    def _drop_in_child(self) -> None:
        """Close the child's copy of the descriptor; the parent's lock stays held."""
        fd, self._fd = self._fd, None
        self.forked = True
        self._mutex = threading.Lock()  # the parent's may have been held by another thread
        if fd is not None:
            with contextlib.suppress(OSError):  # already gone: nothing of ours to close
                os.close(fd)


def _before_fork() -> None:
    _FORKING.acquire()


def _after_fork_in_parent() -> None:
    _FORKING.release()


def _after_fork_in_child() -> None:
    """Let go of every directory lock the parent held (the child runs one thread now).

    The fork lock was taken for this fork (:func:`_before_fork`): released
    here as in the parent, so the child can fork in turn.
    """
    _FORKING.release()
    for lock in list(_HELD):
        lock._drop_in_child()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
