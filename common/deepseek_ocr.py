"""DeepSeek-OCR, framework-free: image views, tiling, normalisation, image-token layout and prompt ids.

Exact to the official remote code (`modeling_deepseekocr.py` `infer()`, `dynamic_preprocess`,
`BasicImageTransform`, `format_messages`/`text_encode`; `conversation.py` "plain"); rules in RULES.md.
Deliberate deviations, all where the official code would silently misbehave: a placeholder count that differs
from the image count is a `UserError` (`infer()` drops or repeats text); crop mode with image_size other than
640 is refused (its tiles would not fill their token block); several images are laid out one after another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from .errors import UserError


@dataclass(frozen=True)
class DeepseekOCRImage:
    """One image's pixel views, normalised to (v/255 - 0.5) / 0.5, float32, channels first."""

    global_view: np.ndarray          # (3, S, S): S = base_size in crop mode, image_size otherwise
    tiles: np.ndarray                # (n_tiles, 3, T, T), T = image_size; n_tiles = 0 when not tiled
    crop: tuple[int, int]            # (width tiles, height tiles); (1, 1) when not tiled


@dataclass(frozen=True)
class DeepseekOCRInputs:
    """A whole prompt: BOS first, every image position holding `image_token_id`, images in prompt order."""

    input_ids: np.ndarray            # (L,) int64
    images: tuple[DeepseekOCRImage, ...] = ()

    @property
    def next_position(self) -> int:
        # Positions are 0..L-1 over the whole prompt; generation continues at L.
        return int(self.input_ids.shape[0])

    def extended(self, token_ids: Sequence[int]) -> DeepseekOCRInputs:
        ids = np.concatenate([self.input_ids, np.asarray(token_ids, dtype=np.int64)])
        return replace(self, input_ids=ids)


# ------------------------------------------------------------------------------------------------- constants

#: Named resolution modes of the official README: (base_size, image_size, crop_mode).
MODES: dict[str, tuple[int, int, bool]] = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128815
BOS_ID = 0
#: The tokenizer's EOS text, used as a separator by the "deepseek" conversation templates.
EOS_TEXT = "<｜end▁of▁sentence｜>"
#: `infer()` hard-codes 640 both as the tiling threshold and (through `dynamic_preprocess`'s default) the tile
#: side; neither follows `image_size`.
TILE_SIZE = 640
#: `tuple(int(x * 255) for x in mean)` with mean 0.5: 127, not 128.
PAD_COLOR = (127, 127, 127)
PATCH_SIZE, DOWNSAMPLE_RATIO = 16, 4
MEAN = STD = 0.5

#: `dynamic_preprocess` candidates: every (w, h) grid with 2..9 tiles, `sorted` by tile count from a set, so
#: equal counts keep CPython's set order. Recorded from the official code; a test re-derives it.
CANDIDATE_GRIDS: tuple[tuple[int, int], ...] = (
    (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2),
    (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1),
)


# ------------------------------------------------------------------------------------------------- geometry

