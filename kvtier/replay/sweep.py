"""``kvtier replay --sweep``: hit ratio per policy and capacity, beside Belady's bound.

The workload's prompts are hashed at the configured block size; each
request's chain of block keys is replayed through every registered eviction
policy (:func:`kvtier.policies.simulation.simulate`) and through the offline
optimum (:func:`~kvtier.policies.simulation.belady`) at capacities given as
fractions of the workload's distinct blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
from rich.table import Table

from kvtier.block_hasher import BlockHasher
from kvtier.errors import ConfigError
from kvtier.policies import EVICTION_POLICIES, make_eviction_policy
from kvtier.policies.simulation import belady, simulate
from kvtier.replay.workloads import Workload
from kvtier.request import Request

__all__ = ["SweepRow", "plot_sweep", "render_sweep", "sweep"]

DEFAULT_FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50)


@attrs.frozen
class SweepRow:
    """Hit ratios at one capacity.

    Attributes:
        fraction: The capacity as a fraction of the distinct blocks.
        capacity: The capacity in blocks.
        belady: The offline optimum's hit ratio.
        policies: Each policy's hit ratio, by name.
    """

    fraction: float
    capacity: int
    belady: float
    policies: dict[str, float]

    def gap_closed(self, policy: str, baseline: str = "lru") -> float | None:
        """The share of the ``baseline``-to-Belady gap that ``policy`` closes.

        None when the baseline was not swept or already reaches Belady.
        """
        if baseline not in self.policies or self.belady <= self.policies[baseline]:
            return None
        base = self.policies[baseline]
        return (self.policies[policy] - base) / (self.belady - base)


def sweep(
    workload: Workload,
    *,
    block_size: int,
    hash_algorithm: str = "sha256",
    hash_seed: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    policies: Sequence[str] | None = None,
) -> list[SweepRow]:
    """Hit ratios of every policy (and Belady) at each capacity fraction.

    The prompts are hashed with ``BlockHasher(block_size, hash_algorithm,
    seed=hash_seed)``, as the replay hashes them (``[offload] hash`` and
    ``hash_seed``).

    Raises:
        ConfigError: A fraction outside (0, 1].
        UnknownNameError: An unknown policy name.
    """
    hasher = BlockHasher(block_size, hash_algorithm, seed=hash_seed)
    chains = [
        list(Request(f"s{i}", p, hasher).block_hashes) for i, p in enumerate(workload.prompts)
    ]
    keys = [[bytes(h) for h in chain] for chain in chains]
    distinct = len({key for chain in keys for key in chain})
    names = list(policies) if policies is not None else list(EVICTION_POLICIES)
    rows = []
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"sweep fractions must be in (0, 1], got {fraction!r}")
        capacity = max(1, int(distinct * fraction))
        ratios = {
            name: simulate(
                keys, capacity, make_eviction_policy(name, capacity), tags=workload.tags
            ).hit_ratio
            for name in names
        }
        rows.append(SweepRow(fraction, capacity, belady(keys, capacity).hit_ratio, ratios))
    return rows


def render_sweep(rows: Sequence[SweepRow], *, title: str) -> Table:
    """The sweep as a rich table: one row per capacity, one column per policy.

    Each policy cell reads ``hit ratio (share of the LRU-Belady gap closed)``
    when LRU was swept.
    """
    table = Table(title=title)
    names = list(rows[0].policies) if rows else []
    for column in ("capacity", "Belady", *names):  # a narrow terminal wraps, never cuts to "…"
        table.add_column(column, justify="right", overflow="fold")
    for row in rows:
        cells = [f"{row.fraction * 100:g}% ({row.capacity:,})", f"{row.belady:.2%}"]
        for name in names:
            closed = row.gap_closed(name) if name != "lru" else None
            extra = f" ({closed:+.0%})" if closed is not None else ""
            cells.append(f"{row.policies[name]:.2%}{extra}")
        table.add_row(*cells)
    return table


PLOT_FORMATS: Final = (".png", ".svg", ".pdf")
"""File name suffixes :func:`plot_sweep` writes."""


def check_plot_path(path: Path) -> None:
    """Check, before a sweep runs, that :func:`plot_sweep` can write ``path``.

    Raises:
        ConfigError: The suffix is not one of :data:`PLOT_FORMATS`, the path
            is a directory, its directory does not exist, it cannot be
            written, or matplotlib is not installed (``pip install
            'kvtier[plot]'``).
    """
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(f"--plot: {str(path)!r} must end in {', '.join(PLOT_FORMATS)}")
    if path.is_dir():
        raise ConfigError(f"--plot: {str(path)!r} is a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"--plot: the directory {str(path.parent)!r} does not exist")
    existed = path.exists()
    try:  # opened for real: os.access says yes to root where writes fail (/proc, NFS)
        with path.open("ab"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--plot: {str(path)!r} cannot be written: {exc.strerror or exc}"
        ) from exc
    if not existed:
        path.unlink(missing_ok=True)
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'kvtier[plot]'") from exc


def plot_sweep(rows: Sequence[SweepRow], path: Path, *, title: str) -> None:
    """Draw hit ratio against capacity per policy (and Belady) into ``path``.

    Raises:
        ConfigError: As :func:`check_plot_path`, or the file could not be written.
    """
    check_plot_path(path)
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'kvtier[plot]'") from exc
    figure, axes = plt.subplots(figsize=(7, 4.5))
    capacities = [row.fraction * 100 for row in rows]
    axes.plot(capacities, [r.belady * 100 for r in rows], "k--", label="Belady (offline)")
    for name in rows[0].policies if rows else ():
        axes.plot(capacities, [r.policies[name] * 100 for r in rows], marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("capacity (% of distinct blocks)")
    axes.set_ylabel("hit ratio (% of blocks)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"--plot: cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
