"""PaddleOCR-VL preprocessing without a framework: resize rules, patches, prompt ids, 3D positions.

Expected values are worked out by hand from RULES.md (sizes, token layout, positions), not by the code.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import paddleocr_vl as pv
from common.errors import ImageError, ModelFilesError, UserError
from common.tokenizer import Tokenizer
from scripts.ckpt_paddleocr_vl import build_tokenizer

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "paddleocr-vl"
PRE = json.loads((REFERENCE / "preprocessor_config.json").read_text())
TEMPLATE = (REFERENCE / "chat_template.jinja").read_text()
BOS, START, PLACE, END = 100273, 101305, 100295, 101306


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(build_tokenizer(103424))


def _resize(h: int, w: int) -> tuple[int, int]:
    return pv.smart_resize(h, w, factor=28, min_pixels=PRE["min_pixels"], max_pixels=PRE["max_pixels"])


# ------------------------------------------------------------------------------------------------ sizes

def test_half_to_even_rounding() -> None:
    # 1190/28 = 42.5 and 742/28 = 26.5: half to even gives 42 and 26 (half-up would give 1204 x 756).
    assert _resize(1190, 742) == (1176, 728)


def test_small_image_scaled_to_factor_then_to_min_pixels() -> None:
    # 20x20 -> 28x28, then beta = sqrt(147384 / 784) = 13.71..., ceil(28 * 13.71 / 28) = 14 -> 392.
    assert _resize(20, 20) == (392, 392)


def test_text_line_upscaled_to_min_pixels() -> None:
    # beta = sqrt(147384 / 12000) = 3.5046; ceil(40 * 3.5046 / 28) = 6, ceil(300 * 3.5046 / 28) = 38.
    assert _resize(40, 300) == (168, 1064)


def test_large_page_downscaled_below_max_pixels() -> None:
    # beta = sqrt(2500 * 3000 / 2822400) = 1.6301; floor(2500 / 1.6301 / 28) = 54, floor(3000 / 1.6301 / 28) = 65.
    h, w = _resize(2500, 3000)
    assert (h, w) == (54 * 28, 65 * 28) and h * w <= PRE["max_pixels"]


def test_unchanged_when_already_on_grid_and_in_range() -> None:
    assert _resize(560, 784) == (560, 784)


def test_aspect_ratio_over_200_is_a_user_error() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        _resize(28, 28 * 201)
    assert issubclass(ImageError, UserError)
    assert _resize(28, 28 * 200)[0] >= 28


# ------------------------------------------------------------------------------------------------ patches

def _small_settings() -> pv.ImageSettings:
    # A tiny min_pixels so a 28 x 56 image keeps its size and the patch order can be read off directly.
    return pv.ImageSettings.from_dict({**PRE, "min_pixels": 28 * 28})


def test_patches_raster_order_and_channel_first_flattening() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(28, 56, 3), dtype=np.uint8)
    patches, grid = pv.preprocess_image(Image.fromarray(pixels), _small_settings())
    assert grid.tolist() == [1, 2, 4] and patches.shape == (8, 3 * 14 * 14) and patches.dtype == np.float32
    normalised = (pixels.astype(np.float64) / 255).astype(np.float32)
    normalised = (normalised - np.float32(0.5)) / np.float32(0.5)
    for index in range(8):
        row, col = divmod(index, 4)
        block = normalised[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14]  # (14, 14, C)
        np.testing.assert_array_equal(patches[index], block.transpose(2, 0, 1).ravel())


def test_white_is_one_black_is_minus_one() -> None:
    white = Image.new("RGB", (56, 28), (255, 255, 255))
    black = Image.new("RGB", (56, 28), (0, 0, 0))
    assert np.all(pv.preprocess_image(white, _small_settings())[0] == 1.0)
    assert np.all(pv.preprocess_image(black, _small_settings())[0] == -1.0)


def test_rgba_alpha_dropped_not_composited_and_gray_replicated() -> None:
    rgba = Image.new("RGBA", (56, 28), (0, 0, 0, 0))  # fully transparent black stays black
    assert np.all(pv.preprocess_image(rgba, _small_settings())[0] == -1.0)
    gray = Image.new("L", (56, 28), 255)
    patches, _ = pv.preprocess_image(gray, _small_settings())
    assert patches.shape[1] == 3 * 14 * 14 and np.all(patches == 1.0)


def test_image_token_count_is_a_quarter_of_the_patches() -> None:
    assert pv.image_token_count([1, 12, 76], 2) == 12 * 76 // 4
    assert pv.image_token_count(np.array([1, 108, 130]), 2) == 3510


def test_preprocessor_size_dict_form_and_missing_keys() -> None:
    newer = {k: v for k, v in PRE.items() if k not in ("min_pixels", "max_pixels")}
    newer["size"] = {"shortest_edge": 1000, "longest_edge": 2000}
    settings = pv.ImageSettings.from_dict(newer)
    assert (settings.min_pixels, settings.max_pixels, settings.factor) == (1000, 2000, 28)
    with pytest.raises(UserError, match="min_pixels"):
        pv.ImageSettings.from_dict({"patch_size": 14})


# ------------------------------------------------------------------------------------------------ prompt

def test_rendered_prompt_keeps_image_markers_and_trailing_space() -> None:
    text = pv.render_prompt(TEMPLATE, [{"type": "image"}, {"type": "text", "text": "OCR:"}])
    assert text == "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant: "


def test_prompt_ids_layout(tokenizer: Tokenizer) -> None:
    image = Image.new("RGB", (300, 40), (200, 10, 10))
    inputs = pv.build_inputs("Table Recognition:", [image], tokenizer, TEMPLATE, PRE)
    n = 12 * 76 // 4  # 40x300 -> 168x1064 -> 12 x 76 patches
    expected = ([BOS] + tokenizer.encode("User: ") + [START] + [PLACE] * n + [END]
                + tokenizer.encode("Table Recognition:\nAssistant: "))
    assert inputs.input_ids.tolist() == expected
    assert 1 not in inputs.input_ids.tolist()  # no <s>
    assert inputs.image_grid_thw.tolist() == [[1, 12, 76]]
    assert inputs.pixel_values.shape == (12 * 76, 588)
    tail = inputs.input_ids.tolist()[inputs.input_ids.tolist().index(END) + 1:]
    assert tokenizer.decode(tail) == "Table Recognition:\nAssistant: "


def test_image_tags_place_images_in_the_text(tokenizer: Tokenizer) -> None:
    a, b = Image.new("RGB", (56, 56)), Image.new("RGB", (56, 56))
    settings = {**PRE, "min_pixels": 28 * 28}  # 56x56 stays 56x56: 4x4 patches, 4 tokens
    inputs = pv.build_inputs("Compare <image> with <image> please", [a, b], tokenizer, TEMPLATE, settings)
    block = [START] + [PLACE] * 4 + [END]
    expected = ([BOS] + tokenizer.encode("User: Compare ") + block + tokenizer.encode(" with ") + block
                + tokenizer.encode(" please\nAssistant: "))
    assert inputs.input_ids.tolist() == expected
    with pytest.raises(UserError, match="2 image"):
        pv.build_inputs("only <image>", [a, b], tokenizer, TEMPLATE, settings)
    with pytest.raises(UserError, match="special token"):
        pv.build_inputs("sneaky <|IMAGE_PLACEHOLDER|>", [a], tokenizer, TEMPLATE, settings)


def test_text_only_prompt(tokenizer: Tokenizer) -> None:
    inputs = pv.build_inputs("Hello", [], tokenizer, TEMPLATE, PRE)
    assert inputs.input_ids.tolist() == [BOS] + tokenizer.encode("User: Hello\nAssistant: ")
    assert inputs.pixel_values.shape[0] == 0 and inputs.image_grid_thw.shape == (0, 3)
    L = len(inputs.input_ids)
    assert inputs.position_ids.tolist() == [list(range(L))] * 3 and inputs.next_position == L


def test_template_from_tokenizer_config_when_no_jinja_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "X"}))
    assert pv.load_chat_template(tmp_path) == "X"
    (tmp_path / "chat_template.jinja").write_text("Y")
    assert pv.load_chat_template(tmp_path) == "Y"
    with pytest.raises(ModelFilesError):
        pv.load_chat_template(tmp_path / "missing")


def test_tasks_and_generation_defaults() -> None:
    assert pv.TASKS == {"ocr": "OCR:", "table": "Table Recognition:", "formula": "Formula Recognition:",
                        "chart": "Chart Recognition:"}
    assert pv.task_prompt("chart") == "Chart Recognition:"
    with pytest.raises(UserError, match="unknown"):
        pv.task_prompt("poem")
    options = pv.generation_defaults(json.loads((REFERENCE / "generation_config.json").read_text()))
    assert options.stop_token_ids == (2,)
    assert not options.sampling.do_sample and options.sampling.no_repeat_ngram_size == 0
    assert options.sampling.repetition_penalty == 1.0


# ------------------------------------------------------------------------------------------------ positions

def test_mrope_positions_one_image() -> None:
    # text, text, a 1x4x6 patch grid (2x3 merged cells), text, text.
    ids = np.array([7, 8] + [PLACE] * 6 + [9, 10])
    pos = pv.mrope_positions(ids, np.array([[1, 4, 6]]), image_token_id=PLACE, merge_size=2)
    assert pos.dtype == np.int64
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]


def test_mrope_positions_two_images_and_decode_continuation() -> None:
    # [t] [img 2x2 merged: 4x4 patches] [t t] [img 1x2 merged: 2x4 patches] [t]
    ids = np.array([7] + [PLACE] * 4 + [8, 9] + [PLACE] * 2 + [10])
    grids = np.array([[1, 4, 4], [1, 2, 4]])
    pos = pv.mrope_positions(ids, grids, image_token_id=PLACE, merge_size=2)
    assert pos.tolist() == [
        [0, 1, 1, 1, 1, 3, 4, 5, 5, 7],
        [0, 1, 1, 2, 2, 3, 4, 5, 5, 7],
        [0, 1, 2, 1, 2, 3, 4, 5, 6, 7],
    ]
    inputs = pv.PaddleOCRVLInputs(input_ids=ids, pixel_values=np.zeros((24, 588), np.float32),
                                  image_grid_thw=grids, position_ids=pos)
    assert inputs.next_position == 8
    longer = inputs.extended([11, 12])
    assert longer.input_ids.tolist()[-2:] == [11, 12]
    assert longer.position_ids[:, -2:].tolist() == [[8, 9]] * 3 and longer.next_position == 10
    assert inputs.input_ids.shape == (10,)  # the original is unchanged


def test_mrope_positions_mismatch_is_an_error() -> None:
    ids = np.array([7] + [PLACE] * 3)
    with pytest.raises(ValueError):
        pv.mrope_positions(ids, np.array([[1, 4, 4]]), image_token_id=PLACE, merge_size=2)
    with pytest.raises(ValueError):
        pv.mrope_positions(np.array([7, 8]), np.array([[1, 4, 4]]), image_token_id=PLACE, merge_size=2)