def check_sizes(base_size: int, image_size: int, crop_mode: bool) -> None:
    """Refuse view sizes the official pipeline cannot run (`UserError`, one line).

    In crop mode the tiles are always `TILE_SIZE` pixels while their token count follows `image_size`, so any
    other `image_size` would leave image positions without features.
    """
    for name, size in (("base_size", base_size), ("image_size", image_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < PATCH_SIZE or size % PATCH_SIZE:
            raise UserError(f"{name} must be a positive multiple of {PATCH_SIZE}, got {size!r}", param=name)
    if crop_mode and image_size != TILE_SIZE:
        raise UserError(f"crop mode tiles are {TILE_SIZE} px: image_size must be {TILE_SIZE}, got {image_size}",
                        param="image_size")


def find_closest_aspect_ratio(width: int, height: int,
                              candidates: Sequence[tuple[int, int]] = CANDIDATE_GRIDS,
                              tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """The tile grid (width tiles, height tiles) whose aspect ratio is nearest to width / height.

    Walks the candidates in order: a strictly smaller |w/h - i/j| takes over; an exactly equal one takes over
    only when the image area exceeds half the candidate's total tile area (so big squares go 3x3, not 2x2).
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in candidates:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * i * j:
            best = (i, j)
    return best


def needs_tiles(width: int, height: int) -> bool:
    """Crop mode tiles an image only when a side exceeds `TILE_SIZE` (the threshold ignores image_size)."""
    return width > TILE_SIZE or height > TILE_SIZE


def tile_image(image: Image.Image, tile_size: int = TILE_SIZE) -> tuple[list[Image.Image], tuple[int, int]]:
    """`dynamic_preprocess`: BICUBIC-resize to the chosen grid, cut row-major into square tiles.

    Returns the tiles (tile k at column k % i, row k // i) and the grid (i, j) = (width tiles, height tiles).
    No thumbnail is added (the official call leaves `use_thumbnail` False).
    """
    i, j = find_closest_aspect_ratio(image.width, image.height, CANDIDATE_GRIDS, tile_size)
    resized = image.resize((tile_size * i, tile_size * j), Image.Resampling.BICUBIC)
    tiles = [resized.crop(((k % i) * tile_size, (k // i) * tile_size,
                           (k % i + 1) * tile_size, (k // i + 1) * tile_size)) for k in range(i * j)]
    return tiles, (i, j)


def contained_size(width: int, height: int, size: int) -> tuple[int, int]:
    """`ImageOps.contain` into a size x size square (Pillow 13): the short side is Python-`round`ed."""
    if width == height:
        return size, size
    if width > height:
        return size, round(height / width * size)
    return round(width / height * size), size


def pad_to_square(image: Image.Image, size: int, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """`ImageOps.pad(image, (size, size), color=color)` as Pillow 13 does it, written out so the geometry does
    not depend on the installed Pillow: aspect-kept BICUBIC resize (small images grow), pasted centred at
    `round((size - short) * 0.5)` on a `color` canvas.
    """
    new_w, new_h = contained_size(image.width, image.height, size)
    if (new_w, new_h) == (size, size):
        return image.resize((size, size), Image.Resampling.BICUBIC)
    out = Image.new(image.mode, (size, size), color)
    if min(new_w, new_h) == 0:  # a sliver that rounds to nothing: Pillow pastes an empty image
        return out
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    out.paste(resized, (round((size - new_w) * 0.5), 0) if new_w != size else (0, round((size - new_h) * 0.5)))
    return out


def global_view(image: Image.Image, *, base_size: int, image_size: int, crop_mode: bool) -> Image.Image:
    """The one whole-image view: padded to base_size in crop mode; without crop mode a stretched resize to
    image_size when image_size <= 640 (aspect lost, as the official code does), padded to image_size above.
    """
    if crop_mode:
        return pad_to_square(image, base_size)
    if image_size <= TILE_SIZE:
        return image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return pad_to_square(image, image_size)


def normalize(image: Image.Image) -> np.ndarray:
    """`ToTensor` then `Normalize(0.5, 0.5)`: uint8 HWC -> float32 CHW, (v / 255 - 0.5) / 0.5.

    Each step in float32, in the same order, so values equal the torchvision ones bit for bit.
    """
    if image.mode != "RGB":
        raise ValueError(f"normalize expects an RGB image, got mode {image.mode}")
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    return (chw / np.float32(255) - np.float32(MEAN)) / np.float32(STD)


def preprocess_image(image: Image.Image, *, base_size: int, image_size: int, crop_mode: bool) -> DeepseekOCRImage:
    """All views of one RGB image, normalised (see `global_view`, `tile_image`)."""
    check_sizes(base_size, image_size, crop_mode)
    if image.mode != "RGB":
        raise ValueError(f"preprocess_image expects an RGB image (common.images.to_rgb), got mode {image.mode}")
    view = normalize(global_view(image, base_size=base_size, image_size=image_size, crop_mode=crop_mode))
    if crop_mode and needs_tiles(image.width, image.height):
        tiles, crop = tile_image(image)
        stacked = np.stack([normalize(t) for t in tiles])
    else:
        stacked, crop = np.zeros((0, 3, image_size, image_size), np.float32), (1, 1)
    return DeepseekOCRImage(global_view=view, tiles=stacked, crop=crop)


# ------------------------------------------------------------------------------------------------- image tokens

def query_side(size: int) -> int:
    """Feature rows (and columns) of one view of `size` pixels: ceil((size // 16) / 4)."""
    return math.ceil((size // PATCH_SIZE) / DOWNSAMPLE_RATIO)


def image_token_count(*, base_size: int, image_size: int, crop_mode: bool, crop: tuple[int, int] = (1, 1)) -> int:
    """Image positions of one image: global rows of n + 1 (a newline each), one separator, and in crop mode
    with tiles, (n_tile * i + 1) * (n_tile * j) for the tile mosaic.
    """
    if not crop_mode:
        n = query_side(image_size)
        return (n + 1) * n + 1
    n = query_side(base_size)
    count = (n + 1) * n + 1
    i, j = crop
    if i > 1 or j > 1:
        m = query_side(image_size)
        count += (m * i + 1) * (m * j)
    return count


def image_token_ids(image: DeepseekOCRImage, *, base_size: int, image_size: int, crop_mode: bool,
                    image_token_id: int = IMAGE_TOKEN_ID) -> list[int]:
    """The id block for one image: every position holds `image_token_id`. The model fills them in its own
    order (tiles, global, separator), which is not the order `infer()` lays the blocks out in.
    """
    count = image_token_count(base_size=base_size, image_size=image_size, crop_mode=crop_mode, crop=image.crop)
    return [image_token_id] * count


# ------------------------------------------------------------------------------------------------- prompts

class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _template(name: str) -> tuple[str, str]:
    """(sep, sep2) of the conversation.py templates this module renders."""
    seps = {"plain": ("", ""), "alignment": ("", ""), "deepseek": ("\n\n", EOS_TEXT), "deepseekv2": ("", EOS_TEXT)}
    if name not in seps:
        raise UserError(f"unknown prompt template {name!r}; known: {', '.join(sorted(seps))}", param="template")
    return seps[name]


def format_messages(messages: Sequence[tuple[str, str]], template: str = "plain", system: str = "") -> str:
    """`format_messages` + `Conversation.get_prompt` of conversation.py: each message content is stripped,
    then the rendered prompt is stripped.

    - "plain" (what `infer()` uses): contents joined with nothing; roles are not rendered.
    - "alignment": every user turn (even index) becomes "<image>\\n", assistant turns are kept.
    - "deepseek" / "deepseekv2": `system + sep` if a system message, then "role: content" + sep / sep2 in
      turn, and a bare "role:" for an empty content (the generation slot).
    `messages` are (role, content) pairs; the roles are rendered as given.
    """
    sep, sep2 = _template(template)
    seps = (sep, sep2)
    out = ""
    if template in ("deepseek", "deepseekv2") and system:
        out = system + sep
    for index, (role, content) in enumerate(messages):
        text = content.strip()
        if template in ("deepseek", "deepseekv2"):
            out += f"{role}: {text}{seps[index % 2]}" if text else f"{role}:"
        elif text:
            out += ("<image>\n" if template == "alignment" and index % 2 == 0 else text) + seps[index % 2]
    return out.strip()


def build_inputs(prompt: str, images: Sequence[Image.Image], tokenizer: _Encoder, *, base_size: int,
                 image_size: int, crop_mode: bool, image_token_id: int = IMAGE_TOKEN_ID,
                 bos_id: int = BOS_ID) -> DeepseekOCRInputs:
    """Prompt ids and pixel views for `infer()`'s "plain" template.

    The prompt is stripped and split on "<image>"; each piece is encoded without special tokens and followed
    by its image's block of `image_token_id`; then the last piece; BOS goes in front. A prompt without
    "<image>" and without images is plain text. `images` must be RGB (`common.images`), one per placeholder,
    else `UserError`.
    """
    check_sizes(base_size, image_size, crop_mode)
    pieces = prompt.strip().split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise UserError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) but {len(images)} "
                        f"image(s) were given; put one {IMAGE_TOKEN} where each image goes", param="prompt")
    views = tuple(preprocess_image(im, base_size=base_size, image_size=image_size, crop_mode=crop_mode)
                  for im in images)
    ids = [bos_id]
    for piece, view in zip(pieces, views):
        ids += tokenizer.encode(piece)
        ids += image_token_ids(view, base_size=base_size, image_size=image_size, crop_mode=crop_mode,
                               image_token_id=image_token_id)
    ids += tokenizer.encode(pieces[-1])
    return DeepseekOCRInputs(input_ids=np.asarray(ids, dtype=np.int64), images=views)
