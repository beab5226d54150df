"""Workloads for ``kvtier replay``: prompts as token ids, in arrival order.

* :func:`trace_workload`: a Mooncake-format trace (the bundled whole Mooncake
  synthetic trace by default), each request's hash ids expanded into token ids
  (:func:`kvtier.traces.expand_prompt`), so requests sharing ids share prefixes,
  each request tagged with its output length's bucket
  (:attr:`kvtier.traces.TraceRequest.tag`);
* :func:`chat_workload`: multi-round chat, like LMCache's multi-round QA
  benchmark: users share a system prompt, each round a user's prompt is the
  conversation so far (system prompt, every earlier question and answer) plus
  a new question; users take turns.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from kvtier.errors import ConfigError
from kvtier.traces import (
    bundled_full_trace_path,
    bundled_trace_path,
    expand_prompt,
    read_mooncake_trace,
)

__all__ = ["WORKLOADS", "Workload", "chat_workload", "sample_workload", "trace_workload"]


@attrs.frozen
class Workload:
    """Prompts to replay, in arrival order.

    Attributes:
        name: A short name for reports.
        prompts: One list of token ids per request.
        tags: One :attr:`~kvtier.request.Request.tag` per request, or None
            (every request untagged).

    Raises:
        ConfigError: ``tags`` is not one per prompt.
    """

    name: str
    prompts: Sequence[list[int]]
    tags: Sequence[int | str | None] | None = attrs.field(default=None, kw_only=True)

    @tags.validator
    def _one_per_prompt(self, _: object, value: Sequence[int | str | None] | None) -> None:
        if value is not None and len(value) != len(self.prompts):
            raise ConfigError(
                f"workload {self.name}: {len(value)} tags for {len(self.prompts)} prompts"
            )

    def tag(self, index: int) -> int | str | None:
        """Request ``index``'s tag (None when the workload is untagged)."""
        return None if self.tags is None else self.tags[index]

    def head(self, count: int) -> Workload:
        """The first ``count`` requests, with their tags."""
        tags = None if self.tags is None else self.tags[:count]
        return Workload(self.name, self.prompts[:count], tags=tags)

    @property
    def num_tokens(self) -> int:
        """Prompt tokens over all requests."""
        return sum(len(prompt) for prompt in self.prompts)


def trace_workload(path: str | Path | None = None, *, limit: int | None = None) -> Workload:
    """A Mooncake-format trace (``.jsonl`` or ``.jsonl.xz``).

    Args:
        path: The trace; the whole bundled Mooncake synthetic trace (3,993
            requests) when None.
        limit: Replay only the first ``limit`` requests.

    Raises:
        TraceFormatError: A malformed line.
        OSError: The file cannot be read.
    """
    source = Path(path) if path is not None else bundled_full_trace_path()
    rows = read_mooncake_trace(source, limit=limit)
    cache: dict[int, array[int]] = {}
    name = source.name.removesuffix(".xz").removesuffix(".jsonl")
    prompts = [expand_prompt(row, cache=cache) for row in rows]
    return Workload(name, prompts, tags=[row.tag for row in rows])


def sample_workload(*, limit: int | None = None) -> Workload:
    """The bundled 200-request sample of the Mooncake trace (little reuse: 6 %)."""
    return trace_workload(bundled_trace_path(), limit=limit)


def chat_workload(
    *,
    users: int = 16,
    rounds: int = 6,
    system_prompt: int = 2048,
    question: int = 128,
    answer: int = 256,
    seed: int = 0,
) -> Workload:
    """Multi-round chat: ``users`` conversations of ``rounds`` turns, turns interleaved.

    Raises:
        ConfigError: A count is not positive.
    """
    for name, value in (
        ("users", users),
        ("rounds", rounds),
        ("system_prompt", system_prompt),
        ("question", question),
        ("answer", answer),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"chat workload: {name} must be an integer >= 1, got {value!r}")
    rng = random.Random(seed)
    shared = [rng.randrange(32_000) for _ in range(system_prompt)]
    history = [list(shared) for _ in range(users)]
    prompts: list[list[int]] = []
    for _ in range(rounds):
        for user in range(users):
            history[user].extend(rng.randrange(32_000) for _ in range(question))
            prompts.append(list(history[user]))
            history[user].extend(rng.randrange(32_000) for _ in range(answer))
    return Workload(f"chat-{users}x{rounds}", prompts)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mooncake": trace_workload,
    "sample": sample_workload,
    "chat": chat_workload,
}
"""Built-in workloads by name (``--workload``), each with its default parameters.

The trace ones (``mooncake``, ``sample``) take ``limit=`` and read no further.
"""
