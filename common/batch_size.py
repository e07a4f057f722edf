"""The default `--batch-size`: as many slots as the KV cache lets fit in a share of the free memory.

A slot of the batched engine holds one request's keys and values for every decoder layer:
`layers x 2 (K and V) x kv_heads x head_dim x (prompt + max_new_tokens) x dtype bytes`. The default batch is
what fits in `MEMORY_SHARE` of the memory free now (the weights are already resident, activations and the vision
tower need the rest), capped where more slots stop paying: 8 on an accelerator, 4 on a CPU (decode there is
compute-bound, and a wider batch only delays the first finished page). Framework-free: the sizes come from
config.json, the free memory from the operating system (or the caller).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

#: Share of the free memory the default batch may give to its KV cache.
MEMORY_SHARE = 0.5
#: Slots at most, per kind of device.
MAX_BATCH = {"cpu": 4, "accelerator": 8}
#: Prompt tokens assumed per page before any is prepared (DeepSeek-OCR base mode is 273 image tokens, Gundam and
#: large PaddleOCR-VL pages reach a few thousand): sized for large pages, so a default never overcommits.
PROMPT_TOKENS_ESTIMATE = 2048
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# config.json sections that hold the decoder (DeepSeek-OCR nests it, PaddleOCR-VL keeps it at the top).
_DECODER_SECTIONS = ("language_config", "text_config")


@dataclass(frozen=True)
class KVShape:
    """The decoder's KV geometry, read from config.json."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_slot(self, tokens: int, dtype_bytes: int) -> int:
        """KV cache bytes one request of `tokens` positions needs."""
        return self.layers * 2 * self.kv_heads * self.head_dim * tokens * dtype_bytes


def kv_shape(config: Mapping[str, Any]) -> KVShape | None:
    """The decoder's layers, KV heads and head size from a config.json dict (nested decoder sections
    searched); None when the file does not say (the caller then falls back to the cap)."""
    for section in (*(config.get(name) for name in _DECODER_SECTIONS), config):
        if not isinstance(section, Mapping) or "num_hidden_layers" not in section:
            continue
        try:
            heads = int(section["num_attention_heads"])
            kv_heads = int(section.get("num_key_value_heads") or heads)
            head_dim = int(section.get("head_dim") or int(section["hidden_size"]) // heads)
            return KVShape(int(section["num_hidden_layers"]), kv_heads, head_dim)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
    return None


def default_batch_size(shape: KVShape | None, *, max_new_tokens: int, dtype: str, device: str,
                       free_bytes: int | None, prompt_tokens: int = PROMPT_TOKENS_ESTIMATE) -> int:
    """Slots for a run: the KV cache of each in `MEMORY_SHARE` of `free_bytes`, between 1 and the device's cap.
    Unknown sizes or free memory give the cap (the engine still refuses what does not fit)."""
    cap = MAX_BATCH["cpu" if device == "cpu" else "accelerator"]
    if shape is None or free_bytes is None:
        return cap
    per_slot = shape.bytes_per_slot(prompt_tokens + max_new_tokens, DTYPE_BYTES.get(dtype, 4))
    return max(1, min(cap, int(free_bytes * MEMORY_SHARE // max(per_slot, 1))))


def free_memory(device: str) -> int | None:
    """Bytes free now on `device` ("cpu", "metal": the system's available memory, unified on Apple Silicon;
    "cuda": the first visible GPU as nvidia-smi reports it), or None when it cannot be told."""
    if device.startswith("cuda"):
        return _cuda_free()
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cuda_free() -> int | None:
    # Asking the driver's tool keeps common/ free of any framework import.
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        rows = [line.strip() for line in out.splitlines() if line.strip()]
        index = int(visible) if visible.isdigit() and int(visible) < len(rows) else 0
        return int(float(rows[index])) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
