"""DeepSeek-OCR-2 as a `ModelFamily`: DeepSeek-OCR's "plain" template and grounding prompts, fixed view sizes.

The preprocessing (768 px tiles, the 1024 px global view, the image-token layout) is `common/deepseek_ocr2.py`,
exact to transformers 5.23's processor; DeepSeek-OCR's `mode` presets do not apply (OCR-2 has one geometry).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from .. import deepseek_ocr2
from ..generation import PromptInputs
from ..model_config import DeepseekOCR2Config
from ..prompts import render_deepseek
from .deepseek_ocr import DeepseekOCR, has_qwen2_encoder
from .family import SIDE_FILES, Encoder, ModelSpec


class DeepseekOCR2(DeepseekOCR):
    id = "deepseek-ocr-2"
    display_name = "DeepSeek-OCR-2"
    spec = ModelSpec(
        model_id="deepseek-ocr-2",
        repo="deepseek-ai/DeepSeek-OCR-2",
        config="config.json",
        tokenizer="tokenizer.json",
        weights=("model-00001-of-000001.safetensors",),
        optional=("model.safetensors.index.json", *SIDE_FILES),
    )
    config_class = DeepseekOCR2Config
    module = "deepseek_ocr2"
    checkpoint_builder = "scripts.ckpt_deepseek_ocr2"
    # config.json says "deepseek_vl_v2" like DeepSeek-OCR; `matches_config` tells them apart by the encoder.
    model_types = ("deepseek_vl_v2", "deepseek_ocr2", "deepseekocr2", "deepseek-ocr-2")
    options = ()
    #: The official README prompt (the same as DeepSeek-OCR's).
    default_prompt = "<image>\n<|grounding|>Convert the document to markdown."
    placeholders_required = True

    def max_positions(self, config_path: Path) -> int:
        return DeepseekOCR2Config.from_file(config_path).language.max_position_embeddings

    def matches_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") != "deepseek_vl_v2" or has_qwen2_encoder(config)

    def render_prompt(self, prompt: str, settings: Any) -> str:
        return render_deepseek(prompt, settings.template)

    def prepare(self, prompt: str, images: Sequence[Image.Image], encoder: Encoder, settings: Any,
                extras: Mapping[str, Any]) -> PromptInputs:
        return deepseek_ocr2.build_inputs(prompt, images, encoder)


FAMILY = DeepseekOCR2()
