"""Mooncake trace reading and token expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier import BlockHasher, Request
from kvtier.traces import (
    TraceFormatError,
    TraceRequest,
    bundled_full_trace_path,
    bundled_trace_path,
    expand_prompt,
    read_mooncake_trace,
)

SAMPLE = bundled_trace_path()
ROW = '{"timestamp": 0, "input_length": 1, "output_length": 0, "hash_ids": [1]}'


def test_sample_reads() -> None:
    trace = read_mooncake_trace(SAMPLE)
    assert len(trace) == 200
    assert trace[0].input_length == 40160
    assert len(trace[0].hash_ids) == 79
    assert read_mooncake_trace(SAMPLE, limit=3) == trace[:3]


def test_expansion_preserves_prefix_sharing() -> None:
    a = TraceRequest(0, 1024 + 100, 1, (7, 8, 9))
    b = TraceRequest(0, 1024 + 50, 1, (7, 8, 10))
    c = TraceRequest(0, 600, 1, (11, 8))
    ta, tb, tc = expand_prompt(a), expand_prompt(b), expand_prompt(c)
    assert (len(ta), len(tb), len(tc)) == (1124, 1074, 600)
    assert ta[:1024] == tb[:1024]
    assert ta[1024:1074] != tb[1024:1074]
    assert tc[512:] == ta[512:600]  # same id, same tokens, wherever it appears
    assert ta[:512] != tc[:512]
    assert all(0 <= t < 65536 for t in ta)
    cache: dict[int, object] = {}
    assert expand_prompt(a, cache=cache) == ta  # type: ignore[arg-type]
    assert set(cache) == {7, 8, 9}
    # At 16-token blocks, shared trace blocks give shared kvtier hashes.
    hasher = BlockHasher(16)
    ha, hb = Request("a", ta, hasher).block_hashes, Request("b", tb, hasher).block_hashes
    assert ha[:64] == hb[:64]
    assert ha[64] != hb[64]


def test_small_trace_block_size() -> None:
    row = TraceRequest(0, 5, 0, (1, 2))
    assert len(expand_prompt(row, trace_block_size=4)) == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"timestamp": 0, "input_length": 3}', "missing field"),
        (ROW.replace('"input_length": 1', '"input_length": -1'), "input_length"),
        (ROW.replace('"timestamp": 0', '"timestamp": "x"'), "timestamp"),
        (ROW.replace("[1]", '["a"]'), "hash_ids"),
        (ROW.replace('"input_length": 1', '"input_length": 600'), "cover 512"),
        (ROW.replace("[1]", "[1, 2, 3]"), "3 hash_ids for input_length 1, 1 expected"),
        (ROW.replace('"input_length": 1', '"input_length": 0'), "input_length must be .* >= 1"),
        (ROW.replace('"timestamp": 0', '"timestamp": -5'), "timestamp must be a number >= 0"),
        (ROW.replace('"timestamp": 0', '"timestamp": NaN'), "timestamp"),
        (
            ROW.replace("[1]", f"[{2**64}]"),
            r"hash_ids must be a list of integers in \[0, 2\*\*64\)",
        ),
        (ROW.replace('"input_length": 1', '"input_length": 1' + "0" * 5000), "not a usable JSON"),
    ],
)
def test_bad_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(f"{ROW}\n\n{line}\n")
    with pytest.raises(TraceFormatError, match=message) as info:
        read_mooncake_trace(path)
    assert ":3:" in str(info.value)


def test_full_trace_is_bundled_compressed_and_starts_with_the_sample() -> None:
    full = read_mooncake_trace(bundled_full_trace_path())
    assert len(full) == 3993
    assert sum(len(row.hash_ids) for row in full) == 121_877
    assert len({i for row in full for i in row.hash_ids}) == 43_924
    assert full[:200] == read_mooncake_trace(SAMPLE)
    assert read_mooncake_trace(bundled_full_trace_path(), limit=5) == full[:5]


def test_xz_trace_round_trip_and_corrupt_xz(tmp_path: Path) -> None:
    import lzma

    good = tmp_path / "t.jsonl.xz"
    good.write_bytes(lzma.compress((ROW + "\n").encode()))
    assert read_mooncake_trace(good) == [TraceRequest(0, 1, 0, (1,))]
    bad = tmp_path / "bad.jsonl.xz"
    bad.write_bytes(lzma.compress((ROW + "\n" + ROW + "\n").encode())[:-20])
    with pytest.raises(TraceFormatError, match="not valid xz"):
        read_mooncake_trace(bad)


def test_an_empty_trace_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    for text in ("", "\n\n  \n"):
        path.write_text(text)
        with pytest.raises(TraceFormatError, match="has no requests"):
            read_mooncake_trace(path)


@pytest.mark.parametrize(
    ("name", "data"), [("t.jsonl", b"\xff\xfe{}"), ("t.jsonl.gz", b"\x1f\x8b\x08\x00")]
)
def test_a_trace_that_is_not_utf8_is_an_error(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TraceFormatError, match=r":1: not UTF-8 text \(compressed\?"):
        read_mooncake_trace(path)


def test_a_trace_starting_with_a_utf8_bom_reads(tmp_path: Path) -> None:
    """Editors on Windows write one; it is not part of the first JSON object."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{ROW}\n{ROW}\n".encode())
    assert len(read_mooncake_trace(path)) == 2
