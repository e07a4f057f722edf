"""Grounding parse, pixel boxes and Markdown clean-up (common/output.py)."""
from __future__ import annotations

from PIL import Image

from common.output import clean_markdown, crop_refs, draw_refs, parse_grounding, strip_grounding, to_pixels

ANSWER = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 899, 120]]<|/det|>\n# Report\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 150, 899, 400]]<|/det|>\nBody $a \\coloneqq b$.\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999], [500, 500, 999, 999]]<|/det|>\n\n"
    "<|ref|>image<|/ref|><|det|>[[10, 10, 20, 20]]<|/det|>\n<｜end▁of▁sentence｜>"
)


def test_parse_grounding_labels_boxes_and_spans() -> None:
    refs = parse_grounding(ANSWER)
    assert [r.label for r in refs] == ["title", "text", "image", "image"]
    assert refs[0].boxes == ((100, 50, 899, 120),)
    assert refs[2].boxes == ((0, 500, 499, 999), (500, 500, 999, 999))
    assert ANSWER[refs[1].start:refs[1].end] == "<|ref|>text<|/ref|><|det|>[[100, 150, 899, 400]]<|/det|>"


def test_malformed_coordinates_give_no_boxes_and_never_evaluate() -> None:
    refs = parse_grounding("<|ref|>x<|/ref|><|det|>__import__('os')<|/det|> <|ref|>y<|/ref|><|det|>[[1,2,3]]<|/det|>")
    assert [(r.label, r.boxes) for r in refs] == [("x", ()), ("y", ())]


def test_to_pixels_follows_official_scaling_and_clamps() -> None:
    # Official demo: int(v / 999 * size). 999 maps onto the far edge exactly.
    assert to_pixels((0, 0, 999, 999), 640, 480) == (0, 0, 640, 480)
    assert to_pixels((500, 250, 750, 998), 1000, 2000) == (int(500 / 999 * 1000), int(250 / 999 * 2000),
                                                           int(750 / 999 * 1000), int(998 / 999 * 2000))
    assert to_pixels((-5, 0, 1200, 999), 100, 100) == (0, 0, 100, 100)


def test_pixel_boxes_and_as_dict() -> None:
    ref = parse_grounding(ANSWER)[0]
    assert ref.pixel_boxes(999, 999) == ((100, 50, 899, 120),)
    assert ref.as_dict() == {"label": "title", "boxes": [[100, 50, 899, 120]]}
    assert ref.as_dict((1998, 999)) == {"label": "title", "boxes": [[200, 50, 1798, 120]]}


def test_strip_grounding_variants() -> None:
    text = "<|ref|>the cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> and <|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    assert strip_grounding(text) == " and "
    assert strip_grounding(text, keep_labels=True) == "the cat and "
    assert strip_grounding(text, image_link=lambda i: f"![](images/{i}.jpg)") == " and ![](images/0.jpg)"


def test_clean_markdown_matches_demo_post_processing() -> None:
    links = clean_markdown(ANSWER, image_link=lambda i: f"![](images/{i}.jpg)\n")
    assert links == "# Report\n\nBody $a := b$.\n\n![](images/0.jpg)\n\n![](images/1.jpg)"
    assert clean_markdown(ANSWER) == "# Report\n\nBody $a := b$."


def test_crop_and_draw() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    refs = parse_grounding(ANSWER)
    crops = crop_refs(image, refs)
    assert [c.size for c in crops] == [(99, 50), (100, 50), (2, 1)]
    assert len(crop_refs(image, refs, label=None)) == 5
    drawn = draw_refs(image, refs)
    assert drawn.size == image.size and image.getpixel((20, 5)) == (255, 255, 255)
    assert drawn.getpixel((20, 5)) != (255, 255, 255)  # the title box's top edge at y = int(50/999*100)
