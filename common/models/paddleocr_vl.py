"""PaddleOCR-VL as a `ModelFamily`: named tasks (`task`), the checkpoint's chat template, generation_config.json.

The preprocessing itself (smart resize, patches, 3D positions, template rendering) is `common/paddleocr_vl.py`;
this module only says how the rest of the project reaches it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from .. import paddleocr_vl
from ..errors import UserError
from ..generation import PromptInputs
from ..model_config import PaddleOCRVLConfig
from ..prompts import IMAGE_PLACEHOLDER, paddle_prompt_text
from ..sampling import SamplingOptions
from .family import SIDE_FILES, Encoder, ModelFamily, ModelFiles, ModelOption, ModelSpec, read_json


class PaddleOCRVL(ModelFamily):
    id = "paddleocr-vl"
    display_name = "PaddleOCR-VL"
    spec = ModelSpec(
        model_id="paddleocr-vl",
        repo="PaddlePaddle/PaddleOCR-VL",
        config="config.json",
        tokenizer="tokenizer.json",
        weights=("model.safetensors",),
        # The SentencePiece model and added tokens are fetched too, in case a tokenizer.json must be rebuilt.
        optional=("tokenizer.model", "added_tokens.json", *SIDE_FILES),
    )
    config_class = PaddleOCRVLConfig
    module = "paddleocr_vl"
    checkpoint_builder = "scripts.ckpt_paddleocr_vl"
    model_types = ("paddleocr_vl",)
    #: Task name -> prompt text (`task`); PaddleOCR-VL 1.5 has two more.
    tasks: Mapping[str, str] = paddleocr_vl.TASKS
    options = (ModelOption("task", tuple(tasks)),)
    #: The OCR task's prompt; the template puts the images before it.
    default_prompt = "OCR:"
    placeholders_required = False

    def max_positions(self, config_path: Path) -> int:
        return PaddleOCRVLConfig.from_file(config_path).text.max_position_embeddings

    def load_extras(self, files: ModelFiles) -> dict[str, Any]:
        template = (Path(files.chat_template).read_text(encoding="utf-8") if files.chat_template
                    else paddleocr_vl.load_chat_template(Path(files.config).parent))
        return {"chat_template": template, "preprocessor": read_json(files.preprocessor_config)}

    def generation_defaults(self, generation_config: Mapping[str, Any]) -> SamplingOptions:
        return paddleocr_vl.generation_defaults(generation_config).sampling

    def user_prompt(self, prompt: str | None, n_images: int, options: Mapping[str, Any], *,
                    param: str | None = None) -> str:
        if options.get("task") is not None:
            if prompt is None and n_images:
                return ""  # the task's text replaces the prompt; the images go in front of it
            if prompt is not None and prompt.replace(IMAGE_PLACEHOLDER, "").strip():
                raise UserError("a task replaces the prompt text: give the task or a prompt with text, not both",
                                param="task")
        return super().user_prompt(prompt, n_images, options, param=param)

    def render_prompt(self, prompt: str, settings: Any) -> str:
        text = paddle_prompt_text(prompt)
        if not settings.task:
            return text
        return with_task(text, paddleocr_vl.task_prompt(settings.task, self.tasks, self.display_name))

    def prepare(self, prompt: str, images: Sequence[Image.Image], encoder: Encoder, settings: Any,
                extras: Mapping[str, Any]) -> PromptInputs:
        return paddleocr_vl.build_inputs(prompt, images, encoder, extras.get("chat_template") or "",
                                         extras.get("preprocessor") or {})


def with_task(prompt: str, task_text: str) -> str:
    """A task replaces the prompt's text (its leading placeholders are already gone: the template puts images
    first). Placeholders inside the text cannot be kept around a replaced text."""
    if IMAGE_PLACEHOLDER in prompt:
        raise UserError("a task replaces the prompt text; with a task, put <image> placeholders only at the "
                        "start of the prompt", param="task")
    return task_text


FAMILY = PaddleOCRVL()
