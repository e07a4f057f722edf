"""Prompt text shared by the CLI and the server: chat folding, `<image>` placeholders, prompt templates.

A prompt in this project is plain text in which each image stands at one `<image>` placeholder, images in order
(the DeepSeek-OCR convention, e.g. `"<image>\\n<|grounding|>Convert the document to markdown."`). The front ends
produce it (the CLI from `--prompt`, the server from chat messages via `fold_messages`); the pipeline renders it
for the model: DeepSeek-OCR's conversation templates ("plain" is what the official `infer()` uses), or
PaddleOCR-VL's checkpoint chat template, which always puts the images before the text of the turn.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image

from .deepseek_ocr import format_messages
from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"


#: DeepSeek-OCR conversation templates (official `conversation.py`, rendered as `format_messages` does with a
#: user turn and an empty assistant turn, then `.strip()`). "plain" drops the roles: the prompt is the text.
#: Both "deepseek" templates use the DeepSeek separator style; they differ only in the separator after the turn.
DEEPSEEK_TEMPLATES: tuple[str, ...] = ("plain", "deepseek", "deepseekv2")

TEXT_PART_TYPES = ("text", "input_text")
IMAGE_PART_TYPES = ("image_url", "input_image", "image", "file", "input_file")
IGNORED_ROLES = ("system", "developer")

#: One image, or several (a PDF file part gives one image per page), for one content part.
ImagesForPart = Callable[[dict[str, Any]], "Image.Image | Sequence[Image.Image]"]


class FoldedPrompt(NamedTuple):
    """The latest user turn as prompt text with `<image>` placeholders, and its images in placeholder order."""

    prompt: str
    images: list[Image.Image]


def __getattr__(name: str) -> Any:
    """`DEFAULT_PROMPTS` ({model id: one image's default prompt}), read from the families when first asked for:
    the families import this module, so it cannot import them at load time."""
    if name == "DEFAULT_PROMPTS":
        from .models import FAMILIES  # noqa: PLC0415 - see above

        return {model_id: family.default_prompt for model_id, family in FAMILIES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def check_placeholders(prompt: str, n_images: int, *, param: str | None = None) -> None:
    """Raise `UserError` unless `prompt` holds exactly one `<image>` per image."""
    found = count_placeholders(prompt)
    if found != n_images:
        raise UserError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) were given; "
            f"put one {IMAGE_PLACEHOLDER} in the prompt per image, in order", param=param)


def _as_images(value: Any) -> list[Image.Image]:
    if isinstance(value, Image.Image):
        return [value]
    images = list(value)
    if not all(isinstance(im, Image.Image) for im in images):
        raise TypeError("images_for_part must return a PIL image or a sequence of them")
    return images


def _latest_user_turn(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages must be a non-empty list", param="messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError("each message must be an object with a 'role'", param="messages")
    ignored = [m["role"] for m in messages if m["role"] in IGNORED_ROLES]
    if ignored:
        # The OCR models were trained without system prompts; keeping them would change the answers.
        log.info("ignoring %d %s message(s)", len(ignored), "/".join(sorted(set(ignored))))
    for message in reversed(messages):
        if message["role"] == "user":
            return message
    raise UserError("messages hold no user turn", param="messages")


def fold_messages(messages: Sequence[dict[str, Any]], images_for_part: ImagesForPart) -> FoldedPrompt:
    """Fold OpenAI-style chat messages into one prompt: the LATEST user turn, with its images.

    `messages` are dicts with `role` and `content` (a string, or a list of parts: `text`/`input_text` with
    `text`, or image parts `image_url`/`input_image`/`image`/`file`/`input_file`). `images_for_part(part)` is
    called once per image part, in order, and returns the decoded PIL image (or a list, e.g. PDF pages); it
    raises its own errors for unreadable data. System/developer turns, earlier turns and assistant turns are
    ignored. Text parts are joined with newlines. If the text already holds as many `<image>` placeholders as
    there are images it is used as written; if it holds none, each image part becomes an `<image>` where the
    part stands (so `[image, text]` gives `"<image>\\n<text>"`); any other count raises `UserError`.
    """
    turn = _latest_user_turn(messages)
    content = turn.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise UserError("message content must be a string or a list of parts", param="messages")
    texts: list[str] = []
    segments: list[str] = []
    images: list[Image.Image] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise UserError(f"a '{kind}' part needs a string 'text'", param="messages")
            if text:
                texts.append(text)
                segments.append(text)
        elif kind in IMAGE_PART_TYPES:
            part_images = _as_images(images_for_part(part))
            images.extend(part_images)
            segments.extend(IMAGE_PLACEHOLDER for _ in part_images)
        else:
            raise UserError(f"unsupported message content part type {kind!r}", param="messages")
    written = "\n".join(texts)
    found = count_placeholders(written)
    if found == len(images):
        return FoldedPrompt(written, images)
    if found == 0:
        return FoldedPrompt("\n".join(segments), images)
    raise UserError(
        f"the message text has {found} {IMAGE_PLACEHOLDER} placeholder(s) but the turn holds {len(images)} "
        f"image(s)", param="messages")


def render_deepseek(prompt: str, template: str = "plain") -> str:
    """DeepSeek-OCR prompt text as `infer()` builds it: one user turn and the empty assistant slot, rendered by
    `deepseek_ocr.format_messages` (placeholders kept for tokenizing). "plain" is the stripped prompt."""
    if template not in DEEPSEEK_TEMPLATES:
        raise UserError(f"unknown template {template!r}; choose one of {', '.join(DEEPSEEK_TEMPLATES)}",
                        param="template")
    return format_messages([("<|User|>", prompt), ("<|Assistant|>", "")], template)


def paddle_prompt_text(prompt: str) -> str:
    """A PaddleOCR-VL prompt with its LEADING `<image>` placeholders removed, when those are all it has.

    The checkpoint's template puts a turn's images before its text, so `"<image>\\nOCR:"` must render exactly
    as the official `[image, "OCR:"]` turn does; each leading placeholder takes the whitespace after it. A prompt
    with placeholders elsewhere is returned unchanged (the images are then spliced in where they stand).
    """
    text = prompt.lstrip()
    while text.startswith(IMAGE_PLACEHOLDER):
        text = text[len(IMAGE_PLACEHOLDER):].lstrip()
    return text if IMAGE_PLACEHOLDER not in text else prompt
