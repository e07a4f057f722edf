"""Documents in: a PDF file part read as pages, each page its own request on the scheduler.

A chat `file` part or a Responses `input_file` part whose `file_data` is a PDF data URL stands for its pages:
every page is rendered (`common.pdf`, at the CLI's 144 dpi) and OCRed with the turn's prompt as a request of its
own, so the pages of one document batch together like separate requests would. The request's limits apply to
the pages as they do to images: the PDF's bytes are capped like an image body (`--image-max-bytes`), the page
count by `--max-images-per-request` (checked when the PDF is opened, before any page is rendered), each page by
`--max-image-pixels`, and every page's pixels are reserved on the request's admission ticket before it is
rendered. Opening, counting and rendering run on the loader's bounded pool, never on the event loop.
"""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from common.errors import ImageError, UserError
from common.pdf import DEFAULT_DPI, PdfFile, is_pdf, open_pdf
from common.pipeline import Request

from .errors import BusyError
from .images import ImageLoader, decode_data_url

#: Pages render at the resolution the CLI uses (the official DeepSeek-OCR PDF script's).
PAGE_DPI = DEFAULT_DPI


def _source(part: dict[str, Any]) -> dict[str, Any]:
    source = part.get("file") if part.get("type") == "file" else part
    return source if isinstance(source, dict) else {}


def is_pdf_part(part: dict[str, Any]) -> bool:
    """True for a `file` / `input_file` part whose data URL says `application/pdf`, or says no specific type
    and names a `.pdf` file. Other file parts stay images, as before."""
    if part.get("type") not in ("file", "input_file"):
        return False
    source = _source(part)
    data = source.get("file_data")
    if not isinstance(data, str) or not data[:5].lower() == "data:":
        return False
    mime = data[5:].split(",", 1)[0].split(";", 1)[0].strip().lower()
    filename = source.get("filename")
    named_pdf = isinstance(filename, str) and filename.lower().endswith(".pdf")
    return mime == "application/pdf" or (mime in ("", "application/octet-stream") and named_pdf)


def document_part(parts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The PDF part of a turn's image-like parts, or None when it has none. A turn with a PDF holds nothing
    else to look at: every page is read with the turn's text as its prompt, so another image (or a second PDF)
    would have no place in it (400)."""
    pdfs = [part for part in parts if is_pdf_part(part)]
    if not pdfs:
        return None
    if len(parts) > 1:
        raise ImageError(f"a turn with a PDF file part may hold no other images or files (it holds {len(parts)}): "
                         "each page is read on its own with the turn's text as its prompt; send one PDF per "
                         "request", param="messages")
    return pdfs[0]


def _filename(part: dict[str, Any]) -> str:
    """How messages name the PDF: by its file name when it has a short printable one."""
    name = _source(part).get("filename")
    if isinstance(name, str) and name and name.isprintable() and len(name) <= 100:
        return f"PDF file {name!r}"
    return "the PDF file"


def _named(exc: UserError, name: str) -> ImageError:
    """`common.pdf`'s error for bytes ("PDF data ...") naming the request's file instead, as a 400."""
    return ImageError(str(exc).replace("PDF data", name, 1), param="messages")


def open_checked(data: bytes, max_pages: int, max_pixels: int, dpi: int = PAGE_DPI, name: str = "the PDF file"
                 ) -> tuple[PdfFile, list[tuple[int, int]]]:
    """Open a PDF and check its limits before any page is rendered: (the open file, each page's pixel size).

    Raises a 400 `ImageError` for an empty, corrupt or password-protected PDF, more than `max_pages` pages
    (`--max-images-per-request`) or a page over `max_pixels` at `dpi` (`--max-image-pixels`). Runs pdfium:
    call it on a worker thread.
    """
    if not is_pdf(data):
        raise ImageError(f"{name} is not a readable PDF (no %PDF header)", param="messages")
    try:
        pdf = open_pdf(data)
    except UserError as exc:
        raise _named(exc, name) from None
    try:
        if pdf.page_count > max_pages:
            raise ImageError(f"{name} has {pdf.page_count} pages, over the limit of {max_pages} pages (or images) "
                             "per request (--max-images-per-request)", param="messages")
        sizes = [pdf.pixel_size(number, dpi) for number in range(1, pdf.page_count + 1)]
        for number, (width, height) in enumerate(sizes, 1):
            if width * height > max_pixels:
                raise ImageError(f"page {number} of {name} is {width}x{height} = {width * height} pixels at {dpi} "
                                 f"dpi, over the limit of {max_pixels} (--max-image-pixels)", param="messages")
    except BaseException:
        pdf.close()
        raise
    return pdf, sizes


async def load_pdf(loader: ImageLoader, part: dict[str, Any], reservation: Any = None) -> list[Image.Image]:
    """Every page of the PDF in `part` as an RGB image, in order, under the limits of the module docstring.

    `reservation` (the request's admission `Ticket`) is charged all pages' pixels after the count and sizes are
    known and before the first page is rendered: a refusal costs no rendering.
    """
    name = _filename(part)
    url = _source(part).get("file_data") or ""
    max_bytes = loader.limits.max_bytes
    data = await loader.run(lambda: decode_data_url(url.strip(), max_bytes, pdf=True))
    if len(data) > max_bytes:  # the check before decoding allows base64's padding slack
        raise ImageError(f"PDF file is larger than {max_bytes} bytes (--image-max-bytes)", param="messages")
    pdf, sizes = await loader.run(open_checked, data, loader.max_images, loader.max_pixels, PAGE_DPI, name)
    pages: list[Image.Image] = []
    try:
        if reservation is not None:
            for width, height in sizes:
                reservation.reserve_pixels(width * height)
        for number in range(1, len(sizes) + 1):
            try:
                pages.append(await loader.run(pdf.render, number, PAGE_DPI, loader.max_pixels))
            except UserError as exc:
                raise _named(exc, name) from None
    except BaseException:
        pages.clear()  # the traceback keeps this frame alive: do not let it keep the pixels too
        raise
    finally:
        await loader.run(pdf.close)
    return pages


class PageFeeder:
    """Puts a document's page requests on the scheduler in page order, as many as its queue takes now.

    The first page is submitted at once, so a full queue is a 429 before anything is answered. The others wait
    here when the queue is full and are submitted by `top_up` (called as the answer comes in) once it has room;
    a page that still finds no room when its turn comes fails with the queue's `BusyError`. `cancel` stops every
    page not yet finished (the client left, or a page failed).
    """

    def __init__(self, scheduler: Any, requests: list[Request]) -> None:
        if not requests:
            raise ValueError("a document has at least one page")
        self._scheduler = scheduler
        self._requests = requests
        self.jobs: list[Any] = [scheduler.submit(requests[0])]
        self.top_up()

    def __len__(self) -> int:
        return len(self._requests)

    def top_up(self) -> None:
        """Submit waiting pages, in order, while the scheduler takes them."""
        while len(self.jobs) < len(self._requests):
            try:
                self.jobs.append(self._scheduler.submit(self._requests[len(self.jobs)]))
            except BusyError:
                return

    def job(self, index: int) -> Any:
        """The job of page `index` (0-based), submitting it now if it was still waiting."""
        self.top_up()
        while len(self.jobs) <= index:  # every earlier page has finished: the queue is full of other requests
            self.jobs.append(self._scheduler.submit(self._requests[len(self.jobs)]))
        return self.jobs[index]

    def cancel(self) -> None:
        """Stop every submitted page that has not finished; pages never submitted are dropped with the feeder."""
        for job in self.jobs:
            if not job.done:
                job.cancel()
