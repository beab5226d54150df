"""Mooncake-format request traces and their expansion into token ids.

A Mooncake trace (Qin et al., FAST '25) is JSON lines, one request per line:
``timestamp`` (ms), ``input_length`` and ``output_length`` (tokens) and
``hash_ids``, one id per ``trace_block_size``-token block (512 in the published
traces), prefix-chained.

:func:`expand_prompt` turns a row into concrete token ids: each block id is
expanded deterministically into ``trace_block_size`` tokens (SHAKE-128 of the
id, read as 16-bit tokens), then the prompt is cut to ``input_length``. Equal
ids give equal token runs and distinct ids distinct ones, so the trace's
prefix sharing is preserved at every block size that divides the trace's.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs

from kvtier.errors import KVTierError

__all__ = [
    "bundled_full_trace_path",
    "bundled_trace_path",
    "TraceFormatError",
    "TraceRequest",
    "expand_prompt",
    "read_mooncake_trace",
]

MOONCAKE_BLOCK_SIZE = 512
"""Tokens per hash id in the published Mooncake traces."""
_MAX_HASH_ID = 1 << 64  # ids are expanded from their 8-byte encoding


class TraceFormatError(KVTierError, ValueError):
    """A trace line is not a valid Mooncake record; the message names the line."""


@attrs.frozen
class TraceRequest:
    """One request of a trace.

    Attributes:
        timestamp_ms: Arrival time in ms since the trace's start.
        input_length: Prompt tokens.
        output_length: Generated tokens.
        hash_ids: One id per trace block of the prompt.
    """

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def tag(self) -> int:
        """A request tag for policies: ⌊log₂ output_length⌋ (-1 for no output).

        A trace records the tokens generated, not the ``max_tokens`` an engine
        knows when the request arrives; the bucket of the output length stands
        in for it (see :attr:`kvtier.policies.hints.BlockHint.tag`).
        """
        return self.output_length.bit_length() - 1


def _parse(line: str, where: str, trace_block_size: int) -> TraceRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{where}: not JSON: {exc.msg}") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise TraceFormatError(f"{where}: not a usable JSON record: {exc}") from exc
    if not isinstance(row, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = {"timestamp", "input_length", "output_length", "hash_ids"} - row.keys()
    if missing:
        raise TraceFormatError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    timestamp, input_length = row["timestamp"], row["input_length"]
    output_length, hash_ids = row["output_length"], row["hash_ids"]
    for name, value, least in (
        ("input_length", input_length, 1),  # a request without a prompt computes nothing
        ("output_length", output_length, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TraceFormatError(f"{where}: {name} must be an integer >= {least}, got {value!r}")
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int | float)
        or not math.isfinite(timestamp)
        or timestamp < 0
    ):
        raise TraceFormatError(f"{where}: timestamp must be a number >= 0, got {timestamp!r}")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and 0 <= h < _MAX_HASH_ID for h in hash_ids
    ):
        raise TraceFormatError(f"{where}: hash_ids must be a list of integers in [0, 2**64)")
    needed = -(-input_length // trace_block_size)
    if len(hash_ids) < needed:
        raise TraceFormatError(
            f"{where}: {len(hash_ids)} hash_ids cover {len(hash_ids) * trace_block_size} "
            f"tokens, input_length is {input_length}"
        )
    if len(hash_ids) > needed:  # hashed at a smaller block size: sharing would be invented
        raise TraceFormatError(
            f"{where}: {len(hash_ids)} hash_ids for input_length {input_length}, "
            f"{needed} expected (one per {trace_block_size}-token block): was the trace "
            "hashed at another block size?"
        )
    return TraceRequest(timestamp, input_length, output_length, tuple(hash_ids))


def bundled_trace_path() -> Path:
    """The trace sample shipped with kvtier.

    The first 200 requests of the Mooncake paper's synthetic trace
    (Apache-2.0; see ``kvtier/data/README.md``).
    """
    return Path(__file__).resolve().parent / "data" / "mooncake_sample.jsonl"


def bundled_full_trace_path() -> Path:
    """The whole Mooncake synthetic trace shipped with kvtier, xz-compressed.

    All 3,993 requests of the Mooncake paper's synthetic trace (Apache-2.0;
    see ``kvtier/data/README.md``); :func:`read_mooncake_trace` reads it as is.
    """
    return Path(__file__).resolve().parent / "data" / "mooncake_synthetic.jsonl.xz"


def read_mooncake_trace(
    path: str | Path, *, limit: int | None = None, trace_block_size: int = MOONCAKE_BLOCK_SIZE
) -> list[TraceRequest]:
    """Read a Mooncake-format trace.

    Args:
        path: The JSON-lines file; a name ending in ``.xz`` is decompressed.
        limit: Read at most this many requests.
        trace_block_size: Tokens per hash id.

    Returns:
        The requests, in file order. Blank lines are skipped.

    Raises:
        TraceFormatError: A line is malformed, the file is not UTF-8 or not
            valid xz (the message gives the line's number), or it holds no
            request.
        OSError: The file cannot be read.
    """
    return list(_iter_trace(Path(path), limit, trace_block_size))


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")  # a BOM (Windows editors) is not JSON


def _iter_trace(path: Path, limit: int | None, trace_block_size: int) -> Iterator[TraceRequest]:
    count = 0
    number = 0
    try:
        with _open_text(path) as lines:
            for number, line in enumerate(lines, 1):
                if limit is not None and count >= limit:
                    return
                if not line.strip():
                    continue
                yield _parse(line, f"{path}:{number}", trace_block_size)
                count += 1
    except (lzma.LZMAError, EOFError) as exc:  # EOFError: a truncated stream
        raise TraceFormatError(f"{path}:{number + 1}: not valid xz data: {exc}") from exc
    except UnicodeDecodeError as exc:
        hint = " (compressed? only .xz is read compressed)" if path.suffix != ".xz" else ""
        raise TraceFormatError(f"{path}:{number + 1}: not UTF-8 text{hint}") from exc
    if not count and limit != 0:
        raise TraceFormatError(f"{path}: the trace has no requests")


def _block_tokens(hash_id: int, trace_block_size: int) -> array[int]:
    tokens = array(
        "H", hashlib.shake_128(hash_id.to_bytes(8, "little")).digest(2 * trace_block_size)
    )
    if sys.byteorder == "big":  # pragma: no cover - big-endian hosts only
        tokens.byteswap()
    return tokens


def expand_prompt(
    request: TraceRequest,
    *,
    trace_block_size: int = MOONCAKE_BLOCK_SIZE,
    cache: dict[int, array[int]] | None = None,
) -> list[int]:
    """Turn a trace request into its prompt's token ids (each below 65536).

    Args:
        request: The trace request.
        trace_block_size: Tokens per hash id.
        cache: Expanded blocks by id, reused across calls when given.

    Returns:
        ``request.input_length`` token ids.
    """
    out: array[int] = array("H")
    for hash_id in request.hash_ids[: -(-request.input_length // trace_block_size)]:
        block = cache.get(hash_id) if cache is not None else None
        if block is None:
            block = _block_tokens(hash_id, trace_block_size)
            if cache is not None:
                cache[hash_id] = block
        out.extend(block)
    return out[: request.input_length].tolist()
