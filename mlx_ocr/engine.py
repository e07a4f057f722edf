"""The MLX engine: many sequences decoded together, one token per active slot per step (common/engine.py).

A new request is encoded and prefilled alone into a free slot of the `SlotCache` (batch one: exactly the
single-sequence computation), then joins the batched decode step, which feeds the last id of every slot in
`[0, end)` at once: the MoE then groups the tokens of all rows by expert. Free rows inside that range, and rows
that do not feed an id, ride along as padding whose outputs are dropped (their key is written at index 0 of a row
that is free, freed, or without a cache). With one row, or rows of equal length, the step is the single-sequence
step bit for bit; rows of different lengths attend through a length mask, and batched GEMMs may round
differently in the last bits (see the README's batching note).

Each slot keeps its own sampling: processors, sampler (seeded per request), history, logprobs.

The one difference from torch_ocr/engine.py: as mlx-lm's `generate_step` does, `step` queues the next step's
forward (`_queue`, `mx.async_eval`) on the still-lazy chosen ids before reading them on the host, so building and
running step t+1 overlaps the host work of step t. Every row that does not end at its token cap this step is fed
ahead; a row that then turns out to have stopped (stop id) or is aborted wasted that row of the step, and its key
write is harmless: its slot is freed and a prefill rewrites it from index 0. A row decoding without a cache needs
its ids on the host, so `_forward` runs its full forward at the start of the next step, as torch does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx

from common.engine import SlotState, Slots, StepToken, Stopwatch
from common.generation import GeneratedToken, GenerationOptions, PromptInputs, TokenLogprob
from common.timing import Timings

from .cache import SlotCache
from .sampling import Processor, Sampler, make_processors, make_sampler

#: Cache capacity grows in steps of this many positions, so admissions rarely reallocate.
CAPACITY_STEP = 256


@dataclass
class _Choice:
    """One row's outcome; values stay lazy on the device until `_report` reads them."""

    tokens: mx.array                 # (1,) int64
    logprobs: mx.array | None        # (1,) raw log-probability of the chosen id
    top_logprobs: mx.array | None    # (1, N) raw, descending
    top_ids: mx.array | None         # (1, N)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.tokens, self.logprobs, self.top_logprobs, self.top_ids) if a is not None]


def _top(raw: mx.array, count: int) -> tuple[mx.array, mx.array]:
    """(values, ids) of the `count` largest entries per row, descending."""
    count = min(count, raw.shape[-1])
    ids = mx.argpartition(-raw, kth=count - 1, axis=-1)[:, :count] if count < raw.shape[-1] else mx.argsort(-raw)
    values = mx.take_along_axis(raw, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(values, order, axis=-1), mx.take_along_axis(ids, order, axis=-1)


def _choose(history: mx.array, logits: mx.array, processors: list[Processor], sampler: Sampler,
            num_logprobs: int) -> _Choice:
    """Process, sample, and keep the RAW log-softmax (before processors and temperature) when asked for."""
    raw = None
    if num_logprobs > 0:
        raw = logits.astype(mx.float32)
        raw = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
    for process in processors:
        logits = process(history, logits)
    tokens = sampler(logits).astype(mx.int64)
    if raw is None:
        return _Choice(tokens, None, None, None)
    values, ids = _top(raw, num_logprobs)
    return _Choice(tokens, mx.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0], values, ids)


def _report(token_id: int, choice: _Choice) -> GeneratedToken:
    if choice.logprobs is None:
        return GeneratedToken(token_id)
    pairs = zip(choice.top_ids[0].tolist(), choice.top_logprobs[0].tolist())
    return GeneratedToken(token_id, choice.logprobs[0].item(), tuple(TokenLogprob(i, v) for i, v in pairs))


@dataclass
class _Slot(SlotState):
    """A sequence's arrays: inputs (for the cache-off path), image embeddings, history, pending logits."""

    inputs: Any = None
    image_embeds: mx.array | None = None
    processors: list[Processor] | None = None
    sampler: Sampler | None = None
    history: mx.array | None = None      # (1, L + max_new) int64: prompt then generated ids
    logits: mx.array | None = None       # (1, V) float32 for the next choice (maybe still queued); None: compute
    last: mx.array | None = None         # (1,) int64: the last chosen id, fed (or queued) to the model


