"""``kvtier replay``: workloads through a real tier stack, with every reused byte checked.

:func:`replay` drives a simulated engine (no model) through the real
:class:`~kvtier.offload.OffloadManager`, transfer pipeline and tiers;
:func:`sweep` compares eviction policies with Belady's offline optimum.
"""

from kvtier.replay.defaults import default_config, default_config_path
from kvtier.replay.engine import ReplayIntegrityError, block_bytes, replay
from kvtier.replay.report import ReplayReport, TierReport, render
from kvtier.replay.sweep import SweepRow, plot_sweep, render_sweep, sweep
from kvtier.replay.workloads import (
    WORKLOADS,
    Workload,
    chat_workload,
    sample_workload,
    trace_workload,
)

__all__ = [
    "WORKLOADS",
    "ReplayIntegrityError",
    "ReplayReport",
    "SweepRow",
    "TierReport",
    "Workload",
    "block_bytes",
    "chat_workload",
    "default_config",
    "default_config_path",
    "plot_sweep",
    "render",
    "render_sweep",
    "replay",
    "sample_workload",
    "sweep",
    "trace_workload",
]
