"""What a replay measured, as an attrs value, a dict for ``--json`` and a rich table."""

from __future__ import annotations

from typing import Any

import attrs
from rich.table import Table

from kvtier.offload.stats import TierStats

__all__ = ["ReplayReport", "TierReport", "render", "tier_report"]


@attrs.frozen
class TierReport:
    """One lower tier's share of a replay.

    Attributes:
        name: The tier.
        hits: Blocks found there by lookups / blocks looked up there.
        queries: Blocks looked up there.
        stored_blocks: Blocks the offload manager's stores wrote to it
            (demotions into it are counted in ``demotions``).
        loaded_blocks: Blocks loaded from it toward the device.
        evictions: Blocks evicted from it.
        demotions: Blocks demoted into it from the tier above.
        store_gbps: Store throughput of the pipeline into it.
        load_gbps: Load throughput of the pipeline out of it.
        failed_transfers: Blocks of failed transfers.
        bytes_stored: Bytes written to it, by stores, demotions and flushes.
        bytes_loaded: Bytes loaded from it toward the device.
        probed_blocks: Blocks found by lookup-time probes of this shared tier
            (stored by another engine after this one opened).
        restored_blocks: Blocks the tier held when the replay opened it (a
            disk tier reopened on an earlier run's ``--workdir``): loads of
            them count as hits like any other.
        flushed_blocks: Blocks copied into it from the tier above when the
            replay closed the stack (``[offload] flush_on_close``), for the
            next run on the same ``--workdir``.
        dropped_stores: Blocks not stored because the tier was full of blocks
            being written or read (pinned or reserved) and no tier below took
            or held them: lost, not failed.
        failed_probes: Lookup-time probes of this shared tier that failed or
            timed out (each counted as a miss).
        spilled_blocks: Of ``stored_blocks``, blocks stored into this tier
            straight from the device because the tiers above had no room.
    """

    name: str
    hits: int
    queries: int
    stored_blocks: int
    loaded_blocks: int
    evictions: int
    demotions: int
    store_gbps: float
    load_gbps: float
    failed_transfers: int
    bytes_stored: int = 0
    bytes_loaded: int = 0
    probed_blocks: int = 0
    restored_blocks: int = 0
    flushed_blocks: int = 0
    dropped_stores: int = 0
    failed_probes: int = 0
    spilled_blocks: int = 0


def tier_report(name: str, stats: TierStats) -> TierReport:
    """A :class:`TierReport` from the offload manager's counters."""
    return TierReport(
        name,
        stats.hits,
        stats.queries,
        stats.stores,
        stats.loads,
        stats.evictions,
        stats.demotions,
        stats.store_gbps,
        stats.load_gbps,
        stats.failed_transfers,
        stats.bytes_stored,
        stats.bytes_loaded,
        stats.probed_blocks,
        stats.restored_blocks,
        stats.flushed,
        stats.dropped_stores,
        stats.failed_probes,
        stats.spilled_stores,
    )


