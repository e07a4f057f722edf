"""Plain data that crosses the boundary between the pipeline and a backend's generate loop.

A backend receives a model's prepared inputs (NumPy, built in `common/deepseek_ocr.py` or
`common/paddleocr_vl.py`) and `GenerationOptions`, and yields `GeneratedToken`s: ints and floats only, so the
server's worker thread can hand them to the event loop without touching a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from .sampling import SamplingOptions


@dataclass(frozen=True)
class GenerationOptions:
    """How many tokens, when to stop, what to report. Sampling rules live in `SamplingOptions`."""

    max_new_tokens: int = 512
    ignore_eos: bool = False          # generate exactly max_new_tokens (benchmarks)
    use_cache: bool = True            # False recomputes the whole sequence each step (must give the same ids)
    logprobs: int = 0                 # top-N raw log-probabilities per generated token (0 = off)
    stop_token_ids: tuple[int, ...] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class GeneratedToken:
    """One generated id with, when asked for, the RAW log-probabilities (before temperature, penalties, bans)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


class PromptInputs(Protocol):
    """What every model's prepared inputs offer the generate loop (both are frozen dataclasses in common/)."""

    input_ids: np.ndarray  # (L,) int64: the whole prompt, image placeholder ids included

    @property
    def next_position(self) -> int:
        """Position id of the first generated token (L for DeepSeek-OCR; max M-RoPE position + 1 for PaddleOCR-VL)."""
        ...

    def extended(self, token_ids: Sequence[int]) -> PromptInputs:
        """The same prompt with `token_ids` appended as text (used when the KV cache is off)."""
        ...
