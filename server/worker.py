"""The queue between the event loop and the one thread that owns the backend.

Routes only see the `Scheduler` protocol: `submit(request) -> Job` (an async iterator of the pipeline's events,
`TextDelta`... then one `Result`) and `Job.cancel()`. `Worker` serves jobs one at a time, in order; a batching
scheduler can replace it behind the same two calls. Only plain values cross threads: the pipeline's frozen
dataclasses going out, a `threading.Event` coming in (the pipeline checks it between tokens).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from typing import Any, AsyncIterator, Callable, Iterable, Protocol

from common.pipeline import Request, Result, TextDelta

from .errors import BusyError

log = logging.getLogger("deepseek_ocr.server")

_END = object()
Event = TextDelta | Result


class Job:
    """One submitted request: iterate it for its events; `cancel()` stops it whether queued or running."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[Job], None]) -> None:
        self.id = next(self._ids)
        self.request = request
        self.cancelled = threading.Event()
        self.done = False
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._on_cancel = on_cancel

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        item = await self._events.get()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def cancel(self) -> None:
        """Stop generating (the pipeline sees the event between tokens) or drop the job from the queue."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)

    # Called from the worker thread: hand the item to the loop that owns the asyncio queue.
    def _post(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody is listening
            pass


class Scheduler(Protocol):
    def start(self, preload: Iterable[str] = ()) -> None:
        """Start serving (called when the server starts); `preload` names models to load first."""
        ...

    def stop(self) -> None:
        """Cancel queued and running jobs and stop serving (called when the server stops)."""
        ...

    def submit(self, request: Request) -> Job:
        """Queue `request`; raises `BusyError` when no slot is free. Must be called on the event loop."""
        ...

    def status(self) -> dict[str, Any]:
        """Plain values for the readiness route: loaded models, queue depth, the model being loaded."""
        ...


class Worker:
    """A bounded FIFO served by one thread calling `pipeline.stream(request, cancel)`.

    `queue_size` counts jobs WAITING (the running one excluded). A full queue answers 429; when the job in front
    is loading a model (slow: seconds to minutes) the answer is 503 with a longer Retry-After instead.
    """

    def __init__(self, pipeline: Any, queue_size: int, retry_after_s: int = 1, load_retry_after_s: int = 10) -> None:
        self.pipeline = pipeline
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s
        self.load_retry_after_s = load_retry_after_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._preload: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._loading: str | None = None
        # Refreshed by the worker thread only: the pipeline holds its lock while loading a model, so asking it
        # from the event loop could stall every route for the length of a load.
        self._loaded: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="generation-worker", daemon=True)

    def start(self, preload: Iterable[str] = ()) -> None:
        """Start the thread; models in `preload` are loaded first, on that thread (backends are thread-bound)."""
        with self._cond:
            self._stopping = False
            self._preload.extend(preload)
            if self._thread.is_alive():
                return
            # A thread runs once; a server restarted in the same process (tests do this) gets a fresh one.
            self._thread = threading.Thread(target=self._serve, name="generation-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel everything and wait briefly for the thread to finish its current token."""
        with self._cond:
            self._stopping = True
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancelled.set()
            job._post(_END)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, request: Request) -> Job:
        job = Job(request, asyncio.get_running_loop(), self._cancel)
        with self._cond:
            if self._stopping:
                raise BusyError("server is shutting down", status=503, retry_after=self.load_retry_after_s)
            if len(self._waiting) >= self.queue_size:
                if self._loading is not None:
                    raise BusyError(f"model {self._loading!r} is loading and the queue is full; retry later",
                                    status=503, retry_after=self.load_retry_after_s)
                raise BusyError(f"server is busy: {len(self._waiting)} requests queued; retry later",
                                status=429, retry_after=self.retry_after_s)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def status(self) -> dict[str, Any]:
        with self._cond:
            queued, running, loading = len(self._waiting), self._running is not None, self._loading
        return {"loaded_models": list(self._loaded), "loading": loading,
                "queued": queued, "queue_size": self.queue_size, "busy": running,
                "worker_alive": self._thread.is_alive()}

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job in self._waiting:  # never started: free its slot now and end its iterator
                self._waiting.remove(job)
                job._post(_END)

    def _next(self) -> Job | str | None:
        with self._cond:
            while not (self._stopping or self._waiting or self._preload):
                self._cond.wait()
            if self._stopping:
                return None
            if self._preload:
                return self._preload.popleft()
            self._running = self._waiting.popleft()
            return self._running

    def _serve(self) -> None:
        while (item := self._next()) is not None:
            try:
                if isinstance(item, str):
                    self._load(item)
                else:
                    self._run(item)
            finally:
                self._loaded = list(self.pipeline.loaded_models())
                with self._cond:
                    self._running = None

    def _load(self, model: str) -> None:
        self._loading = model
        try:
            self.pipeline.load(model)
        except Exception:  # a bad default model must not kill the worker: requests will report the error
            log.exception("preloading model %r failed", model)
        finally:
            self._loading = None

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():  # cancelled between leaving the queue and starting
            job._post(_END)
            return
        try:
            model = job.request.model
            if model is not None and model not in self._loaded:
                # Loaded here rather than inside stream(), so "loading" (503 instead of 429) covers exactly the load.
                self._loading = model
                try:
                    self.pipeline.load(model)
                finally:
                    self._loading, self._loaded = None, list(self.pipeline.loaded_models())
            # A cancelled job is not abandoned here: the pipeline sees the event between tokens and still ends
            # with its Result, which carries the usage counts a stop string needs.
            for event in self.pipeline.stream(job.request, job.cancelled):
                job._post(event)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
            job._post(exc)
        finally:
            job._post(_END)