@attrs.frozen
class ReplayReport:
    """A replay's results.

    Attributes:
        workload: The workload's name.
        requests: Requests replayed.
        prompt_tokens: Prompt tokens over all requests.
        device_hit_tokens: Tokens the device prefix cache held.
        loaded_tokens: Tokens loaded from lower tiers (every block verified).
        declined_tokens: Lower-tier hits the prefetch policy left to compute
            (too slow to stage within its budget).
        prefetch: The prefetch policy's name.
        verified_blocks: Blocks reused (device hits and loaded blocks), each
            compared byte for byte with the bytes it was computed with.
        failed_loads: Loads that came back (partly) failed and were recomputed.
        seconds: Wall time of the replay itself, from the first request to
            the last completion (its stores included); opening and closing
            the tiers are not counted.
        device: Where the device tier lived (``cpu`` or ``cuda``).
        tiers: One report per lower tier, fastest first.
        open_seconds: Wall time of opening the tiers before the first request
            (allocating the CPU tier, a disk tier's restart scan, connecting
            to Redis).
        close_seconds: Wall time of closing them after the last completion
            (``[offload] flush_on_close`` included).
        partial_loads: Of the failed loads, those that kept the blocks before
            the first failed one (recomputed from it on).
    """

    workload: str
    requests: int
    prompt_tokens: int
    device_hit_tokens: int
    loaded_tokens: int
    declined_tokens: int
    prefetch: str
    verified_blocks: int
    failed_loads: int
    seconds: float
    device: str
    tiers: tuple[TierReport, ...]
    open_seconds: float = 0.0
    close_seconds: float = 0.0
    partial_loads: int = 0

    @property
    def saved_tokens(self) -> int:
        """Prefill tokens not computed: device hits plus lower-tier loads."""
        return self.device_hit_tokens + self.loaded_tokens

    @property
    def saved_ratio(self) -> float:
        """``saved_tokens / prompt_tokens``."""
        return self.saved_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` (derived ratios included)."""
        data = attrs.asdict(self)
        data["saved_tokens"] = self.saved_tokens
        data["saved_ratio"] = self.saved_ratio
        return data


def render(report: ReplayReport) -> list[Table]:
    """The report as rich tables: a summary and one row per tier."""
    summary = Table(title=f"kvtier replay: {report.workload}", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    rows = [
        ("requests", f"{report.requests:,}"),
        ("prompt tokens", f"{report.prompt_tokens:,}"),
        ("device prefix-cache hits", f"{report.device_hit_tokens:,} tokens"),
        ("loaded from lower tiers", f"{report.loaded_tokens:,} tokens"),
        ("prefill saved", f"{report.saved_tokens:,} tokens ({report.saved_ratio:.1%})"),
        (f"hits declined by prefetch={report.prefetch}", f"{report.declined_tokens:,} tokens"),
        ("reused blocks verified byte for byte", f"{report.verified_blocks:,}"),
        ("failed loads (recomputed)", _failed_loads(report)),
        ("device tier", report.device),
        ("wall time", f"{report.seconds:.1f} s"),
        (
            "opening / closing the tiers",
            f"{report.open_seconds:.1f} s / {report.close_seconds:.1f} s",
        ),
    ]
    for row in rows:
        summary.add_row(*row)
    tiers = Table(title="lower tiers (blocks)")
    columns = ["tier", "hits", "stored", "loaded", "evicted", "demoted in", "failed"]
    warm = any(tier.restored_blocks for tier in report.tiers)
    if warm:  # only a warm start shows the column
        columns.insert(1, "restored")
    if any(tier.spilled_blocks for tier in report.tiers):  # a first tier short of room
        columns[columns.index("stored")] = "stored (spilled in)"
    flushed = any(tier.flushed_blocks for tier in report.tiers)
    if flushed:  # only flush_on_close shows the column
        columns.insert(len(columns) - 1, "flushed in")
    dropped = any(tier.dropped_stores for tier in report.tiers)
    if dropped:  # only a tier that was full of blocks in flight shows them
        columns[-1] = "failed / dropped"
    for column in columns:  # a narrow terminal wraps numbers, never cuts them to "…"
        tiers.add_column(column, justify="right", overflow="fold")
    traffic = Table(title="traffic (pipeline time per direction)")
    traffic_columns = ["tier", "stored", "store GB/s", "loaded", "load GB/s"]
    probes = any(tier.failed_probes for tier in report.tiers)
    if probes:  # only a shared tier that failed to answer shows the column
        traffic_columns.append("failed probes")
    for column in traffic_columns:
        traffic.add_column(column, justify="right", overflow="fold")
    for tier in report.tiers:
        ratio = tier.hits / tier.queries if tier.queries else 0.0
        restored = [f"{tier.restored_blocks:,}"] if warm else []
        tiers.add_row(
            tier.name,
            *restored,
            f"{ratio:.1%} of {tier.queries:,}",
            _stored(tier),
            f"{tier.loaded_blocks:,}",
            f"{tier.evictions:,}",
            f"{tier.demotions:,}",
            *([f"{tier.flushed_blocks:,}"] if flushed else []),
            f"{tier.failed_transfers:,}" + (f" / {tier.dropped_stores:,}" if dropped else ""),
        )
        traffic.add_row(
            tier.name,
            _mib(tier.bytes_stored),
            _gbps(tier.store_gbps),
            _mib(tier.bytes_loaded),
            _gbps(tier.load_gbps),
            *([f"{tier.failed_probes:,}"] if probes else []),
        )
    return [summary, tiers, traffic]


def _stored(tier: TierReport) -> str:
    """Blocks stored, with those spilled in past a full tier above: ``N (M)``."""
    spilled = f" ({tier.spilled_blocks:,})" if tier.spilled_blocks else ""
    return f"{tier.stored_blocks:,}{spilled}"


def _failed_loads(report: ReplayReport) -> str:
    if not report.partial_loads:
        return f"{report.failed_loads:,}"
    return f"{report.failed_loads:,} ({report.partial_loads:,} in part)"


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f} MiB" if nbytes else "-"


def _gbps(gbps: float) -> str:
    """GB/s, or ``-`` where no time was attributed (a staged hop is timed as one load)."""
    return f"{gbps:.2f}" if gbps else "-"
