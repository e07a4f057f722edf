"""The MLX backend as the pipeline sees it: `load_model(kind, ...)` -> a `LoadedModel` (common/backend.py).

Device and dtype are resolved here once; the model file for `kind` is imported only when asked for. Mirrors
torch_ocr/backend.py. Devices: 'auto' -> Metal when available, else the CPU; 'cuda' belongs to the torch backend.
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx

from common.errors import UserError
from common.generation import GeneratedToken, GenerationOptions, PromptInputs
from common.models import get_family
from common.timing import Timings

from .engine import Engine
from .generate import generate
from .loader import DTYPES, resolve_device

def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on Metal, float32 on the CPU (bfloat16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (auto, {', '.join(DTYPES)})", param="dtype")
    return dtype


def _sync_for(device: str):
    """What `Timings` calls before each clock read: wait for queued MLX work (the same on every MLX device)."""
    return mx.synchronize


def metal_available() -> bool:
    """Whether MLX can run on a Metal GPU here (what `--backend auto` asks on Apple Silicon)."""
    return bool(mx.metal.is_available())


class MLXModel:
    """A loaded model plus where it runs; `generate` is one sequence, `engine` many (engine.py)."""

    backend = "mlx"

    def __init__(self, kind: str, model: Any, device: str, dtype: str) -> None:
        self.kind = kind
        self.model = model
        self.device = device
        self.dtype = dtype
        self.sync = _sync_for(device)

    def generate(self, inputs: PromptInputs, options: GenerationOptions, timings: Timings,
                 cancel: threading.Event | None = None) -> Iterator[GeneratedToken]:
        timings.sync = self.sync
        return generate(self.model, inputs, options, timings, cancel)

    def engine(self, max_batch: int) -> Engine:
        """A batched engine over this model: `max_batch` slots decoded together (common/engine.py)."""
        return Engine(self.model, max_batch, sync=self.sync)


def load_model(kind: str, config_path: Path, weights_path: Path, *, dtype: str, device: str,
               quantize: int | None = None, group_size: int = 64) -> MLXModel:
    """Build `kind` from its config.json and checkpoint on `device` ('auto', 'cpu', 'metal'); `quantize` 4 or 8
    quantizes the decoder at load time (a converted snapshot is loaded as saved)."""
    family = get_family(kind)  # an unknown id is an UnknownModelError listing the known ones
    device_name = resolve_device(device)
    dtype_name = resolve_dtype(dtype, device_name)
    # The family's module: `load(config_path, weights_path, *, dtype, device)`.
    module = importlib.import_module(f"mlx_ocr.{family.module}")
    model = module.load(Path(config_path), Path(weights_path), dtype=dtype_name, device=device_name,
                        quantize=quantize, group_size=group_size)
    return MLXModel(kind, model, device_name, dtype_name)
