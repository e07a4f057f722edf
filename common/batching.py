"""Many requests through one model's engine: continuous batching for the server, in-order batches for the CLI
and the Python API.

`Batch` is the session a server worker owns: `admit` prepares a request (prompt, images, options; `UserError`
before anything runs) and prefills it into a free slot while the others keep their place; `step` decodes one
token for every running request and hands back each request's events (`TextDelta`s, and its `Result` when it
ends). A request's cancel event is honoured between steps: its slot is freed and its `Result` says "cancelled".
`run_in_order` drives a `Batch` over an iterable of requests and yields their results in input order.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator, Sequence

from .errors import UserError
from .pipeline import Decoding, Pipeline, Request, Result, TextDelta

Event = TextDelta | Result


@dataclass
class _Running:
    key: Hashable
    decoding: Decoding
    cancel: threading.Event | None


class Batch:
    """Up to `max_batch` requests of one model decoded together (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, model_id: str, max_batch: int) -> None:
        if max_batch < 1:
            raise UserError(f"the batch size must be >= 1, got {max_batch}", param="batch_size")
        self.pipeline, self.model_id, self.max_batch = pipeline, model_id, max_batch
        self.engine = pipeline.load(model_id).engine(max_batch)
        self._running: dict[int, _Running] = {}

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    @property
    def active(self) -> int:
        """Requests being decoded."""
        return len(self._running)

    def admit(self, request: Request, key: Hashable = None, cancel: threading.Event | None = None) -> None:
        """Prepare `request` and prefill it into a free slot; its events come back from `step` under `key`.
        Raises `UserError` for a bad request (nothing is admitted) and `RuntimeError` when no slot is free."""
        (error,) = self.admit_many([(request, key, cancel)])
        if error is not None:
            raise error

    def admit_many(self, items: Sequence[tuple[Request, Hashable, threading.Event | None]]) -> list[UserError | None]:
        """`admit` for several requests, their images encoded in one vision pass where shapes allow. A request
        that fails its preparation is left out and its `UserError` returned in its place (None: admitted); a
        failure inside the engine (internal) admits none and raises."""
        if len(items) > self.free_slots:
            raise RuntimeError(f"no free slot: {len(items)} asked, {self.free_slots} of {self.max_batch} free")
        errors: list[UserError | None] = []
        ready = []
        for request, key, cancel in items:
            model = request.model or self.pipeline.settings.active_model
            if model != self.model_id:
                raise ValueError(f"this batch serves {self.model_id!r}, not {model!r}")
            try:
                ready.append((self.pipeline.prepare(request), key, cancel))
                errors.append(None)
            except UserError as error:
                errors.append(error)
        if ready:
            slots = self.engine.add_many([(p.inputs, p.options, p.timings) for p, _, _ in ready])
            for slot, (prepared, key, cancel) in zip(slots, ready):
                self._running[slot] = _Running(key, Decoding(prepared), cancel)
        return errors

    def step(self) -> list[tuple[Hashable, list[Event]]]:
        """One token for every running request: (key, its new events) per request, a request's last events
        ending with its `Result`. Cancelled requests end first, without another token."""
        out: list[tuple[Hashable, list[Event]]] = []
        for slot, running in list(self._running.items()):
            if running.cancel is not None and running.cancel.is_set():
                out.append((running.key, self._end(slot, cancelled=True)))
        for item in self.engine.step():
            running = self._running[item.slot]
            events: list[Event] = list(running.decoding.feed(item.token))
            if item.finished or running.decoding.done:
                events += self._end(item.slot, cancelled=False)
            out.append((running.key, events))
        return out

    def _end(self, slot: int, cancelled: bool) -> list[Event]:
        self.engine.abort(slot)  # a no-op for a slot the engine already freed
        return self._running.pop(slot).decoding.finish(cancelled=cancelled)

    def cancel_all(self) -> list[tuple[Hashable, list[Event]]]:
        """End every running request now (server shutdown, an internal error): their final events."""
        return [(self._running[slot].key, self._end(slot, cancelled=True)) for slot in list(self._running)]


def run_in_order(pipeline: Pipeline, requests: Iterable[Request], batch_size: int, *,
                 return_errors: bool = False) -> Iterator[Result | UserError]:
    """`Pipeline.map`: requests pulled lazily, admitted while slots are free, results yielded in input order
    as soon as every earlier one is done. Consecutive requests for another model start a new batch once the
    current one drains."""
    if batch_size < 1:
        raise UserError(f"the batch size must be >= 1, got {batch_size}", param="batch_size")
    source = iter(enumerate(requests))
    done: dict[int, Result | UserError] = {}
    batch: Batch | None = None
    pending: tuple[int, Request] | None = None
    exhausted, emitted = False, 0
    while True:
        group: list[tuple[int, Request]] = []  # admitted together: one vision pass for their images
        while not exhausted and (batch is None or len(group) < batch.free_slots):
            pending = pending or next(source, None)
            if pending is None:
                exhausted = True
                break
            index, request = pending
            model = request.model or pipeline.settings.active_model
            if batch is not None and batch.model_id != model:
                if batch.active or group:
                    break  # drain this model's batch first
                batch = None
            if batch is None:
                try:
                    batch = Batch(pipeline, model, batch_size)
                except UserError as error:
                    done[index], pending = error, None
                    continue
            if len(group) >= batch.free_slots:
                break  # a batch made just now for another model's request
            group.append(pending)
            pending = None
        if group:
            errors = batch.admit_many([(request, index, None) for index, request in group])
            done.update({index: error for (index, _), error in zip(group, errors) if error is not None})
        while emitted in done:
            item = done.pop(emitted)
            emitted += 1
            if isinstance(item, UserError) and not return_errors:
                raise item
            yield item
        if batch is None or not batch.active:
            if exhausted and not done:
                return
            continue
        for key, events in batch.step():
            if events and isinstance(events[-1], Result):
                done[key] = events[-1]
