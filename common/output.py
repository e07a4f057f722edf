"""Post-processing of DeepSeek-OCR answers: grounding references, boxes in pixels, clean Markdown.

In grounding mode the model writes `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` before each
block (label = block type such as `title`, `text`, `table`, `image`, or the phrase asked for with "Locate").
Coordinates are normalised to 0..999; the official demo scripts (`run_dpsk_ocr_*.py` `re_match`,
`draw_bounding_boxes`) map them to pixels as `int(v / 999 * size)`, drop non-image references from the Markdown,
turn `image` references into image links, and rewrite two LaTeX macros Markdown renderers lack. The markup is
read by `common.grounding.parse` (never `eval`: the text comes from a document, so it is untrusted), which
keeps every word of a malformed answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw

from .grounding import COORD_SCALE, EOS_TEXT, Block, Box, parse, to_pixels

__all__ = ["COORD_SCALE", "EOS_TEXT", "GroundedRef", "clean_markdown", "crop_refs", "draw_refs",
           "parse_grounding", "strip_grounding", "to_pixels"]

# Official demo post-processing: macros that common Markdown math renderers do not know.
_LATEX_FIXES = (("\\coloneqq", ":="), ("\\eqqcolon", "=:"))


@dataclass(frozen=True)
class GroundedRef:
    """One `<|ref|>…<|det|>…` reference: its label, its boxes (normalised 0..999) and where it sits in the text."""

    label: str
    boxes: tuple[Box, ...]
    start: int      # character offsets of the whole reference in the answer
    end: int

    def pixel_boxes(self, width: int, height: int) -> tuple[Box, ...]:
        return tuple(to_pixels(box, width, height) for box in self.boxes)

    def as_dict(self, size: tuple[int, int] | None = None) -> dict[str, object]:
        """JSON-ready form; with `size` = (width, height) the boxes are in pixels of that image."""
        boxes = self.boxes if size is None else self.pixel_boxes(*size)
        return {"label": self.label, "boxes": [list(b) for b in boxes]}


def parse_grounding(text: str) -> list[GroundedRef]:
    """Every grounding reference in `text`, in order (`common.grounding.parse`: malformed markup never raises;
    unreadable coordinates give a reference without boxes)."""
    return [GroundedRef(b.label, tuple(b.boxes), b.start, b.end) for b in parse(text).blocks]


def strip_grounding(text: str, *, image_link: Callable[[int], str] | None = None, keep_labels: bool = False) -> str:
    """The answer without grounding markup.

    References labelled `image` become `image_link(index)` (index counts image references from 0; default:
    removed). Other references are removed; with `keep_labels` their label text stays (useful for "Locate <|ref|>
    phrase<|/ref|>" answers, where the label is the content).
    """
    out, images = [], 0
    for piece in parse(text).pieces:
        if not isinstance(piece, Block):
            out.append(piece)
        elif piece.label == "image":
            out.append(image_link(images) if image_link else "")
            images += 1
        elif keep_labels:
            out.append(piece.label)
    return "".join(out)


def clean_markdown(text: str, *, image_link: Callable[[int], str] | None = None) -> str:
    """What the official demo saves as the page's Markdown: no EOS text, no grounding, LaTeX fixes applied."""
    text = text.replace(EOS_TEXT, "")
    text = strip_grounding(text, image_link=image_link)
    for old, new in _LATEX_FIXES:
        text = text.replace(old, new)
    # Removing a reference leaves the newline that followed it at the start of its block.
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def crop_refs(image: Image.Image, refs: list[GroundedRef], label: str | None = "image") -> list[Image.Image]:
    """The regions of `image` the references point at (only those labelled `label`; None = all), in order."""
    width, height = image.size
    crops = []
    for ref in refs:
        if label is None or ref.label == label:
            for x1, y1, x2, y2 in ref.pixel_boxes(width, height):
                if x2 > x1 and y2 > y1:
                    crops.append(image.crop((x1, y1, x2, y2)))
    return crops


def draw_refs(image: Image.Image, refs: list[GroundedRef], width: int = 2) -> Image.Image:
    """A copy of `image` with every reference's boxes outlined and labelled (a colour per label)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    palette = [(220, 20, 60), (30, 144, 255), (34, 139, 34), (255, 140, 0), (148, 0, 211), (0, 139, 139)]
    colours: dict[str, tuple[int, int, int]] = {}
    for ref in refs:
        colour = colours.setdefault(ref.label, palette[len(colours) % len(palette)])
        for x1, y1, x2, y2 in ref.pixel_boxes(*out.size):
            draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=width)
            draw.text((x1 + 2, max(0, y1 - 12)), ref.label, fill=colour)
    return out