class Engine:
    """`max_batch` slots over one model; `add`, `step`, `abort` as in `common.engine.Engine`."""

    def __init__(self, model: Any, max_batch: int, *, sync: Any = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.slots: Slots[_Slot] = Slots(max_batch)
        self.cache: SlotCache | None = None
        self._sync = sync

    @property
    def active(self) -> list[int]:
        return self.slots.active

    @property
    def free_slots(self) -> int:
        return self.slots.free

    def add(self, inputs: PromptInputs, options: GenerationOptions, timings: Timings) -> int:
        return self.add_many([(inputs, options, timings)])[0]

    def add_many(self, requests: Sequence[tuple[PromptInputs, GenerationOptions, Timings]]) -> list[int]:
        """Several requests at once: their images in one vision pass where the model can stack them (each
        request books its share of it), then each prompt prefilled into its own free slot. A failure frees every
        slot this call took."""
        if len(requests) > self.slots.free:
            raise RuntimeError(f"no free slot: {len(requests)} asked, {self.slots.free} of {self.max_batch} free")
        if any(options.max_new_tokens < 1 for _, options, _ in requests):
            raise ValueError("max_new_tokens must be >= 1")
        states = [_Slot.create(inputs, options, timings, inputs=inputs, processors=make_processors(options.sampling),
                               sampler=make_sampler(options.sampling)) for inputs, options, timings in requests]
        for _, _, timings in requests:
            if self._sync is not None:
                timings.sync = self._sync  # stage timings wait for the device (a step waits for its own ids)
        watch, taken = Stopwatch(self._sync), []
        try:
            embeds = self._encode([inputs for inputs, _, _ in requests], [t for _, _, t in requests])
            shared = watch.lap() / len(requests)
            for (inputs, options, timings), state, image_embeds in zip(requests, states, embeds):
                state.image_embeds, state.elapsed_ms = image_embeds, shared
                taken.append(self.slots.take(state))
                with timings.measure("decode.prefill"):
                    self._prefill(taken[-1], state)
                state.elapsed_ms += watch.lap()
        except BaseException:
            for slot in taken:
                self.slots.release(slot)
            raise
        return taken

    def _encode(self, prompts: list[PromptInputs], timings: list[Timings]) -> list[Any]:
        """Image embeddings per prompt: through `encode_images_batch` on Metal; one prompt at a time on the CPU,
        where stacking pages made each slower (measured on torch). Evaluated here, or the stage would be timed as
        ~0 (MLX is lazy)."""
        if len(prompts) == 1 or mx.default_device() == mx.cpu:
            embeds = []
            for inputs, t in zip(prompts, timings):
                with t.measure("vision.compute_embeddings"):
                    embeds.append(self.model.encode_images(inputs))
                    mx.eval([e for e in embeds[-1:] if e is not None])
            return embeds
        watch = Stopwatch(self._sync)
        embeds = self.model.encode_images_batch(prompts)
        mx.eval([e for e in embeds if e is not None])
        share = watch.lap() / len(prompts)
        for t in timings:
            t.add("vision.compute_embeddings", share)
        return embeds

    def _prefill(self, slot: int, state: _Slot) -> None:
        """The prompt of `state` through the model into `slot` (batch one); its first logits and history."""
        inputs, options = state.inputs, state.options
        prompt = mx.array(inputs.input_ids, dtype=mx.int64)[None]                # (1, L)
        needed = prompt.shape[1] + options.max_new_tokens
        views = self._reserve(needed).prefill_view(slot) if options.use_cache else None
        state.logits = self.model.prefill(inputs, state.image_embeds, views)
        state.history = mx.zeros((1, needed), dtype=mx.int64)
        state.history[:, :prompt.shape[1]] = prompt
        mx.eval(state.logits, state.history)

    def _reserve(self, needed: int) -> SlotCache:
        """The slot cache with room for `needed` positions per slot (allocated or grown in CAPACITY_STEP steps)."""
        capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        if self.cache is None:
            # One slot: exactly the room asked for, as the single-sequence loop always had.
            self.cache = self.model.make_slot_cache(self.max_batch, needed if self.max_batch == 1 else capacity)
        elif needed > self.cache.capacity:
            self.cache.reserve(capacity)
        return self.cache

    def abort(self, slot: int) -> None:
        self.slots.release(slot)

    def step(self) -> list[StepToken]:
        if not self.slots.states:
            return []
        # No device sync: reading the ids waits for this step only, a sync would also wait for the queued one.
        watch = Stopwatch()
        self._forward()
        chosen = [(slot, state, _choose(state.history[:, :state.prompt_length + len(state.generated)],
                                        state.logits, state.processors, state.sampler,
                                        state.options.logprobs))
                  for slot, state in sorted(self.slots.states.items())]
        mx.async_eval(*[array for _, _, choice in chosen for array in choice.arrays()])
        queued = self._queue(chosen)
        ids = mx.concatenate([choice.tokens for _, _, choice in chosen]).tolist()  # the step's one host sync
        step_ms = watch.lap()
        out = []
        for (slot, state, choice), token_id in zip(chosen, ids):
            report = _report(token_id, choice)
            finished = state.record(token_id, step_ms)
            if finished:
                self.slots.release(slot)
            else:
                state.history[:, state.prompt_length + len(state.generated) - 1] = choice.tokens
                state.last, state.logits = choice.tokens, queued.get(slot)
            out.append(StepToken(slot, report, finished))
        return out

    def _forward(self) -> None:
        """Logits for every slot whose last id is still unfed: a full forward of the extended prompt for a slot
        decoding without a cache (the cached slots were fed ahead by `_queue`)."""
        for state in self.slots.states.values():
            if state.logits is None and not state.options.use_cache:
                state.logits = self.model.prefill(state.inputs.extended(state.generated), state.image_embeds, None)

    def _queue(self, chosen: list[tuple[int, _Slot, _Choice]]) -> dict[int, mx.array]:
        """The next batched step over the cached slots, queued on this step's still-lazy ids; its logits per slot.

        A row's id goes where `feed_index` / `feed_position` will put it once recorded (one past the ids recorded
        so far). Rows ending at their cap this step, free rows and rows without a cache are padding at index 0.
        """
        fed = {slot: (state, choice.tokens) for slot, state, choice in chosen
               if state.options.use_cache and len(state.generated) + 1 < state.options.max_new_tokens}
        if not fed:
            return {}
        rows = max(fed) + 1
        tokens = mx.zeros(rows, dtype=mx.int64)
        positions = [0] * rows
        lengths = [0] * rows
        for slot, (state, token) in fed.items():
            tokens[slot:slot + 1] = token
            positions[slot] = state.next_position + len(state.generated)
            lengths[slot] = state.prompt_length + len(state.generated)
        logits = self.model.step(tokens, mx.array(positions, dtype=mx.int64), self.cache.decode_view(lengths))
        mx.async_eval(logits)
        return {slot: logits[slot:slot + 1] for slot in fed}
