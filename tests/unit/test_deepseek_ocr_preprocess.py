"""DeepSeek-OCR preprocessing and prompt ids against numbers recorded from the official remote code.

`tests/goldens/deepseek_ocr/preprocess.json` was written by running the official `infer()` (up to its
`generate` call), `dynamic_preprocess`, `find_closest_aspect_ratio`, `ImageOps.pad`, `text_encode` and
`format_messages` on the images of `patterns.py` (see the README there). Pixel views are compared bit for bit
(SHA-256 of the float32 bytes) and at sampled positions.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import deepseek_ocr as ds
from common.errors import UserError
from common.images import open_image
from common.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens" / "deepseek_ocr"
sys.path.insert(0, str(GOLDENS))
import patterns  # noqa: E402

GOLDEN = json.loads((GOLDENS / "preprocess.json").read_text(encoding="utf-8"))
CASES = {case["name"]: case for case in GOLDEN["cases"]}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_files(ROOT / "tests" / "data" / "reference" / "deepseek-ocr" / "tokenizer.json")


def case_image(case: dict) -> Image.Image:
    """The image the reference opened, through our loader (PNG for generated images, the committed JPEG)."""
    if case["kind"].startswith("file:"):
        return open_image(GOLDENS / case["kind"][5:])
    image = patterns.make_image(case["kind"], case["width"], case["height"], case["seed"])
    return open_image(patterns.png_bytes(image))


def unrle(pairs: list[list[int]]) -> list[int]:
    return [token for token, count in pairs for _ in range(count)]


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- tiling search

def test_candidate_order_is_the_official_one() -> None:
    assert [list(c) for c in ds.CANDIDATE_GRIDS] == GOLDEN["candidates"]


def test_candidate_order_follows_from_the_official_expression() -> None:
    # Re-derived the official way (set, then sorted by tile count) under this interpreter.
    grids = sorted({(i, j) for n in range(2, 10) for i in range(1, n + 1) for j in range(1, n + 1) if 2 <= i * j <= 9},
                   key=lambda r: r[0] * r[1])
    assert tuple(grids) == ds.CANDIDATE_GRIDS


@pytest.mark.parametrize("width,height,i,j", GOLDEN["aspect_search"][:: max(1, len(GOLDEN["aspect_search"]) // 60)])
def test_aspect_search_sample(width: int, height: int, i: int, j: int) -> None:
    assert ds.find_closest_aspect_ratio(width, height) == (i, j)


def test_aspect_search_all_recorded_sizes() -> None:
    wrong = [(w, h, (i, j), ds.find_closest_aspect_ratio(w, h)) for w, h, i, j in GOLDEN["aspect_search"]
             if ds.find_closest_aspect_ratio(w, h) != (i, j)]
    assert not wrong


@pytest.mark.parametrize("width,height,grid", [
    (1000, 400, (2, 1)),    # 2.5: tie between 2x1 and 3x1, area 400000 <= 0.5*640*640*3 keeps 2x1
    (1600, 640, (3, 1)),    # same ratio, area 1024000 takes 3x1
    (1357, 1357, (2, 2)),   # 1841449 px <= 1843200: squares stay 2x2
    (1358, 1358, (3, 3)),   # 1844164 px: 3x3
    (1800, 900, (2, 1)),    # ratio 2: 4x2 ties 2x1 and needs > 1638400 px
    (1820, 910, (4, 2)),
])
def test_aspect_ties(width: int, height: int, grid: tuple[int, int]) -> None:
    assert ds.find_closest_aspect_ratio(width, height) == grid
    assert [width, height, *grid] in GOLDEN["aspect_search"]


# ---------------------------------------------------------------------------------------------- padding

@pytest.mark.parametrize("width,height,size,box", GOLDEN["pads"])
def test_pad_geometry_matches_imageops_pad(width: int, height: int, size: int, box: list[int] | None) -> None:
    out = np.asarray(ds.pad_to_square(Image.new("RGB", (width, height), (255, 255, 255)), size))
    assert out.shape == (size, size, 3)
    inside = np.argwhere(out[..., 0] != 127)
    found = None if not len(inside) else [int(inside[:, 1].min()), int(inside[:, 0].min()),
                                          int(inside[:, 1].max()) + 1, int(inside[:, 0].max()) + 1]
    assert found == box
    assert (out[..., 0] == 127).any() == (box != [0, 0, size, size])  # pad colour 127 (0.5 * 255 truncated)


def test_contained_size_rounds_half_to_even() -> None:
    assert ds.contained_size(2048, 3, 1024) == (1024, 2)    # 1.5 -> 2
    assert ds.contained_size(2048, 5, 1024) == (1024, 2)    # 2.5 -> 2
    assert ds.contained_size(2048, 1, 1024) == (1024, 0)    # 0.5 -> 0: nothing is pasted


# ---------------------------------------------------------------------------------------------- whole images

@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.slow
def test_views_and_ids_match_official(name: str, tokenizer: Tokenizer) -> None:
    case = CASES[name]
    image = case_image(case)
    assert image.size == (case["width"], case["height"])
    inputs = ds.build_inputs(case["prompt"], [image], tokenizer, base_size=case["base_size"],
                             image_size=case["image_size"], crop_mode=case["crop_mode"])
    assert inputs.input_ids.dtype == np.int64
    assert inputs.input_ids.tolist() == unrle(case["ids_rle"])
    (view,) = inputs.images
    assert list(view.crop) == case["crop"]
    assert list(view.global_view.shape) == case["global_shape"]
    for c, y, x, value in case["global_samples"]:
        assert view.global_view[c, y, x] == np.float32(value), (c, y, x)
    assert sha(view.global_view) == case["global_sha256"]
    assert view.tiles.shape[0] == case["n_tiles"]
    for tile, samples in zip(view.tiles, case["tile_samples"]):
        for c, y, x, value in samples:
            assert tile[c, y, x] == np.float32(value), (c, y, x)
    assert [sha(t) for t in view.tiles] == case["tile_sha256"]
    count = ds.image_token_count(base_size=case["base_size"], image_size=case["image_size"],
                                 crop_mode=case["crop_mode"], crop=view.crop)
    assert count == case["n_image_tokens"]


@pytest.mark.parametrize("base,image,crop_mode,grid,count", [
    (1024, 640, True, (1, 1), 273), (1024, 640, True, (2, 1), 483), (1024, 640, True, (3, 1), 583),
    (1024, 640, True, (3, 2), 893), (1024, 640, True, (4, 2), 1093), (1280, 640, True, (2, 1), 631),
    (640, 640, False, (1, 1), 111), (512, 512, False, (1, 1), 73), (1280, 1280, False, (1, 1), 421),
    (512, 1024, False, (1, 1), 273),   # without crop mode base_size plays no part
])
def test_image_token_counts(base: int, image: int, crop_mode: bool, grid: tuple[int, int], count: int) -> None:
    assert ds.image_token_count(base_size=base, image_size=image, crop_mode=crop_mode, crop=grid) == count


def test_query_side() -> None:
    assert [ds.query_side(s) for s in (512, 640, 1024, 1280)] == [8, 10, 16, 20]


def test_modes_table() -> None:
    assert ds.MODES["gundam"] == (1024, 640, True) and ds.MODES["tiny"] == (512, 512, False)
    for base, image, crop in ds.MODES.values():
        ds.check_sizes(base, image, crop)


def test_tiles_are_row_major_cuts_of_the_bicubic_resize() -> None:
    image = patterns.make_image("rgb", 1900, 1300, 11)
    tiles, grid = ds.tile_image(image)
    assert grid == (3, 2)
    resized = np.asarray(image.resize((1920, 1280), Image.Resampling.BICUBIC))
    for k, tile in enumerate(tiles):
        row, col = divmod(k, 3)
        assert np.array_equal(np.asarray(tile), resized[row * 640:(row + 1) * 640, col * 640:(col + 1) * 640])


def test_normalisation_formula() -> None:
    image = Image.fromarray(np.array([[[0, 127, 255], [1, 128, 254]]], dtype=np.uint8))
    out = ds.normalize(image)
    assert out.dtype == np.float32 and out.shape == (3, 1, 2)
    assert out[:, 0, 0].tolist() == [-1.0, np.float32(np.float32(127) / 255 - 0.5) / np.float32(0.5), 1.0]


def test_rgba_alpha_is_dropped_not_composited() -> None:
    rgba = patterns.make_image("rgba", 300, 200, 22)
    rgb = open_image(patterns.png_bytes(rgba))
    # The transparent stripe keeps its stored colour.
    assert np.array_equal(np.asarray(rgb)[:, :10], np.asarray(rgba)[:, :10, :3])


# ---------------------------------------------------------------------------------------------- prompt ids

@pytest.mark.parametrize("text,ids", GOLDEN["text_encode"])
def test_text_encode_matches_official(text: str, ids: list[int], tokenizer: Tokenizer) -> None:
    assert tokenizer.encode(text) == ids


@pytest.mark.parametrize("prompt,ids", GOLDEN["text_only"])
def test_text_only_prompt_ids(prompt: str, ids: list[int], tokenizer: Tokenizer) -> None:
    inputs = ds.build_inputs(prompt, [], tokenizer, base_size=1024, image_size=640, crop_mode=True)
    assert inputs.input_ids.tolist() == ids
    assert inputs.images == () and ids[0] == ds.BOS_ID


@pytest.mark.parametrize("case", GOLDEN["prompt_cases"], ids=lambda c: c["prompt"][:30])
def test_prompt_with_image_ids(case: dict, tokenizer: Tokenizer) -> None:
    image = case_image(CASES[case["image"]])
    inputs = ds.build_inputs(case["prompt"], [image], tokenizer, base_size=1024, image_size=640, crop_mode=True)
    assert inputs.input_ids.tolist() == unrle(case["ids_rle"])


def test_grounding_and_ref_token_ids(tokenizer: Tokenizer) -> None:
    # Special tokens are single ids and keep neighbouring spaces (RULES 4).
    assert tokenizer.encode("<|grounding|>") == [128820]
    ids = tokenizer.encode("Locate <|ref|>")
    assert ids[-2:] == [223, 128816]
    assert tokenizer.encode("\n") == [201]


def test_placeholder_count_mismatch_is_a_user_error(tokenizer: Tokenizer) -> None:
    image = Image.new("RGB", (32, 32))
    with pytest.raises(UserError, match="1 <image> placeholder"):
        ds.build_inputs("<image>\nFree OCR.", [], tokenizer, base_size=1024, image_size=640, crop_mode=True)
    with pytest.raises(UserError, match="0 <image> placeholder.*2 image"):
        ds.build_inputs("Free OCR.", [image, image], tokenizer, base_size=1024, image_size=640, crop_mode=True)


@pytest.mark.parametrize("base,image,crop_mode", [(1024, 1024, True), (1000, 640, True), (0, 640, False),
                                                  (1024, True, False)])
def test_bad_sizes_are_user_errors(base: int, image: int, crop_mode: bool, tokenizer: Tokenizer) -> None:
    with pytest.raises(UserError):
        ds.build_inputs("hi", [], tokenizer, base_size=base, image_size=image, crop_mode=crop_mode)


def test_two_images_in_prompt_order(tokenizer: Tokenizer) -> None:
    small, wide = Image.new("RGB", (100, 80), (9, 9, 9)), patterns.make_image("rgb", 1300, 620, 7)
    inputs = ds.build_inputs("A<image>B<image>C", [small, wide], tokenizer, base_size=1024, image_size=640,
                             crop_mode=True)
    ids = inputs.input_ids.tolist()
    a, b, c = (tokenizer.encode(t) for t in "ABC")
    assert ids == [0] + a + [ds.IMAGE_TOKEN_ID] * 273 + b + [ds.IMAGE_TOKEN_ID] * 483 + c
    assert [im.crop for im in inputs.images] == [(1, 1), (2, 1)]


def test_extended_keeps_positions(tokenizer: Tokenizer) -> None:
    inputs = ds.build_inputs("Hello", [], tokenizer, base_size=1024, image_size=640, crop_mode=True)
    longer = inputs.extended([5, 6])
    assert longer.next_position == inputs.next_position + 2 and longer.input_ids[-2:].tolist() == [5, 6]


# ---------------------------------------------------------------------------------------------- templates

def _template_id(case: dict) -> str:
    return f"{case['template']}-{'system' if case['system'] else 'nosystem'}-{len(case['messages'])}"


@pytest.mark.parametrize("case", GOLDEN["templates"], ids=_template_id)
def test_conversation_templates(case: dict) -> None:
    messages = [tuple(m) for m in case["messages"]]
    assert ds.format_messages(messages, case["template"], case["system"]) == case["text"]


def test_unknown_template() -> None:
    with pytest.raises(UserError, match="unknown prompt template"):
        ds.format_messages([("<|User|>", "x")], "chatml")
