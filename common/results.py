"""Structured results out: one record per page, and the `--output-dir` folder that keeps them safe.

A page record is a plain dict (JSON as is): the raw text, Markdown, blocks `{label, text, box}` in page pixels,
token counts, finish reason and the `looped` flag. `OutputDir` writes, per document folder:

    page-0001.txt            the raw model text          page-0001.md     Markdown, figures linked
    page-0001.annotated.jpg  the page with boxes drawn   images/page-0001-0.jpg   figure crops
    page-0001.json           the page record (written last: its presence means the page is finished)
    result.md, result.json   the document so far (rewritten after every page)

Every file is written to a temporary name and renamed, so an interrupted run leaves whole files or none.
A finished page's record carries a key (document sha256 + page + run settings): `--resume` skips a page whose
key matches and reruns one whose input or settings changed. Existing results are never replaced unless the run
says `--overwrite` (or `--resume`, for the pages it reruns).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .documents import Document
from .errors import UserError
from .output import PageLayout, draw_boxes, looped, page_layout

RESULT_JSON, RESULT_MD = "result.json", "result.md"
FLAGGED_REASONS = ("length",)


def page_stem(number: int) -> str:
    return f"page-{number:04d}"


def page_record(name: str, number: int, page_count: int, text: str, size: tuple[int, int], *,
                plain_label: str = "text", result: Any = None) -> tuple[dict[str, Any], PageLayout]:
    """The record of page `number` of document `name` from its model `text` (and the pipeline `Result` when
    there is one: token counts, finish reason, timings), plus its layout (figures to crop)."""
    layout = page_layout(text, size, plain_label=plain_label,
                         figure_name=lambda i: f"images/{page_stem(number)}-{i}.jpg")
    record: dict[str, Any] = {"input": name, "page": number, "page_count": page_count,
                              "width": size[0], "height": size[1], "text": text, "markdown": layout.markdown,
                              "blocks": layout.blocks, "looped": looped(text)}
    if result is not None:
        record.update(
            token_ids=result.token_ids, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, finish_reason=result.finish_reason, model=result.model,
            backend=result.backend, device=result.device, dtype=result.dtype, timings_ms=result.timings_ms)
    else:
        record["finish_reason"] = None  # text produced elsewhere (`render`): nothing known about its decoding
    return record, layout


def flags(record: dict[str, Any]) -> list[str]:
    """Why a page needs a look: "length" (hit the token cap), "looped" (ended in a repetition loop)."""
    out = [reason for reason in FLAGGED_REASONS if record.get("finish_reason") == reason]
    return out + (["looped"] if record.get("looped") else [])


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename (never a half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jpeg(image: Image.Image) -> bytes:
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def settings_key(settings: dict[str, Any]) -> str:
    """A short digest of the settings that shape an answer (model, files, prompt, inference keys, dpi)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class OutputDir:
    """The `--output-dir` of one run (see the module docstring)."""

    def __init__(self, root: Path, *, settings: dict[str, Any], resume: bool = False,
                 overwrite: bool = False) -> None:
        if root.exists() and not root.is_dir():
            raise UserError(f"--output-dir {root} is a file, not a folder")
        self.root, self.settings = root, settings
        self.resume, self.overwrite = resume, overwrite
        self._key = settings_key(settings)
        self._pages: dict[str, dict[int, dict[str, Any]]] = {}
        self._failed: dict[str, dict[int, str]] = {}

    def folder(self, doc: Document) -> Path:
        return self.root / doc.input.out_name

    def check(self, docs: Iterable[Document]) -> None:
        """Refuse to touch folders that already hold results, unless --resume or --overwrite says how."""
        if self.resume or self.overwrite:
            return
        for doc in docs:
            folder = self.folder(doc)
            held = [p.name for p in (folder / RESULT_JSON, *sorted(folder.glob("page-*.json"))) if p.exists()]
            if held:
                raise UserError(f"{folder} already holds results ({held[0]}); add --resume to finish the "
                                "unfinished pages or --overwrite to replace them")

    def page_key(self, doc: Document, number: int) -> str:
        return f"{doc.sha256[:16]}-{number}-{self._key}"

    def finished(self, doc: Document, number: int) -> dict[str, Any] | None:
        """With --resume: the record of a page finished by an earlier run with the same input and settings."""
        if not self.resume:
            return None
        path = self.folder(doc) / f"{page_stem(number)}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != self.page_key(doc, number):
            return None
        self._pages.setdefault(doc.input.out_name, {})[number] = record
        return record

    def write_page(self, doc: Document, record: dict[str, Any], layout: PageLayout, image: Image.Image) -> None:
        """Every file of one finished page, the record last, then the document's result files."""
        folder, stem = self.folder(doc), page_stem(record["page"])
        record["key"] = self.page_key(doc, record["page"])
        atomic_write(folder / f"{stem}.txt", record["text"])
        atomic_write(folder / f"{stem}.md", layout.markdown + "\n")
        boxes = [(b["label"], tuple(box)) for b in record["blocks"]
                 for box in (b.get("boxes") or ([b["box"]] if b.get("box") else []))]
        atomic_write(folder / f"{stem}.annotated.jpg", _jpeg(draw_boxes(image, boxes)))
        for name, box in layout.figures:
            atomic_write(folder / name, _jpeg(image.crop(box)))
        atomic_write(folder / f"{stem}.json", json.dumps(record, ensure_ascii=False, indent=1))
        self._pages.setdefault(doc.input.out_name, {})[record["page"]] = record
        self._failed.get(doc.input.out_name, {}).pop(record["page"], None)
        self.write_document(doc)

    def fail_page(self, doc: Document, number: int, message: str) -> None:
        """A page that could not be read: named in result.json, so nothing goes missing unnoticed."""
        self._failed.setdefault(doc.input.out_name, {})[number] = message
        self.write_document(doc)

    def write_document(self, doc: Document) -> None:
        pages = [record for _, record in sorted(self._pages.get(doc.input.out_name, {}).items())]
        failed = self._failed.get(doc.input.out_name, {})
        folder = self.folder(doc)
        atomic_write(folder / RESULT_MD, join_markdown(pages))
        summary = {
            "input": doc.name, "sha256": doc.sha256, "page_count": doc.page_count, "selected": doc.pages,
            "settings": self.settings, "pages": pages,
            "failed": [{"page": n, "error": m} for n, m in sorted(failed.items())],
            "flagged": [{"page": r["page"], "flags": flags(r)} for r in pages if flags(r)],
            "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in pages),
            "completion_tokens": sum(r.get("completion_tokens") or 0 for r in pages),
            "timings_ms": summed_timings(pages),
            "complete": len(pages) == len(doc.pages) and not failed,
        }
        atomic_write(folder / RESULT_JSON, json.dumps(summary, ensure_ascii=False, indent=1))


