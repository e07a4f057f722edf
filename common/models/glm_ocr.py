"""GLM-OCR as a `ModelFamily`: the recognition tasks (`task`: text, table, formula), the checkpoint's chat
template, generation_config.json.

Prompt handling is PaddleOCR-VL's (images before the text unless `<image>` places them, a task replaces the
text), so the family derives from it; the preprocessing itself is `common/glm_ocr.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from .. import glm_ocr
from ..generation import PromptInputs
from ..model_config import GlmOcrConfig
from ..sampling import SamplingOptions
from .family import SIDE_FILES, Encoder, ModelOption, ModelSpec
from .paddleocr_vl import PaddleOCRVL


class GlmOCR(PaddleOCRVL):
    id = "glm-ocr"
    display_name = "GLM-OCR"
    spec = ModelSpec(
        model_id="glm-ocr",
        repo="zai-org/GLM-OCR",
        config="config.json",
        tokenizer="tokenizer.json",
        weights=("model.safetensors",),
        optional=SIDE_FILES,
    )
    config_class = GlmOcrConfig
    module = "glm_ocr"
    checkpoint_builder = "scripts.ckpt_glm_ocr"
    model_types = ("glm_ocr",)
    tasks = glm_ocr.TASKS
    options = (ModelOption("task", tuple(glm_ocr.TASKS)),)
    default_prompt = glm_ocr.TASKS["text"]

    def max_positions(self, config_path: Path) -> int:
        return GlmOcrConfig.from_file(config_path).text.max_position_embeddings

    def generation_defaults(self, generation_config: Mapping[str, Any]) -> SamplingOptions:
        return glm_ocr.generation_defaults(generation_config).sampling

    def prepare(self, prompt: str, images: Sequence[Image.Image], encoder: Encoder, settings: Any,
                extras: Mapping[str, Any]) -> PromptInputs:
        return glm_ocr.build_inputs(prompt, images, encoder, extras.get("chat_template") or "",
                                    extras.get("preprocessor") or {})


FAMILY = GlmOCR()
