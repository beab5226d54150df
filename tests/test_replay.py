"""The replay engine: real tiers, real pipeline, every reused byte checked."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import anyio
import pytest
import torch
from rich.console import Console

from kvtier.config import KvtierConfig, parse_config
from kvtier.errors import BlockMissingError, ConfigError
from kvtier.replay import (
    ReplayIntegrityError,
    ReplayReport,
    TierReport,
    Workload,
    block_bytes,
    chat_workload,
    default_config,
    render,
    replay,
    sample_workload,
    trace_workload,
)
from kvtier.replay.sweep import SweepRow, render_sweep, sweep
from kvtier.tiers.base import BlockKey, BlockStore
from tests.tier_doubles import FaultInjectingStore

BLOCK_BYTES = 2 * 16 * 1 * 8 * 2  # one layer, K and V, 16 tokens, one head of 8, fp16


def small_config(
    *,
    device_blocks: int = 64,
    cpu_blocks: int = 96,
    disk_blocks: int | None = 1024,
    mode: str = "eager",
    disk_path: Path | None = None,
    prefetch: dict[str, object] | None = None,
    spill_stores: bool = True,
) -> KvtierConfig:
    tiers: list[dict[str, object]] = [
        {"kind": "device", "capacity": device_blocks * BLOCK_BYTES},
        {"kind": "cpu", "capacity": cpu_blocks * BLOCK_BYTES},
    ]
    if disk_blocks is not None:
        disk: dict[str, object] = {"kind": "disk", "capacity": disk_blocks * BLOCK_BYTES}
        if disk_path is not None:
            disk["path"] = str(disk_path)
        tiers.append(disk)
    return parse_config(
        {
            "layout": {"num_layers": 1, "block_size": 16, "num_kv_heads": 1, "head_size": 8},
            "offload": {
                "write_mode": mode,
                **(prefetch or {"prefetch": "wait_complete"}),
                **({} if spill_stores else {"spill_stores": False}),
            },
            "tiers": tiers,
        }
    )


def small_chat() -> Workload:
    return chat_workload(users=6, rounds=4, system_prompt=256, question=32, answer=64)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["eager", "lazy", "selective"])
async def test_chat_replay_loads_from_lower_tiers_and_verifies_every_block(
    mode: str, tmp_path: Path
) -> None:
    workload = small_chat()
    report = await replay(small_config(mode=mode), workload, workdir=tmp_path)
    assert report.requests == 24
    assert report.prompt_tokens == workload.num_tokens
    assert report.device_hit_tokens > 0
    if mode == "selective":  # histories are hit once each on the device: none is stored
        assert report.verified_blocks == report.device_hit_tokens // 16
        return
    assert report.loaded_tokens > 0, "the device is too small to hold every history"
    reused_blocks = (report.device_hit_tokens + report.loaded_tokens) // 16
    assert report.verified_blocks == reused_blocks
    assert report.saved_tokens == report.device_hit_tokens + report.loaded_tokens
    assert 0 < report.saved_ratio < 1
    names = [tier.name for tier in report.tiers]
    assert names == ["cpu", "disk"]
    cpu = report.tiers[0]
    if mode == "eager":
        assert cpu.stored_blocks > 0
        assert cpu.bytes_stored == cpu.stored_blocks * BLOCK_BYTES
    assert cpu.loaded_blocks > 0
    assert cpu.bytes_loaded == cpu.loaded_blocks * BLOCK_BYTES
    assert report.tiers[0].hits <= report.tiers[0].queries


@pytest.mark.asyncio
async def test_hits_spill_to_disk_when_cpu_is_small(tmp_path: Path) -> None:
    report = await replay(small_config(cpu_blocks=48), small_chat(), workdir=tmp_path)
    disk = report.tiers[1]
    assert disk.demotions > 0  # CPU evictions are demoted, not dropped
    # Its writes, shown: demotions, and stores the full CPU tier spilled into it.
    assert disk.bytes_stored == (disk.demotions + disk.spilled_blocks) * BLOCK_BYTES
    assert disk.hits > 0
    assert disk.loaded_blocks > 0
    assert report.verified_blocks == (report.device_hit_tokens + report.loaded_tokens) // 16


@pytest.mark.asyncio
async def test_bigger_lower_tiers_save_at_least_as_much(tmp_path: Path) -> None:
    workload = small_chat()
    none_below = await replay(small_config(cpu_blocks=1, disk_blocks=None), workload)
    with_disk = await replay(small_config(), workload, workdir=tmp_path)
    assert with_disk.saved_tokens > none_below.saved_tokens


@pytest.mark.asyncio
async def test_a_second_replay_on_the_same_workdir_starts_warm(tmp_path: Path) -> None:
    workload = small_chat()
    cold = await replay(small_config(), workload, workdir=tmp_path)
    warm = await replay(small_config(), workload, workdir=tmp_path)
    assert [tier.restored_blocks for tier in cold.tiers] == [0, 0]
    cpu, disk = warm.tiers
    assert cpu.restored_blocks == 0  # the CPU tier does not persist
    assert 0 < disk.restored_blocks <= 1024
    # The blocks the first run left on disk serve the second from its first request.
    assert warm.loaded_tokens > cold.loaded_tokens
    assert warm.verified_blocks == (warm.device_hit_tokens + warm.loaded_tokens) // 16


@pytest.mark.asyncio
async def test_disk_tier_path_from_the_config_is_used(tmp_path: Path) -> None:
    where = tmp_path / "cache"
    await replay(small_config(cpu_blocks=48, disk_path=where), small_chat())
    assert where.is_dir()
    assert (where.stat().st_mode & 0o777) == 0o700
    assert any(where.rglob("*"))


class Wrapper(FaultInjectingStore):
    """A wrapper that opens and closes the tier it wraps."""

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()  # type: ignore[attr-defined]
        return self


class CorruptingStore(Wrapper):
    """Flips one byte of every block it reads: what a buggy tier would hand back."""

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        await super().read_into(slots, keys, out)
        out[:, 0] ^= 0xFF


@pytest.mark.asyncio
async def test_wrong_bytes_from_a_tier_fail_the_replay(tmp_path: Path) -> None:
    def corrupt(tier: BlockStore) -> BlockStore:
        return CorruptingStore(tier)

    with pytest.raises(ReplayIntegrityError, match="loaded block"):
        await replay(small_config(), small_chat(), workdir=tmp_path, wrap_tier=corrupt)


@pytest.mark.asyncio
async def test_a_failing_tier_turns_loads_into_recomputes(tmp_path: Path) -> None:
    from kvtier.errors import TierIOError

    wrapped: list[Wrapper] = []

    class AlwaysFailingReads(Wrapper):
        async def read_into(
            self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
        ) -> None:
            self.reads += 1
            raise TierIOError("EIO", tier=self.name)

    def failing(tier: BlockStore) -> BlockStore:
        store = AlwaysFailingReads(tier)
        wrapped.append(store)
        return store

    report = await replay(small_config(), small_chat(), workdir=tmp_path, wrap_tier=failing)
    assert sum(store.reads for store in wrapped) > 0
    assert report.loaded_tokens == 0
    assert report.failed_loads > 0
    assert report.verified_blocks == report.device_hit_tokens // 16


class LosingStore(Wrapper):
    """Loses a third of the blocks (chosen by key) on every read, garbling their rows."""

    async def read_into(
        self, slots: Sequence[int], keys: Sequence[BlockKey], out: torch.Tensor
    ) -> None:
        await super().read_into(slots, keys, out)
        lost = [i for i, key in enumerate(keys) if key[0] % 3 == 0]
        for i in lost:
            out[i].fill_(0xEE)
        if lost:
            raise BlockMissingError.of_slots(self.name, [slots[i] for i in lost])


@pytest.mark.asyncio
async def test_lost_blocks_cost_their_positions_on_and_the_report_counts_partial_loads(
    tmp_path: Path,
) -> None:
    report = await replay(
        small_config(), small_chat(), workdir=tmp_path, wrap_tier=LosingStore
    )  # every kept block is verified byte for byte: no ReplayIntegrityError
    assert report.failed_loads > 0
    assert 0 < report.partial_loads <= report.failed_loads
    assert report.loaded_tokens > 0
    assert report.to_dict()["partial_loads"] == report.partial_loads
    console = Console(width=200, record=True)
    for table in render(report):
        console.print(table)
    assert f"({report.partial_loads:,} in part)" in console.export_text()


@pytest.mark.asyncio
async def test_device_too_small_for_the_largest_prompt_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="largest prompt"):
        await replay(small_config(device_blocks=8), small_chat())


def test_block_bytes_depend_on_the_key_only() -> None:
    layout = small_config().layout
    a, b = block_bytes(layout, b"a" * 32), block_bytes(layout, b"b" * 32)
    assert a.shape == (layout.block_bytes,)
    assert a.dtype == torch.uint8
    assert torch.equal(a, block_bytes(layout, b"a" * 32))
    assert not torch.equal(a, b)


def test_default_config_is_device_cpu_disk_without_a_path() -> None:
    config = default_config()
    assert [t.kind for t in config.tiers] == ["device", "cpu", "disk"]
    assert config.tiers[2].path is None
    assert config.layout.block_size == 512


def test_workloads() -> None:
    chat = chat_workload(users=2, rounds=3, system_prompt=10, question=2, answer=3)
    assert len(chat.prompts) == 6
    first, second_round = chat.prompts[0], chat.prompts[2]
    assert second_round[: len(first)] == first  # a user's history is the next prompt's prefix
    assert chat.prompts[0][:10] == chat.prompts[1][:10]  # the shared system prompt
    assert len(sample_workload().prompts) == 200
    assert trace_workload(limit=3).name == "mooncake_synthetic"
    assert trace_workload(limit=3).prompts == sample_workload(limit=3).prompts
    with pytest.raises(ConfigError, match="users"):
        chat_workload(users=0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("prefetch", "disk_loads"),
    [
        ({"prefetch": "wait_complete"}, True),
        ({"prefetch": "best_effort"}, False),
        ({"prefetch": "timeout", "prefetch_timeout": "1000s"}, True),
        (
            {"prefetch": "timeout", "prefetch_timeout": 0, "prefetch_timeout_per_1k_tokens": 0},
            "first",  # the first staged load is free (no measurement yet), then none fit
        ),
    ],
)
async def test_prefetch_policy_decides_what_is_staged_from_disk(
    prefetch: dict[str, object], disk_loads: bool | str, tmp_path: Path
) -> None:
    config = small_config(cpu_blocks=48, prefetch=prefetch)
    report = await replay(config, small_chat(), workdir=tmp_path)
    disk = report.tiers[1]
    assert disk.hits > 0  # the disk held blocks the lookups found
    assert report.prefetch == prefetch["prefetch"]
    assert report.verified_blocks == (report.device_hit_tokens + report.loaded_tokens) // 16
    if disk_loads is True:
        assert disk.loaded_blocks > 0
        assert report.declined_tokens == 0
    elif disk_loads is False:
        assert disk.loaded_blocks == 0
        assert report.declined_tokens > 0
    else:
        assert report.declined_tokens > 0


@pytest.mark.asyncio
async def test_the_smallest_device_that_holds_the_largest_prompt_is_accepted() -> None:
    """A prompt of 5 blocks needs 5 device blocks beside the pool's null block: 6."""
    prompt = list(range(5 * 16))
    workload = Workload("five-blocks", [prompt, prompt])
    report = await replay(small_config(device_blocks=6, disk_blocks=None), workload)
    assert report.device_hit_tokens + report.loaded_tokens == 4 * 16  # the last block recomputed
    with pytest.raises(ConfigError, match=r"5 device blocks .* \(5 blocks, plus the pool's null"):
        await replay(small_config(device_blocks=5, disk_blocks=None), workload)


