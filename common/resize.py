"""PyTorch's 1D interpolation as explicit matrices, for backends without an identical resize (MLX).

Position tables (SAM, CLIP, PaddleOCR-VL vision) are resized with `F.interpolate` in the official code; MLX has
no antialiased bicubic, so the resize becomes a fixed linear map computed here in NumPy. Framework-free.
"""
from __future__ import annotations

import functools

import numpy as np


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
