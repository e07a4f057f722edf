"""PaddleOCR-VL 1.5 as a `ModelFamily`: v1's model code and preprocessing with the 1.5 snapshot's side files
(preprocessor min/max pixels, chat template) and two more tasks, `Spotting:` and `Seal Recognition:`.

Nothing is hard-coded for 1.5 beyond the task list: the pixel budget and the template come from the snapshot,
which `PaddleOCRVL.load_extras` reads (tests/data/reference/paddleocr-vl-1.5/RULES.md).
"""
from __future__ import annotations

from .. import paddleocr_vl
from .family import SIDE_FILES, ModelOption, ModelSpec
from .paddleocr_vl import PaddleOCRVL

TASKS: dict[str, str] = {
    **paddleocr_vl.TASKS,
    "spotting": "Spotting:",
    "seal": "Seal Recognition:",
}


class PaddleOCRVL15(PaddleOCRVL):
    id = "paddleocr-vl-1.5"
    display_name = "PaddleOCR-VL 1.5"
    spec = ModelSpec(
        model_id="paddleocr-vl-1.5",
        repo="PaddlePaddle/PaddleOCR-VL-1.5",
        config="config.json",
        tokenizer="tokenizer.json",
        weights=("model.safetensors",),
        optional=("tokenizer.model", "added_tokens.json", *SIDE_FILES),
    )
    checkpoint_builder = "scripts.ckpt_paddleocr_vl_1_5"
    # model_types: v1's ("paddleocr_vl"); the config.json of both versions names the same architecture.
    tasks = TASKS
    options = (ModelOption("task", tuple(TASKS)),)


FAMILY = PaddleOCRVL15()