@pytest.mark.asyncio
async def test_stores_dropped_by_a_full_cpu_tier_are_reported(tmp_path: Path) -> None:
    """A CPU tier full of blocks being written drops stores: the report must say how many."""
    dropping = small_config(cpu_blocks=4, spill_stores=False)
    report = await replay(dropping, small_chat(), workdir=tmp_path)
    cpu = report.tiers[0]
    assert cpu.dropped_stores > 0
    assert report.to_dict()["tiers"][0]["dropped_stores"] == cpu.dropped_stores
    lines = text(report).splitlines()
    at = next(i for i, line in enumerate(lines) if "dropped" in line)  # the tiers' header
    row = next(line for line in lines[at:] if line.split("│")[1:2] == ["  cpu "])
    cells = [cell.strip() for cell in row.split("│")]
    names = [cell.strip() for cell in lines[at].split("┃")]
    failed = f"{cpu.failed_transfers:,} / {cpu.dropped_stores:,}"
    assert cells[names.index("failed / dropped")] == failed
    roomy = await replay(small_config(), small_chat(), workdir=tmp_path / "roomy")
    assert all(tier.dropped_stores == 0 for tier in roomy.tiers)
    assert "dropped" not in text(roomy)  # the column shows only when needed


@pytest.mark.asyncio
async def test_stores_a_full_cpu_tier_spills_to_disk_are_reported(tmp_path: Path) -> None:
    """With spilling (the default) the disk takes what the CPU tier had no room for."""
    dropping = await replay(small_config(cpu_blocks=4, spill_stores=False), small_chat())
    report = await replay(small_config(cpu_blocks=4), small_chat(), workdir=tmp_path)
    cpu, disk = report.tiers
    assert disk.spilled_blocks > 0
    assert disk.bytes_stored == (disk.demotions + disk.spilled_blocks) * BLOCK_BYTES
    assert cpu.spilled_blocks == 0
    assert cpu.dropped_stores < dropping.tiers[0].dropped_stores
    assert report.to_dict()["tiers"][1]["spilled_blocks"] == disk.spilled_blocks
    lines = text(report).splitlines()
    at = next(i for i, line in enumerate(lines) if "(spilled in)" in line)  # the tiers' header
    names = [cell.strip() for cell in lines[at].split("┃")]
    column = names.index("stored (spilled in)")
    end = next(i for i in range(at, len(lines)) if lines[i].startswith("└"))
    cells = {
        cells[1]: cells[column]
        for cells in ([cell.strip() for cell in line.split("│")] for line in lines[at:end])
        if len(cells) > column
    }
    assert cells["disk"] == f"{disk.stored_blocks:,} ({disk.spilled_blocks:,})"
    assert cells["cpu"] == f"{cpu.stored_blocks:,}"  # nothing spilled into it
    assert "spilled" not in text(dropping)  # the column shows only when needed


