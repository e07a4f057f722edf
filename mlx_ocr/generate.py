"""The single-sequence path: the engine with one slot (bit-identical to a batch of one; see engine.py).

Mirrors torch_ocr/generate.py. The engine keeps the overlap this loop always had: the next step's forward is
queued on the still-lazy token before that token is read (engine.py, `Engine.step`).
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

from common.engine import generate_one
from common.generation import GeneratedToken, GenerationOptions, PromptInputs
from common.timing import Timings

from .engine import Engine


def generate(model: Any, inputs: PromptInputs, options: GenerationOptions, timings: Timings,
             cancel: threading.Event | None = None) -> Iterator[GeneratedToken]:
    """Yield generated tokens until a stop id (yielded too), `max_new_tokens`, or `cancel` (checked between tokens).

    Timed stages: vision.compute_embeddings, decode.prefill (cache allocation + prompt forward), decode.iterative
    (one per step after the first token), decode.generate (the whole call, minus time the consumer holds a token).
    """
    return generate_one(Engine(model, 1, sync=timings.sync), inputs, options, timings, cancel)
