"""Weight quantization for the MLX backend: at load time (`--quantize 4|8`) and as a converted snapshot.

Only the decoder is quantized by default (attention and MLP linears, routed experts through `SwitchLinear`, the
token embedding and the head); the vision towers and projectors stay in float unless asked, and so does the MoE
router (a plain weight, not a Linear: routing decides which experts run at all). A layer whose input width is
not a multiple of the group size stays in float too (tiny test models have such widths).

A converted snapshot keeps the module names (the original ones, except routed experts, which are stored
stacked as `...mlp.experts.{gate,up,down}_proj.*`) in MLX layout, and config.json gains
`"quantization": {"bits": B, "group_size": G, "mode": "affine", "format": "mlx"}`. That key is the format marker:
a loader that sees it skips `sanitize`, so no layout change is ever applied twice. The options, the marker and
the file copying are common/quantization.py's, shared with torch_ocr/quantize.py (whose layout differs).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from common.errors import UserError
from common.models import get_family
from common.quantization import MARKER_KEY  # noqa: F401 - re-exported: the marker's key in config.json
from common.quantization import (check_options, copy_snapshot_files, kind_of, prepare_output,
                                 write_config)
from common.quantization import read_config as _read_config

FORMAT = "mlx"  # the marker's `format`: this backend's layout


def read_config(config_path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json without the marker, and the marker; a torch-quantized snapshot is a `UserError`."""
    return _read_config(config_path, backend=FORMAT)


def _quantizable(path: str, module: nn.Module, prefixes: tuple[str, ...], group_size: int) -> bool:
    if not hasattr(module, "to_quantized") or not path.startswith(prefixes):
        return False
    if isinstance(module, nn.Embedding) and not path.endswith("embed_tokens"):
        return False  # position tables are read whole and resized, not looked up: they stay float
    return module.weight.shape[-1] % group_size == 0


def quantize_model(model: nn.Module, *, bits: int, group_size: int = 64, prefixes: tuple[str, ...]) -> list[str]:
    """Quantize, in place, every Linear / Embedding / SwitchLinear under `prefixes`; returns their paths."""
    check_options(bits, group_size)
    chosen: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if _quantizable(path, module, prefixes, group_size):
            chosen.append(path)
            return True
        return False

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return chosen


def apply_marker(model: nn.Module, marker: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Give a freshly built model the quantized structure a converted snapshot was saved with.

    A module is quantized exactly when the snapshot holds its `scales`, so the structure follows the file.
    """
    nn.quantize(model, group_size=int(marker["group_size"]), bits=int(marker["bits"]),
                class_predicate=lambda path, module: f"{path}.scales" in weights)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (quantized weights, scales and biases included)."""
    return sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))


def convert(model_dir: Path, output_dir: Path, bits: int, group_size: int = 64, *,
            kind: str | None = None, dtype: str = "bfloat16", vision: bool = False) -> dict[str, int]:
    """Write a pre-quantized snapshot of an original checkpoint directory; returns weight bytes before/after.

    The output directory holds the other snapshot files unchanged, `model.safetensors` in MLX module layout
    and config.json with the quantization marker. `kind` (a model id) is read from config.json's `model_type`
    when not given; `vision` also quantizes the vision towers and projector.
    """
    check_options(bits, group_size)
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    raw = prepare_output(model_dir, output_dir)
    module = _model_module(kind or kind_of(raw, model_dir))
    model = module.load(model_dir / "config.json", model_dir, dtype=dtype, device="cpu")
    before = weight_bytes(model)
    prefixes = module.QUANTIZE_PREFIXES + (module.VISION_PREFIXES if vision else ())
    quantize_model(model, bits=bits, group_size=group_size, prefixes=prefixes)
    after = weight_bytes(model)
    copy_snapshot_files(model_dir, output_dir)
    mx.save_safetensors(str(output_dir / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    write_config(output_dir, raw, {"bits": bits, "group_size": group_size, "mode": "affine", "format": FORMAT})
    return {"before": before, "after": after}


def _model_module(kind: str):
    # Imported here: the model modules import this one.
    return importlib.import_module(f"mlx_ocr.{get_family(kind).module}")

