"""PDF input: pages rendered to RGB images with pypdfium2 (the optional `pdf` extra), one page per OCR request.

Both models read one page image at a time, so a PDF is not an input of its own: the front ends render the
selected pages here and send each through the pipeline with the same prompt. 144 dpi is the default because the
official DeepSeek-OCR PDF script renders at that resolution (a US Letter page becomes 1224x1584 pixels).

pdfium is not thread-safe at all, not even across documents, so every call into it (open, count, render, close)
holds one process-wide lock. Documents are closed explicitly under that lock: pypdfium2 would otherwise close
them from a garbage-collection finaliser, outside any lock.

Usage:
    for number, image in iter_pages("doc.pdf", "1-3,5", dpi=200):   # one page in memory at a time
        ...
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

from PIL import Image

from .errors import ImageError, UserError

PdfSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

DEFAULT_DPI = 144
MIN_DPI, MAX_DPI = 18, 1200
#: Pages one call may select: past this the input is more likely a mistake than a document to OCR page by page.
MAX_PAGES = 500
#: Pixels one rendered page may have (the server's default image limit): refuses a poster at 1200 dpi.
MAX_PAGE_PIXELS = 64_000_000
#: The PDF header may follow up to 1 KiB of leading bytes; readers (pdfium included) search that far.
_HEADER_WINDOW = 1024

# pdfium error codes (FPDF_GetLastError), as pypdfium2 reports them in `PdfiumError.err_code`.
_ERR_SUCCESS, _ERR_FILE, _ERR_FORMAT, _ERR_PASSWORD = 0, 2, 3, 4

_LOCK = threading.RLock()


def _pdfium() -> Any:
    try:
        import pypdfium2  # noqa: PLC0415 - optional extra, imported only when a PDF is read
    except ImportError:
        raise UserError("reading PDF files needs the 'pypdfium2' package, which is not installed; install it "
                        "with: pip install 'deepseek-ocr[pdf]'") from None
    return pypdfium2


def is_pdf(data: bytes) -> bool:
    """True when `data` starts like a PDF (the `%PDF-` header within its first KiB)."""
    return b"%PDF-" in bytes(data[:_HEADER_WINDOW])


def is_pdf_file(path: str | os.PathLike) -> bool:
    """True for a `.pdf` name or a file whose first KiB holds the PDF header; False for anything unreadable (the
    image reader then reports the problem)."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        return True
    try:
        with path.open("rb") as handle:
            return is_pdf(handle.read(_HEADER_WINDOW))
    except OSError:
        return False


def check_dpi(dpi: Any, name: str = "dpi") -> int:
    """`dpi` as an int within MIN_DPI..MAX_DPI, else a `UserError` naming `name` (the flag or field)."""
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not MIN_DPI <= dpi <= MAX_DPI:
        raise UserError(f"{name}: {dpi!r} is not allowed (allowed: an integer from {MIN_DPI} to {MAX_DPI})",
                        param="dpi")
    return dpi


def parse_pages(spec: str | None, page_count: int, max_pages: int = MAX_PAGES) -> list[int]:
    """1-based page numbers from a selection such as "1-3,5" or "4-" (page 4 to the end); None means all pages.

    Numbers keep the order written, repeats dropped. Raises `UserError` (param "pages") for bad syntax, a page
    outside 1..page_count (the message gives the count) or more than `max_pages` pages.
    """
    if spec is None:
        numbers = list(range(1, page_count + 1))
    else:
        numbers = []
        for item in str(spec).split(","):
            for number in _parse_item(item.strip(), spec, page_count):
                if number not in numbers:
                    numbers.append(number)
    if len(numbers) > max_pages:
        raise UserError(f"{len(numbers)} pages selected, but at most {max_pages} are read per call; select fewer "
                        f"pages (e.g. pages '1-{max_pages}')", param="pages")
    return numbers


def _parse_item(item: str, spec: str, page_count: int) -> range:
    first, dash, last = item.partition("-")
    if not first.strip().isdigit() or (last.strip() and not last.strip().isdigit()):
        raise UserError(f"pages {spec!r}: expected page numbers and ranges such as '1-3,5' or '4-'", param="pages")
    start = int(first)
    end = (int(last) if last.strip() else page_count) if dash else start
    for number in (start, end):
        if not 1 <= number <= page_count:
            raise UserError(f"page {number} is out of range: the PDF has {page_count} page"
                            f"{'s' if page_count != 1 else ''}", param="pages")
    if end < start:
        raise UserError(f"pages {spec!r}: the range {item!r} runs backwards", param="pages")
    return range(start, end + 1)


