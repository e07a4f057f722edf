"""DeepSeek-OCR as a `ModelFamily`: size presets (`mode`), the "plain" template, the no-repeat 20-gram.

The preprocessing itself (crops, views, image-token layout) is `common/deepseek_ocr.py`, exact to the official
`infer()`; this module only says how the rest of the project reaches it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from .. import deepseek_ocr
from ..generation import PromptInputs
from ..model_config import DeepseekOCRConfig
from ..prompts import IMAGE_PLACEHOLDER, render_deepseek
from ..sampling import SamplingOptions
from .family import SIDE_FILES, Encoder, ModelFamily, ModelOption, ModelSpec

SIZE_KEYS = ("base_size", "image_size", "crop_mode")


class DeepseekOCR(ModelFamily):
    id = "deepseek-ocr"
    display_name = "DeepSeek-OCR"
    spec = ModelSpec(
        model_id="deepseek-ocr",
        repo="deepseek-ai/DeepSeek-OCR",
        config="config.json",
        tokenizer="tokenizer.json",
        weights=("model-00001-of-000001.safetensors",),
        # The index is tiny and lists every tensor; kept so the snapshot matches the published one.
        optional=("model.safetensors.index.json", *SIDE_FILES),
    )
    config_class = DeepseekOCRConfig
    module = "deepseek_ocr"
    checkpoint_builder = "scripts.ckpt_deepseek_ocr"
    model_types = ("deepseek_vl_v2", "deepseek-ocr", "deepseekocr")
    options = (ModelOption("mode", tuple(deepseek_ocr.MODES), {
        name: dict(zip(SIZE_KEYS, sizes)) for name, sizes in deepseek_ocr.MODES.items()}),)
    #: The official README prompt.
    default_prompt = "<image>\n<|grounding|>Convert the document to markdown."
    placeholders_required = True

    def max_positions(self, config_path: Path) -> int:
        return DeepseekOCRConfig.from_file(config_path).language.max_position_embeddings

    def matches_config(self, config: Mapping[str, Any]) -> bool:
        # DeepSeek-OCR-2 shares the model_type; its vision tower is a Qwen2 encoder where this one has CLIP.
        return not has_qwen2_encoder(config)

    def generation_defaults(self, generation_config: Mapping[str, Any]) -> SamplingOptions:
        # The official infer() decodes greedily with no_repeat_ngram_size=20, whatever generation_config says.
        return SamplingOptions(do_sample=False, no_repeat_ngram_size=20)

    def default_prompt_for(self, n_images: int) -> str:
        # The default prompt is written for one page; more pages get one placeholder each, in front.
        body = self.default_prompt.split(IMAGE_PLACEHOLDER + "\n", 1)[1]
        return f"{IMAGE_PLACEHOLDER}\n" * n_images + body

    def render_prompt(self, prompt: str, settings: Any) -> str:
        return render_deepseek(prompt, settings.template)

    def image_sizes(self, settings: Any) -> tuple[int, int, bool]:
        """(base_size, image_size, crop_mode): the `mode` preset when one is set, else the three keys."""
        if settings.mode:
            return deepseek_ocr.MODES[settings.mode]
        return settings.base_size, settings.image_size, settings.crop_mode

    def prepare(self, prompt: str, images: Sequence[Image.Image], encoder: Encoder, settings: Any,
                extras: Mapping[str, Any]) -> PromptInputs:
        base_size, image_size, crop_mode = self.image_sizes(settings)
        return deepseek_ocr.build_inputs(prompt, images, encoder, base_size=base_size, image_size=image_size,
                                         crop_mode=crop_mode)


def has_qwen2_encoder(config: Mapping[str, Any]) -> bool:
    """True for a DeepSeek-OCR-2 config.json: `vision_config.width` names the "qwen2-0-5b" encoder."""
    vision = config.get("vision_config")
    width = vision.get("width") if isinstance(vision, dict) else None
    return isinstance(width, dict) and "qwen2-0-5b" in width


FAMILY = DeepseekOCR()
