"""Sampling rules, specified once: the options and a NumPy reference of every logits processor and sampler.

Backends implement the same rules in `torch_ocr/sampling.py` and `mlx_ocr/sampling.py`; a test runs all three on
the same logits and requires the same result. The official DeepSeek-OCR `infer()` decodes greedily with a
no-repeat n-gram ban of size 20 over the WHOLE sequence (prompt ids included).

The rules are those of transformers' `RepetitionPenaltyLogitsProcessor`, `NoRepeatNGramLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` (min_tokens_to_keep 1), applied in that
order, with warpers only when sampling. The windowed n-gram ban with exempt ids is the DeepSeek-OCR vLLM recipe's
`NoRepeatNGramLogitsProcessor` (n-grams that start inside the last `window` ids; whitelisted ids never banned).
Deviation: `do_sample` with temperature 0 decodes greedily (transformers refuses it; OpenAI clients send it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 0.0          # ignored unless do_sample (as transformers does)
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # 1.0 = off
    no_repeat_ngram_size: int = 20    # 0 = off
    ngram_window: int = 0             # 0 = the whole sequence; the vLLM recipe's guard uses 90
    ngram_exempt_ids: tuple[int, ...] = ()  # ids never banned by the n-gram rule (vLLM recipe: table cells)
    seed: int | None = None


Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (history (B, L) int64, logits (B, V)) -> logits
Sampler = Callable[[np.ndarray], np.ndarray]                 # logits (B, V) -> ids (B,) int64


def check_options(options: SamplingOptions) -> None:
    """Refuse values no rule can honour, naming the request field (every backend's `make_*` calls this)."""
    if options.temperature < 0:
        raise UserError(f"temperature must be >= 0, got {options.temperature}", param="temperature")
    if not 0.0 < options.top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {options.top_p}", param="top_p")
    if options.top_k < 0:
        raise UserError(f"top_k must be >= 0, got {options.top_k}", param="top_k")
    if options.repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0, got {options.repetition_penalty}",
                        param="repetition_penalty")
    if options.no_repeat_ngram_size < 0 or options.ngram_window < 0:
        raise UserError("no_repeat_ngram_size and ngram_window must be >= 0", param="no_repeat_ngram_size")


def is_greedy(options: SamplingOptions) -> bool:
    """True when the next id is the argmax of the processed logits (no warpers, no randomness)."""
    return not options.do_sample or options.temperature == 0.0


