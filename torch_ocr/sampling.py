"""Logits processors and samplers on torch tensors: the rules of `common/sampling.py`, batch-first.

Processors take (history (B, L) int64, logits (B, V) float32) and return new logits; samplers take processed
logits and return (B,) int64 ids. The formulas are transformers' (see common/sampling.py); the n-gram ban uses the
shared incremental index so each step reads only the newest ids from the device.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.sampling import NGramBans, SamplingOptions, check_options, is_greedy, warper_steps

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[torch.Tensor], torch.Tensor]


def make_repetition_penalty(penalty: float) -> Processor:
    def process(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        score = torch.gather(logits, 1, history)
        score = torch.where(score < 0, score * penalty, score / penalty)
        return logits.scatter(1, history, score)

    return process


def make_no_repeat_ngram(size: int, window: int = 0, exempt: tuple[int, ...] = ()) -> Processor:
    bans = NGramBans(size, window, exempt)

    def process(history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        start = bans.start(history.shape[0], history.shape[1])
        banned = bans.add(history[:, start:].tolist())
        rows = [b for b, ids in enumerate(banned) for _ in ids]
        if not rows:
            return logits
        cols = [t for ids in banned for t in ids]
        out = logits.clone()
        out[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = -float("inf")
        return out

    return process


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


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


def make_warpers(options: SamplingOptions) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The warpers of `common.sampling.warper_steps` (temperature -> top-k -> top-p, only when sampling)."""
    return [lambda x, rule=WARPERS[name], value=value: rule(x, value) for name, value in warper_steps(options)]


def make_sampler(options: SamplingOptions) -> Sampler:
    """Argmax when greedy; else warp and draw with a generator owned by this sampler (seeded once, lazily on the
    logits' device, so CUDA draws stay on the GPU)."""
    check_options(options)
    if is_greedy(options):
        return lambda logits: torch.argmax(logits, dim=-1)
    warpers = make_warpers(options)
    generators: dict[torch.device, torch.Generator] = {}

    def sample(logits: torch.Tensor) -> torch.Tensor:
        generator = generators.get(logits.device)
        if generator is None:
            generator = generators[logits.device] = torch.Generator(device=logits.device)
            if options.seed is None:
                generator.seed()  # OS entropy, leaves the global RNG alone
            else:
                generator.manual_seed(options.seed)
        for warp in warpers:
            logits = warp(logits)
        probs = torch.softmax(logits.float(), dim=-1)
        # argmax(p / Exp(1)) is a draw from p without the host sync torch.multinomial needs on CUDA
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
        return torch.argmax(probs / noise, dim=-1)

    return sample
