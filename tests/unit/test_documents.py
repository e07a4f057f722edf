"""Documents in (common/documents.py): discovery, page counts, lazy pages with per-page errors, in-order runs."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from common.documents import PageJob, discover, map_in_order, open_document
from common.errors import UserError


def _png(path: Path, colour: tuple[int, int, int] = (255, 255, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_folder_is_sorted_naturally_filtered_and_optionally_recursive(tmp_path: Path) -> None:
    for name in ("p10.png", "p2.png", "P1.JPG", "sub/p3.png", ".hidden.png"):
        _png(tmp_path / "scans" / name)
    (tmp_path / "scans" / "notes.txt").write_text("x")
    flat, skipped = discover([str(tmp_path / "scans")])
    assert [Path(i.name).name for i in flat] == ["P1.JPG", "p2.png", "p10.png"] and skipped == 1
    deep, _ = discover([str(tmp_path / "scans")], recursive=True)
    assert [i.out_name for i in deep] == ["P1", "p2", "p10", "sub/p3"]


def test_unexpanded_glob_same_names_and_missing_paths(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "b" / "x.png")
    found, _ = discover([str(tmp_path / "*" / "x.png")])
    assert [i.out_name for i in found] == ["x", "x-2"]  # two documents never share an output folder
    with pytest.raises(UserError, match="not found"):
        discover([str(tmp_path / "none.png")])
    with pytest.raises(UserError, match="no file matches"):
        discover([str(tmp_path / "*.webp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images or PDFs.*--recursive"):
        discover([str(tmp_path / "empty")])


def test_tiff_frames_are_pages_and_pages_select(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20 + i, 10), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "f.tif", save_all=True, append_images=frames[1:])
    (item,), _ = discover([str(tmp_path / "f.tif")])
    doc = open_document(item, pages="2-")
    assert (doc.kind, doc.page_count, doc.pages) == ("tiff", 3, [2, 3])
    assert [(n, im.size) for n, im in doc.iter_pages()] == [(2, (21, 10)), (3, (22, 10))]
    assert [(n, im) for n, im in open_document(item).iter_pages(skip={1, 3})][0::2] == [(1, None), (3, None)]


def test_a_corrupt_image_comes_back_as_its_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    (item,), _ = discover([str(bad)])
    ((number, error),) = open_document(item).iter_pages()
    assert number == 1 and isinstance(error, UserError) and "not in a supported image format" in str(error)


def test_pdf_pages_and_refusals(tmp_path: Path) -> None:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument.new()
    for width in (72, 144, 36):
        doc.new_page(width, 72)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    (tmp_path / "d.pdf").write_bytes(buffer.getvalue())
    (item,), _ = discover([str(tmp_path / "d.pdf")])
    opened = open_document(item, pages="1,3", dpi=72)
    assert [(n, im.size) for n, im in opened.iter_pages()] == [(1, (72, 72)), (3, (36, 72))]
    assert len(opened.sha256) == 64
    with pytest.raises(UserError, match="out of range"):
        open_document(item, pages="4")
    (tmp_path / "empty.pdf").write_bytes(b"")
    (empty,), _ = discover([str(tmp_path / "empty.pdf")])
    with pytest.raises(UserError):
        open_document(empty)


class _FakePipeline:
    """`Pipeline.map` stand-in: results in order, a request whose prompt says "refuse" fails its preparation."""

    def __init__(self) -> None:
        self.pulled: list[str] = []

    def map(self, requests, batch_size, return_errors):  # noqa: ANN001, ANN201
        assert return_errors
        for request in requests:
            self.pulled.append(request)
            yield UserError("refused") if request == "refuse" else f"result:{request}"


def test_map_in_order_interleaves_errors_and_pass_throughs_in_place() -> None:
    def request_for(item: str) -> str | None:
        if item == "unreadable":
            raise UserError("cannot read")
        return None if item == "resumed" else item

    out = list(map_in_order(_FakePipeline(), ["a", "unreadable", "resumed", "refuse", "b"], request_for, 4))
    assert [(item, str(o) if o is not None else None) for item, o in out] == [
        ("a", "result:a"), ("unreadable", "cannot read"), ("resumed", None), ("refuse", "refused"),
        ("b", "result:b")]


def test_page_job_needs_the_model_only_with_an_image() -> None:
    assert not PageJob(None, 1).needs_model  # type: ignore[arg-type]
    assert not PageJob(None, 1, image=Image.new("RGB", (1, 1)), record={}).needs_model  # type: ignore[arg-type]
    assert PageJob(None, 1, image=Image.new("RGB", (1, 1))).needs_model  # type: ignore[arg-type]
