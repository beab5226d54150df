"""The offload manager: per-step store and load planning over the tier stack."""

from kvtier.offload.manager import OffloadManager
from kvtier.offload.plan import (
    FinishedLoad,
    HitInfo,
    LoadSpec,
    SchedulerOutput,
    StepPlan,
    StoreSpec,
    WriteMode,
)
from kvtier.offload.stats import OffloadStats, TierStats

__all__ = [
    "FinishedLoad",
    "HitInfo",
    "LoadSpec",
    "OffloadManager",
    "OffloadStats",
    "SchedulerOutput",
    "StepPlan",
    "StoreSpec",
    "TierStats",
    "WriteMode",
]
