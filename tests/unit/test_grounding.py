"""The grounding parser (common/grounding.py): every malformed case keeps its words and never raises."""
from __future__ import annotations

import random

import pytest

from common.grounding import UNKNOWN_LABEL, parse, read_boxes, to_pixels


def _words(parsed) -> str:
    """Every word the parser kept: labels, block texts, text before the first block, raw unread coordinates."""
    out = [parsed.lead]
    for block in parsed.blocks:
        out += [block.label, block.text, block.det or ""]
    return " ".join(out)


def test_well_formed_blocks_take_the_text_after_them() -> None:
    parsed = parse("<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Head\n"
                   "<|ref|>text<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>\nBody.<｜end▁of▁sentence｜>")
    assert [(b.label, b.boxes, b.text) for b in parsed.blocks] == [
        ("title", [(1, 2, 3, 4)], "# Head"), ("text", [(5, 6, 7, 8)], "Body.")]
    assert parsed.lead == ""


def test_plain_text_is_all_lead() -> None:
    parsed = parse("no markup here")
    assert parsed.blocks == [] and parsed.lead == "no markup here"


def test_unclosed_ref_keeps_its_words() -> None:
    parsed = parse("before <|ref|>title words")
    assert parsed.blocks == [] and "before" in _words(parsed) and "title words" in "".join(parsed.pieces)


def test_unclosed_det_at_the_end_still_reads_its_box() -> None:
    (block,) = parse("<|ref|>text<|/ref|><|det|>[[10, 20, 30, 40]").blocks
    assert block.label == "text" and block.boxes == [(10, 20, 30, 40)]
    (cut,) = parse("<|ref|>text<|/ref|><|det|>[[10, 2").blocks
    assert cut.boxes == [] and cut.det == "[[10, 2"


def test_ref_label_without_its_closer_before_det() -> None:
    (block,) = parse("<|ref|>table<|det|>[[1, 1, 9, 9]]<|/det|>cells").blocks
    assert (block.label, block.boxes, block.text) == ("table", [(1, 1, 9, 9)], "cells")


def test_nested_ref_innermost_label_wins_outer_words_stay() -> None:
    parsed = parse("<|ref|>outer <|ref|>inner<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>rest")
    (block,) = parsed.blocks
    assert block.label == "inner" and block.text == "rest" and "outer" in parsed.lead


@pytest.mark.parametrize("det", ["[[1, 2, 3]]", "[[1, 2, 3, 4, 5]]", "[[a, b, c, d]]", "__import__('os')", ""])
def test_wrong_arity_or_garbage_gives_no_box_but_keeps_the_raw_text(det: str) -> None:
    (block,) = parse(f"<|ref|>text<|/ref|><|det|>{det}<|/det|>words").blocks
    assert block.boxes == [] and block.text == "words" and block.det == det


def test_out_of_range_coordinates_clamp_and_reversed_corners_swap() -> None:
    assert read_boxes("[[-5, 1200, 999, 0]]") == [(0, 0, 999, 999)]
    assert read_boxes("[[900, 800, 100, 200]]") == [(100, 200, 900, 800)]
    assert read_boxes("[[1.5, 2.0, 3.9, 4]]") == [(1, 2, 3, 4)]


def test_several_boxes_per_ref_are_all_kept() -> None:
    (block,) = parse("<|ref|>image<|/ref|><|det|>[[0, 0, 9, 9], [10, 10, 20, 20], [1, 2, 3]]<|/det|>").blocks
    assert block.boxes == [(0, 0, 9, 9), (10, 10, 20, 20)]


def test_unknown_labels_are_kept_and_det_without_ref_is_unknown() -> None:
    parsed = parse("<|ref|>sticker<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>a <|det|>[[5, 6, 7, 8]]<|/det|>b")
    assert [(b.label, b.text) for b in parsed.blocks] == [("sticker", "a"), (UNKNOWN_LABEL, "b")]


def test_ref_without_det_is_a_block_without_box() -> None:
    parsed = parse("Locate <|ref|>the total<|/ref|> here")
    (block,) = parsed.blocks
    assert (block.label, block.boxes, block.text) == ("the total", [], "here")
    assert parsed.lead == "Locate "


def test_stray_closers_are_dropped_words_kept() -> None:
    parsed = parse("a <|/ref|>b <|/det|>c")
    assert parsed.blocks == [] and parsed.lead == "a b c"


def test_stray_tag_inside_coordinates_is_dropped() -> None:
    (block,) = parse("<|ref|>t<|/ref|><|det|>[[1, 2, 3, 4]]<|ref|><|/det|>x").blocks
    assert block.boxes == [(1, 2, 3, 4)] and block.text == "x"


def test_random_tag_soup_never_raises_and_keeps_every_word() -> None:
    tags = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"]
    rng = random.Random(0)
    for _ in range(500):
        words = [f"w{i}" for i in range(rng.randint(0, 6))]
        parts = [rng.choice(tags + words + [" "]) for _ in range(rng.randint(0, 12))]
        text = "".join(parts)
        parsed = parse(text)
        kept = _words(parsed) + "".join(p for p in parsed.pieces if isinstance(p, str))
        for word in (p for p in parts if p.startswith("w")):
            assert word in kept, text


def test_to_pixels_official_scaling() -> None:
    assert to_pixels((0, 0, 999, 999), 640, 480) == (0, 0, 640, 480)
    assert to_pixels((500, 0, 999, 499), 1000, 100) == (500, 0, 1000, 49)
