"""Cumulative per-tier counters of the offload manager."""

from __future__ import annotations

import attrs

__all__ = ["OffloadStats", "TierStats"]


@attrs.define
class TierStats:
    """Counters of one lower tier, in blocks, since the manager started.

    Attributes:
        queries: Blocks looked up in this tier (those the tiers above missed),
            for requests the engine admitted: a request's lookup counts once,
            when :meth:`~kvtier.offload.manager.OffloadManager.update_state_after_alloc`
            records its allocation (its latest lookup), however often the
            engine asked while it could not allocate.
        hits: Of those, blocks this tier held.
        declined: Of those, blocks the manager's prefetch policy left to
            compute rather than wait for this tier (see
            :mod:`kvtier.policies.prefetch`).
        stores: Blocks written to this tier (completed) by stores from the
            device.
        spilled_stores: Of ``stores``, blocks written to this tier (below the
            first) straight from the device because the tiers above had no
            room for them (see :mod:`kvtier.offload.stores`).
        loads: Blocks read from this tier toward the device (completed).
        evictions: Blocks evicted from this tier to make room.
        demotions: Evicted blocks copied to the next tier down instead of dropped.
        failed_transfers: Blocks of transfers to or from this tier that failed.
        dropped_stores: Blocks not stored because the tier was full of pinned
            or reserved blocks and no tier below took them (eager and
            selective modes can spill them there, see
            :attr:`~kvtier.offload.manager.OffloadManager.spills`) or holds
            them already: lost, counted in the first tier. In
            lazy mode, which never spills, the unwritten blocks left at the
            device's eviction end (the tier's room ran out, or its own stores
            kept evicting their copies); a block counts once for as long as
            it waits there.
        flushed: Blocks copied into this tier from the volatile tier above
            when the manager closed (``flush_on_close``, see
            :mod:`kvtier.offload.flush`).
        bytes_stored: Bytes written to this tier by completed stores and by
            demotions and flushes into it (``stores`` counts only the former).
        bytes_loaded: Bytes loaded toward the device from this tier.
        store_seconds: Time the pipeline spent on those writes.
        load_seconds: Time the pipeline spent on those loads (staging included).
        probed_blocks: Blocks a lookup-time probe found in this (shared) tier
            and entered into its index (see :mod:`kvtier.offload.remote`).
        failed_probes: Probes of this tier that failed or timed out (each
            counted as a miss).
        restored_blocks: Blocks a persistent tier recovered when it was
            opened (a warm restart on a directory an earlier run filled).
    """

    queries: int = 0
    hits: int = 0
    declined: int = 0
    stores: int = 0
    loads: int = 0
    evictions: int = 0
    demotions: int = 0
    failed_transfers: int = 0
    dropped_stores: int = 0
    flushed: int = 0
    bytes_stored: int = 0
    bytes_loaded: int = 0
    store_seconds: float = 0.0
    load_seconds: float = 0.0
    probed_blocks: int = 0
    failed_probes: int = 0
    restored_blocks: int = 0
    spilled_stores: int = 0  # last: a field added later keeps the positions of the others

    @property
    def hit_ratio(self) -> float:
        """``hits / queries`` (0.0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0

    @property
    def store_gbps(self) -> float:
        """Stored bytes over store time, in GB/s (0.0 before any store)."""
        return self.bytes_stored / self.store_seconds / 1e9 if self.store_seconds else 0.0

    @property
    def load_gbps(self) -> float:
        """Loaded bytes over load time, in GB/s (0.0 before any load)."""
        return self.bytes_loaded / self.load_seconds / 1e9 if self.load_seconds else 0.0


@attrs.define
class OffloadStats:
    """A snapshot of the manager's counters.

    Attributes:
        tiers: One :class:`TierStats` per lower tier, in stack order.
        lookups: Requests looked up and then allocated (each once; see
            :attr:`TierStats.queries`).
        device_hit_blocks: Blocks the device prefix cache held at lookup.
        tokens_to_compute: Prompt tokens the lookups left to compute.
        loads_finished: Request loads that ended (each reported to the engine,
            unless its request finished first). A load the manager's close
            found never started is reported failed but not counted here (nor
            in ``loads_failed``): it moved nothing.
        loads_failed: Of those, loads that failed (in whole or in part).
        loads_partial: Of the failed ones, loads that failed in part: the
            blocks before the first failed one arrived (a block gone or bad).
    """

    tiers: dict[str, TierStats] = attrs.field(factory=dict)
    lookups: int = 0
    device_hit_blocks: int = 0
    tokens_to_compute: int = 0
    loads_finished: int = 0
    loads_failed: int = 0
    loads_partial: int = 0
