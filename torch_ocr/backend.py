"""The torch backend as the pipeline sees it: `load_model(kind, ...)` -> a `LoadedModel` (common/backend.py).

Device and dtype are resolved here once; the model file for `kind` is imported only when asked for, so loading
DeepSeek-OCR never imports PaddleOCR-VL's code. Mirrored in mlx_ocr/backend.py.
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from common.errors import UserError
from common.generation import GeneratedToken, GenerationOptions, PromptInputs
from common.models import get_family
from common.timing import Timings

from .engine import Engine
from .generate import generate
from .layers import pack_linears
from .loader import DTYPES, resolve_device

def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bfloat16 on an accelerator, float32 on the CPU (bfloat16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return "float32" if device.type == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (auto, {', '.join(DTYPES)})", param="dtype")
    return dtype


def _sync_for(device: torch.device):
    """What `Timings` calls before each clock read, so asynchronous CUDA work is measured honestly."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class TorchModel:
    """A loaded model plus where it runs; `generate` is one sequence, `engine` many (engine.py)."""

    backend = "torch"

    def __init__(self, kind: str, model: Any, device: torch.device, dtype: str) -> None:
        self.kind = kind
        self.model = model
        self.torch_device = device
        self.device = device.type
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
               quantize: int | None = None, group_size: int = 64) -> TorchModel:
    """Build `kind` from its config.json and checkpoint on `device` ('auto', 'cpu', 'cuda', 'cuda:N'); `quantize`
    4 or 8 quantizes the decoder at load time (a converted torch snapshot is loaded as saved; an MLX one is a
    `UserError` naming --backend mlx)."""
    family = get_family(kind)  # an unknown id is an UnknownModelError listing the known ones
    torch_device = resolve_device(device)
    dtype_name = resolve_dtype(dtype, torch_device)
    # The family's module: `load(config_path, weights_path, *, dtype, device, quantize, group_size)`.
    module = importlib.import_module(f"torch_ocr.{family.module}")
    model = module.load(Path(config_path), Path(weights_path), dtype=DTYPES[dtype_name], device=torch_device,
                        quantize=quantize, group_size=group_size)
    pack_linears(model)  # float32 on the CPU: the one-off weight reorder belongs to loading, not the first page
    return TorchModel(kind, model, torch_device, dtype_name)