class PdfFile:
    """An open PDF. Use as a context manager (or call `close`); every method takes the pdfium lock itself, so
    pages may be rendered one at a time while other threads use pdfium in between."""

    def __init__(self, source: PdfSource, *, password: str | None = None) -> None:
        pdfium = _pdfium()
        if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
            source = source.read()
        self.name = f"PDF file {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "PDF data"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ImageError(f"{self.name} not found" if not path.exists() else f"{self.name} is not a file")
            source = str(path)
        elif not source:
            raise ImageError("PDF data is empty")
        with _LOCK:
            try:
                self._doc = pdfium.PdfDocument(bytes(source) if isinstance(source, bytearray) else source,
                                               password=password)
            except pdfium.PdfiumError as exc:
                raise self._open_error(exc, password) from None
            except OSError as exc:
                raise ImageError(f"cannot read {self.name}: {exc.strerror or exc}") from None
            self.page_count = len(self._doc)
        if self.page_count == 0:
            self.close()
            raise ImageError(f"{self.name} has no pages")

    def _open_error(self, exc: Any, password: str | None) -> ImageError:
        code = getattr(exc, "err_code", None)
        if code == _ERR_PASSWORD:
            return ImageError(f"{self.name} is password-protected" + (
                " and the password is wrong" if password else "; remove the protection first"))
        if code == _ERR_FORMAT:
            return ImageError(f"{self.name} is not a readable PDF (corrupt, truncated or not a PDF)")
        if code == _ERR_SUCCESS:  # pdfium refused without a reason: seen for a page tree with no pages
            return ImageError(f"{self.name} is not a readable PDF (no pages, or a broken page tree)")
        if code == _ERR_FILE:
            return ImageError(f"cannot read {self.name}")
        return ImageError(f"cannot open {self.name}: {exc}")

    def select(self, pages: str | None = None, max_pages: int = MAX_PAGES) -> list[int]:
        """1-based page numbers of this document for a selection (see `parse_pages`)."""
        return parse_pages(pages, self.page_count, max_pages)

    def pixel_size(self, number: int, dpi: int = DEFAULT_DPI) -> tuple[int, int]:
        """(width, height) in pixels of page `number` (1-based) rendered at `dpi`, without rendering it."""
        dpi = check_dpi(dpi)
        if self._doc is None:
            raise ValueError(f"{self.name} is closed")
        if not 1 <= number <= self.page_count:
            raise UserError(f"page {number} is out of range: the PDF has {self.page_count} pages", param="pages")
        with _LOCK:
            page = self._doc[number - 1]
            try:
                points = page.get_size()  # 1/72 inch each
            finally:
                page.close()
        width, height = (math.ceil(side * dpi / 72) for side in points)
        return width, height

    def render(self, number: int, dpi: int = DEFAULT_DPI, max_pixels: int = MAX_PAGE_PIXELS) -> Image.Image:
        """Page `number` (1-based) as an RGB image at `dpi`; an `ImageError` when it would exceed `max_pixels`."""
        width, height = self.pixel_size(number, dpi)
        if width * height > max_pixels:
            raise ImageError(f"page {number} of {self.name} would be {width}x{height} = {width * height} "
                             f"pixels at {dpi} dpi, over the limit of {max_pixels}; use a lower dpi")
        pdfium = _pdfium()
        with _LOCK:
            page = self._doc[number - 1]
            try:
                bitmap = page.render(scale=dpi / 72)
                try:
                    # convert() copies: the image must not share the pdfium buffer closed just below.
                    return bitmap.to_pil().convert("RGB")
                finally:
                    bitmap.close()
            except pdfium.PdfiumError as exc:
                raise ImageError(f"cannot render page {number} of {self.name}: {exc}") from None
            finally:
                page.close()

    def close(self) -> None:
        with _LOCK:
            doc, self._doc = getattr(self, "_doc", None), None
            if doc is not None:
                doc.close()

    def __del__(self) -> None:
        # Closing here, under the lock, keeps pypdfium2's own finaliser (which takes no lock) from doing it.
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - nothing can be reported from a finaliser
            pass

    def __enter__(self) -> PdfFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_pdf(source: PdfSource, *, password: str | None = None) -> PdfFile:
    """Open a PDF from a path, bytes or a binary stream.

    Raises `ImageError` for a missing file, an empty, corrupt or password-protected PDF (one line each), and
    `UserError` when pypdfium2 is not installed.
    """
    return PdfFile(source, password=password)


def iter_pages(source: PdfSource, pages: str | None = None, dpi: int = DEFAULT_DPI, *,
               password: str | None = None, max_pages: int = MAX_PAGES, max_pixels: int = MAX_PAGE_PIXELS,
               progress: bool = False, label: str = "pages") -> PageReader:
    """(page number, RGB image) for each selected page, rendered only when asked for: the way to OCR a long
    document page by page. The reader also tells `page_count` (the document's) and `numbers` (the selection).

    The document is opened and the selection checked before this returns, so a bad file or range fails at
    once; it is closed when the iteration ends or the reader is closed (it is also a context manager).
    `progress` shows a tqdm bar on stderr (silenced by TQDM_DISABLE=1) that advances when the caller asks for
    the next page, i.e. after it has used the last one.
    """
    dpi = check_dpi(dpi)
    doc = open_pdf(source, password=password)
    try:
        numbers = doc.select(pages, max_pages)
    except BaseException:
        doc.close()
        raise
    return PageReader(doc, numbers, dpi, max_pixels, progress, label)


class PageReader:
    """The iterator `iter_pages` returns: (number, image) pairs, one page rendered per step."""

    def __init__(self, doc: PdfFile, numbers: list[int], dpi: int, max_pixels: int, progress: bool,
                 label: str) -> None:
        self.page_count, self.numbers = doc.page_count, numbers
        self._doc = doc
        self._pages = self._render_all(dpi, max_pixels, progress, label)

    def _render_all(self, dpi: int, max_pixels: int, progress: bool,
                    label: str) -> Iterator[tuple[int, Image.Image]]:
        import sys  # noqa: PLC0415

        from tqdm import tqdm  # noqa: PLC0415 - only when pages are read

        # `disable` is left unset when a bar is wanted: an explicit value would override TQDM_DISABLE.
        quiet = {} if progress else {"disable": True}
        try:
            with tqdm(self.numbers, desc=label, unit="page", file=sys.stderr, **quiet) as bar:
                for number in bar:
                    yield number, self._doc.render(number, dpi, max_pixels)
        finally:
            self._doc.close()

    def __iter__(self) -> PageReader:
        return self

    def __next__(self) -> tuple[int, Image.Image]:
        return next(self._pages)

    def close(self) -> None:
        self._pages.close()
        self._doc.close()  # a generator never started skips its finally

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
