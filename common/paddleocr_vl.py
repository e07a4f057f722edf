"""PaddleOCR-VL (v1), framework-free: image resize and patches, the prompt's token ids and the 3D M-RoPE positions.

Exact to transformers 5.23.0 `models/paddleocr_vl/`: `image_processing_pil_paddleocr_vl.py` (`smart_resize`,
PIL bicubic resize, rescale/normalise, `patchify`), `processing_paddleocr_vl.py` (one placeholder per merged
patch) and `modeling_paddleocr_vl.py` `get_rope_index`. Two deliberate deviations, both RULES.md's: RGBA is
converted with a plain `.convert("RGB")` (transformers composites on white), and the chat template is rendered
without transformers' `image_token` variable, so each image keeps its IMAGE_START / IMAGE_END markers.

`<image>` in a user prompt marks where an image goes: the prompt must then hold exactly one `<image>` per image,
and each is replaced in place by that image's tokens. Without any `<image>`, images come first, as the checkpoint's
template puts them (one user turn: images, then text).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from .errors import ConfigError, ImageError, ModelFilesError, UserError
from .generation import GenerationOptions
from .images import to_rgb
from .sampling import SamplingOptions

TASKS: dict[str, str] = {
    "ocr": "OCR:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
    "chart": "Chart Recognition:",
}

IMAGE_TAG = "<image>"
IMAGE_START = "<|IMAGE_START|>"
IMAGE_PLACEHOLDER = "<|IMAGE_PLACEHOLDER|>"
IMAGE_END = "<|IMAGE_END|>"
# The template's own default image block; rendering without `image_token` makes it emit exactly this.
IMAGE_BLOCK = IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END

# Template variables of the v1 tokenizer_config.json (no `image_token`: see the module docstring).
STANDARD_SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
}

MAX_ASPECT_RATIO = 200


class TextEncoder(Protocol):
    """Anything that turns text into ids without adding special tokens (`common.tokenizer.Tokenizer`)."""

    def encode(self, text: str) -> list[int]: ...


# ------------------------------------------------------------------------------------------------ images

@dataclass(frozen=True)
class ImageSettings:
    """The fields of preprocessor_config.json that the PIL image processor reads."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Side of one merged token in pixels (28): sizes are rounded to multiples of it."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "preprocessor_config.json") -> ImageSettings:
        """Read the settings; `min_pixels`/`max_pixels` or the newer `size` {shortest_edge, longest_edge}."""
        size = data.get("size") or {}
        min_pixels = data.get("min_pixels", size.get("shortest_edge"))
        max_pixels = data.get("max_pixels", size.get("longest_edge"))
        if not isinstance(min_pixels, int) or not isinstance(max_pixels, int):
            raise ConfigError(f"{source}: missing key 'min_pixels'/'max_pixels'")
        if data.get("do_resize", True) is False:
            raise ConfigError(f"{source}: 'do_resize' false is not supported (patches need sizes on the grid)")
        return cls(
            min_pixels=min_pixels, max_pixels=max_pixels,
            patch_size=int(data.get("patch_size", 14)), merge_size=int(data.get("merge_size", 2)),
            resample=int(data.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            image_mean=tuple(float(v) for v in data.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(v) for v in data.get("image_std", (0.5, 0.5, 0.5))),
            do_rescale=bool(data.get("do_rescale", True)), do_normalize=bool(data.get("do_normalize", True)),
        )


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels].

    Python's `round` (half to even) as in the reference: 1190x742 gives 1176x728, not 1204x756. A side under
    `factor` is first scaled up to it, keeping the aspect ratio; beta uses those adjusted sides.
    Raises `ImageError` when the aspect ratio exceeds 200.
    """
    if height < factor:
        width, height = round(width * factor / height), factor
    if width < factor:
        height, width = round(height * factor / width), factor
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the "
                         f"{MAX_ASPECT_RATIO}:1 that PaddleOCR-VL accepts")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, settings: ImageSettings) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches (gh*gw, C*p*p) float32 in raster order, grid_thw (3,) int64 = [1, gh, gw]).

    Always resized (bicubic on uint8 RGB), even to its own size: PIL's resample then leaves it unchanged, and
    skipping the call would be a second code path to keep exact.
    """
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, factor=settings.factor,
                                 min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    resized = rgb.resize((width, height), resample=Image.Resampling(settings.resample))
    pixels = np.asarray(resized).transpose(2, 0, 1)  # (C, H, W) uint8
    if settings.do_rescale:
        # The reference multiplies in float64 and rounds to float32 afterwards.
        pixels = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if settings.do_normalize:
        mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    p = settings.patch_size
    channels, gh, gw = pixels.shape[0], height // p, width // p
    patches = pixels.reshape(channels, gh, p, gw, p).transpose(1, 3, 0, 2, 4)  # (gh, gw, C, p, p)
    patches = np.ascontiguousarray(patches.reshape(gh * gw, channels * p * p), dtype=np.float32)
    return patches, np.array([1, gh, gw], dtype=np.int64)


