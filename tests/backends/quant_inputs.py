"""The page and prompt inputs the quantization tests of both backends feed every model (one place, so the torch
and MLX checks see the same arrays)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from common import deepseek_ocr as cd
from common import deepseek_ocr2, glm_ocr, paddleocr_vl
from common.tokenizer import Tokenizer


def page() -> Image.Image:
    """A light page with a dark rule and a reddish block."""
    image = Image.new("RGB", (180, 120), (250, 250, 250))
    image.paste((20, 20, 20), (20, 40, 160, 46))
    image.paste((120, 60, 60), (30, 70, 90, 110))
    return image


def prompt_inputs(kind: str, snapshot: Path):
    """`kind`'s model inputs for `page()` and its plain OCR prompt, built from the snapshot's side files."""
    if kind == "deepseek-ocr":
        tok = Tokenizer.from_files(snapshot / "tokenizer.json", snapshot / "tokenizer_config.json")
        return cd.build_inputs("<image>\nFree OCR.", [page()], tok, base_size=512, image_size=512, crop_mode=False)
    tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
    if kind == "deepseek-ocr-2":
        return deepseek_ocr2.build_inputs("<image>\nFree OCR.", [page()], tokenizer)
    pre = json.loads((snapshot / "preprocessor_config.json").read_text())
    template = paddleocr_vl.load_chat_template(snapshot)
    if kind == "glm-ocr":
        return glm_ocr.build_inputs("Text Recognition:", [page()], tokenizer, template, pre)
    return paddleocr_vl.build_inputs("OCR:", [page()], tokenizer, template, pre)
