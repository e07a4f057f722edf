"""Documents in: files, folders, globs, PDFs and multi-page TIFFs as a list of documents, each a list of pages.

Each input is its own document and each page its own answer (the multi-image prompt, several images in ONE
request, is a different thing: `--image` in the CLI, a list in `OCR.__call__`). Documents are opened and counted
before any model work, so a missing file, an empty or password-protected PDF or a bad `--pages` selection is
known at once; pages are decoded only when the run asks for them, and a page that fails to decode (corrupt, too
large) comes back as its error in its place, so one bad page never stops the others.

Usage:
    docs, skipped = discover(["scans/", "report.pdf"], recursive=False)
    for doc in open_documents(docs, pages="1-3", dpi=144):
        for number, image_or_error in doc.iter_pages():
            ...
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from PIL import Image, ImageOps

from .errors import ImageError, UserError
from .images import ALLOWED_FORMATS, open_image, to_rgb
from .pdf import DEFAULT_DPI, MAX_PAGE_PIXELS, is_pdf, is_pdf_file, open_pdf, parse_pages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: What a folder contributes: images and PDFs, by name (anything else is counted as skipped).
DOCUMENT_SUFFIXES = (*IMAGE_SUFFIXES, ".pdf")
_GLOB_CHARS = re.compile(r"[*?\[]")
T = TypeVar("T")


@dataclass(frozen=True)
class Input:
    """One document to read: where its bytes are and the name it goes by (also its output folder)."""

    name: str                   # as shown in messages and outputs: the path typed, or folder/relative path
    source: Path | bytes        # a file, or the bytes of a fetched URL
    out_name: str               # relative folder under --output-dir (unique within a run)


def _natural(path: Path) -> list[object]:
    """Sort key that puts page2 before page10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.as_posix())]


def _folder_files(folder: Path, recursive: bool) -> tuple[list[Path], int]:
    """Images and PDFs in `folder` (sorted naturally; hidden names skipped) and how many other files were
    passed over."""
    found, skipped = [], 0
    walker = folder.rglob("*") if recursive else folder.iterdir()
    for path in walker:
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in DOCUMENT_SUFFIXES:
            found.append(path)
        else:
            skipped += 1
    return sorted(found, key=lambda p: _natural(p.relative_to(folder))), skipped


def discover(args: list[str], *, recursive: bool = False, fetch: object = None) -> tuple[list[Input], int]:
    """The documents named by `args`, in order: files as given, folders as their sorted images and PDFs
    (`recursive`: subfolders too), globs the shell left unexpanded, and http(s) URLs (`fetch(url)` -> bytes).
    Returns (inputs, files skipped in folders). A missing path or a folder with nothing to read is a `UserError`.
    """
    inputs: list[Input] = []
    skipped = 0
    for arg in args:
        if arg.startswith(("http://", "https://")) and callable(fetch):
            name = arg.rstrip("/").rsplit("/", 1)[-1] or "download"
            inputs.append(Input(arg, fetch(arg), Path(name).stem or "download"))
            continue
        path = Path(arg).expanduser()
        if not path.exists() and _GLOB_CHARS.search(arg):
            matches = sorted((Path(m) for m in glob.glob(os.path.expanduser(arg), recursive=recursive)),
                             key=_natural)
            if not matches:
                raise UserError(f"{arg}: no file matches this pattern")
            inputs += [Input(str(m), m, m.with_suffix("").name) for m in matches if m.is_file()]
            continue
        if path.is_dir():
            files, passed = _folder_files(path, recursive)
            skipped += passed
            if not files:
                raise UserError(f"folder {arg} holds no images or PDFs ({', '.join(DOCUMENT_SUFFIXES)})"
                                + ("" if recursive else "; add --recursive to look in its subfolders"))
            inputs += [Input(str(f), f, f.relative_to(path).with_suffix("").as_posix()) for f in files]
            continue
        if not path.exists():
            raise ImageError(f"{arg} not found")
        if not path.is_file():
            raise ImageError(f"{arg} is not a file")
        inputs.append(Input(arg, path, path.with_suffix("").name))
    return _unique_out_names(inputs), skipped


