"""DeepSeek-OCR-2, framework-free: tiles, the global view, normalisation, the image-token layout, prompt ids.

Exact to transformers 5.23's `DeepseekOcr2ImageProcessorPil` (crop to 768 px tiles, 2..6 of them, only when the
long side exceeds 768; the 1024 px global view resized by `round` and centre-padded with 127) and
`DeepseekOcr2Processor` (per image: 144 tokens per tile + 256 + 1 separator, no newline tokens). The prompt is
rendered like DeepSeek-OCR's ("plain" template, BOS 0 in front, each piece encoded on its own), so the pixel
views and prompt structures are DeepSeek-OCR's dataclasses. Deliberate deviation: RGBA drops alpha (as the
official loaders do; transformers composites on white), and EXIF orientation is applied by `common.images`.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from .deepseek_ocr import (BOS_ID, DOWNSAMPLE_RATIO, IMAGE_TOKEN, IMAGE_TOKEN_ID, MEAN, PAD_COLOR, PATCH_SIZE, STD,
                           DeepseekOCRImage, DeepseekOCRInputs, find_closest_aspect_ratio)
from .errors import UserError

__all__ = ["BASE_SIZE", "TILE_SIZE", "DeepseekOCRImage", "DeepseekOCRInputs", "build_inputs", "candidate_grids",
           "global_view", "image_token_count", "preprocess_image", "tile_image"]

#: The processor's `size` (the global view) and `tile_size`; `min_patches` / `max_patches`.
BASE_SIZE = 1024
TILE_SIZE = 768
MIN_TILES, MAX_TILES = 2, 6


# ------------------------------------------------------------------------------------------------- geometry

def candidate_grids(min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES) -> tuple[tuple[int, int], ...]:
    """Every (width tiles, height tiles) grid with min..max tiles, width-major, then stably sorted by tile count
    (`get_all_supported_aspect_ratios`): among equal counts the wider grid comes first."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_image(image: Image.Image, tile_size: int = TILE_SIZE) -> tuple[list[Image.Image], tuple[int, int]]:
    """`crop_image_to_patches`: BICUBIC resize to the best grid (the exact-tie area rule of DeepSeek-OCR, over
    `candidate_grids`), cut row-major. Returns the tiles and (width tiles, height tiles)."""
    cols, rows = find_closest_aspect_ratio(image.width, image.height, candidate_grids(), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop(((k % cols) * tile_size, (k // cols) * tile_size,
                           (k % cols + 1) * tile_size, (k // cols + 1) * tile_size)) for k in range(cols * rows)]
    return tiles, (cols, rows)


def global_view(image: Image.Image, size: int = BASE_SIZE) -> Image.Image:
    """The long side BICUBIC-resized to `size` (the short side Python-`round`ed), then centred on a `size` square
    of colour 127, the offset floored (`pad_to_square`). A short side that rounds to 0 is kept at 1 pixel (the
    reference fails there)."""
    scale = size / max(image.width, image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if new_w == new_h:
        return resized
    side = max(new_w, new_h)
    out = Image.new("RGB", (side, side), PAD_COLOR)
    out.paste(resized, ((side - new_w) // 2, (side - new_h) // 2))
    return out


def normalize(image: Image.Image) -> np.ndarray:
    """uint8 HWC -> float32 CHW: times 1/255 in float64 rounded to float32, then (x - 0.5) / 0.5 in float32."""
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    pixels = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (pixels - np.float32(MEAN)) / np.float32(STD)


def preprocess_image(image: Image.Image) -> DeepseekOCRImage:
    """All views of one RGB image: tiles when the long side exceeds `TILE_SIZE`, and the global view."""
    if image.mode != "RGB":
        raise ValueError(f"preprocess_image expects an RGB image (common.images.to_rgb), got mode {image.mode}")
    if max(image.width, image.height) > TILE_SIZE:
        tiles, crop = tile_image(image)
        stacked = np.stack([normalize(t) for t in tiles])
    else:
        stacked, crop = np.zeros((0, 3, TILE_SIZE, TILE_SIZE), np.float32), (1, 1)
    return DeepseekOCRImage(global_view=normalize(global_view(image)), tiles=stacked, crop=crop)


# ------------------------------------------------------------------------------------------------- image tokens

def queries(size: int) -> int:
    """Encoder outputs of one view of `size` pixels: (ceil(size / 16 / 4))**2 (144 for 768, 256 for 1024)."""
    return math.ceil(size / PATCH_SIZE / DOWNSAMPLE_RATIO) ** 2


def image_token_count(n_tiles: int) -> int:
    """Image positions of one image: its tiles' queries, the global view's, one separator."""
    return n_tiles * queries(TILE_SIZE) + queries(BASE_SIZE) + 1


# ------------------------------------------------------------------------------------------------- prompts

class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def build_inputs(prompt: str, images: Sequence[Image.Image], tokenizer: _Encoder, *,
                 image_token_id: int = IMAGE_TOKEN_ID, bos_id: int = BOS_ID) -> DeepseekOCRInputs:
    """Prompt ids and pixel views: the stripped prompt split on "<image>", each piece encoded without special
    tokens and followed by its image's block of `image_token_id`, BOS in front. `images` must be RGB, one per
    placeholder, else `UserError`."""
    pieces = prompt.strip().split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise UserError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) but {len(images)} "
                        f"image(s) were given; put one {IMAGE_TOKEN} where each image goes", param="prompt")
    views = tuple(preprocess_image(image) for image in images)
    ids = [bos_id]
    for piece, view in zip(pieces, views):
        ids += tokenizer.encode(piece)
        ids += [image_token_id] * image_token_count(view.tiles.shape[0])
    ids += tokenizer.encode(pieces[-1])
    return DeepseekOCRInputs(input_ids=np.asarray(ids, dtype=np.int64), images=views)