class NGramIndex:
    """Incremental index of one sequence's n-grams: prefix (n-1 ids) -> {next id: latest start position}.

    transformers rebuilds every n-gram of the sequence at each step (O(L) per token, quadratic over a page of
    OCR output); this index adds the one new n-gram per token instead. Keeping the latest start of each n-gram
    answers the windowed question too: an n-gram counts when it starts at or after `len - window`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids: list[int] = []
        self._table: dict[tuple[int, ...], dict[int, int]] = {}

    def extend(self, ids: Iterable[int]) -> None:
        n = self.size
        for token in ids:
            self.ids.append(int(token))
            start = len(self.ids) - n
            if start >= 0:
                prefix = tuple(self.ids[start:start + n - 1])
                self._table.setdefault(prefix, {})[self.ids[-1]] = start

    def banned(self, window: int = 0, exempt: frozenset[int] = frozenset()) -> list[int]:
        """Ids that would complete an n-gram already present (inside the last `window` ids when window > 0)."""
        n, length = self.size, len(self.ids)
        if length < n:
            return []
        prefix = tuple(self.ids[length - n + 1:]) if n > 1 else ()
        earliest = max(0, length - window) if window > 0 else 0
        found = self._table.get(prefix, {})
        return sorted(t for t, start in found.items() if start >= earliest and t not in exempt)


class NGramBans:
    """Per-row `NGramIndex`es over the growing (B, L) history, so a backend reads only the ids not yet seen.

    Use: `start = bans.start(B, L)`, then `bans.add(history[:, start:] as host lists)` returns each row's banned
    ids. A history that is not an extension of the last one (another batch size, a shorter sequence) rebuilds.
    """

    def __init__(self, size: int, window: int, exempt: Iterable[int]) -> None:
        self.size, self.window, self.exempt = size, window, frozenset(int(i) for i in exempt)
        self._rows: list[NGramIndex] = []

    def start(self, batch: int, length: int) -> int:
        """First history position not yet indexed (0 after a reset)."""
        seen = len(self._rows[0].ids) if self._rows else 0
        if len(self._rows) != batch or length < seen:
            self._rows, seen = [NGramIndex(self.size) for _ in range(batch)], 0
        return seen

    def add(self, new_ids: list[list[int]]) -> list[list[int]]:
        for row, new in zip(self._rows, new_ids):
            row.extend(new)
        return [row.banned(self.window, self.exempt) for row in self._rows]


# ---- NumPy reference: written for clarity, the spec the backends are tested against ----------------------------

def repetition_penalty(history: np.ndarray, logits: np.ndarray, penalty: float) -> np.ndarray:
    """Seen ids (whole history): positive logits divided by `penalty`, negative ones multiplied."""
    out = logits.copy()
    for b in range(logits.shape[0]):
        seen = np.unique(history[b])
        score = out[b, seen]
        out[b, seen] = np.where(score < 0, score * penalty, score / penalty)
    return out


def no_repeat_ngram(history: np.ndarray, logits: np.ndarray, size: int, window: int = 0,
                    exempt: Iterable[int] = ()) -> np.ndarray:
    """-inf for every id that would complete an n-gram already in the history (a plain scan, no index)."""
    out, exempt_set = logits.copy(), set(int(i) for i in exempt)
    for b in range(logits.shape[0]):
        ids = [int(t) for t in history[b]]
        if len(ids) < size:
            continue
        prefix = tuple(ids[len(ids) - size + 1:])
        start = max(0, len(ids) - window) if window > 0 else 0
        for i in range(start, len(ids) - size + 1):
            if tuple(ids[i:i + size - 1]) == prefix and ids[i + size - 1] not in exempt_set:
                out[b, ids[i + size - 1]] = -np.inf
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / np.float32(temperature)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the logits >= the k-th largest (ties at the boundary all survive, as `torch.topk` thresholding does)."""
    k = min(top_k, logits.shape[-1])
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1:k]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Drop the least likely ids whose cumulative probability (ascending order) is <= 1 - top_p; keep the best."""
    order = np.argsort(logits, axis=-1, kind="stable")
    ordered = np.take_along_axis(logits, order, axis=-1).astype(np.float64)
    probs = np.exp(ordered - ordered.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    drop_sorted = cumulative <= 1.0 - top_p
    drop_sorted[:, -1] = False
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits).astype(logits.dtype)


def make_processors(options: SamplingOptions) -> list[Processor]:
    """Logits processors in transformers' order: repetition penalty, then the n-gram ban."""
    check_options(options)
    processors: list[Processor] = []
    if options.repetition_penalty != 1.0:
        processors.append(lambda h, x: repetition_penalty(h, x, options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        processors.append(lambda h, x: no_repeat_ngram(
            h, x, options.no_repeat_ngram_size, options.ngram_window, options.ngram_exempt_ids))
    return processors


def warper_steps(options: SamplingOptions) -> list[tuple[str, float | int]]:
    """(rule, value) of the warpers that change anything, in transformers' order: temperature -> top_k ->
    top_p; none when greedy. Every backend builds its warpers from this list, so the order lives here once."""
    if is_greedy(options):
        return []
    steps = [("temperature", options.temperature, options.temperature != 1.0),
             ("top_k", options.top_k, options.top_k > 0),
             ("top_p", options.top_p, options.top_p < 1.0)]
    return [(name, value) for name, value, active in steps if active]


WARPERS = {"temperature": apply_temperature, "top_k": apply_top_k, "top_p": apply_top_p}


def make_warpers(options: SamplingOptions) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The warpers of `warper_steps`, as functions of the logits."""
    return [lambda x, rule=WARPERS[name], value=value: rule(x, value) for name, value in warper_steps(options)]


def make_sampler(options: SamplingOptions) -> Sampler:
    """Argmax when greedy; else warp and draw from the softmax with a generator seeded once per sampler."""
    check_options(options)
    warpers = make_warpers(options)
    if is_greedy(options):
        return lambda logits: np.argmax(logits, axis=-1).astype(np.int64)
    rng = np.random.default_rng(options.seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        for warp in warpers:
            logits = warp(logits)
        z = logits.astype(np.float64)
        probs = np.exp(z - z.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)

    return sample
