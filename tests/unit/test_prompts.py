"""Chat folding, placeholder checks and prompt templates (common/prompts.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from common.errors import UserError
from common.prompts import (
    DEFAULT_PROMPTS, FoldedPrompt, check_placeholders, fold_messages, render_deepseek,
    paddle_prompt_text,
)

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"


def _image(colour: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (colour, colour, colour))


def _by_url(part: dict) -> Image.Image:
    """Test decoder: the URL names a grey level, so the test can tell which image came back where."""
    url = (part.get("image_url") or {}).get("url") if part["type"] == "image_url" else part.get("image_url")
    return _image(int(url))


def _grey(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]


def _img(level: int) -> dict:
    return {"type": "image_url", "image_url": {"url": str(level)}}


def test_image_then_text_gives_placeholder_newline_text() -> None:
    folded = fold_messages([{"role": "user", "content": [_img(10), {"type": "text", "text": "Free OCR."}]}], _by_url)
    assert folded.prompt == "<image>\nFree OCR."
    assert [_grey(im) for im in folded.images] == [10]


def test_parts_keep_their_order() -> None:
    content = [{"type": "text", "text": "first"}, _img(1), {"type": "text", "text": "then"}, _img(2)]
    prompt, images = fold_messages([{"role": "user", "content": content}], _by_url)
    assert prompt == "first\n<image>\nthen\n<image>"
    assert [_grey(im) for im in images] == [1, 2]


def test_text_with_matching_placeholders_is_used_as_written() -> None:
    content = [_img(3), _img(4), {"type": "text", "text": "A <image> and B <image>."}]
    folded = fold_messages([{"role": "user", "content": content}], _by_url)
    assert folded == FoldedPrompt("A <image> and B <image>.", folded.images)
    assert [_grey(im) for im in folded.images] == [3, 4]


def test_folds_to_latest_user_turn_and_ignores_system() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [_img(5), {"type": "text", "text": "old"}]},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": [{"type": "input_text", "text": "new"}, {"type": "input_image", "image_url": "6"}]},
    ]
    prompt, images = fold_messages(messages, _by_url)
    assert prompt == "new\n<image>"
    assert [_grey(im) for im in images] == [6]


def test_string_content_and_text_only() -> None:
    assert fold_messages([{"role": "user", "content": "hello"}], _by_url) == FoldedPrompt("hello", [])


def test_pdf_like_part_expands_to_several_images() -> None:
    def pages(part: dict) -> list[Image.Image]:
        return [_image(7), _image(8)]

    prompt, images = fold_messages([{"role": "user", "content": [{"type": "file", "file": {}}]}], pages)
    assert prompt == "<image>\n<image>"
    assert [_grey(im) for im in images] == [7, 8]


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": [_img(1), {"type": "text", "text": "<image><image> x"}]}], "2 <image>"),
    ([{"role": "user", "content": "<image> but no image"}], "1 <image>"),
    ([{"role": "system", "content": "only system"}], "no user turn"),
    ([], "non-empty"),
    ([{"role": "user", "content": [{"type": "audio", "audio": {}}]}], "'audio'"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"content": "x"}], "role"),
])
def test_fold_errors_are_user_errors(messages: list, needle: str) -> None:
    with pytest.raises(UserError, match=needle) as info:
        fold_messages(messages, _by_url)
    assert info.value.param == "messages"
    assert "\n" not in str(info.value)


def test_check_placeholders() -> None:
    check_placeholders("<image>\nx <image>", 2)
    check_placeholders("text only", 0)
    with pytest.raises(UserError, match="0 <image> placeholder"):
        check_placeholders("Free OCR.", 1)


def test_render_deepseek_templates() -> None:
    # Official format_messages strips the content and the whole prompt: a trailing space disappears.
    assert render_deepseek("<image>\nFree OCR. ", "plain") == "<image>\nFree OCR."
    assert render_deepseek(" hi ", "deepseek") == "<|User|>: hi\n\n<|Assistant|>:"
    assert render_deepseek("hi", "deepseekv2") == "<|User|>: hi<|Assistant|>:"
    with pytest.raises(UserError, match="unknown template 'chatml'"):
        render_deepseek("x", "chatml")


def test_paddle_prompt_text_drops_only_leading_placeholders() -> None:
    assert paddle_prompt_text("<image>\nOCR:") == "OCR:"
    assert paddle_prompt_text("OCR:") == "OCR:"
    assert paddle_prompt_text("<image> <image>\nTable Recognition:") == "Table Recognition:"
    assert paddle_prompt_text("Compare <image> with <image>") == "Compare <image> with <image>"
    assert paddle_prompt_text("<image>\nfirst, then <image>") == "<image>\nfirst, then <image>"


def test_paddle_chat_template_matches_rules() -> None:
    """The live renderer (common.paddleocr_vl.render_prompt) on the checkpoint's template."""
    from common.paddleocr_vl import render_prompt

    template = (REFERENCE / "paddleocr-vl" / "chat_template.jinja").read_text()
    # RULES.md 8: IMAGE_START + placeholder + IMAGE_END, then the task, then "\nAssistant: " with a space.
    assert render_prompt(template, [{"type": "image"}, {"type": "text", "text": "OCR:"}]) == (
        "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant: ")
    assert render_prompt(template, [{"type": "text", "text": "hi"}]) == "<|begin_of_sentence|>User: hi\nAssistant: "


def test_broken_chat_template_is_a_model_files_error() -> None:
    from common.errors import ModelFilesError
    from common.paddleocr_vl import render_prompt

    with pytest.raises(ModelFilesError, match="chat template"):
        render_prompt("{% for x in %}", [{"type": "text", "text": "x"}])


def test_default_prompts() -> None:
    assert DEFAULT_PROMPTS["deepseek-ocr"] == "<image>\n<|grounding|>Convert the document to markdown."
    assert DEFAULT_PROMPTS["paddleocr-vl"] == "OCR:"
