"""GLM-OCR, framework-free: image resize and patches, the prompt's token ids and the 3D M-RoPE positions.

Exact to transformers 5.23.0: `models/glm46v/image_processing_pil_glm46v.py` (the processor GLM-OCR's
preprocessor_config.json names: `smart_resize` over two frames, PIL bicubic, CLIP rescale/normalise, `patchify`
in 2x2 merge-window order with each patch holding the frame twice), `processing_glm46v.py` (one `<|image|>` per
merged patch) and `models/glm_ocr/modeling_glm_ocr.py` `get_rope_index` (the same positions as PaddleOCR-VL's,
computed by `paddleocr_vl.mrope_positions`). As for PaddleOCR-VL, RGBA is converted with a plain
`.convert("RGB")` and EXIF orientation is applied when a file is opened (tests/data/reference/glm-ocr/RULES.md).

`<image>` in a user prompt marks where an image goes (one per image, replaced in place by its block); without
any, the images come first, then the text, in one user turn of the checkpoint's chat template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageError, ModelFilesError, UserError
from .generation import GenerationOptions
from .images import to_rgb
from .paddleocr_vl import MAX_ASPECT_RATIO, PaddleOCRVLInputs, TextEncoder, mrope_positions, render_prompt
from .sampling import SamplingOptions

#: Task name -> the prompt text of the model card's recognition tasks.
TASKS: dict[str, str] = {
    "text": "Text Recognition:",
    "table": "Table Recognition:",
    "formula": "Formula Recognition:",
}

IMAGE_TAG = "<image>"
IMAGE_START = "<|begin_of_image|>"
IMAGE_TOKEN = "<|image|>"
IMAGE_END = "<|end_of_image|>"
IMAGE_BLOCK = IMAGE_START + IMAGE_TOKEN + IMAGE_END
IMAGE_TOKEN_ID = 59280

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Inputs are PaddleOCR-VL's dataclass (ids, patches, grids, 3D positions): the same fields and position rules.
GlmOcrInputs = PaddleOCRVLInputs


@dataclass(frozen=True)
class ImageSettings:
    """The fields of preprocessor_config.json that the Glm46V image processor reads."""

    min_pixels: int = 112 * 112
    max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "preprocessor_config.json") -> ImageSettings:
        size = data.get("size") or {}
        min_pixels = size.get("shortest_edge", data.get("min_pixels", cls.min_pixels))
        max_pixels = size.get("longest_edge", data.get("max_pixels", cls.max_pixels))
        if not isinstance(min_pixels, int) or not isinstance(max_pixels, int):
            raise ConfigError(f"{source}: 'size' must hold integer 'shortest_edge' and 'longest_edge'")
        if data.get("do_resize", True) is False:
            raise ConfigError(f"{source}: 'do_resize' false is not supported (patches need sizes on the grid)")
        return cls(
            min_pixels=min_pixels, max_pixels=max_pixels,
            patch_size=int(data.get("patch_size", 14)), temporal_patch_size=int(data.get("temporal_patch_size", 2)),
            merge_size=int(data.get("merge_size", 2)),
            resample=int(data.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            image_mean=tuple(float(v) for v in data.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(v) for v in data.get("image_std", CLIP_STD)),
            do_rescale=bool(data.get("do_rescale", True)), do_normalize=bool(data.get("do_normalize", True)),
        )


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int,
                 frames: int = 2) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, `frames` x pixel count within [min_pixels, max_pixels].

    Unlike PaddleOCR-VL's rule, a side under `factor` scales both sides by one factor with int() truncation, and
    the budget counts the two frames of the temporal patch. Python's `round` (half to even) as the reference.
    """
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the "
                         f"{MAX_ASPECT_RATIO}:1 that GLM-OCR accepts")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, settings: ImageSettings) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches (gh*gw, C*T*p*p) float32 in merge-window order, grid_thw (3,) int64 = [1, gh, gw])."""
    rgb = to_rgb(image)
    t = settings.temporal_patch_size
    height, width = smart_resize(rgb.height, rgb.width, factor=settings.factor, min_pixels=settings.min_pixels,
                                 max_pixels=settings.max_pixels, frames=t)
    resized = rgb.resize((width, height), resample=Image.Resampling(settings.resample))
    pixels = np.asarray(resized).transpose(2, 0, 1)  # (C, H, W) uint8
    if settings.do_rescale:
        pixels = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if settings.do_normalize:
        mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    p, m = settings.patch_size, settings.merge_size
    channels, gh, gw = pixels.shape[0], height // p, width // p
    blocks = pixels.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # the frame twice
    patches = np.ascontiguousarray(frames.reshape(gh * gw, channels * t * p * p), dtype=np.float32)
    return patches, np.array([1, gh, gw], dtype=np.int64)


def _user_content(prompt: str, n_images: int) -> list[dict[str, Any]]:
    """Template parts: images first then the text, or one text part with the blocks spliced in at `<image>`."""
    for marker in (IMAGE_START, IMAGE_TOKEN, IMAGE_END):
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


def _expand(text: str, counts: Sequence[int]) -> str:
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(counts):
        raise ModelFilesError(f"the chat template produced {len(pieces) - 1} image token(s) for {len(counts)} "
                              "image(s)")
    return pieces[0] + "".join(IMAGE_TOKEN * count + piece for count, piece in zip(counts, pieces[1:]))


def build_inputs(prompt: str, images: Sequence[Image.Image], tokenizer: TextEncoder, template: str,
                 preprocessor: Mapping[str, Any], *, image_token_id: int = IMAGE_TOKEN_ID) -> GlmOcrInputs:
    """Prompt text + images -> model inputs: the template rendered for one user turn with the generation prompt
    (`[gMASK]<sop><|user|>\\n ... <|assistant|>\\n`), each `<|image|>` repeated once per merged patch, tokenized
    as a whole without added special tokens, positions computed."""
    settings = ImageSettings.from_dict(preprocessor)
    processed = [preprocess_image(image, settings) for image in images]
    grids = np.stack([g for _, g in processed]) if processed else np.zeros((0, 3), dtype=np.int64)
    counts = [int(np.prod(g)) // settings.merge_size ** 2 for g in grids]
    text = render_prompt(template, _user_content(prompt, len(processed)), special_tokens={})
    ids = np.asarray(tokenizer.encode(_expand(text, counts)), dtype=np.int64)
    if int((ids == image_token_id).sum()) != sum(counts):
        raise ModelFilesError(f"the tokenizer does not map {IMAGE_TOKEN} to id {image_token_id}")
    width = len(settings.image_mean) * settings.temporal_patch_size * settings.patch_size ** 2
    pixels = np.concatenate([p for p, _ in processed]) if processed else np.zeros((0, width), dtype=np.float32)
    positions = mrope_positions(ids, grids, image_token_id=image_token_id, merge_size=settings.merge_size)
    return GlmOcrInputs(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, position_ids=positions,
                        image_token_id=image_token_id)


def generation_defaults(generation_config: Mapping[str, Any]) -> GenerationOptions:
    """Greedy, no repetition rules, stop at generation_config.json's eos ids (`<|endoftext|>` and `<|user|>`)."""
    eos = generation_config.get("eos_token_id", [59246, 59253])
    stop = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return GenerationOptions(stop_token_ids=stop, sampling=SamplingOptions(do_sample=False, no_repeat_ngram_size=0))
