"""The pipeline's narrow view of a backend: load a model, generate from prepared inputs (one sequence, or many
through an engine), nothing else.

`torch_ocr/backend.py` and `mlx_ocr/backend.py` each provide `load_model(...) -> LoadedModel`.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Protocol

from .engine import Engine
from .generation import GeneratedToken, GenerationOptions, PromptInputs
from .timing import Timings

class LoadedModel(Protocol):
    kind: str     # a model id of the registry (common.models.family_ids())
    backend: str  # "torch" | "mlx"
    device: str   # "cpu" | "cuda" | "metal"
    dtype: str    # "float32" | "bfloat16" | "float16"

    def generate(
        self,
        inputs: PromptInputs,
        options: GenerationOptions,
        timings: Timings,
        cancel: threading.Event | None = None,
    ) -> Iterator[GeneratedToken]:
        """Encode images (timed as vision.compute_embeddings), prefill (decode.prefill), then decode one token per
        step (decode.iterative) until a stop id, max_new_tokens or `cancel` is set. Stop ids are yielded too."""
        ...

    def engine(self, max_batch: int) -> Engine:
        """A batched engine (common/engine.py) with `max_batch` slots: continuous batching of many requests."""
        ...


class LoadModel(Protocol):
    def __call__(self, kind: str, config_path: Path, weights_path: Path, *, dtype: str, device: str,
                 quantize: int | None = None, group_size: int = 64) -> LoadedModel:
        """Load `kind`; `quantize` 4 or 8 quantizes the decoder at load time (groups of `group_size` weights; torch's
        8 bits have one scale per output channel instead). Each backend also loads its own converted snapshots."""
        ...
