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

__all__ = ["COORD_SCALE", "EOS_TEXT", "GroundedRef", "PageLayout", "clean_markdown", "crop_refs", "draw_boxes",
           "draw_refs", "looped", "page_layout", "parse_grounding", "strip_grounding", "to_pixels"]

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
    return _tidy(strip_grounding(text, image_link=image_link))


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
    return draw_boxes(image, [(ref.label, box) for ref in refs for box in ref.pixel_boxes(*image.size)], width)


def draw_boxes(image: Image.Image, boxes: list[tuple[str, Box]], width: int = 2) -> Image.Image:
    """A copy of `image` with each (label, pixel box) outlined and labelled, a colour per label."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    palette = [(220, 20, 60), (30, 144, 255), (34, 139, 34), (255, 140, 0), (148, 0, 211), (0, 139, 139)]
    colours: dict[str, tuple[int, int, int]] = {}
    for label, (x1, y1, x2, y2) in boxes:
        colour = colours.setdefault(label, palette[len(colours) % len(palette)])
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=width)
        draw.text((x1 + 2, max(0, y1 - 12)), label, fill=colour)
    return out


# ----------------------------------------------------------------------------------------------- pages
@dataclass(frozen=True)
class PageLayout:
    """One page's answer post-processed: clean Markdown with figure links, blocks in page pixels, and the
    figures to crop (their file names relative to the Markdown, and pixel boxes)."""

    markdown: str
    blocks: list[dict[str, object]]
    figures: list[tuple[str, Box]]


def page_layout(text: str, size: tuple[int, int], *, plain_label: str = "text",
                figure_name: Callable[[int], str] = lambda i: f"images/{i}.jpg") -> PageLayout:
    """`text` of a page of `size` (width, height) as Markdown, JSON blocks `{label, text, box}` and figures.

    Grounded answers (DeepSeek-OCR's `<|ref|>` markup) give one block per reference, boxes mapped from the 0..999
    grid to pixels (`boxes` lists them all when there are several); text before the first reference is a block
    of its own without a box. An answer without markup (PaddleOCR-VL's tasks, "Free OCR.") is one block labelled
    `plain_label` covering the page. `image` references become figures, linked where they appear.
    """
    width, height = size
    parsed = parse(text)
    blocks: list[dict[str, object]] = []
    figures: list[tuple[str, Box]] = []
    markdown: list[str] = []
    if not parsed.blocks:
        clean = _tidy("".join(p for p in parsed.pieces if isinstance(p, str)))
        box = [0, 0, width, height]
        blocks = [{"label": plain_label, "text": clean, "box": box}] if clean else []
        return PageLayout(clean, blocks, figures)
    lead = _tidy(parsed.lead)
    if lead:
        blocks.append({"label": "text", "text": lead, "box": None})
    for piece in parsed.pieces:
        if isinstance(piece, str):
            markdown.append(piece)
            continue
        pixels = [to_pixels(box, width, height) for box in piece.boxes]
        block: dict[str, object] = {"label": piece.label, "text": _tidy(piece.text),
                                    "box": list(pixels[0]) if pixels else None}
        if len(pixels) > 1:
            block["boxes"] = [list(b) for b in pixels]
        if piece.det is not None:
            block["det"] = piece.det  # coordinates that could not be read, kept as written
        if piece.label == "image":
            names = []
            for x1, y1, x2, y2 in pixels:
                if x2 > x1 and y2 > y1:  # an empty region has nothing to crop or link
                    names.append(figure_name(len(figures)))
                    figures.append((names[-1], (x1, y1, x2, y2)))
                    markdown.append(f"![]({names[-1]})\n")
            block["figures"] = names
        blocks.append(block)
    return PageLayout(_tidy("".join(markdown)), blocks, figures)


def _tidy(text: str) -> str:
    """The official demo's last steps: EOS text out, LaTeX fixes, blank-line runs folded, ends stripped."""
    text = text.replace(EOS_TEXT, "")
    for old, new in _LATEX_FIXES:
        text = text.replace(old, new)
    # Removing a reference leaves the newline that followed it at the start of its block.
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def looped(text: str, *, min_span: int = 64, max_unit: int = 256, min_repeats: int = 3) -> bool:
    """True when the answer ends in a repetition loop: one unit (1 to `max_unit` characters) repeated at least
    `min_repeats` times back to back, covering `min_span` characters or more at its end. Whitespace runs
    count as one space, so a loop over lines is caught like one within a line. Generation that loops usually
    also hits the token cap (finish reason "length"); both are flagged."""
    tail = re.sub(r"\s+", " ", text.replace(EOS_TEXT, "")).rstrip()
    for unit in range(1, min(max_unit, len(tail) // min_repeats) + 1):
        repeats = max(min_repeats, -(-min_span // unit))
        span = unit * repeats
        if span > len(tail):
            continue
        piece = tail[-unit:]
        if tail[-span:] == piece * repeats:
            return True
    return False
