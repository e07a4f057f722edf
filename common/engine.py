"""The engine surface both backends implement, and the per-slot bookkeeping that needs no framework.

An engine decodes several sequences at once, one token per active slot per `step()`, in the manner of vLLM's
`add_request` / `step` / `abort_request`:

    engine = model.engine(max_batch=8)
    slot = engine.add(inputs, options, timings)     # vision + prefill into a free slot
    for out in engine.step():                       # one token for every active slot
        ...                                         # out.slot, out.token, out.finished
    engine.abort(slot)                              # frees the slot at once

A slot finishes when its token is a stop id or its `max_new_tokens`-th token; it is freed in the same `step`, so
a new request can be added before the next one. Requests may be added between any two steps (continuous
batching). The tensor work (`torch_ocr/engine.py`, `mlx_ocr/engine.py`) sits on top of `Slots` and `SlotState`.

Timings (per request, the stage names of `common/timing.py`): `add` books vision.compute_embeddings and
decode.prefill; every later token books the wall time of the step that produced it as decode.iterative (in a
batch every row waits for the whole step); decode.generate is vision + prefill + the steps, booked when the slot
ends.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, Protocol, TypeVar

from .generation import GeneratedToken, GenerationOptions, PromptInputs
from .timing import Timings


@dataclass(frozen=True)
class StepToken:
    """One slot's token of one `step()`; `finished` means the slot was freed after it (stop id or cap)."""

    slot: int
    token: GeneratedToken
    finished: bool


class Engine(Protocol):
    """What the pipeline drives; `torch_ocr.engine.Engine` and `mlx_ocr.engine.Engine` implement it."""

    max_batch: int

    def add(self, inputs: PromptInputs, options: GenerationOptions, timings: Timings) -> int:
        """Encode the images and prefill the prompt into the lowest free slot; returns the slot. Raises
        `RuntimeError` when no slot is free (check `free_slots` first)."""
        ...

    def step(self) -> list[StepToken]:
        """One token for every active slot, in slot order."""
        ...

    def abort(self, slot: int) -> None:
        """Free `slot` now (its request ends without another token); unknown or free slots are ignored."""
        ...

    @property
    def active(self) -> list[int]:
        """Busy slots, ascending."""
        ...

    @property
    def free_slots(self) -> int:
        ...


@dataclass
class SlotState:
    """Host-side state of one sequence; backends subclass it to add their tensors (history, logits, caches).

    The last chosen id is fed to the model at the next step: at KV index `feed_index` (the prompt plus the ids fed
    before it) and position id `feed_position`, which differ for PaddleOCR-VL's M-RoPE.
    """

    options: GenerationOptions
    timings: Timings
    prompt_length: int
    next_position: int
    stop_ids: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)   # ids chosen so far (the last one not yet fed)
    elapsed_ms: float = 0.0                              # vision + prefill + steps, for decode.generate

    @classmethod
    def create(cls, prompt: PromptInputs, options: GenerationOptions, timings: Timings, **extra: Any) -> Any:
        """A fresh state for `prompt`; `extra` sets a subclass's own fields."""
        stops = frozenset(() if options.ignore_eos else options.stop_token_ids)
        return cls(options=options, timings=timings, prompt_length=int(len(prompt.input_ids)),
                   next_position=int(prompt.next_position), stop_ids=stops, **extra)

    @property
    def feed_index(self) -> int:
        """KV-cache index the last chosen id is written at when fed: the prompt plus every earlier generated id."""
        return self.prompt_length + max(len(self.generated) - 1, 0)

    @property
    def feed_position(self) -> int:
        """Position id of the last chosen id, when it is fed to the model."""
        return self.next_position + len(self.generated) - 1

    def record(self, token_id: int, step_ms: float) -> bool:
        """Book one chosen id; True when the sequence is finished (a stop id or the token cap)."""
        if self.generated:  # the first token comes from the prefill, booked there
            self.timings.add("decode.iterative", step_ms)
        self.elapsed_ms += step_ms
        self.generated.append(token_id)
        return token_id in self.stop_ids or len(self.generated) >= self.options.max_new_tokens

    def close(self) -> None:
        self.timings.add("decode.generate", self.elapsed_ms)


S = TypeVar("S", bound=SlotState)


class Slots(Generic[S]):
    """A fixed number of slots; new sequences take the LOWEST free one, so the busy rows stay packed at the front
    and a decode step runs over the prefix `[0, end)` (see `end`)."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.states: dict[int, S] = {}

    def take(self, state: S) -> int:
        for slot in range(self.max_batch):
            if slot not in self.states:
                self.states[slot] = state
                return slot
        raise RuntimeError(f"no free slot: all {self.max_batch} are busy")

    def release(self, slot: int) -> S | None:
        state = self.states.pop(slot, None)
        if state is not None:
            state.close()
        return state

    @property
    def active(self) -> list[int]:
        return sorted(self.states)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.states)

    @property
    def end(self) -> int:
        """One past the highest busy slot: the rows a batched decode step covers (free rows inside are padding)."""
        return max(self.states, default=-1) + 1


class Stopwatch:
    """Milliseconds between `lap`s, after the device caught up (`sync`), for the step timings above."""

    def __init__(self, sync: Any = None) -> None:
        self._sync = sync or (lambda: None)
        self._start = time.perf_counter()

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        elapsed, self._start = (now - self._start) * 1000.0, now
        return elapsed


def generate_one(engine: Engine, inputs: PromptInputs, options: GenerationOptions, timings: Timings,
                 cancel: Any = None) -> Iterator[GeneratedToken]:
    """One sequence through an engine: its tokens until a stop id (yielded too), `max_new_tokens`, or `cancel`
    (a `threading.Event`, checked between tokens). The slot is freed however the consumer stops."""
    if options.max_new_tokens <= 0 or (cancel is not None and cancel.is_set()):
        return
    slot = engine.add(inputs, options, timings)
    try:
        while True:
            (out,) = engine.step()
            yield out.token
            if out.finished or (cancel is not None and cancel.is_set()):
                return
    finally:
        engine.abort(slot)
