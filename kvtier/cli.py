"""The ``kvtier`` command.

``kvtier replay [CONFIG] [--trace FILE | --workload NAME] [options]`` runs a
workload through a real tier stack (the default stack of
``kvtier/replay/default.toml`` when no CONFIG is given) and prints what it
saved; ``--sweep`` compares the eviction policies with Belady's offline
optimum instead. Exit status: 0 on success, 1 when a reused block held wrong
bytes, 2 on bad input (usage, configuration, trace, a stack too large for this
machine) or output that cannot be written, 70 on an internal error (a bug in
kvtier: its traceback, then one line), 130 when interrupted (SIGINT or SIGTERM;
temporary files are removed first), 141 when the output's reader went away.
Errors are one line on stderr, usage errors included.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, NoReturn

from rich.console import Console
from rich.markup import escape
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
from kvtier.replay.signals import run_cancellable
from kvtier.replay.sweep import DEFAULT_FRACTIONS, check_plot_path

__all__ = ["main"]

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in kvtier, never a verdict on the cache's bytes
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # 128 + SIGPIPE: the output's reader went away (``kvtier replay | head``)


class _Output(Console):
    """stdout or stderr: a reader gone away is a ``BrokenPipeError``, not rich's ``SystemExit(1)``.

    (Status 1 means a reused block held wrong bytes.)
    """

    def on_broken_pipe(self) -> None:
        """Raise ``BrokenPipeError`` (``main`` returns :data:`EXIT_PIPE`)."""
        raise BrokenPipeError(errno.EPIPE, "the output's reader went away")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured, closed): nothing to flush
        pass


_CHAT_OPTIONS: Final = {
    "users": 16,
    "rounds": 6,
    "system_prompt": 2048,
    "question": 128,
    "answer": 256,
}


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) / 100 for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentages: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in (0, 100]: {text!r}")
    return values


def _policy_names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"no policy named in {text!r}")
    unknown = [name for name in names if name not in EVICTION_POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown)}; valid: {', '.join(EVICTION_POLICIES)}"
        )
    return names


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, like every other error (status 2 still)."""

    def error(self, message: str) -> NoReturn:
        """Print ``kvtier: error: MESSAGE (see PROG --help)`` and exit with status 2."""
        self.exit(EXIT_USAGE, f"kvtier: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvtier", description="KV-cache blocks across memory tiers.")
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
    run.add_argument("--limit", type=int, help="replay only the first N requests of the workload")
    chat = run.add_argument_group("chat workload (--workload chat)")
    chat.add_argument("--users", type=int, help="conversations (default 16)")
    chat.add_argument("--rounds", type=int, help="turns per conversation (default 6)")
    chat.add_argument("--system-prompt", type=int, help="shared system prompt tokens (2048)")
    chat.add_argument("--question", type=int, help="tokens per question (default 128)")
    chat.add_argument("--answer", type=int, help="tokens per answer (default 256)")
    run.add_argument(
        "--workdir",
        type=Path,
        help="where disk tiers without a path live (kept: a later run on it starts warm "
        "with the blocks left there, shown as 'restored')",
    )
    run.add_argument("--json", action="store_true", help="print JSON instead of tables")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--sweep",
        action="store_true",
        help="compare eviction policies and Belady's optimum at several capacities",
    )
    run.add_argument(
        "--policies",
        type=_policy_names,
        help=f"sweep: policies, comma-separated (default: all: {', '.join(EVICTION_POLICIES)})",
    )
    run.add_argument(
        "--capacities",
        type=_fractions,
        help="sweep: capacities in %% of the distinct blocks (default 1,5,10,25,50)",
    )
    run.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="sweep and draw hit ratio vs capacity"
    )
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that the chosen command would ignore.

    Raises:
        KVTierError: An option that does nothing here (the message names it).
    """
    if args.limit is not None and args.limit < 1:
        raise KVTierError(f"--limit must be >= 1, got {args.limit}")
    given = [name for name in _CHAT_OPTIONS if getattr(args, name) is not None]
    if given and args.workload != "chat":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise KVTierError(f"{flags} only {verb} to --workload chat")
    sweeping = args.sweep or args.plot is not None
    if not sweeping and (args.policies is not None or args.capacities is not None):
        raise KVTierError("--policies and --capacities only apply to --sweep or --plot")
    if sweeping and args.workdir is not None:
        raise KVTierError("--workdir does not apply to --sweep (it runs no tiers)")
    if args.plot is not None:
        check_plot_path(args.plot)


def _workload(args: argparse.Namespace) -> Workload:
    if args.trace is not None:
        try:
            return trace_workload(args.trace, limit=args.limit)
        except OSError as exc:
            raise _named("--trace", args.trace, exc) from exc
    name = args.workload or "mooncake"
    if name == "chat":
        options = {
            name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in _CHAT_OPTIONS.items()
        }
        workload = chat_workload(**options)
        return workload if args.limit is None else workload.head(args.limit)
    # A trace is read only as far as the limit (the whole one expands 61 M tokens).
    return WORKLOADS[name](limit=args.limit)


def _replay(
    config: KvtierConfig, workload: Workload, args: argparse.Namespace, console: Console
) -> ReplayReport:
    if args.json or args.no_progress:
        return run_cancellable(lambda: replay(config, workload, workdir=args.workdir))
    columns = (
        TextColumn("[bold]replay[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(workload.name, total=len(workload.prompts))
        advance: Callable[[int], None] = lambda n: progress.advance(task, n)  # noqa: E731
        return run_cancellable(
            lambda: replay(config, workload, progress=advance, workdir=args.workdir)
        )


def _run_sweep(
    config: KvtierConfig, workload: Workload, args: argparse.Namespace, out: Console
) -> None:
    rows = sweep(
        workload,
        block_size=config.layout.block_size,
        hash_algorithm=config.offload.hash,
        hash_seed=config.offload.hash_seed,
        fractions=args.capacities or DEFAULT_FRACTIONS,
        policies=args.policies,
    )
    title = f"hit ratio by capacity: {workload.name} ({config.layout.block_size}-token blocks)"
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
    else:
        out.print(render_sweep(rows, title=title))  # first: a plot that fails loses no result
    if args.plot is not None:
        plot_sweep(rows, args.plot, title=title)
        if not args.json:
            out.print(f"plot written to {args.plot}")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM: unwind as for Ctrl-C, so temporary tiers are removed."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvtier`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    out = _Output()
    err = _Output(stderr=True, soft_wrap=True)  # one line per error, whatever the width
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args, out, err)
    except BrokenPipeError:  # nobody reads (stdout or stderr) any more: nothing to say
        _silence_stdout()
        return EXIT_PIPE
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, out: Console, err: Console) -> int:
    try:
        with warnings.catch_warnings():  # the filters stay the user's (-W, PYTHONWARNINGS)
            warnings.showwarning = partial(_show_warning, err)
            return _run(args, out, err)
    except KeyboardInterrupt:
        err.print("kvtier: interrupted", markup=False, highlight=False)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as exc:  # a bug: its own status, never 1 (wrong bytes) or 2 (input)
        traceback.print_exception(exc, file=sys.stderr)
        err.print(
            f"[bold red]kvtier: internal error:[/] {escape(repr(exc))} (a bug in kvtier: "
            "please report it with the traceback above)",
            highlight=False,
        )
        return EXIT_INTERNAL


def _show_warning(err: Console, message: Warning | str, *_: object, **__: object) -> None:
    """A warning as one line on stderr, without Python's file and line."""
    err.print(f"[yellow]kvtier: warning:[/] {escape(str(message))}", highlight=False)


