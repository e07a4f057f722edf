"""Sampling rules, specified once: the options and a NumPy reference of every logits processor and sampler.

Backends implement the same rules in `torch_ocr/sampling.py` and `mlx_ocr/sampling.py`; a test runs all three on
the same logits and requires the same result. The official DeepSeek-OCR `infer()` decodes greedily with a
no-repeat n-gram ban of size 20 over the WHOLE sequence (prompt ids included).
"""
from __future__ import annotations

from dataclasses import dataclass


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
