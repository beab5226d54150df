"""What the docs say of the command and the modules, checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvtier.hashing
from kvtier import cli
from kvtier.cli import main
from kvtier.traces import bundled_trace_path

ROOT = Path(__file__).resolve().parents[1]
SMALL_TOML = """
[layout]
num_layers = 1
block_size = 16
num_kv_heads = 1
head_size = 8

[[tiers]]
kind = "cpu"
capacity = "96KiB"
"""


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--limit", "x"], "argument --limit: invalid int value: 'x' (see kvtier replay --help)"),
        (
            ["--trace", "t.jsonl", "--workload", "chat"],
            "argument --workload: not allowed with argument --trace (see kvtier replay --help)",
        ),
        (["--policies", "mru"], "argument --policies: unknown policy mru; valid: "),
    ],
)
def test_a_usage_error_is_one_line_and_status_2(
    args: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/replay.md: errors are one line on stderr; argparse's usage block is not printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"kvtier: error: {line}")


def test_a_missing_command_is_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "kvtier: error: the following arguments are required: COMMAND (see kvtier --help)\n"
    )


@pytest.mark.filterwarnings("default")  # as Python runs the command (pytest makes them errors)
def test_the_sweep_uses_the_configs_hash_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A seeded xxhash config sweeps without the warning of an unseeded one."""
    config = tmp_path / "xxhash.toml"
    config.write_text('[offload]\nhash = "xxhash"\nhash_seed = "team-a"\n' + SMALL_TOML)
    args = ["replay", str(config), "--sweep", "--workload", "sample", "--policies", "lru"]
    assert main([*args, "--capacities", "10", "--limit", "20"]) == 0
    assert capsys.readouterr().err == ""


def test_the_docstring_lists_every_exit_status() -> None:
    statuses = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    assert set(statuses.values()) == {0, 1, 2, 70, 130, 141}
    doc = cli.__doc__ or ""
    for value in statuses.values():
        assert re.search(rf"\b{value}\b", doc), value


def test_the_hashing_docstring_names_the_packer_the_code_uses() -> None:
    doc = kvtier.hashing.__doc__ or ""
    assert "struct.pack" in doc
    assert "array.array" not in doc


def test_the_readme_says_how_much_of_the_trace_the_async_example_runs() -> None:
    example = (ROOT / "examples" / "async_engine_loop.py").read_text()
    found = re.search(r"^REQUESTS = (\d+)$", example, flags=re.MULTILINE)
    assert found is not None
    assert "TRACE = bundled_trace_path()" in example  # the sample, not the whole trace
    requests = len(bundled_trace_path().read_text().splitlines())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (
        f"`examples/async_engine_loop.py` runs it over the first {found[1]} requests of the "
        f"bundled {requests}-request Mooncake sample"
    ) in readme
