"""A grounding parser for DeepSeek-OCR answers that never raises and never drops text.

In grounding mode the model writes `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` before each
block; the block's content is the text up to the next reference. Coordinates are on a 0..999 grid (the official
demo maps them as `int(v / 999 * size)`). A model's output is untrusted and often imperfect (a capped answer ends
mid-tag, small models nest or forget tags), so the scanner here is a small state machine over the four tag
tokens rather than one regular expression: a tag that does not fit is dropped, the words around it are kept.

Rules, each unit-tested:
- unclosed `<|ref|>`: its words stay, as text; nested `<|ref|>`: the innermost label wins, the rest is text;
- `<|det|>` without a `<|ref|>` before it: a block with the label "unknown";
- a `<|ref|>` without `<|det|>`: a block with no box (a "Locate" phrase that was not found);
- boxes: any run of four numbers in brackets; other arities are skipped (the block keeps `det` with the raw
  coordinate text); values are clamped to 0..999 and reversed corners swapped; several boxes per reference
  are all kept; unknown labels are kept as written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

COORD_SCALE = 999
EOS_TEXT = "<｜end▁of▁sentence｜>"
UNKNOWN_LABEL = "unknown"

Box = tuple[int, int, int, int]

_TAG = re.compile(r"<\|(/?)(ref|det)\|>")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Block:
    """One grounded block: its label, boxes on the 0..999 grid, and the text that follows its markup.

    `start`/`end` are the character offsets of the block's markup in the answer; `det` holds the raw coordinate
    text when none of it could be read as a box (so nothing the model wrote is lost).
    """

    label: str
    boxes: list[Box] = field(default_factory=list)
    text: str = ""
    start: int = 0
    end: int = 0
    det: str | None = None


@dataclass
class Parsed:
    """The answer split into `pieces`: plain text (str) and `Block`s in order. `lead` is the text before the
    first block (a plain answer without grounding is all lead)."""

    pieces: list[str | Block]

    @property
    def blocks(self) -> list[Block]:
        return [piece for piece in self.pieces if isinstance(piece, Block)]

    @property
    def lead(self) -> str:
        text = []
        for piece in self.pieces:
            if isinstance(piece, Block):
                break
            text.append(piece)
        return "".join(text)


def read_boxes(text: str) -> list[Box]:
    """Every bracketed group of exactly four numbers in `text`, clamped to 0..999 with corners ordered."""
    boxes = []
    for group in _BRACKETS.findall(text):
        numbers = _NUMBER.findall(group)
        if len(numbers) != 4 or _NUMBER.sub("", group).replace(",", "").strip():
            continue
        x1, y1, x2, y2 = (min(max(int(float(v)), 0), COORD_SCALE) for v in numbers)
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def parse(text: str) -> Parsed:
    """Split an answer into text and blocks (see the module docstring); total on every input."""
    pieces: list[str | Block] = []
    cursor = 0            # start of the text not yet placed
    label_at: int | None = None   # offset after an open <|ref|>
    det_at: int | None = None     # offset after an open <|det|>
    markup_start = 0
    pending: Block | None = None  # a closed ref still waiting for its <|det|>

    def place_text(upto: int) -> None:
        if upto > cursor:
            pieces.append(text[cursor:upto])

    for match in _TAG.finditer(text):
        closing, name = match.group(1) == "/", match.group(2)
        if det_at is not None:  # inside <|det|>: only its closer ends it
            if closing and name == "det":
                content = text[det_at:match.start()]
                block = pending if pending is not None else Block(UNKNOWN_LABEL, start=markup_start)
                block.boxes, block.end = read_boxes(content), match.end()
                block.det = None if block.boxes else content
                pieces.append(block)
                pending, det_at, cursor = None, None, match.end()
            continue  # a stray tag inside coordinates: dropped, the coordinates decide
        if label_at is not None:
            if closing and name == "ref":
                pending = Block(text[label_at:match.start()].strip(), start=markup_start, end=match.end())
                label_at, cursor = None, match.end()
            elif not closing and name == "ref":  # nested: the outer label's words become text
                pieces.append(text[label_at:match.start()])
                label_at, markup_start, cursor = match.end(), match.start(), match.end()
            elif not closing and name == "det":  # unclosed label: still a label
                pending = Block(text[label_at:match.start()].strip(), start=markup_start)
                label_at, det_at, cursor = None, match.end(), match.end()
            continue  # a stray </det> in a label: dropped
        if pending is not None:  # a closed ref: a <|det|> must follow right away
            if not closing and name == "det" and not text[cursor:match.start()].strip():
                det_at, cursor = match.end(), match.end()
                continue
            pieces.append(pending)
            pending = None
        if closing:  # a closer with nothing open: dropped
            place_text(match.start())
            cursor = match.end()
            continue
        place_text(match.start())
        markup_start, cursor = match.start(), match.end()
        if name == "ref":
            label_at = match.end()
        else:
            det_at = match.end()
    _finish(text, pieces, cursor, label_at, det_at, pending, markup_start)
    _attach_text(pieces)
    return Parsed(pieces)


def _finish(text: str, pieces: list[str | Block], cursor: int, label_at: int | None, det_at: int | None,
            pending: Block | None, markup_start: int) -> None:
    """The end of the answer with a tag still open (a capped answer): keep whatever it held."""
    if det_at is not None:
        content = text[det_at:]
        block = pending if pending is not None else Block(UNKNOWN_LABEL, start=markup_start)
        block.boxes, block.end = read_boxes(content), len(text)
        block.det = None if block.boxes else content
        pieces.append(block)
        return
    if pending is not None:
        pieces.append(pending)
    if label_at is not None:
        pieces.append(text[label_at:])  # an unclosed label: its words are text
    elif cursor < len(text):
        pieces.append(text[cursor:])


def _attach_text(pieces: list[str | Block]) -> None:
    """Give each block the text that follows it, up to the next block."""
    current: Block | None = None
    for piece in pieces:
        if isinstance(piece, Block):
            current = piece
        elif current is not None:
            current.text += piece
    for piece in pieces:
        if isinstance(piece, Block):
            piece.text = piece.text.replace(EOS_TEXT, "").strip()


def to_pixels(box: Box, width: int, height: int) -> Box:
    """A 0..999 box in pixels of a `width` x `height` image (the official `int(v / 999 * size)`), clamped."""
    x1, y1, x2, y2 = box

    def scale(v: int, size: int) -> int:
        return min(max(int(v / COORD_SCALE * size), 0), size)

    return scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)
