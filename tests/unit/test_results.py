"""Structured results out (common/results.py and common/output.py page_layout/looped)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from common.documents import discover, open_document
from common.errors import UserError
from common.output import looped, page_layout
from common.results import OutputDir, atomic_write, flags, join_markdown, page_record

GROUNDED = ("<|ref|>title<|/ref|><|det|>[[0, 0, 499, 99]]<|/det|>\n# Title\n\n"
            "<|ref|>image<|/ref|><|det|>[[0, 500, 999, 999]]<|/det|>\n<|ref|>text<|/ref|><|det|>[[10, 10, 20]]<|/det|>"
            "\nBody")


def test_page_layout_blocks_in_page_pixels_and_linked_figures() -> None:
    layout = page_layout(GROUNDED, (200, 100), figure_name=lambda i: f"images/f{i}.jpg")
    assert layout.blocks[0] == {"label": "title", "text": "# Title", "box": [0, 0, 99, 9]}
    assert layout.blocks[1]["box"] == [0, 50, 200, 100] and layout.blocks[1]["figures"] == ["images/f0.jpg"]
    assert layout.blocks[2]["box"] is None and layout.blocks[2]["det"] == "[[10, 10, 20]]"
    assert layout.markdown == "# Title\n\n![](images/f0.jpg)\n\nBody"
    assert layout.figures == [("images/f0.jpg", (0, 50, 200, 100))]


def test_plain_answers_are_one_block_of_their_kind() -> None:
    layout = page_layout("| a | b |", (30, 20), plain_label="table")
    assert layout.blocks == [{"label": "table", "text": "| a | b |", "box": [0, 0, 30, 20]}]
    assert page_layout("", (30, 20)).blocks == []


def test_looped_detects_repetition_at_the_end_only() -> None:
    assert looped("Intro. " + "the same line\n" * 10)
    assert looped("x" * 64) and not looped("x" * 63)
    assert not looped("A normal page of text that ends well. " * 1 + "The end.")
    assert not looped(("row " * 20) + "and then it stopped properly.")


def test_flags_name_length_and_looped() -> None:
    assert flags({"finish_reason": "length", "looped": True}) == ["length", "looped"]
    assert flags({"finish_reason": "stop", "looped": False}) == []


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    atomic_write(tmp_path / "sub" / "a.txt", "hello")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.txt"]


def _doc(tmp_path: Path, colour: tuple[int, int, int] = (255, 255, 255)):  # noqa: ANN202
    path = tmp_path / "page.png"
    Image.new("RGB", (200, 100), colour).save(path)
    (item,), _ = discover([str(path)])
    return open_document(item)


def test_output_dir_writes_every_file_refuses_reuse_and_resumes_by_key(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    image = next(doc.iter_pages())[1]
    out = tmp_path / "out"
    writer = OutputDir(out, settings={"prompt": "p"})
    writer.check([doc])
    record, layout = page_record(doc.name, 1, 1, GROUNDED, image.size)
    writer.write_page(doc, record, layout, image)
    folder = out / "page"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == ["images/page-0001-0.jpg", "page-0001.annotated.jpg", "page-0001.json", "page-0001.md",
                     "page-0001.txt", "result.json", "result.md"]
    assert (folder / "page-0001.txt").read_text() == GROUNDED
    summary = json.loads((folder / "result.json").read_text())
    assert summary["complete"] and summary["pages"][0]["blocks"][0]["label"] == "title"
    assert Image.open(folder / "images/page-0001-0.jpg").size == (200, 50)
    with pytest.raises(UserError, match="already holds results.*--resume.*--overwrite"):
        OutputDir(out, settings={"prompt": "p"}).check([doc])
    assert OutputDir(out, settings={"prompt": "p"}, resume=True).finished(doc, 1)["text"] == GROUNDED
    assert OutputDir(out, settings={"prompt": "other"}, resume=True).finished(doc, 1) is None
    changed = _doc(tmp_path, (0, 0, 0))  # same name, other bytes: rerun
    assert OutputDir(out, settings={"prompt": "p"}, resume=True).finished(changed, 1) is None


def test_failed_pages_are_named_in_result_json(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    writer = OutputDir(tmp_path / "out", settings={})
    writer.fail_page(doc, 1, "corrupt")
    summary = json.loads((tmp_path / "out" / "page" / "result.json").read_text())
    assert summary["failed"] == [{"page": 1, "error": "corrupt"}] and not summary["complete"]


def test_join_markdown_marks_pages() -> None:
    assert join_markdown([{"page": 1, "markdown": "a"}, {"page": 2, "markdown": "b"}]) == \
        "<!-- page 1 -->\n\na\n\n<!-- page 2 -->\n\nb\n"
