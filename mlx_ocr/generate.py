"""The one generate loop for every MLX model: encode images, prefill, then one token per step.

Mirrors torch_ocr/generate.py. As mlx-lm's `generate_step` does, the next step's forward is queued
(`mx.async_eval`) on the still-lazy token before that token is read, so building the graph of step t+1 overlaps the
device work of step t; the cost is one wasted step after a stop id. Each step is evaluated once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from common.generation import GeneratedToken, GenerationOptions, PromptInputs, TokenLogprob
from common.timing import LoopClock, Timings

from .sampling import Processor, Sampler, make_processors, make_sampler


@dataclass
class _Choice:
    """One step's outcome for B rows; values stay lazy on the device until `_reports` reads them."""

    tokens: mx.array                 # (B,) int64
    logprobs: mx.array | None        # (B,) raw log-probability of each chosen id
    top_logprobs: mx.array | None    # (B, N) raw, descending
    top_ids: mx.array | None         # (B, N)

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


def _reports(choice: _Choice) -> list[GeneratedToken]:
    """Host values for each row (waits for this step's evaluation only)."""
    tokens = choice.tokens.tolist()
    if choice.logprobs is None:
        return [GeneratedToken(t) for t in tokens]
    chosen, values, ids = choice.logprobs.tolist(), choice.top_logprobs.tolist(), choice.top_ids.tolist()
    return [GeneratedToken(t, lp, tuple(TokenLogprob(i, v) for i, v in zip(row_ids, row_values)))
            for t, lp, row_ids, row_values in zip(tokens, chosen, ids, values)]


def _forward(model: Any, inputs: PromptInputs, image_embeds: mx.array | None, tokens: mx.array,
             generated: list[int], position: int, cache: list | None) -> mx.array:
    """Logits after `tokens`: one cached step, or (cache off) the whole extended prompt again."""
    if cache is None:
        return model.prefill(inputs.extended(generated), image_embeds, None)
    positions = mx.full(tokens.shape, position, dtype=mx.int64)
    return model.step(tokens, positions, cache)


def generate(model: Any, inputs: PromptInputs, options: GenerationOptions, timings: Timings,
             cancel: threading.Event | None = None) -> Iterator[GeneratedToken]:
    """Yield generated tokens until a stop id (yielded too), `max_new_tokens`, or `cancel` (checked between tokens).

    Timed stages: vision.compute_embeddings, decode.prefill (cache allocation + prompt forward), decode.iterative
    (one per step after the first token), decode.generate (the whole call, minus time the consumer holds a token).
    """
    if options.max_new_tokens <= 0 or (cancel is not None and cancel.is_set()):
        return
    processors, sampler = make_processors(options.sampling), make_sampler(options.sampling)
    stop_ids = frozenset(() if options.ignore_eos else options.stop_token_ids)
    clock = LoopClock()
    try:
        with timings.measure("vision.compute_embeddings"):
            image_embeds = model.encode_images(inputs)
            if image_embeds is not None:
                mx.eval(image_embeds)  # lazy until evaluated: the stage would otherwise be timed as ~0
        prompt = mx.array(inputs.input_ids, dtype=mx.int64)[None]                # (B, L)
        batch, length = prompt.shape
        with timings.measure("decode.prefill"):
            cache = model.make_cache(batch, length + options.max_new_tokens) if options.use_cache else None
            logits = model.prefill(inputs, image_embeds, cache)
            mx.eval(logits)
        # preallocated so processors get a (B, L + n) view each step without a concatenation
        history = mx.zeros((batch, length + options.max_new_tokens), dtype=mx.int64)
        history[:, :length] = prompt
        generated: list[int] = []
        clock.lap()
        choice = _choose(history[:, :length], logits, processors, sampler, options.logprobs)
        mx.async_eval(*choice.arrays())
        for index in range(options.max_new_tokens):
            last = index + 1 == options.max_new_tokens
            if cache is not None and not last:
                logits = _forward(model, inputs, image_embeds, choice.tokens, generated,
                                  inputs.next_position + index, cache)
                mx.async_eval(logits)
            (report,) = _reports(choice)
            step_ms = clock.lap()
            if index > 0:
                timings.add("decode.iterative", step_ms)
            clock.pause()
            yield report
            clock.resume()
            if report.token_id in stop_ids or last:
                return
            if cancel is not None and cancel.is_set():
                return
            history[:, length + index] = choice.tokens
            generated.append(report.token_id)
            if cache is None:  # the uncached forward needs the token on the host, so it cannot be queued early
                logits = _forward(model, inputs, image_embeds, choice.tokens, generated,
                                  inputs.next_position + index, cache)
            choice = _choose(history[:, :length + index + 1], logits, processors, sampler, options.logprobs)
            mx.async_eval(*choice.arrays())
    finally:
        clock.pause()
        timings.add("decode.generate", clock.total * 1000.0)
