"""CUDA stream and event helpers of the copy engine (:mod:`kvtier.tiers._copy`).

Every wait sleeps in the driver instead of spinning (events are made
``blocking``), and every call selects the stream's own device first, so a
worker thread never creates a context on another GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["drain", "event_done", "mark", "new_stream", "on_stream", "wait_event"]

# Typed handles on torch's untyped CUDA constructors and query.
new_stream: Callable[..., torch.cuda.Stream] = torch.cuda.Stream
_new_event: Callable[..., torch.cuda.Event] = torch.cuda.Event
event_done: Callable[[torch.cuda.Event], bool] = torch.cuda.Event.query


@contextmanager
def on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """Make ``stream`` current, with its device current around it.

    ``torch.cuda.stream`` alone, in a thread whose current device is another
    one (a fresh worker thread's is device 0), restores that device's stream
    on exit, which selects the device and, from CUDA 12 on, creates its
    context: 300-500 MiB on a GPU another process may have filled.
    """
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield


def mark(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``stream`` now; waiting for it sleeps instead of spinning.

    (A default event, like ``Stream.synchronize``, spin-waits: a worker
    thread waiting for a copy queued behind the engine's forward pass would
    burn a core the whole time.)
    """
    with torch.cuda.device(stream.device):
        done = _new_event(blocking=True)
        done.record(stream)
    return done


def wait_event(done: torch.cuda.Event, device: torch.device) -> None:
    """Block the calling thread until ``done`` happened (on ``device``)."""
    with torch.cuda.device(device):
        done.synchronize()


def drain(stream: torch.cuda.Stream) -> None:
    """Block until every copy queued on ``stream`` so far is done, without spinning."""
    wait_event(mark(stream), stream.device)