def _unique_out_names(inputs: list[Input]) -> list[Input]:
    """Two inputs never share an output folder: later ones get "-2", "-3", ..."""
    seen: dict[str, int] = {}
    out = []
    for item in inputs:
        name = item.out_name or "document"
        count = seen.get(name.lower(), 0) + 1
        seen[name.lower()] = count
        out.append(item if count == 1 else Input(item.name, item.source, f"{name}-{count}"))
    return out


@dataclass
class Document:
    """An opened input: its kind, page count, the pages selected and a digest of its bytes (for --resume)."""

    input: Input
    kind: str                    # "pdf" | "tiff" (several frames) | "image"
    page_count: int
    pages: list[int]
    sha256: str
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = MAX_PAGE_PIXELS

    @property
    def name(self) -> str:
        return self.input.name

    def iter_pages(self, skip: set[int] | frozenset[int] = frozenset()
                   ) -> Iterator[tuple[int, Image.Image | UserError | None]]:
        """(page number, RGB image or the `UserError` that page raised) for each selected page, decoded one at
        a time; pages in `skip` (finished earlier) come as None, not decoded. The file stays open only while
        this runs."""
        wanted = [n for n in self.pages if n not in skip]
        readers = {"pdf": self._pdf_pages, "tiff": self._tiff_pages}
        pages = readers.get(self.kind, self._image_pages)(wanted)
        for number in self.pages:
            if number in skip:
                yield number, None
            else:
                yield next(pages)

    def _image_pages(self, wanted: list[int]) -> Iterator[tuple[int, Image.Image | UserError]]:
        for number in wanted:
            try:
                yield number, open_image(self.input.source)
            except UserError as error:
                yield number, error

    def _pdf_pages(self, wanted: list[int]) -> Iterator[tuple[int, Image.Image | UserError]]:
        if not wanted:
            return
        with open_pdf(self.input.source, password=self.password) as pdf:
            for number in wanted:
                try:
                    yield number, pdf.render(number, self.dpi, self.max_pixels)
                except UserError as error:
                    yield number, error

    def _tiff_pages(self, wanted: list[int]) -> Iterator[tuple[int, Image.Image | UserError]]:
        source = self.input.source
        what = f"image file {self.name}"
        try:
            handle = Image.open(source if isinstance(source, Path) else _bytes_io(source), formats=ALLOWED_FORMATS)
        except (OSError, Image.DecompressionBombError) as exc:
            for number in wanted:
                yield number, ImageError(f"cannot read {what}: {exc}")
            return
        with handle:
            for number in wanted:
                try:
                    handle.seek(number - 1)
                    frame = handle.copy()
                    try:  # as common.images.open_image: orientation applied when the frame says so
                        frame = ImageOps.exif_transpose(frame)
                    except Exception:  # noqa: BLE001 - the official loader falls back on any error
                        pass
                    yield number, to_rgb(frame, f"page {number} of {what}")
                except (OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
                    yield number, ImageError(f"cannot read page {number} of {what}: {exc}")


def _bytes_io(data: bytes):  # noqa: ANN202 - a BytesIO
    import io  # noqa: PLC0415

    return io.BytesIO(data)


def _digest(source: Path | bytes) -> str:
    hasher = hashlib.sha256()
    if isinstance(source, bytes):
        hasher.update(source)
    else:
        with source.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
    return hasher.hexdigest()


def _frame_count(source: Path | bytes) -> int | None:
    """Frames of a TIFF (None: not a TIFF, or unreadable: the page decode then reports it)."""
    try:
        with Image.open(source if isinstance(source, Path) else _bytes_io(source), formats=("TIFF",)) as image:
            return int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - anything unreadable is reported when the page is decoded
        return None


def open_document(item: Input, *, pages: str | None = None, dpi: int = DEFAULT_DPI,
                  password: str | None = None, max_pixels: int = MAX_PAGE_PIXELS) -> Document:
    """Open `item` far enough to know its pages: PDFs are opened and counted (an empty, corrupt or
    password-protected one is an `ImageError` now), TIFFs have their frames counted, other images are one page.
    `pages` ("1-3,5") selects pages of a PDF or multi-page TIFF; single images ignore it."""
    source = item.source
    sha = _digest(source) if isinstance(source, bytes) or source.is_file() else ""
    if is_pdf(source) if isinstance(source, bytes) else is_pdf_file(source):
        with open_pdf(source, password=password) as pdf:
            numbers = pdf.select(pages)
            count = pdf.page_count
        return Document(item, "pdf", count, numbers, sha, dpi, password, max_pixels)
    frames = _frame_count(source)
    if frames and frames > 1:
        return Document(item, "tiff", frames, parse_pages(pages, frames), sha, dpi, None, max_pixels)
    return Document(item, "image", 1, [1], sha, dpi, None, max_pixels)


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class PageJob:
    """One page on its way through a run: its image, or the error that stopped it, or (--resume) the record
    an earlier run left."""

    document: Document
    number: int
    image: Image.Image | None = None
    error: UserError | None = None
    record: dict | None = None

    @property
    def needs_model(self) -> bool:
        return self.image is not None and self.error is None and self.record is None


def run_pages(pipeline: Any, jobs: Iterable[PageJob], request_for: Callable[[PageJob], Any], batch_size: int, *,
              on_text: Callable[[PageJob, str], None] | None = None) -> Iterator[tuple[PageJob, Any]]:
    """(job, `Result` | `UserError` | None) for every job, in input order, each as soon as it and every earlier
    one are done. Pages that need the model decode `batch_size` at a time through `Pipeline.map` (jobs are pulled
    lazily, so only the pages a batch needs are decoded); jobs that failed or were resumed pass through with
    None. With `batch_size` 1 each page goes through `Pipeline.stream` and `on_text(job, piece)` sees its text
    token by token. A page whose request the pipeline refuses (a `UserError`) comes back as that error."""
    if batch_size <= 1:
        yield from _run_streamed(pipeline, jobs, request_for, on_text)
        return
    yield from map_in_order(pipeline, jobs, lambda job: request_for(job) if job.needs_model else None, batch_size)


def map_in_order(pipeline: Any, items: Iterable[T], request_for: Callable[[T], Any], batch_size: int
                 ) -> Iterator[tuple[T, Any]]:
    """(item, outcome) for every item in order, through `Pipeline.map`: `request_for(item)` gives its
    `Request` (outcome: the `Result`, or the `UserError` its preparation raised), None (nothing to run: outcome
    None), or raises a `UserError` (outcome: that error, e.g. an image that cannot be read). Items are pulled
    lazily, as the batch has room."""
    waiting: deque[tuple[T, Any, bool]] = deque()  # (item, outcome so far, sent to the model)

    def requests() -> Iterator[Any]:
        for item in items:
            try:
                request = request_for(item)
            except UserError as error:
                waiting.append((item, error, False))
                continue
            waiting.append((item, None, request is not None))
            if request is not None:
                yield request

    for result in pipeline.map(requests(), batch_size, return_errors=True):
        while waiting and not waiting[0][2]:
            item, outcome, _ = waiting.popleft()
            yield item, outcome
        yield waiting.popleft()[0], result
    while waiting:
        item, outcome, _ = waiting.popleft()
        yield item, outcome


def _run_streamed(pipeline: Any, jobs: Iterable[PageJob], request_for: Callable[[PageJob], Any],
                  on_text: Callable[[PageJob, str], None] | None) -> Iterator[tuple[PageJob, Any]]:
    from .pipeline import Result  # noqa: PLC0415 - the pipeline loads the backends' seams

    for job in jobs:
        if not job.needs_model:
            yield job, None
            continue
        result: Any = None
        try:
            for event in pipeline.stream(request_for(job)):
                if isinstance(event, Result):
                    result = event
                elif on_text is not None and event.text:
                    on_text(job, event.text)
        except UserError as error:
            result = error
        yield job, result
