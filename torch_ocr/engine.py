"""The torch engine: many sequences decoded together, one token per active slot per step (common/engine.py).

A new request is encoded and prefilled alone into a free slot of the `SlotCache` (batch one: exactly the
single-sequence computation), then joins the batched decode step, which feeds the last id of every slot in
`[0, end)` at once: the MoE then groups the tokens of all rows by expert. Free rows inside that range, and rows
whose first id came from their prefill, ride along as padding whose outputs are dropped (their key is written at
their own next index, which the next real write overwrites). With one row, or rows of equal length, the step
is the single-sequence step bit for bit; rows of different lengths attend through a length mask, and batched
GEMMs may round differently in the last bits (see the README's batching note).

Each slot keeps its own sampling: processors, sampler (seeded per request), history, logprobs.
Mirrored in mlx_ocr/engine.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from common.engine import SlotState, Slots, StepToken, Stopwatch
from common.generation import GeneratedToken, GenerationOptions, PromptInputs, TokenLogprob
from common.timing import Timings

from .cache import SlotCache
from .sampling import Processor, Sampler, make_processors, make_sampler

#: Cache capacity grows in steps of this many positions, so admissions rarely reallocate.
CAPACITY_STEP = 256


@dataclass
class _Choice:
    """One row's outcome; values stay on the device until `_report` reads them."""

    tokens: torch.Tensor                 # (1,) int64
    logprobs: torch.Tensor | None        # (1,) raw log-probability of the chosen id
    top_logprobs: torch.Tensor | None    # (1, N) raw, descending
    top_ids: torch.Tensor | None         # (1, N)


def _choose(history: torch.Tensor, logits: torch.Tensor, processors: list[Processor], sampler: Sampler,
            num_logprobs: int) -> _Choice:
    """Process, sample, and keep the RAW log-softmax (before processors and temperature) when asked for."""
    raw = torch.log_softmax(logits.float(), dim=-1) if num_logprobs > 0 else None
    for process in processors:
        logits = process(history, logits)
    tokens = sampler(logits).to(torch.int64)
    if raw is None:
        return _Choice(tokens, None, None, None)
    top = torch.topk(raw, min(num_logprobs, raw.shape[-1]), dim=-1)
    return _Choice(tokens, raw.gather(1, tokens[:, None])[:, 0], top.values, top.indices)


def _report(token_id: int, choice: _Choice) -> GeneratedToken:
    if choice.logprobs is None:
        return GeneratedToken(token_id)
    pairs = zip(choice.top_ids[0].tolist(), choice.top_logprobs[0].tolist())
    return GeneratedToken(token_id, float(choice.logprobs[0]), tuple(TokenLogprob(i, v) for i, v in pairs))


@dataclass
class _Slot(SlotState):
    """A sequence's tensors: inputs (for the cache-off path), image embeddings, history, pending logits."""

    inputs: Any = None
    image_embeds: torch.Tensor | None = None
    processors: list[Processor] | None = None
    sampler: Sampler | None = None
    history: torch.Tensor | None = None      # (1, L + max_new) int64: prompt then generated ids
    logits: torch.Tensor | None = None       # (1, V) float32 for the next choice; None while the last id is unfed
    last: torch.Tensor | None = None         # (1,) int64 on the device: the last chosen id, to feed


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
                timings.sync = self._sync  # stage timings wait for the device, as the step timings do
        watch, taken = Stopwatch(self._sync), []
        with torch.inference_mode():
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
        """Image embeddings per prompt: through `encode_images_batch` on an accelerator; one prompt at a time on
        the CPU, where the vision GEMMs are already large and stacking pages made each slower (measured)."""
        if len(prompts) == 1 or self.model.device.type == "cpu":
            embeds = []
            for inputs, t in zip(prompts, timings):
                with t.measure("vision.compute_embeddings"):
                    embeds.append(self.model.encode_images(inputs))
            return embeds
        watch = Stopwatch(self._sync)
        embeds = self.model.encode_images_batch(prompts)
        share = watch.lap() / len(prompts)
        for t in timings:
            t.add("vision.compute_embeddings", share)
        return embeds

    def _prefill(self, slot: int, state: _Slot) -> None:
        """The prompt of `state` through the model into `slot` (batch one); its first logits and history."""
        inputs, options = state.inputs, state.options
        prompt = torch.as_tensor(inputs.input_ids, dtype=torch.int64)[None]       # (1, L)
        needed = prompt.shape[1] + options.max_new_tokens
        views = self._reserve(needed).prefill_view(slot) if options.use_cache else None
        state.logits = self.model.prefill(inputs, state.image_embeds, views)
        state.history = torch.empty((1, needed), dtype=torch.int64, device=state.logits.device)
        state.history[:, :prompt.shape[1]] = prompt.to(state.logits.device)

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
        watch = Stopwatch(self._sync)
        with torch.inference_mode():
            self._forward()
            chosen = [(slot, state, _choose(state.history[:, :state.prompt_length + len(state.generated)],
                                            state.logits, state.processors, state.sampler,
                                            state.options.logprobs))
                      for slot, state in sorted(self.slots.states.items())]
            ids = torch.cat([choice.tokens for _, _, choice in chosen]).tolist()  # the step's one host sync
            step_ms = watch.lap()
            out = []
            for (slot, state, choice), token_id in zip(chosen, ids):
                report = _report(token_id, choice)
                finished = state.record(token_id, step_ms)
                if finished:
                    self.slots.release(slot)
                else:
                    state.history[:, state.prompt_length + len(state.generated) - 1] = choice.tokens
                    state.last, state.logits = choice.tokens, None
                out.append(StepToken(slot, report, finished))
        return out

    def _forward(self) -> None:
        """Logits for every slot whose last id is still unfed: one batched step over the cached slots, and a
        full forward of the extended prompt for a slot decoding without a cache."""
        states = self.slots.states
        cached = {s: st for s, st in states.items() if st.logits is None and st.options.use_cache}
        for state in states.values():
            if state.logits is None and not state.options.use_cache:
                state.logits = self.model.prefill(state.inputs.extended(state.generated), state.image_embeds, None)
        if not cached:
            return
        rows = max(cached) + 1
        device = self.model.device
        tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        positions = torch.zeros(rows, dtype=torch.int64, device=device)
        lengths = [0] * rows
        for slot in range(rows):
            state = states.get(slot)
            if state is None or not state.options.use_cache:
                continue  # a free row (or one without a cache): padding at index 0
            lengths[slot] = state.feed_index
            if slot in cached:
                tokens[slot:slot + 1] = state.last
                positions[slot] = state.feed_position
            else:  # prefilled, first id not chosen yet: padding written where its first fed id will go
                positions[slot] = state.prompt_length
        logits = self.model.step(tokens, positions, self.cache.decode_view(lengths))
        for slot, state in cached.items():
            state.logits = logits[slot:slot + 1]
