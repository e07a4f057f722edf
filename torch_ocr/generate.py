"""The one generate loop for every torch model: encode images, prefill, then one token per step.

The model is driven only through its protocol (`encode_images`, `make_cache`, `prefill`, `step`), so DeepSeek-OCR
and PaddleOCR-VL share this loop. Tensors are batch-first throughout (history (B, L), logits (B, V), tokens (B,));
`generate` serves one sequence, `_choose` and `_reports` already work on B rows. Mirrored in mlx_ocr/generate.py.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from common.generation import GeneratedToken, GenerationOptions, PromptInputs, TokenLogprob
from common.timing import LoopClock, Timings

from .sampling import Processor, Sampler, make_processors, make_sampler


@dataclass
class _Choice:
    """One step's outcome for B rows; values stay on the device until `_reports` reads them."""

    tokens: torch.Tensor                 # (B,) int64
    logprobs: torch.Tensor | None        # (B,) raw log-probability of each chosen id
    top_logprobs: torch.Tensor | None    # (B, N) raw, descending
    top_ids: torch.Tensor | None         # (B, N)


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


def _reports(choice: _Choice) -> list[GeneratedToken]:
    """Host values for each row (the one device->host transfer of a step)."""
    tokens = choice.tokens.tolist()
    if choice.logprobs is None:
        return [GeneratedToken(t) for t in tokens]
    chosen, values, ids = choice.logprobs.tolist(), choice.top_logprobs.tolist(), choice.top_ids.tolist()
    return [GeneratedToken(t, lp, tuple(TokenLogprob(i, v) for i, v in zip(row_ids, row_values)))
            for t, lp, row_ids, row_values in zip(tokens, chosen, ids, values)]


def _forward(model: Any, inputs: PromptInputs, image_embeds: torch.Tensor | None, tokens: torch.Tensor,
             generated: list[int], position: int, cache: list | None) -> torch.Tensor:
    """Logits after `tokens`: one cached step, or (cache off) the whole extended prompt again."""
    if cache is None:
        return model.prefill(inputs.extended(generated), image_embeds, None)
    positions = torch.full(tokens.shape, position, dtype=torch.int64, device=tokens.device)
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
        with timings.measure("vision.compute_embeddings"), torch.inference_mode():
            image_embeds = model.encode_images(inputs)
        prompt = torch.as_tensor(inputs.input_ids, dtype=torch.int64)[None]       # (B, L)
        batch, length = prompt.shape
        with timings.measure("decode.prefill"), torch.inference_mode():
            cache = model.make_cache(batch, length + options.max_new_tokens) if options.use_cache else None
            logits = model.prefill(inputs, image_embeds, cache)
        # preallocated so processors get a (B, L + n) view each step without a concatenation
        history = torch.empty((batch, length + options.max_new_tokens), dtype=torch.int64, device=logits.device)
        history[:, :length] = prompt.to(logits.device)
        generated: list[int] = []
        clock.lap()
        for index in range(options.max_new_tokens):
            with torch.inference_mode():  # never held across a yield: grad mode is the consumer's thread's too
                choice = _choose(history[:, :length + index], logits, processors, sampler, options.logprobs)
            (report,) = _reports(choice)
            step_ms = clock.lap()
            if index > 0:
                timings.add("decode.iterative", step_ms)
            clock.pause()
            yield report
            clock.resume()
            if report.token_id in stop_ids or index + 1 == options.max_new_tokens:
                return
            if cancel is not None and cancel.is_set():
                return
            history[:, length + index] = choice.tokens
            generated.append(report.token_id)
            with torch.inference_mode():
                logits = _forward(model, inputs, image_embeds, choice.tokens, generated,
                                  inputs.next_position + index, cache)
    finally:
        clock.pause()
        timings.add("decode.generate", clock.total * 1000.0)
