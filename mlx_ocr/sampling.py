"""Logits processors and samplers on MLX arrays: the rules of `common/sampling.py`, batch-first.

mlx-lm's `sample_utils` is used where it implements the same rule: `greedy_sampler` and the repetition penalty
(given the whole history as context). Its sampler chain is not: it applies top-p before top-k and measures both on
the untempered distribution, while transformers (the official `infer()`) applies temperature -> top-k -> top-p,
so the warpers below are our own. mlx-lm has no n-gram ban; it uses the shared incremental index.
"""
from __future__ import annotations

import secrets
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler, make_repetition_penalty as mlx_lm_repetition_penalty

from common.sampling import NGramBans, SamplingOptions, check_options, is_greedy, warper_steps

Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]

# mlx-lm penalises only the last `context_size` ids; the largest int32 slice bound means the whole history.
_WHOLE_HISTORY = 2**31 - 1


def make_repetition_penalty(penalty: float) -> Processor:
    rule = mlx_lm_repetition_penalty(penalty, _WHOLE_HISTORY)

    def process(history: mx.array, logits: mx.array) -> mx.array:
        # mlx-lm takes one 1-D history for all rows (and assigns into the array it is given): go row by row on slices
        return mx.concatenate([rule(history[b], logits[b:b + 1]) for b in range(logits.shape[0])], axis=0)

    return process


def make_no_repeat_ngram(size: int, window: int = 0, exempt: tuple[int, ...] = ()) -> Processor:
    bans = NGramBans(size, window, exempt)

    def process(history: mx.array, logits: mx.array) -> mx.array:
        start = bans.start(history.shape[0], history.shape[1])
        banned = bans.add(history[:, start:].tolist())
        rows = [b for b, ids in enumerate(banned) for _ in ids]
        if not rows:
            return logits
        cols = [t for ids in banned for t in ids]
        out = mx.array(logits)
        out[mx.array(rows), mx.array(cols)] = -mx.inf
        return out

    return process


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    return logits / temperature


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    k = min(top_k, logits.shape[-1])
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits < kth, -mx.inf, logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    order = mx.argsort(logits, axis=-1)
    ordered = mx.take_along_axis(logits, order, axis=-1)
    cumulative = mx.cumsum(mx.softmax(ordered.astype(mx.float32), axis=-1), axis=-1)
    drop_sorted = cumulative <= (1 - top_p)
    keep_best = mx.arange(logits.shape[-1]) == logits.shape[-1] - 1
    drop_sorted = mx.logical_and(drop_sorted, mx.logical_not(keep_best))
    drop = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, -mx.inf, logits)


def make_processors(options: SamplingOptions) -> list[Processor]:
    """Repetition penalty then the n-gram ban, each only when on (transformers' order)."""
    check_options(options)
    processors: list[Processor] = []
    if options.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        processors.append(make_no_repeat_ngram(
            options.no_repeat_ngram_size, options.ngram_window, options.ngram_exempt_ids))
    return processors


WARPERS = {"temperature": apply_temperature, "top_k": apply_top_k, "top_p": apply_top_p}


def make_warpers(options: SamplingOptions) -> list[Callable[[mx.array], mx.array]]:
    """The warpers of `common.sampling.warper_steps` (temperature -> top-k -> top-p, only when sampling)."""
    return [lambda x, rule=WARPERS[name], value=value: rule(x, value) for name, value in warper_steps(options)]


def make_sampler(options: SamplingOptions) -> Sampler:
    """Argmax when greedy; else warp and draw with a key chain owned by this sampler (never the global key)."""
    check_options(options)
    if is_greedy(options):
        return greedy_sampler
    warpers = make_warpers(options)
    state = {"key": mx.random.key(secrets.randbits(63) if options.seed is None else options.seed)}

    def sample(logits: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        for warp in warpers:
            logits = warp(logits)
        return mx.random.categorical(logits.astype(mx.float32), axis=-1, key=key)

    return sample
