"""The one object both front ends drive: request in, text deltas and a final result out.

CONTRACT (types below are fixed; the `Pipeline` implementation fills in the rest):
- Front ends build a `Request` (prompt text with optional `<image>` placeholders, PIL images in order, the model
  id, per-call overrides) and iterate `Pipeline.stream(request, cancel)`: zero or more `TextDelta`, then exactly
  one `Result`. `Pipeline.run(request)` collects the same into a `Result`.
- Errors a user can fix raise `common.errors.UserError` subclasses; anything else is internal.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from .generation import GeneratedToken


@dataclass
class Request:
    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    model: str | None = None                          # None: the configured active model
    overrides: dict[str, Any] = field(default_factory=dict)  # inference keys for this call only (max_new_tokens, temperature, ...)


@dataclass(frozen=True)
class TextDelta:
    text: str                                          # new text; may be "" when a token ends mid-character
    tokens: tuple[GeneratedToken, ...] = ()


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]                               # generated ids, eos excluded
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                                 # "stop" | "length" | "cancelled"
    model: str
    backend: str
    device: str
    dtype: str
    timings_ms: dict[str, float]
    logprobs: list[GeneratedToken] | None = None       # one per generated token when asked for


class Pipeline:  # implemented below by the pipeline module's owner
    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[TextDelta | Result]:
        raise NotImplementedError

    def run(self, request: Request) -> Result:
        raise NotImplementedError
