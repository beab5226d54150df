"""The ``kvtier`` command, run in-process through ``kvtier.cli.main``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvtier import cli
from kvtier.cli import main
from kvtier.replay import workloads
from kvtier.replay.workloads import sample_workload

SMALL_TOML = """
[layout]
num_layers = 1
block_size = 16
num_kv_heads = 1
head_size = 8

[[tiers]]
kind = "device"
capacity = "32KiB"

[[tiers]]
kind = "cpu"
capacity = "96KiB"

[[tiers]]
kind = "disk"
capacity = "1MiB"
"""
CHAT = ["--workload", "chat", "--users", "6", "--rounds", "4", "--system-prompt", "256"]
CHAT += ["--question", "32", "--answer", "64"]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL_TOML)
    return path


def test_replay_json(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", str(small), *CHAT, "--json", "--workdir", str(tmp_path / "w")])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"] == "chat-6x4"
    assert data["requests"] == 24
    assert data["loaded_tokens"] > 0
    assert data["verified_blocks"] == (data["device_hit_tokens"] + data["loaded_tokens"]) // 16
    assert data["saved_tokens"] == data["device_hit_tokens"] + data["loaded_tokens"]
    assert [tier["name"] for tier in data["tiers"]] == ["cpu", "disk"]
    assert any((tmp_path / "w").iterdir())


def test_replay_tables(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(small), *CHAT, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prefill saved" in out
    assert "reused blocks verified byte for byte" in out
    assert "lower tiers" in out
    assert "traffic" in out


def test_replay_on_a_reused_workdir_shows_restored_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "spills.toml"  # a CPU tier of 32 blocks: the chat spills to disk
    small.write_text(SMALL_TOML.replace('"96KiB"', '"16KiB"'))
    workdir = ["--workdir", str(tmp_path / "w")]
    assert main(["replay", str(small), *CHAT, "--no-progress", *workdir]) == 0
    assert "restored" not in capsys.readouterr().out  # a cold start has no such column
    assert main(["replay", str(small), *CHAT, "--json", *workdir]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tiers"][0]["restored_blocks"] == 0
    assert data["tiers"][1]["restored_blocks"] > 0
    assert main(["replay", str(small), *CHAT, "--no-progress", *workdir]) == 0
    assert "restored" in capsys.readouterr().out


def test_replay_with_flush_on_close_leaves_the_cpu_blocks_for_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "flush.toml"
    config.write_text(SMALL_TOML + "\n[offload]\nflush_on_close = true\n")
    workdir = ["--workdir", str(tmp_path / "w")]
    assert main(["replay", str(config), *CHAT, "--json", *workdir]) == 0
    cold = json.loads(capsys.readouterr().out)
    assert cold["tiers"][0]["flushed_blocks"] == 0  # nothing above the CPU tier
    assert cold["tiers"][1]["flushed_blocks"] > 0
    assert main(["replay", str(config), *CHAT, "--json", *workdir]) == 0
    warm = json.loads(capsys.readouterr().out)
    on_disk = cold["tiers"][1]["flushed_blocks"] + cold["tiers"][1]["demotions"]
    assert warm["tiers"][1]["restored_blocks"] == on_disk
    assert (
        main(["replay", str(config), *CHAT, "--no-progress", "--workdir", str(tmp_path / "t")]) == 0
    )
    assert "flushed" in capsys.readouterr().out  # the column shows when a tier was flushed


def test_replay_trace_with_limit(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = Path(__file__).resolve().parents[1] / "kvtier" / "data" / "mooncake_sample.jsonl"
    big_device = small.read_text().replace('"32KiB"', '"2MiB"')
    small.write_text(big_device)
    assert main(["replay", str(small), "--trace", str(trace), "--limit", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requests"] == 3
    assert data["workload"] == "mooncake_sample"


def test_sweep_json_reports_belady_beside_each_policy(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["replay", "--workload", "sample", "--sweep", "--json"]
    assert main([*args, "--policies", "lru,arc", "--capacities", "5,50"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["block_size"] == 512
    assert [row["fraction"] for row in data["rows"]] == [0.05, 0.5]
    for row in data["rows"]:
        assert set(row["policies"]) == {"lru", "arc"}
        for ratio in row["policies"].values():
            assert 0.0 <= ratio <= row["belady"] + 1e-12  # nothing beats the offline optimum
    assert data["rows"][0]["capacity"] < data["rows"][1]["capacity"]


def test_sweep_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    args = ["replay", "--workload", "sample", "--plot", str(plot), "--policies", "lru"]
    assert main([*args, "--capacities", "10,50"]) == 0
    out = capsys.readouterr().out
    assert "Belady" in out
    assert "plot written" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_that_cannot_be_written_keeps_the_table_and_names_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails only when the plot is saved (a full disk, a file system that
    refuses it): the sweep's table is printed first, and the error names --plot."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def no_room(self: Figure, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", no_room)
    plot = tmp_path / "sweep.png"
    args = ["replay", "--workload", "sample", "--plot", str(plot), "--policies", "lru"]
    assert main([*args, "--capacities", "10"]) == 2
    captured = capsys.readouterr()
    assert "Belady" in captured.out
    assert f"--plot: cannot write '{plot}': No space left on device" in captured.err


def test_a_plot_path_that_cannot_be_written_is_refused_before_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tried for real: /proc refuses new files even to root, whom os.access lets pass."""
    pytest.importorskip("matplotlib")
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    assert main(["replay", "--workload", "sample", "--plot", "/proc/kvtier-plot.png"]) == 2
    captured = capsys.readouterr()
    assert "--plot: '/proc/kvtier-plot.png' cannot be written" in captured.err
    assert "Belady" not in captured.out  # refused before the sweep ran
    plot = tmp_path / "new.png"
    assert main(["replay", "--workload", "sample", "--plot", str(plot), "--limit", "1"]) == 0
    assert plot.exists()  # the check's probe file became the plot


