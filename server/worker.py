"""The queue between the event loop and the one thread that owns the backend.

Routes only see the `Scheduler` protocol: `submit(request) -> Job` (an async iterator of the pipeline's events,
`TextDelta`... then one `Result`) and `Job.cancel()`. `Worker` serves them by continuous batching: many jobs
decode together, new ones join between decode steps. Only plain values cross threads: the pipeline's frozen
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
    """Continuous batching: one thread owns the pipeline and one `Batch` (common/batching.py) at a time.

    Between two decode steps the thread admits waiting jobs into free slots (prefill while the others keep their
    place), then steps every running job by one token. Jobs for another model wait at the head of the queue until
    the current model's batch drains (no starvation, no reload per request while `max_resident_models` keeps both).
    `queue_size` counts jobs WAITING (the running ones excluded). A full queue answers 429; while a model loads
    (slow: seconds to minutes) the answer is 503 with a longer Retry-After instead. `max_batch_size` 0 picks the
    device's default (`DEFAULT_BATCH`).
    """

    #: Slots per batch when `max_batch_size` is 0: a CPU gains less from wide batches and holds the KV in RAM.
    DEFAULT_BATCH = {"cpu": 4}
    DEFAULT_BATCH_ACCELERATOR = 8

    def __init__(self, pipeline: Any, queue_size: int, retry_after_s: int = 1, load_retry_after_s: int = 10,
                 max_batch_size: int = 0) -> None:
        self.pipeline = pipeline
        self.queue_size = queue_size
        self.max_batch_size = max_batch_size
        self.retry_after_s = retry_after_s
        self.load_retry_after_s = load_retry_after_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._preload: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._batch: Any = None
        self._running: set[Job] = set()
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
        """Cancel everything and wait briefly for the thread to finish its current step."""
        with self._cond:
            self._stopping = True
            jobs = [*self._waiting, *self._running]
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
            queued, active, loading = len(self._waiting), len(self._running), self._loading
            batch = self._batch
        return {"loaded_models": list(self._loaded), "loading": loading,
                "queued": queued, "queue_size": self.queue_size, "active": active, "busy": active > 0,
                "max_batch_size": batch.max_batch if batch is not None else self.max_batch_size,
                "worker_alive": self._thread.is_alive()}

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job in self._waiting:  # never started: free its place now and end its iterator
                self._waiting.remove(job)
                job._post(_END)

    # ------------------------------------------------------------------------------------ the worker thread
    def _serve(self) -> None:
        try:
            while self._wait_for_work():
                if self._preload:
                    self._load(self._preload.popleft())
                    continue
                self._admit()
                if self._running:
                    self._step()
        finally:
            self._end_all()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._stopping or self._waiting or self._preload or self._running):
                self._cond.wait()
            return not self._stopping

    def _next_job(self) -> Job | None:
        """The head of the queue when the current batch can take it now, else None (it keeps its place)."""
        with self._cond:
            if not self._waiting:
                return None
            job, batch = self._waiting[0], self._batch
            model = job.request.model or self.pipeline.settings.active_model
            if batch is not None and (batch.model_id != model and self._running or not batch.free_slots):
                return None
            return self._waiting.popleft()

    def _admit(self) -> None:
        while (job := self._next_job()) is not None:
            if job.cancelled.is_set():  # cancelled between leaving the queue and starting
                job._post(_END)
                continue
            try:
                batch = self._batch_for(job.request.model or self.pipeline.settings.active_model)
                batch.admit(job.request, key=job, cancel=job.cancelled)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
                job._post(exc)
                job._post(_END)
                continue
            with self._cond:
                self._running.add(job)

    def _batch_for(self, model: str) -> Any:
        """The batch serving `model`, made (and the model loaded, reported as "loading") when it is another."""
        if self._batch is not None and self._batch.model_id == model:
            return self._batch
        if model not in self._loaded:
            self._loading = model
            try:
                self.pipeline.load(model)
            finally:
                self._loading, self._loaded = None, list(self.pipeline.loaded_models())
        size = self.max_batch_size or self.DEFAULT_BATCH.get(self.pipeline.load(model).device,
                                                             self.DEFAULT_BATCH_ACCELERATOR)
        batch = self.pipeline.batch(model, size)
        with self._cond:
            self._batch = batch
        return batch

    def _step(self) -> None:
        try:
            outputs = self._batch.step()
        except Exception as exc:  # noqa: BLE001 - an internal fault ends the jobs of this batch, not the server
            log.exception("decode step failed; ending %d requests", len(self._running))
            with self._cond:
                jobs, self._running, self._batch = list(self._running), set(), None
            for job in jobs:
                job._post(exc)
                job._post(_END)
            return
        for job, events in outputs:
            finished = bool(events) and isinstance(events[-1], Result)
            if finished:  # counted out before its client can see the end (status() is then already right)
                with self._cond:
                    self._running.discard(job)
            for event in events:
                job._post(event)
            if finished:
                job._post(_END)

    def _load(self, model: str) -> None:
        self._loading = model
        try:
            self.pipeline.load(model)
        except Exception:  # a bad default model must not kill the worker: requests will report the error
            log.exception("preloading model %r failed", model)
        finally:
            self._loading = None
            self._loaded = list(self.pipeline.loaded_models())

    def _end_all(self) -> None:
        """On stop: running jobs end with their (cancelled) results; nothing is left hanging."""
        batch = self._batch
        if batch is not None:
            try:
                for job, events in batch.cancel_all():
                    for event in events:
                        job._post(event)
            except Exception:  # noqa: BLE001 - shutting down: the END below still reaches every job
                log.exception("ending the running requests failed")
        with self._cond:
            jobs, self._running = list(self._running), set()
        for job in jobs:
            job._post(_END)