def test_failed_probes_of_a_shared_tier_get_a_column() -> None:
    def tier(name: str, failed_probes: int) -> TierReport:
        return TierReport(name, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, failed_probes=failed_probes)

    assert "failed probes" not in text(report_of(tier("cpu", 0), tier("redis", 0)))
    shown = text(report_of(tier("cpu", 0), tier("redis", 3)))
    redis_rows = [line for line in shown.splitlines() if line.startswith("│ redis")]
    assert redis_rows[-1].split("│")[-2].strip() == "3"  # the traffic table's last column


def test_a_narrow_terminal_wraps_the_tier_table_never_cuts_its_numbers() -> None:
    """Piped output is 80 columns: every optional column at once must still show every digit."""
    busy = TierReport(
        "cpu", 31_000, 52_345, 45_123, 31_000, 40_000, 12_345, 3.2, 5.1, 12,
        restored_blocks=12_000, flushed_blocks=3_000, dropped_stores=123_456, failed_probes=3,
        spilled_blocks=7_654,
    )  # fmt: skip
    shown = text(report_of(busy, TierReport("disk", 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0)), width=80)
    assert "…" not in shown  # a number too wide for its column is folded onto the next line
    for number in ("12,000", "45,123", "31,000", "40,000", "12,345", "3,000", "7,654"):
        assert number in shown