def image_token_count(grid_thw: Sequence[int] | np.ndarray, merge_size: int) -> int:
    """Decoder tokens of one image: one per merge_size x merge_size block of patches (gh*gw/4 in v1)."""
    t, gh, gw = (int(v) for v in grid_thw)
    return t * gh * gw // (merge_size * merge_size)


# ------------------------------------------------------------------------------------------------ prompt

def load_chat_template(snapshot: str | Path) -> str:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`."""
    snapshot = Path(snapshot)
    jinja = snapshot / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = snapshot / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"no chat template: chat_template.jinja absent and {config.name} unreadable ({exc})")
    if not isinstance(template, str):
        raise ModelFilesError(f"no chat template in {snapshot.name}: neither chat_template.jinja nor "
                              "tokenizer_config.json 'chat_template'")
    return template


def render_prompt(template: str, content: Sequence[Mapping[str, Any]],
                  special_tokens: Mapping[str, str] | None = None) -> str:
    """Render one user turn (`content` parts) with the generation prompt on, the way transformers' renderer
    is configured (sandboxed, trim_blocks, lstrip_blocks), passing only the standard special tokens."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    tokens = dict(STANDARD_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    messages = [{"role": "user", "content": [dict(part) for part in content]}]
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **tokens)
    except TemplateError as exc:
        raise ModelFilesError(f"the checkpoint's chat template failed to render: {exc}") from None


def _user_content(prompt: str, n_images: int) -> list[dict[str, Any]]:
    """Template parts for the prompt: images first, or none (blocks already spliced in at `<image>` tags)."""
    for marker in (IMAGE_START, IMAGE_PLACEHOLDER, IMAGE_END):
        if marker in prompt:
            raise UserError(f"the prompt may not contain the special token {marker}; use {IMAGE_TAG} to place "
                            "an image", param="prompt")
    tags = prompt.count(IMAGE_TAG)
    if tags == 0:
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    if tags != n_images:
        raise UserError(f"the prompt has {tags} {IMAGE_TAG} placeholder(s) but {n_images} image(s) were given",
                        param="prompt")
    return [{"type": "text", "text": prompt.replace(IMAGE_TAG, IMAGE_BLOCK)}]


def expand_image_blocks(text: str, token_counts: Sequence[int]) -> str:
    """Repeat the k-th image's single placeholder token_counts[k] times (the processor's expansion)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(token_counts):
        raise ModelFilesError(f"the chat template produced {len(pieces) - 1} image placeholder(s) for "
                              f"{len(token_counts)} image(s)")
    out = [pieces[0]]
    for count, piece in zip(token_counts, pieces[1:]):
        out += [IMAGE_PLACEHOLDER * count, piece]
    return "".join(out)


# ------------------------------------------------------------------------------------------------ positions

def mrope_positions(input_ids: np.ndarray, image_grid_thw: np.ndarray, *, image_token_id: int,
                    merge_size: int) -> np.ndarray:
    """3D M-RoPE position ids (3, L) int64 (t, h, w rows), as `get_rope_index` builds them.

    Text continues one by one on all three axes. An image's placeholder run starting after position s-1 gets
    cell (i, j) of its merged grid (t, h/m, w/m) the positions (s + t_idx, s + i, s + j); text after it resumes at
    s + max(h/m, w/m). Each maximal run of `image_token_id` is one image, consumed in order.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    is_image = ids == image_token_id
    # Boundaries of maximal runs of equal is_image values.
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts, ends = np.concatenate([[0], edges]), np.concatenate([edges, [len(ids)]])
    columns, pos, grids = [], 0, iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3))
    for start, end in zip(starts, ends):
        if not is_image[start]:
            columns.append(np.broadcast_to(np.arange(pos, pos + end - start), (3, end - start)))
            pos += end - start
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError("more image placeholder runs than images")
        t, h, w = int(grid[0]), int(grid[1]) // merge_size, int(grid[2]) // merge_size
        if t * h * w != end - start:
            raise ValueError(f"image placeholder run of {end - start} tokens for a {t}x{h}x{w} merged grid")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        columns.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)
        pos += max(h, w)
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholder runs")
    if not columns:
        return np.zeros((3, 0), dtype=np.int64)
    return np.concatenate(columns, axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class PaddleOCRVLInputs:
    """A whole prompt for the model: ids with image placeholders, patches of every image, 3D positions."""

    input_ids: np.ndarray                       # (L,) int64
    pixel_values: np.ndarray                    # (N_patches, C*p*p) float32, images concatenated in order
    image_grid_thw: np.ndarray                  # (n_images, 3) int64
    position_ids: np.ndarray                    # (3, L) int64
    image_token_id: int = field(default=100295)

    @property
    def next_position(self) -> int:
        """Position of the first generated token: max over all prompt positions + 1 (not L)."""
        return int(self.position_ids.max()) + 1 if self.position_ids.size else 0

    def extended(self, token_ids: Sequence[int]) -> PaddleOCRVLInputs:
        """Append text tokens; they continue at `next_position` on all three axes."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        start = self.next_position
        positions = np.broadcast_to(np.arange(start, start + ids.size, dtype=np.int64), (3, ids.size))
        return replace(self, input_ids=np.concatenate([self.input_ids, ids]),
                       position_ids=np.concatenate([self.position_ids, positions], axis=1))


def build_inputs(prompt: str, images: Sequence[Image.Image], tokenizer: TextEncoder, template: str,
                 preprocessor: Mapping[str, Any], *, image_token_id: int = 100295,
                 special_tokens: Mapping[str, str] | None = None) -> PaddleOCRVLInputs:
    """Prompt text + images -> model inputs: template rendered, each image expanded to IMAGE_START + N x
    IMAGE_PLACEHOLDER + IMAGE_END, tokenized as a whole without added special tokens, positions computed.

    `preprocessor` is preprocessor_config.json's dict. Raises `UserError` for misplaced `<image>` tags,
    `ImageError` for unusable images.
    """
    settings = ImageSettings.from_dict(preprocessor)
    processed = [preprocess_image(image, settings) for image in images]
    grids = (np.stack([grid for _, grid in processed]) if processed else np.zeros((0, 3), dtype=np.int64))
    counts = [image_token_count(grid, settings.merge_size) for grid in grids]
    text = render_prompt(template, _user_content(prompt, len(processed)), special_tokens)
    ids = np.asarray(tokenizer.encode(expand_image_blocks(text, counts)), dtype=np.int64)
    if int((ids == image_token_id).sum()) != sum(counts):
        raise ModelFilesError(f"the tokenizer does not map {IMAGE_PLACEHOLDER} to id {image_token_id}")
    channels_patch = settings.patch_size * settings.patch_size * len(settings.image_mean)
    pixels = (np.concatenate([p for p, _ in processed]) if processed
              else np.zeros((0, channels_patch), dtype=np.float32))
    positions = mrope_positions(ids, grids, image_token_id=image_token_id, merge_size=settings.merge_size)
    return PaddleOCRVLInputs(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, position_ids=positions,
                             image_token_id=image_token_id)


def task_prompt(task: str, tasks: Mapping[str, str] = TASKS, model: str = "PaddleOCR-VL") -> str:
    """The prompt text of a named task (`tasks`, v1's by default); an unknown name is a `UserError` listing the
    known ones."""
    try:
        return tasks[task]
    except KeyError:
        raise UserError(f"unknown {model} task {task!r}; choose one of {', '.join(tasks)}",
                        param="task") from None


def generation_defaults(generation_config: Mapping[str, Any]) -> GenerationOptions:
    """Options from generation_config.json: greedy, no repetition rules, stop at its eos id(s) (2 in v1)."""
    eos = generation_config.get("eos_token_id", 2)
    stop = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return GenerationOptions(stop_token_ids=stop,
                             sampling=SamplingOptions(do_sample=False, no_repeat_ngram_size=0))
