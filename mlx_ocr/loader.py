"""Reading original hub checkpoints into MLX modules: lazy, one copy, strict in both directions.

Mirrors `torch_ocr/loader.py`. `mx.load` maps a safetensors file lazily, so a cast is only a node in the graph
until the first evaluation; the random initial values of a freshly built module are never evaluated either, so
assigning the checkpoint in their place never holds the weights twice.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from common.errors import CheckpointError, ModelFilesError, UserError

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}


def checkpoint_files(weights: Path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, an index json, or a directory holding either."""
    weights = Path(weights)
    if weights.is_dir():
        index = sorted(weights.glob("*.safetensors.index.json"))
        if index:
            weights = index[0]
        else:
            files = sorted(weights.glob("*.safetensors"))
            if not files:
                raise ModelFilesError(f"no .safetensors file in {weights}")
            return files
    if weights.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFilesError(f"{weights}: unreadable safetensors index ({exc})") from None
        return [weights.parent / s for s in shards]
    if not weights.is_file():
        raise ModelFilesError(f"weights file not found: {weights}")
    return [weights]


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

    Raises `CheckpointError` listing every missing key, unexpected key and shape mismatch by name. Computed
    constants are kept under `_`-prefixed attributes, which MLX does not count as parameters.
    """
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tuple(expected[k].shape) != tuple(tensors[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched[:20])}")
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(parts))
    module.update(tree_unflatten(list(tensors.items())))


def resolve_device(device: str) -> str:
    """Select the MLX default device: 'cpu', 'metal' (Apple GPU), 'cuda' (MLX's CUDA build) or 'auto'.

    Returns the device's name as reported to the user. MLX has one default device per process, so this is a
    global choice; every array made afterwards lives there.
    """
    has_metal = mx.metal.is_available()
    has_cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    if device == "auto":
        device = "metal" if has_metal else "cuda" if has_cuda else "cpu"
    if device == "cpu":
        mx.set_default_device(mx.cpu)
        return "cpu"
    if device == "metal" and not has_metal:
        raise UserError("--device metal was asked for, but MLX sees no Metal GPU", param="device")
    if device == "cuda" and not has_cuda:
        raise UserError("--device cuda was asked for, but this MLX build has no CUDA device "
                        "(use --backend torch)", param="device")
    if device not in ("metal", "cuda"):
        raise UserError(f"unknown device {device!r} (auto, cpu, metal or cuda)", param="device")
    mx.set_default_device(mx.gpu)
    return device


# --------------------------------------------------------------------------- position-table resampling

def _cubic_aa(x: np.float32) -> np.float32:
    # PyTorch's antialiased bicubic uses Keys' kernel with a = -0.5 (as PIL does), not the -0.75 of plain bicubic.
    a = np.float32(-0.5)
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.float32(0.0)


@functools.lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """The (out_size, in_size) float32 matrix M with `M @ x == F.interpolate(x, out_size, mode)` along one axis.

    MLX has no antialiased bicubic resize, and 2D bilinear / antialiased bicubic in PyTorch are separable, so a
    table resize becomes `M_h @ T @ M_w.T`. Modes (align_corners False throughout, as every caller uses):
    "linear" (also each axis of "bilinear"; half-pixel centres, source clamped at 0) and "bicubic_aa"
    (antialias=True; PyTorch's `_compute_weights_aa`: support 2 * max(scale, 1), weights normalised per row).
    The arithmetic is float32 step by step, as PyTorch's CPU kernels do it: in float64 the weights drift by
    up to 1e-5 from PyTorch's for a 127 -> 79 table.
    """
    f = np.float32
    scale = f(in_size) / f(out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    for i in range(out_size):
        if mode == "linear":
            # One rounding for scale * (i + 0.5) - 0.5, as the fused multiply-add PyTorch's kernel compiles to.
            src = max(f(float(scale) * (i + 0.5) - 0.5), f(0.0))
            i0 = int(src)
            i1 = i0 + 1 if i0 < in_size - 1 else i0
            lam = f(src - f(i0))
            matrix[i, i0] += f(1.0) - lam
            matrix[i, i1] += lam
        elif mode == "bicubic_aa":
            support = f(2.0) * scale if scale >= 1.0 else f(2.0)
            invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
            center = scale * (f(i) + f(0.5))
            # int() truncates toward zero like the C++ static_cast it mirrors.
            xmin = max(int(center - support + f(0.5)), 0)
            xmax = min(int(center + support + f(0.5)), in_size)
            weights = [f(_cubic_aa((f(j) - center + f(0.5)) * invscale)) for j in range(xmin, xmax)]
            total = f(0.0)
            for w in weights:
                total = f(total + w)
            for k, w in enumerate(weights):
                matrix[i, xmin + k] = w / total if total != 0 else w
        else:
            raise ValueError(f"unknown interpolation mode {mode!r}")
    matrix.flags.writeable = False  # shared through the cache: tables of one size are resized often
    return matrix


def resize_table(table: mx.array, size: tuple[int, int], mode: str) -> mx.array:
    """Resize a (H, W, C) table to (size[0], size[1], C) in float32, exactly as F.interpolate on (1, C, H, W)."""
    m_h = mx.array(interpolation_matrix(table.shape[0], size[0], mode))
    m_w = mx.array(interpolation_matrix(table.shape[1], size[1], mode))
    t = table.astype(mx.float32)
    t = mx.einsum("oh,hwc->owc", m_h, t)
    return mx.einsum("pw,owc->opc", m_w, t)
