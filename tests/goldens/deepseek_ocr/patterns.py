"""Deterministic test images for the DeepSeek-OCR goldens (NumPy + Pillow only, integer arithmetic).

The goldens were recorded from images made by `make_image`; the tests make them again, save them as PNG and
open them through `common.images`, as the reference opened the same PNG files. Integer maths and PCG64
integers only, so every platform gets the same pixels.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

KINDS = ("rgb", "rgba", "palette", "gray")


def _rgb(width: int, height: int, rng: np.random.Generator, noise: int) -> np.ndarray:
    """Gradients, an 8 px checkerboard, a few solid blocks (like text lines) and uniform noise: (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.int64)
    r = xx * 255 // max(width - 1, 1)
    g = yy * 255 // max(height - 1, 1)
    b = ((xx // 8 + yy // 8) % 2) * 200 + 20
    out = np.stack([r, g, b], axis=-1)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(1, max(width // 3, 2)))
        y1 = y0 + int(rng.integers(1, max(height // 8, 2)))
        out[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    if noise:
        out = out + rng.integers(-noise, noise + 1, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_image(kind: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """One image of `kind` ("rgb", "rgba", "palette", "gray") and size, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    if kind == "rgb":
        return Image.fromarray(_rgb(width, height, rng, 24))
    if kind == "rgba":
        rgb = _rgb(width, height, rng, 24)
        alpha = rng.integers(0, 256, (height, width)).astype(np.uint8)
        alpha[:, : width // 4] = 0  # fully transparent stripe: its stored colour must show after RGB conversion
        return Image.fromarray(np.dstack([rgb, alpha]))
    if kind == "palette":
        yy, xx = np.mgrid[0:height, 0:width].astype(np.int64)
        index = ((xx // 5 + 3 * (yy // 7)) % 256 + rng.integers(0, 3, (height, width))) % 256
        image = Image.frombytes("P", (width, height), index.astype(np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 256 * 3).astype(np.uint8).tobytes())
        return image
    if kind == "gray":
        rgb = _rgb(width, height, rng, 24).astype(np.int64)
        return Image.fromarray(((rgb[..., 0] + rgb[..., 1] + rgb[..., 2]) // 3).astype(np.uint8))
    raise ValueError(f"unknown image kind {kind!r}; known: {', '.join(KINDS)}")


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding (decoding gives the same pixels back everywhere)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def exif_jpeg_bytes(width: int, height: int, orientation: int, seed: int = 0) -> bytes:
    """A smooth JPEG (no noise, so it stays small) tagged with an EXIF orientation; committed as a file too,
    because JPEG encoders may differ between builds."""
    image = Image.fromarray(_rgb(width, height, np.random.default_rng(seed), 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, exif=exif.tobytes())
    return buffer.getvalue()
