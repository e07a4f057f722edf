"""Reading original hub checkpoints into MLX modules: lazy, one copy, strict in both directions.

Mirrors `torch_ocr/loader.py`. `mx.load` maps a safetensors file lazily, so a cast is only a node in the graph
until the first evaluation; the random initial values of a freshly built module are never evaluated either, so
assigning the checkpoint in their place never holds the weights twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from common.checkpoints import check_strict, checkpoint_files
from common.errors import ModelFilesError, UserError
from common.resize import interpolation_matrix

from . import quantize as quantization

M = TypeVar("M", bound=nn.Module)

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}


def read_safetensors(
    files: Iterable[Path],
    *,
    dtype: mx.Dtype,
    skip: Callable[[str], bool] = lambda name: False,
) -> Iterator[tuple[str, mx.array]]:
    """Yield (original name, lazy array) from the files, floating arrays cast to `dtype` (also lazily)."""
    for path in files:
        try:
            arrays = mx.load(str(path))
        except Exception as exc:  # MLX raises a plain RuntimeError/ValueError for a corrupt header
            raise ModelFilesError(f"{path}: not a readable safetensors file ({exc})") from None
        for name, array in arrays.items():
            if skip(name):
                continue
            if mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(dtype)
            yield name, array


def assign_strict(module: nn.Module, tensors: dict[str, mx.array]) -> None:
    """Assign `tensors` to the module's parameters by name; every one must match exactly.

    Raises `CheckpointError` listing every missing key, unexpected key and shape mismatch by name
    (`common.checkpoints.check_strict`). Computed constants are kept under `_`-prefixed attributes, which MLX
    does not count as parameters.
    """
    expected = dict(tree_flatten(module.parameters()))
    check_strict({name: value.shape for name, value in expected.items()},
                 {name: value.shape for name, value in tensors.items()})
    module.update(tree_unflatten(list(tensors.items())))


def resolve_device(device: str) -> str:
    """'auto' -> 'metal' when MLX sees an Apple GPU, else 'cpu'; sets MLX's (process-wide) default device.

    Returns the device's name as reported to the user. 'cuda' belongs to the torch backend. The one device rule
    of this backend: `mlx_ocr.backend` and `load_module` both call it.
    """
    if device == "auto":
        device = "metal" if mx.metal.is_available() else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        raise UserError("device cuda needs the torch backend (backend torch)", param="device")
    if device == "metal":
        if not mx.metal.is_available():
            raise UserError("device metal was asked for, but MLX sees no Metal GPU", param="device")
        mx.set_default_device(mx.gpu)
        return "metal"
    if device != "cpu":
        raise UserError(f"unknown device {device!r} for MLX (auto, cpu or metal)", param="device")
    mx.set_default_device(mx.cpu)
    return "cpu"


def load_module(
    model_class: Callable[[Any], M],
    config_class: Any,
    config_path: str | Path,
    weights_path: str | Path,
    *,
    dtype: str,
    device: str,
    sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]],
    skip: Callable[[str], bool] = lambda name: False,
    quantize: int | None = None,
    group_size: int = 64,
    prefixes: tuple[str, ...] = (),
) -> M:
    """`model_class(config_class.from_dict(config.json))` with the checkpoint assigned, evaluated once.

    The one loading sequence of both models: options checked and the device chosen before anything is built,
    arrays read lazily (those `skip` names never read), cast to `dtype`, `sanitize`d to module names and
    assigned strictly; `quantize` bits then quantize the modules under `prefixes`. A converted snapshot (its
    config.json carries the quantization marker) is already in module layout and quantized: it skips
    `sanitize` and loads as saved. Raises `UserError` for bad options, `CheckpointError` on a mismatch.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})", param="dtype")
    if quantize:
        quantization.check_options(quantize, group_size)
    resolve_device(device)
    raw, marker = quantization.read_config(Path(config_path))
    model = model_class(config_class.from_dict(raw, str(config_path)))
    tensors = dict(read_safetensors(checkpoint_files(Path(weights_path)), dtype=DTYPES[dtype], skip=skip))
    if marker is None:
        assign_strict(model, sanitize(tensors))
        if quantize:
            quantization.quantize_model(model, bits=quantize, group_size=group_size, prefixes=prefixes)
    else:
        quantization.apply_marker(model, marker, tensors)
        assign_strict(model, tensors)
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- position-table resampling

def resize_table(table: mx.array, size: tuple[int, int], mode: str) -> mx.array:
    """Resize a (H, W, C) table to (size[0], size[1], C) in float32, exactly as F.interpolate on (1, C, H, W)."""
    m_h = mx.array(interpolation_matrix(table.shape[0], size[0], mode))
    m_w = mx.array(interpolation_matrix(table.shape[1], size[1], mode))
    t = table.astype(mx.float32)
    t = mx.einsum("oh,hwc->owc", m_h, t)
    return mx.einsum("pw,owc->opc", m_w, t)
