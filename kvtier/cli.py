"""The ``kvtier`` command.

``kvtier replay [CONFIG] [--trace FILE | --workload NAME] [options]`` runs a
workload through a real tier stack (the default stack of
``kvtier/replay/default.toml`` when no CONFIG is given) and prints what it
saved; ``--sweep`` compares the eviction policies with Belady's offline
optimum instead. Exit status: 0 on success, 1 when a reused block held wrong
bytes, 2 on bad input (usage, configuration, trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvtier.config import KvtierConfig, load_config
from kvtier.errors import KVTierError
from kvtier.policies import EVICTION_POLICIES
from kvtier.replay import (
    WORKLOADS,
    ReplayIntegrityError,
    ReplayReport,
    Workload,
    chat_workload,
    default_config,
    plot_sweep,
    render,
    render_sweep,
    replay,
    sweep,
    trace_workload,
)
from kvtier.replay.sweep import DEFAULT_FRACTIONS

__all__ = ["main"]

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_USAGE = 2


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) / 100 for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentages: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in (0, 100]: {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description="KV-cache blocks across memory tiers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "replay",
        help="replay a workload through a real tier stack",
        description=(
            "Replay a workload through a real kvtier stack (device prefix cache, offload "
            "manager, transfer pipeline, CPU and disk tiers) with real bytes, checking every "
            "reused block byte for byte. With no arguments: the bundled Mooncake trace on the "
            "default device + CPU + disk stack."
        ),
    )
    run.add_argument("config", nargs="?", type=Path, help="a TOML stack (default: built in)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--trace", type=Path, help="a Mooncake-format trace (.jsonl or .jsonl.xz)")
    source.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        help="a built-in workload (default: mooncake, the bundled trace)",
    )
    run.add_argument("--limit", type=int, help="replay only the first N requests of a trace")
    chat = run.add_argument_group("chat workload (--workload chat)")
    chat.add_argument("--users", type=int, default=16, help="conversations (default 16)")
    chat.add_argument("--rounds", type=int, default=6, help="turns per conversation (default 6)")
    chat.add_argument("--system-prompt", type=int, default=2048, help="shared system prompt tokens")
    chat.add_argument("--question", type=int, default=128, help="tokens per question")
    chat.add_argument("--answer", type=int, default=256, help="tokens per answer")
    run.add_argument("--workdir", type=Path, help="where disk tiers without a path live")
    run.add_argument("--json", action="store_true", help="print JSON instead of tables")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--sweep",
        action="store_true",
        help="compare eviction policies and Belady's optimum at several capacities",
    )
    run.add_argument(
        "--policies",
        type=_names,
        help=f"sweep: policies, comma-separated (default: all: {', '.join(EVICTION_POLICIES)})",
    )
    run.add_argument(
        "--capacities",
        type=_fractions,
        default=DEFAULT_FRACTIONS,
        help="sweep: capacities in %% of the distinct blocks (default 1,5,10,25,50)",
    )
    run.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="sweep and draw hit ratio vs capacity"
    )
    return parser


def _workload(args: argparse.Namespace) -> Workload:
    if args.limit is not None and args.limit < 1:
        raise KVTierError(f"--limit must be >= 1, got {args.limit}")
    if args.trace is not None:
        return trace_workload(args.trace, limit=args.limit)
    name = args.workload or "mooncake"
    if name == "chat":
        workload = chat_workload(
            users=args.users,
            rounds=args.rounds,
            system_prompt=args.system_prompt,
            question=args.question,
            answer=args.answer,
        )
    else:
        workload = WORKLOADS[name]()
    if args.limit is not None:
        workload = Workload(workload.name, workload.prompts[: args.limit])
    return workload


def _replay(
    config: KvtierConfig, workload: Workload, args: argparse.Namespace, console: Console
) -> ReplayReport:
    if args.json or args.no_progress:
        return anyio.run(lambda: replay(config, workload, workdir=args.workdir))
    columns = (
        TextColumn("[bold]replay[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(workload.name, total=len(workload.prompts))
        advance: Callable[[int], None] = lambda n: progress.advance(task, n)  # noqa: E731
        return anyio.run(lambda: replay(config, workload, progress=advance, workdir=args.workdir))


def _run_sweep(
    config: KvtierConfig, workload: Workload, args: argparse.Namespace, out: Console
) -> None:
    rows = sweep(
        workload,
        block_size=config.layout.block_size,
        hash_algorithm=config.offload.hash,
        fractions=args.capacities,
        policies=args.policies,
    )
    title = f"hit ratio by capacity: {workload.name} ({config.layout.block_size}-token blocks)"
    if args.plot is not None:
        plot_sweep(rows, args.plot, title=title)
    if args.json:
        data: dict[str, Any] = {
            "workload": workload.name,
            "block_size": config.layout.block_size,
            "rows": [
                {
                    "fraction": r.fraction,
                    "capacity": r.capacity,
                    "belady": r.belady,
                    "policies": r.policies,
                }
                for r in rows
            ],
        }
        print(json.dumps(data, indent=2))
        return
    out.print(render_sweep(rows, title=title))
    if args.plot is not None:
        out.print(f"plot written to {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvtier`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    out = Console()
    err = Console(stderr=True)
    try:
        config = load_config(args.config) if args.config is not None else default_config()
        workload = _workload(args)
        if args.sweep or args.plot is not None:
            _run_sweep(config, workload, args, out)
            return EXIT_OK
        report = _replay(config, workload, args, err)
    except ReplayIntegrityError as exc:
        err.print(f"[bold red]kvtier: integrity check failed:[/] {exc}")
        return EXIT_INTEGRITY
    except (KVTierError, OSError) as exc:
        err.print(f"[bold red]kvtier: error:[/] {exc}", highlight=False)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for table in render(report):
            out.print(table)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