def page_marker(number: int) -> str:
    """The line that opens page `number` wherever pages are joined into one text (result.md, a server answer
    for a PDF): an HTML comment, so Markdown renderers show nothing while a reader can still split the text."""
    return f"<!-- page {number} -->"


def page_heading(number: int, *, first: bool) -> str:
    """What goes before page `number`'s text in a joined document: its marker and a blank line, after a blank
    line that ends the previous page unless it is the `first`. Streamed pieces built from it concatenate to
    `join_pages`."""
    return ("" if first else "\n\n") + page_marker(number) + "\n\n"


def join_pages(pages: Iterable[tuple[int, str]]) -> str:
    """(page number, text) pairs as one text, each page after its `page_marker` line."""
    return "".join(page_heading(number, first=i == 0) + text for i, (number, text) in enumerate(pages))


def join_markdown(pages: list[dict[str, Any]]) -> str:
    """The document's Markdown: each page after a `<!-- page N -->` line (figure links stay valid: the pages'
    Markdown files sit in the same folder)."""
    return join_pages((r["page"], r["markdown"]) for r in pages) + "\n"


def blocks_page(number: int, text: str, size: tuple[int, int], *, plain_label: str = "text",
                finish_reason: str | None = None) -> dict[str, Any]:
    """Page `number`'s layout blocks `{label, text, box}` (pixels of the page of `size`), as the page records
    of `--output-dir` hold them (`page_layout`), for answers that carry no files: figure crop names dropped."""
    blocks = [{k: v for k, v in block.items() if k != "figures"}
              for block in page_layout(text, size, plain_label=plain_label).blocks]
    return {"page": number, "width": size[0], "height": size[1], "blocks": blocks, "finish_reason": finish_reason}


def summed_timings(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for record in records:
        for stage, ms in (record.get("timings_ms") or {}).items():
            total[stage] = total.get(stage, 0.0) + ms
    return total
