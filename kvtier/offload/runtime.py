"""Where the offload manager's transfer jobs run, and how their outcomes come back.

Two modes, one mechanism:

* **async engines** enter the manager with ``async with``: jobs run in a task
  group on the engine's own event loop;
* **synchronous engines** enter it with ``with``: the manager starts an event
  loop in a background thread (an anyio blocking portal) that it owns and
  closes, and jobs run there.

Either way a job's outcome is appended to a queue (thread-safe) and waiters
are woken; the manager applies outcomes on the engine's thread at the start of
its next call, so its bookkeeping is never touched by two threads.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import anyio
import anyio.from_thread
import torch
from anyio.abc import TaskGroup

from kvtier.errors import ClosedError
from kvtier.offload._state import LoadOutcome, StoreOutcome
from kvtier.tiers._streams import mark, wait_event

__all__ = ["Runtime", "current_streams"]

Outcome = StoreOutcome | LoadOutcome
Job = Callable[..., Coroutine[Any, Any, None]]
_NOT_RUNNING = "the offload manager is not running: enter it first"


def current_streams(tiers: Iterable[object]) -> list[torch.cuda.Stream]:
    """The calling thread's current CUDA stream on each GPU the tiers live on.

    A tier lives on a GPU when its ``device`` attribute is a CUDA
    ``torch.device`` (the device tier over a CUDA KV cache).
    """
    streams: dict[int, torch.cuda.Stream] = {}
    for tier in tiers:
        device = getattr(tier, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in streams:
                streams[index] = torch.cuda.current_stream(index)
    return list(streams.values())


def planned_at(streams: Sequence[torch.cuda.Stream]) -> list[tuple[Any, torch.device]]:
    """An event recorded now on each stream (where the engine's queued work stands)."""
    return [(mark(stream), stream.device) for stream in streams]


async def wait_for(events: Sequence[tuple[Any, torch.device]]) -> None:
    """Wait, off the loop, until every event's work has run (a job's ``ready``).

    The job awaits it inside its own error handling: a failed wait (a CUDA
    error) fails the job's outcome, and a cancelled one (which still ends
    first: worker threads are not abandoned) reports it cancelled.
    """
    for event, device in events:
        if not event.query():
            await anyio.to_thread.run_sync(wait_event, event, device)


def _make_current(streams: Sequence[torch.cuda.Stream]) -> None:
    """Make ``streams`` the current ones of the calling thread (per GPU)."""
    for stream in streams:
        torch.cuda.set_stream(stream)


class Runtime:
    """Runs jobs and collects their outcomes."""

    def __init__(self) -> None:
        self.outcomes: deque[Outcome] = deque()
        self._cond = threading.Condition()
        self._event: anyio.Event | None = None
        self._group: TaskGroup | None = None
        # async mode: (job, args, events) queued by spawn, started by _dispatch
        self._jobs: deque[tuple[Job, tuple[Any, ...], Sequence[Any]]] = deque()
        self._planned_at: Callable[[Sequence[Any]], Sequence[Any]] = planned_at
        self._wake: anyio.Event | None = None
        self._closing = False
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._session_cm: AbstractContextManager[Any] | None = None
        self._streams: Callable[[], Sequence[torch.cuda.Stream]] | None = None
        self.thread_mode = False

    @property
    def running(self) -> bool:
        """Jobs can be started."""
        return self._group is not None

    def bind(self, group: TaskGroup | None) -> None:
        """Start jobs in ``group`` (``None``: stop accepting jobs).

        Called on the loop that runs ``group``. Binding starts the task that
        starts the jobs :meth:`spawn` queues; unbinding lets it start the jobs
        still queued and end.
        """
        self._group = group
        self._closing = group is None
        if group is not None:
            group.start_soon(self._dispatch, group)
        else:
            self._wake_dispatcher()

    async def _dispatch(self, group: TaskGroup) -> None:
        """Start queued jobs in ``group`` until unbound (async mode).

        Starting a task costs far more than queueing a callable, so the
        engine's planning calls only queue jobs; they start as soon as the
        engine awaits anything (its next ``wait_*`` at the latest).
        """
        jobs = self._jobs
        while True:
            while jobs:
                job, args, events = jobs.popleft()
                if events:
                    ready = functools.partial(wait_for, events)
                    group.start_soon(functools.partial(job, *args, ready=ready))
                else:
                    group.start_soon(job, *args)
            if self._closing:
                return
            self._wake = anyio.Event()
            await self._wake.wait()

    def _wake_dispatcher(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    def follow_streams(self, streams: Callable[[], Sequence[torch.cuda.Stream]]) -> None:
        """Async mode: order each job after the engine's streams as :meth:`spawn` plans it.

        ``streams()`` (see :func:`current_streams`) is called on the engine's
        thread at each :meth:`spawn`; an event recorded on each then is what
        the job waits for before its first copy. Without it a job's copies would
        wait for the loop thread's current stream when they are issued, at
        a later await: an engine that queued its forward pass under ``with
        torch.cuda.stream(s):`` and left the block before awaiting would
        have its stores read blocks still being written.
        """
        if streams():
            self._streams = streams  # no CUDA tier: never asked again

    # -- thread mode -------------------------------------------------------------------

    def start_thread(
        self,
        session: Callable[[], AbstractAsyncContextManager[Any]],
        streams: Callable[[], Sequence[torch.cuda.Stream]] = lambda: (),
    ) -> None:
        """Run ``session()`` in a new background event loop until :meth:`stop_thread`.

        ``streams()``, called on the engine's thread (when entering and at
        each :meth:`spawn`; see :func:`current_streams`), gives the CUDA
        streams the loop thread makes current before it opens the session
        and before it starts each job. A copy is ordered after its thread's
        current stream, and CUDA keeps one per thread: without them the
        loop's thread would have the legacy default stream, which does not
        wait for the engine's own stream (vLLM computes on one), so a store
        could read blocks its forward pass is still writing.
        """
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.thread_mode = True
        try:
            first = streams()
            if first:
                self._streams = streams  # no CUDA tier: never asked again
                self._portal.call(_make_current, first)
            self._session_cm = self._portal.wrap_async_context_manager(session())
            self._session_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = self._session_cm = None
            raise

    def stop_thread(self) -> None:
        """Close the session (its jobs finish first) and the background loop."""
        session, portal = self._session_cm, self._portal_cm
        self._session_cm = self._portal_cm = self._portal = None
        try:
            if session is not None:
                session.__exit__(None, None, None)
        finally:
            if portal is not None:
                portal.__exit__(None, None, None)

    def call(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        """Run ``await fn(*args)`` on the background loop and return its result (thread mode).

        Raises:
            ClosedError: The manager is not entered with ``with``.
        """
        portal = self._portal
        if portal is None:
            raise ClosedError("the offload manager runs no background loop: enter it with `with`")
        return portal.call(fn, *args)

    # -- jobs --------------------------------------------------------------------------

    def check_running(self) -> None:
        """Raise unless jobs can be started.

        Raises:
            ClosedError: The manager is not entered (or has been left).
        """
        if self._group is None:
            raise ClosedError(_NOT_RUNNING)

    def spawn(self, job: Job, *args: Any) -> None:
        """Start ``job(*args)`` (from the engine's thread).

        In async mode the job is queued and starts once the engine's loop
        runs; in thread mode it starts on the background loop now. In async
        mode with the engine's streams followed (:meth:`follow_streams`), the
        job gets ``ready=``: an awaitable it awaits first, inside its own
        error handling, that ends once the work queued on those streams by
        now has run.

        Raises:
            ClosedError: The manager is not entered.
        """
        group = self._group
        if group is None:
            raise ClosedError(_NOT_RUNNING)
        if self._portal is None:
            streams = self._streams() if self._streams is not None else ()
            self._jobs.append((job, args, self._planned_at(streams) if streams else ()))
            self._wake_dispatcher()
            return

        streams = self._streams() if self._streams is not None else ()

        def start() -> None:  # runs on the background loop's thread
            _make_current(streams)  # the engine's, as it plans this job
            group.start_soon(job, *args)

        self._portal.call(start)

    def push(self, outcome: Outcome) -> None:
        """Report a job's outcome (from the job's event loop)."""
        self.outcomes.append(outcome)
        event, self._event = self._event, None
        if event is not None:
            event.set()
        with self._cond:
            self._cond.notify_all()

    async def wait_async(self) -> None:
        """Wait until an outcome is queued (async mode, engine's loop)."""
        if self.outcomes:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def wait_blocking(self, timeout: float | None) -> bool:
        """Wait until an outcome is queued; False after ``timeout`` seconds (None: no limit)."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.outcomes), timeout)