def test_a_workdir_that_is_a_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "afile"
    workdir.write_text("")
    assert main(["replay", "--workload", "sample", "--workdir", str(workdir)]) == 2
    assert f"--workdir {workdir}: not a directory" in capsys.readouterr().err


def test_a_warning_made_an_error_is_an_input_error_not_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-W error``: xxhash without a hash_seed warns, which is then raised."""
    import warnings

    config = tmp_path / "xx.toml"
    config.write_text(
        "[layout]\nnum_layers = 1\nblock_size = 512\nnum_kv_heads = 1\nhead_size = 8\n"
        '[offload]\nhash = "xxhash"\n[[tiers]]\nkind = "cpu"\ncapacity = "8MiB"\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = main(["replay", str(config), "--workload", "sample", "--limit", "2"])
    assert status == 2
    assert "internal error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "--limit"),
        (["--users", "3"], "--users only applies to --workload chat"),
        (["--capacities", "5"], "--policies and --capacities only apply to --sweep"),
        (["--sweep", "--workdir", "/tmp"], "--workdir does not apply to --sweep"),
        (["--plot", "out.txt"], "must end in .png, .svg, .pdf"),
        (["--plot", "/no/such/dir/x.png"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--workload", "sample", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "{tmp}/nope.jsonl"], "--trace {tmp}/nope.jsonl: No such file or directory"),
        (["--trace", "{tmp}"], "--trace {tmp}: Is a directory"),
        (["{tmp}/nope.toml"], "CONFIG {tmp}/nope.toml: No such file or directory"),
        (["{tmp}"], "CONFIG {tmp}: Is a directory"),
    ],
)
def test_an_unreadable_input_file_is_named_by_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in args]
    assert main(["replay", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kvtier: error: {message.format(tmp=tmp_path)}"


@pytest.mark.filterwarnings("default")  # as Python runs the command (pytest makes them errors)
def test_warnings_are_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "xxhash.toml"
    config.write_text('[offload]\nhash = "xxhash"\n' + SMALL_TOML)
    assert main(["replay", str(config), *CHAT, "--no-progress", "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kvtier: warning: hash algorithm 'xxhash' without a seed")


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_TOML.replace('kind = "cpu"', 'kind = "cpu"\neviction = "mru"'))
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tiers[1].eviction" in err
    assert "mru" in err
    assert main(["replay", str(tmp_path / "missing.toml")]) == 2


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for policies in ("mru", ","):
        with pytest.raises(SystemExit) as exit_info:
            main(["replay", "--sweep", "--policies", policies])
        assert exit_info.value.code == 2
    assert "unknown policy mru; valid:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--capacities", "0,200"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--trace", "x", "--workload", "chat"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["[/x]", "[bold]cpu", "[/]"])
def test_error_text_is_never_read_as_markup(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "[weird]" / "bad.toml"
    bad.parent.mkdir()
    bad.write_text(SMALL_TOML.replace('kind = "cpu"', f'kind = "{kind}"'))
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"tiers[1].kind: {kind!r}" in err
    assert main(["replay", str(tmp_path / "[weird]" / "missing.toml")]) == 2
    assert "[weird]/missing.toml" in capsys.readouterr().err


def test_an_error_is_one_line_however_narrow_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_TOML.replace('kind = "cpu"', 'kind = "cpu"\neviction = "mru"'))
    assert main(["replay", str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_stack_too_large_for_the_machine_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.toml"
    big.write_text(SMALL_TOML.replace('capacity = "32KiB"', 'capacity = "1000TiB"'))
    assert main(["replay", str(big), *CHAT, "--no-progress"]) == 2
    assert "tiers[0].capacity: " in capsys.readouterr().err


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_temporary_tiers_and_exits_130(tmp_path: Path, signame: str) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvtier", "replay", "--no-progress"],
        env=dict(os.environ, TMPDIR=str(temp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # A shell's background jobs ignore SIGINT; the child must not inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        for _ in range(2400):  # until the replay's temporary tiers exist (2 min at most)
            if any(temp.iterdir()) or process.poll() is not None:
                break
            time.sleep(0.05)
        process.send_signal(getattr(signal, signame))
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.decode().strip().splitlines() == ["kvtier: interrupted"]
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("workload", ["sample", "mooncake"])
def test_limit_keeps_each_requests_tag(workload: str) -> None:
    args = cli._parser().parse_args(["replay", "--workload", workload, "--limit", "5"])
    limited = cli._workload(args)
    expected = sample_workload(limit=5)  # the bundled trace's first requests either way
    assert limited.prompts == expected.prompts
    assert expected.tags is not None
    assert list(limited.tags or ()) == list(expected.tags)


@pytest.mark.parametrize("workload", ["sample", "mooncake"])
def test_limit_reads_the_trace_no_further(workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--limit 5 of the 3,993-request trace read 5 requests, not all (2.7 GB peak)."""
    read: list[int] = []
    real = workloads.read_mooncake_trace

    def counting(*args: Any, **kwargs: Any) -> Any:
        rows = real(*args, **kwargs)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(workloads, "read_mooncake_trace", counting)
    args = cli._parser().parse_args(["replay", "--workload", workload, "--limit", "5"])
    assert len(cli._workload(args).prompts) == 5
    assert read == [5]


