"""Resetting the lower tiers: forget and delete every block they hold.

A base of :class:`~kvtier.offload.manager.OffloadManager`. An engine that
resets its device prefix cache because the KV it computed is no longer valid
(new weights, say) resets the lower tiers too, or their old blocks would be
loaded into new requests. vLLM's engine calls its connector's ``reset_cache``
for the same reason.

A reset is all or nothing and needs the transfers at rest: with a load or a
store planned or running it refuses (returns False) and changes nothing. It
makes every block of the tiers it covers invisible at once (one
``AllBlocksCleared`` per tier), so no lookup finds one from then on, then
deletes their bytes (a disk tier's files; host memory has nothing to
delete), and the blocks a lasting tier holds outside its slots (a
:class:`~kvtier.tiers.base.SweepingStore`: a disk tier's blocks of a larger
capacity, or files its scan could not read), and frees their slots once the
deletes ended; until then no store
reuses those slots or writes those keys, so a block of a retired key computed
meanwhile is not stored; other blocks are stored in free slots as usual (see
:meth:`~kvtier.tiers.index.TierIndex.retire`).

A shared tier (a :class:`~kvtier.tiers.base.ProbingStore`, such as Redis)
holds the blocks of every engine that uses it: one engine can neither tell
which are stale nor delete them safely (another may be writing the same key
afresh), and a probe would find them again. A reset with a shared tier in the
stack therefore has to say ``keep_shared=True``, and leaves that tier as it
is; KV for new weights belongs under new keys there (a ``cache_salt`` or hash
seed naming the weights version) or a new key prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from kvtier.errors import ClosedError, InvalidRequestError
from kvtier.log import get_logger
from kvtier.offload.transfers import Transfers
from kvtier.offload.writeback import WriteBack
from kvtier.tiers.base import BlockKey, BlockStore, ProbingStore, SweepingStore
from kvtier.tiers.index import TierIndex

__all__ = ["CacheReset", "ResetsRunning"]

_log = get_logger("kvtier.offload")

Retired = dict[int, list[tuple[int, BlockKey]]]
"""Tier level → ``(slot, key)`` of the blocks a reset retired there."""


class ResetsRunning:
    """The async resets whose deletes are running: leaving the manager waits for them."""

    def __init__(self) -> None:
        self.count = 0
        self._over: anyio.Event | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a reset while its deletes run."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if not self.count and self._over is not None:
                over, self._over = self._over, None
                over.set()

    async def wait(self) -> None:
        """Until no reset is deleting (cancellations wait too: the deletes are bounded)."""
        with anyio.CancelScope(shield=True):
            while self.count:
                if self._over is None:
                    self._over = anyio.Event()
                await self._over.wait()


class CacheReset:
    """The lower tiers' reset of an offload manager (not constructed on its own).

    :class:`~kvtier.offload.manager.OffloadManager` sets the state these use.
    """

    tiers: list[BlockStore]
    indexes: list[TierIndex]
    _transfers: Transfers
    _lazy: WriteBack
    _resets: ResetsRunning

    async def reset_cache(self, *, keep_shared: bool = False) -> bool:
        """Forget and delete every block of the lower tiers (async engines).

        Call it between steps, once
        :meth:`~kvtier.offload.waits.TransferWaits.wait_idle` returned and no
        request holds a planned load, beside the device's
        :meth:`~kvtier.manager.KVCacheManager.reset_prefix_cache`. The tiers
        forget their blocks before this awaits anything; it returns once the
        bytes are deleted (a cancelled call still finishes the deletes first).
        A delete that fails is logged (``reset_discard_failed``): the block
        is forgotten all the same, and a disk tier deletes its file again at
        close.

        Leaving the manager (from another task) while the deletes run waits
        for them before the tiers close.

        Args:
            keep_shared: Leave the shared tiers (Redis) as they are; required
                when the stack has one (see :mod:`kvtier.offload.reset`).
                Their blocks are still found and loaded afterwards, old
                bytes included: KV of new weights needs its own key prefix
                there (reopen the manager with it).

        Returns:
            True once reset; False, changing nothing, while a load or a store
            is planned or running (with ``world_size > 1``, a store also until
            every worker reported it), or another reset is still deleting.

        Raises:
            ClosedError: The manager is not entered, or entered with ``with``
                (call :meth:`reset_cache_blocking` then).
            InvalidRequestError: A shared tier is in the stack and
                ``keep_shared`` is False (nothing changed).
        """
        self._transfers.runtime.check_running()  # not entered, or left: say so first
        if self._transfers.runtime.thread_mode:
            raise ClosedError(
                "under `with`, call reset_cache_blocking(); reset_cache() is for a manager "
                "entered with `async with`"
            )
        retired = self._retire(keep_shared)
        if retired is None:
            return False
        try:
            # Counted: leaving the manager (from another task) waits for the
            # deletes before the tiers close; a tier closed first keeps its files.
            with self._resets.running(), anyio.CancelScope(shield=True):
                await _discard_all(self.tiers, retired)
        finally:
            self._release(retired)
        return True

    def reset_cache_blocking(self, *, keep_shared: bool = False) -> bool:
        """:meth:`reset_cache` for synchronous engines (the manager entered with ``with``).

        The deletes run on the manager's background loop; the engine's thread
        waits for them.

        Raises:
            ClosedError: The manager is not entered with ``with`` (nothing changed).
            InvalidRequestError: As :meth:`reset_cache`.
        """
        if not self._transfers.runtime.thread_mode:
            raise ClosedError(
                "reset_cache_blocking needs the manager entered with `with`; "
                "under `async with`, await reset_cache()"
            )
        retired = self._retire(keep_shared)
        if retired is None:
            return False
        try:
            self._transfers.runtime.call(_discard_all, self.tiers, retired)
        finally:
            self._release(retired)
        return True

    def _retire(self, keep_shared: bool) -> Retired | None:
        """Make every block of the covered tiers invisible; None when refused."""
        transfers = self._transfers
        transfers.runtime.check_running()
        transfers.drain()
        shared = [tier.name for tier in self.tiers if isinstance(tier, ProbingStore)]
        if shared and not keep_shared:
            raise InvalidRequestError(
                f"shared tier(s) {', '.join(map(repr, shared))} hold every engine's blocks "
                "and cannot be reset from one engine: pass keep_shared=True to reset the "
                "other tiers (and store KV for new weights under a new key prefix there)"
            )
        levels = [lvl for lvl, tier in enumerate(self.tiers) if not isinstance(tier, ProbingStore)]
        held = [self.indexes[lvl].num_pinned + self.indexes[lvl].num_reserved for lvl in levels]
        if transfers.loads or transfers.stores or any(held):
            _log.warning(
                "reset_cache_refused",
                loads=len(transfers.loads),
                stores=len(transfers.stores),
                blocks_held=sum(held),
            )
            return None
        retired: Retired = {}
        for lvl in levels:
            retired[lvl] = self.indexes[lvl].retire() or []  # none held: never refused
        self._lazy.restart()
        _log.info(
            "cache_reset",
            tiers=[self.tiers[lvl].name for lvl in levels],
            n_blocks=sum(map(len, retired.values())),
        )
        return retired

    def _release(self, retired: Retired) -> None:
        """Free the retired blocks' slots (their bytes are deleted, or given up on)."""
        for lvl, blocks in retired.items():
            if blocks:
                self.indexes[lvl].unpin([key for _, key in blocks])
        self._lazy.restart()


async def _discard_all(tiers: list[BlockStore], retired: Retired) -> None:
    """Delete the retired blocks' bytes, tier by tier, then what a lasting tier holds unmapped.

    A failure is logged.
    """
    for lvl, blocks in retired.items():
        tier = tiers[lvl]
        try:
            if blocks:
                await tier.discard([slot for slot, _ in blocks])
        except Exception as exc:  # forgotten all the same (a disk tier retries at close)
            _log.warning(
                "reset_discard_failed", tier=tier.name, n_blocks=len(blocks), error=repr(exc)
            )
        if isinstance(tier, SweepingStore):
            try:
                swept = await tier.discard_unmapped()
            except Exception as exc:
                _log.warning("reset_sweep_failed", tier=tier.name, error=repr(exc))
            else:
                if swept:
                    _log.info("reset_swept", tier=tier.name, n_blocks=swept)