def report_of(*tiers: TierReport) -> ReplayReport:
    return ReplayReport("w", 1, 16, 0, 0, 0, "best_effort", 0, 0, 0.1, "cpu", tiers)


def text(report: ReplayReport, width: int = 200) -> str:
    console = Console(width=width, record=True)
    for table in render(report):
        console.print(table)
    return console.export_text()


class SlowToOpenAndClose(Wrapper):
    """Takes ``OPEN_CLOSE_DELAY`` to open and as long to close (a big tier, a flush)."""

    async def __aenter__(self) -> Self:
        await anyio.sleep(OPEN_CLOSE_DELAY)
        return await super().__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        await super().__aexit__(*exc_info)  # type: ignore[arg-type]
        await anyio.sleep(OPEN_CLOSE_DELAY)


OPEN_CLOSE_DELAY = 0.25


@pytest.mark.asyncio
async def test_wall_time_is_the_replay_alone_with_opening_and_closing_apart(
    tmp_path: Path,
) -> None:
    """docs/replay.md: wall time runs from the first request to the last completion."""
    started = time.perf_counter()
    report = await replay(
        small_config(), small_chat(), workdir=tmp_path, wrap_tier=SlowToOpenAndClose
    )
    total = time.perf_counter() - started
    slow = OPEN_CLOSE_DELAY * len(report.tiers)  # each lower tier sleeps on open and on close
    assert report.open_seconds >= slow
    assert report.close_seconds >= slow
    assert 0 < report.seconds <= total - 2 * slow  # neither is in the replay's time
    data = report.to_dict()
    assert (data["seconds"], data["open_seconds"]) == (report.seconds, report.open_seconds)
    assert data["close_seconds"] == report.close_seconds
    shown = text(report)
    assert "opening / closing the tiers" in shown
    assert f"{report.open_seconds:.1f} s / {report.close_seconds:.1f} s" in shown


def test_a_narrow_terminal_wraps_the_sweep_table_never_cuts_it() -> None:
    """Piped output is 80 columns: six policies' cells and headers are folded, not cut."""
    names = ["lru", "slru", "arc", "s3fifo", "prefix_slru", "lfu"]
    rows = [
        SweepRow(f, int(40_148 * f), 0.6512, {n: 0.4123 + i / 100 for i, n in enumerate(names)})
        for f in (0.01, 0.05, 0.5)
    ]
    console = Console(width=80, record=True)
    console.print(render_sweep(rows, title="hit ratio by capacity"))
    shown = console.export_text()
    assert "…" not in shown
    for number in ("65.12%", "41.23%", "46.23%", "(+21%)", "(2,007)", "50%"):
        assert number in shown


def test_the_sweep_hashes_with_the_configured_seed() -> None:
    """A seeded xxhash sweep warns of no random root and repeats itself exactly."""
    workload = sample_workload(limit=40)
    run = [
        sweep(workload, block_size=16, hash_algorithm="xxhash", hash_seed="s", fractions=[0.1])
        for _ in range(2)
    ]  # pytest makes a RandomRootHashWarning an error
    assert run[0] == run[1]