def _replay_json(config: Path, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "kvtier", "replay", str(config), *CHAT, "--json"]
    done = subprocess.run(
        [*command, "--workdir", str(workdir)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    return dict(json.loads(done.stdout))


def test_a_hash_seed_lets_another_process_hit_xxhash_blocks_on_disk(tmp_path: Path) -> None:
    config = tmp_path / "xxhash.toml"  # a CPU tier of 32 blocks: the chat spills to disk
    seeded = '[offload]\nhash = "xxhash"\nhash_seed = "team-a"\nprefetch = "wait_complete"\n'
    config.write_text(seeded + SMALL_TOML.replace('"96KiB"', '"16KiB"'))
    cold = _replay_json(config, tmp_path / "w")
    warm = _replay_json(config, tmp_path / "w")  # a new process: a new random root without a seed
    assert warm["tiers"][1]["restored_blocks"] > 0
    assert warm["saved_tokens"] > cold["saved_tokens"]  # the restored blocks are found


def test_sweep_labels_keep_fractional_capacities_apart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["replay", "--sweep", "--workload", "sample", "--policies", "lru"]
    assert main([*args, "--capacities", "1.5,2.5,10"]) == 0
    out = capsys.readouterr().out
    for label in ("1.5% (", "2.5% (", "10% ("):  # both were "2%"
        assert label in out


def test_workdir_without_a_disk_tier_to_hold_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cpu.toml"
    config.write_text(
        "[layout]\nnum_layers = 1\nblock_size = 16\nnum_kv_heads = 1\nhead_size = 8\n"
        '[[tiers]]\nkind = "cpu"\ncapacity = "1MiB"\n'
    )
    args = ["replay", str(config), "--workload", "sample", "--limit", "2", "--no-progress"]
    assert main([*args, "--workdir", str(tmp_path / "w")]) == 2
    assert "--workdir holds the disk tiers without a path" in capsys.readouterr().err
    assert main(args) == 0


def test_an_internal_error_has_its_own_status_and_a_traceback(
    small: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug must not read as status 1 (a reused block held wrong bytes) or 2 (bad input)."""

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_replay", broken)  # stands in for any bug in the replay
    assert main(["replay", str(small), *CHAT, "--no-progress"]) == cli.EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("kvtier: internal error: ZeroDivisionError('a bug')")


class FailingStdout(io.StringIO):
    """A stdout whose writes fail as a closed pipe or a full disk does."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor")


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("sweep", [False, True])
def test_a_reader_that_went_away_is_status_141_never_1(
    small: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    as_json: bool,
    sweep: bool,
) -> None:
    """``kvtier replay | head``: status 1 would say a reused block held wrong bytes."""
    monkeypatch.setattr(sys, "stdout", FailingStdout(BrokenPipeError(32, "Broken pipe")))
    args = ["replay", str(small), *CHAT, "--no-progress"]
    args += ["--json"] * as_json + ["--sweep"] * sweep
    assert main(args) == cli.EXIT_PIPE == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("as_json", [False, True])
def test_a_full_disk_under_the_output_is_an_error_that_says_so(
    small: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setattr(sys, "stdout", FailingStdout(OSError(28, "No space left on device")))
    args = ["replay", str(small), *CHAT, "--no-progress"] + ["--json"] * as_json
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kvtier: error: cannot write the output: No space left on device"


def test_a_closed_stderr_is_status_141_never_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error message cannot be written: still not the status of wrong bytes."""
    monkeypatch.setattr(sys, "stderr", FailingStdout(BrokenPipeError(32, "Broken pipe")))
    assert main(["replay", str(tmp_path / "missing.toml"), *CHAT]) == cli.EXIT_PIPE