def _named(option: str, path: object, exc: OSError) -> KVTierError:
    """An unreadable input file as an error that names the option it came from."""
    return KVTierError(f"{option} {path}: {exc.strerror or exc}")


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    try:
        _check_options(args)
        try:
            config = load_config(args.config) if args.config is not None else default_config()
        except OSError as exc:
            raise _named("CONFIG", args.config, exc) from exc
        if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
            raise KVTierError(f"--workdir {args.workdir}: not a directory")
        if args.workdir is not None and not any(
            tier.kind == "disk" and tier.path is None for tier in config.tiers
        ):
            raise KVTierError(
                "--workdir holds the disk tiers without a path, and this config has none"
            )
        workload = _workload(args)
        if args.sweep or args.plot is not None:
            _write(lambda: _run_sweep(config, workload, args, out))
            return EXIT_OK
        report = _replay(config, workload, args, err)
        _write(lambda: _print_report(report, args, out))
    except BrokenPipeError:  # for main
        raise
    except ReplayIntegrityError as exc:
        err.print(f"[bold red]kvtier: integrity check failed:[/] {escape(str(exc))}")
        return EXIT_INTEGRITY
    except (KVTierError, OSError, Warning) as exc:  # a warning made an error by -W error
        err.print(f"[bold red]kvtier: error:[/] {escape(str(exc))}", highlight=False)
        return EXIT_USAGE
    except MemoryError:
        err.print(
            "[bold red]kvtier: error:[/] not enough memory for this stack: lower the "
            "tiers' capacities",
            highlight=False,
        )
        return EXIT_USAGE
    return EXIT_OK


def _print_report(report: ReplayReport, args: argparse.Namespace, out: Console) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for table in render(report):
            out.print(table)


def _write(output: Callable[[], None]) -> None:
    """Run ``output``; a failed write (a full disk) is an error that says so.

    Raises:
        KVTierError: The output could not be written.
        BrokenPipeError: Its reader went away.
    """
    try:
        output()
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise KVTierError(f"cannot write the output: {exc.strerror or exc}") from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
