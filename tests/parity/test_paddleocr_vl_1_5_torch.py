"""PaddleOCR-VL 1.5 on PyTorch against transformers 5.23.0, live, on the tiny 1.5 checkpoint (float32, CPU).

The model code is v1's (held to the reference by test_paddleocr_vl_torch.py); what 1.5 changes is checked here
end to end: the pixel budget of its preprocessor_config.json, its chat template (rendered by transformers'
own `apply_chat_template`, which for 1.5 keeps the image markers) and its six task prompts. Each case compares
prompt ids, pixels, grids and positions exactly, prefill logits within 1e-4 and greedy ids.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import paddleocr_vl as pv  # noqa: E402
from common.images import open_image  # noqa: E402
from common.models import get_family  # noqa: E402
from common.models.paddleocr_vl_1_5 import TASKS  # noqa: E402
from tests.parity.test_paddleocr_vl_torch import (  # noqa: E402
    NEW_TOKENS, RTOL, Env, _exif_jpeg, _greedy_ours, _noise, _rgba)

EOS = 2


@pytest.fixture(scope="module")
def env(paddle15_tiny: Path) -> Env:
    return Env(paddle15_tiny)


def _reference_inputs(env: Env, prompt: str, images: list[Image.Image]) -> dict:
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]}]
    text = env.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(prompt + "\nAssistant:\n")
    return env.processor(text=[text], images=images, return_tensors="pt")


def _compare(env: Env, images: list[Image.Image], prompt: str = "OCR:",
             reference_images: list[Image.Image] | None = None) -> list[int]:
    inputs = pv.build_inputs(prompt, images, env.tokenizer, env.template, env.pre)
    ref_in = _reference_inputs(env, prompt, reference_images or images)
    assert inputs.input_ids.tolist() == ref_in["input_ids"][0].tolist()
    assert inputs.image_grid_thw.tolist() == ref_in["image_grid_thw"].tolist()
    ref_pixels = ref_in["pixel_values"].reshape(ref_in["pixel_values"].shape[0], -1).numpy()
    assert np.array_equal(inputs.pixel_values, ref_pixels)
    positions, _ = env.ref.model.get_rope_index(ref_in["input_ids"], ref_in["mm_token_type_ids"],
                                                ref_in["image_grid_thw"])
    assert np.array_equal(inputs.position_ids, positions[:, 0].numpy())
    logits, ours_ids = _greedy_ours(env, inputs)
    with torch.no_grad():
        ref_logits = env.ref(**ref_in).logits[:, -1].float()
        generated = env.ref.generate(**ref_in, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=RTOL * float(ref_logits.abs().max()))
    assert ours_ids == generated[0, ref_in["input_ids"].shape[1]:].tolist()
    assert ours_ids[0] != EOS, "the tiny checkpoint must not stop at once"
    return ours_ids


def test_pixel_budget_is_the_snapshots(env: Env) -> None:
    assert (env.pre["min_pixels"], env.pre["max_pixels"]) == (112896, 1003520)
    page = _noise(2480, 3508, 2)
    t, gh, gw = pv.build_inputs("OCR:", [page], env.tokenizer, env.template, env.pre).image_grid_thw[0].tolist()
    assert gh * gw * 196 <= 1003520 < gh * gw * 196 * 1.2
    _compare(env, [page])


def test_small_image_upscaled_to_min_pixels(env: Env) -> None:
    image = _noise(300, 40, 1)
    _compare(env, [image])
    t, gh, gw = pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre).image_grid_thw[0].tolist()
    assert gh * gw * 196 >= 112896


def test_wide_tall_tiny(env: Env) -> None:
    for image in (_noise(4000, 40, 3), _noise(60, 1500, 4), _noise(9, 6, 5)):
        _compare(env, [image])


def test_rgba_grayscale_exif(env: Env) -> None:
    rgba = _rgba()
    _compare(env, [rgba], reference_images=[rgba.convert("RGB")])
    _compare(env, [_noise(240, 180, 8, mode="L")])
    data = _exif_jpeg()
    _compare(env, [open_image(data)],
             reference_images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")])


def test_two_images(env: Env) -> None:
    _compare(env, [_noise(400, 300, 9), _noise(120, 700, 10)])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_prompts(env: Env, task: str) -> None:
    _compare(env, [_noise(500, 200, 11)], prompt=TASKS[task])


def test_family_tasks_and_template(env: Env) -> None:
    family = get_family("paddleocr-vl-1.5")
    assert family.option_names == ("task",) and set(family.tasks) == set(pv.TASKS) | {"spotting", "seal"}
    settings = type("S", (), {"task": "seal"})()
    assert family.render_prompt("", settings) == "Seal Recognition:"
    with pytest.raises(Exception, match="unknown PaddleOCR-VL task 'seal'"):
        get_family("paddleocr-vl").render_prompt("", settings)
