"""PDF input (common/pdf.py): page selection, rendering, refusals, on PDFs written by hand in the test.

The PDFs are built here byte by byte (a minimal PDF is a dozen objects and an xref table), so each page's size
and content are known without another renderer: a page of W x H points at D dpi is W*D/72 x H*D/72 pixels, and
a filled black rectangle must come out black. The password-protected file uses the PDF standard security
handler, revision 2 (RC4, 40-bit key, ISO 32000-1 section 7.6.3, algorithms 1 to 4), so pdfium must refuse it
without the password and render the same black rectangle with it.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import threading
from pathlib import Path

import pytest
from PIL import Image

from common import pdf as pdf_module
from common.errors import ImageError, UserError
from common.pdf import (MAX_DPI, MIN_DPI, check_dpi, is_pdf, is_pdf_file, iter_pages, open_pdf,
                        parse_pages)

pytest.importorskip("pypdfium2")

# ISO 32000-1, 7.6.3.3, algorithm 2 step (a): the 32 bytes every password is padded with.
PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
FILE_ID = bytes(range(16))
PERMISSIONS = -4  # every permission bit set


def _rc4(key: bytes, data: bytes) -> bytes:
    box = list(range(256))
    j = 0
    for i in range(256):
        j = (j + box[i] + key[i % len(key)]) % 256
        box[i], box[j] = box[j], box[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + box[i]) % 256
        box[i], box[j] = box[j], box[i]
        out.append(byte ^ box[(box[i] + box[j]) % 256])
    return bytes(out)


def _encryption(user: str, owner: str) -> tuple[bytes, bytes, bytes]:
    """(file key, /O, /U) for revision 2 (algorithms 3, 2 and 4)."""
    padded_user = (user.encode("latin-1") + PAD)[:32]
    padded_owner = (owner.encode("latin-1") + PAD)[:32]
    o_value = _rc4(hashlib.md5(padded_owner).digest()[:5], padded_user)
    key = hashlib.md5(padded_user + o_value + PERMISSIONS.to_bytes(4, "little", signed=True) + FILE_ID).digest()[:5]
    return key, o_value, _rc4(key, PAD)


def make_pdf(pages: list[tuple[int, int]], *, black_box: bool = True, password: str | None = None) -> bytes:
    """A PDF whose page i is pages[i] = (width, height) points, each with a black 20x20 pt square at (10, 10)
    from the bottom-left corner; encrypted with user password `password` when given."""
    key = o_value = u_value = b""
    if password is not None:
        key, o_value, u_value = _encryption(password, "owner-" + password)
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects: dict[int, bytes] = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
                                 2: f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode()}
    for i, (width, height) in enumerate(pages):
        page, content = 3 + 2 * i, 4 + 2 * i
        objects[page] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] "
                         f"/Contents {content} 0 R /Resources << >> >>").encode()
        stream = b"0 0 0 rg 10 10 20 20 re f\n" if black_box else b""
        if password is not None:  # algorithm 1: per-object key from the file key, object and generation numbers
            object_key = hashlib.md5(key + content.to_bytes(3, "little") + b"\0\0").digest()[:len(key) + 5]
            stream = _rc4(object_key, stream)
        objects[content] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    trailer_extra = b""
    if password is not None:
        encrypt = 3 + 2 * n
        objects[encrypt] = (b"<< /Filter /Standard /V 1 /R 2 /O <" + o_value.hex().encode() + b"> /U <"
                            + u_value.hex().encode() + b"> /P %d >>" % PERMISSIONS)
        trailer_extra = b" /Encrypt %d 0 R /ID [<%s> <%s>]" % (encrypt, FILE_ID.hex().encode(),
                                                              FILE_ID.hex().encode())
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = out.tell()
        out.write(b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n")
    xref = out.tell()
    size = max(objects) + 1
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
    for number in range(1, size):
        out.write(b"%010d 00000 n \n" % offsets[number])
    out.write(b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (size, trailer_extra, xref))
    return out.getvalue()


THREE_PAGES = [(200, 100), (100, 300), (150, 150)]


@pytest.fixture(scope="module")
def three_pages() -> bytes:
    return make_pdf(THREE_PAGES)


# ------------------------------------------------------------------------------------------ page selection
@pytest.mark.parametrize("spec, expected", [
    (None, [1, 2, 3, 4, 5]),
    ("1-3,5", [1, 2, 3, 5]),
    (" 2 , 4 ", [2, 4]),
    ("4-", [4, 5]),
    ("5,1-2,2", [5, 1, 2]),      # the order written, repeats dropped
    ("3-3", [3]),
])
def test_page_selection(spec: str | None, expected: list[int]) -> None:
    assert parse_pages(spec, 5) == expected


@pytest.mark.parametrize("spec, words", [
    ("0", "page 0 is out of range: the PDF has 5 pages"),
    ("2-7", "page 7 is out of range: the PDF has 5 pages"),
    ("4-2", "runs backwards"),
    ("1;2", "expected page numbers"),
    ("", "expected page numbers"),
    ("-3", "expected page numbers"),
    ("one", "expected page numbers"),
])
def test_bad_page_selection_is_a_user_error(spec: str, words: str) -> None:
    with pytest.raises(UserError, match=words) as caught:
        parse_pages(spec, 5)
    assert caught.value.param == "pages"


def test_page_count_cap() -> None:
    assert len(parse_pages("1-3", 10, max_pages=3)) == 3
    with pytest.raises(UserError, match="4 pages selected, but at most 3"):
        parse_pages(None, 4, max_pages=3)


def test_singular_page_count_in_the_message() -> None:
    with pytest.raises(UserError, match="the PDF has 1 page$"):
        parse_pages("2", 1)


# ------------------------------------------------------------------------------------------ rendering
def render_pdf(source, pages=None, dpi=144, **options) -> list:
    """Every selected page at once, through the one page reader the front ends use."""
    with iter_pages(source, pages, dpi, **options) as reader:
        return [image for _, image in reader]


def test_renders_every_page_at_the_dpi(three_pages: bytes) -> None:
    images = render_pdf(three_pages, dpi=144)
    assert [im.size for im in images] == [(w * 2, h * 2) for w, h in THREE_PAGES]  # 144 dpi = 2 px per point
    assert all(im.mode == "RGB" for im in images)
    # The 20x20 pt square at (10, 10) from the bottom-left: 40x40 px, 20 px from the left and bottom edges.
    first = images[0]
    assert first.getpixel((40, first.height - 40)) == (0, 0, 0)
    assert first.getpixel((first.width - 5, 5)) == (255, 255, 255)


def test_page_range_and_order(three_pages: bytes, tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(three_pages)
    images = render_pdf(path, pages="3,1", dpi=72)
    assert [im.size for im in images] == [THREE_PAGES[2], THREE_PAGES[0]]
    assert [im.size for im in render_pdf(str(path), pages="2-", dpi=72)] == THREE_PAGES[1:]
    with pytest.raises(UserError, match="page 4 is out of range: the PDF has 3 pages"):
        render_pdf(path, pages="4")


def test_stream_and_bytearray_sources(three_pages: bytes) -> None:
    assert len(render_pdf(io.BytesIO(three_pages), pages="1", dpi=72)) == 1
    assert len(render_pdf(bytearray(three_pages), pages="2", dpi=72)) == 1


def test_page_by_page(three_pages: bytes) -> None:
    with open_pdf(three_pages) as doc:
        assert doc.page_count == 3
        assert doc.select("2-") == [2, 3]
        assert doc.pixel_size(2, dpi=144) == (200, 600)
        assert doc.render(2, dpi=36).size == (50, 150)
    with pytest.raises(ValueError, match="closed"):
        doc.render(1)


def test_iter_pages_renders_one_page_per_step(three_pages: bytes, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with pytest.raises(UserError, match="page 9 is out of range"):
        iter_pages(three_pages, "9")                  # the selection fails at the call, before any page
    reader = iter_pages(three_pages, "3,1", dpi=72)
    assert (reader.page_count, reader.numbers) == (3, [3, 1])
    number, image = next(reader)
    assert (number, image.size) == (3, THREE_PAGES[2])
    reader.close()
    with pytest.raises(StopIteration):
        next(reader)
    assert capsys.readouterr().err == ""             # no bar unless asked for
    with iter_pages(three_pages, dpi=72, progress=True, label="doc.pdf") as shown:
        assert [number for number, _ in shown] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "doc.pdf" in err and "3/3" in err


def test_pages_render_from_several_threads(three_pages: bytes) -> None:
    """pdfium is not thread-safe; the module lock must make concurrent renders give the same pixels."""
    expected = [im.tobytes() for im in render_pdf(three_pages, dpi=72)]
    results: list[list[bytes]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append([im.tobytes() for im in render_pdf(three_pages, dpi=72)])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20 and all(r == expected for r in results)


def test_made_with_pypdfium2_itself() -> None:
    pdfium = pytest.importorskip("pypdfium2")
    doc = pdfium.PdfDocument.new()
    doc.new_page(72, 144)
    doc.new_page(144, 72)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    assert [im.size for im in render_pdf(buffer.getvalue(), dpi=72)] == [(72, 144), (144, 72)]


# ------------------------------------------------------------------------------------------ refusals
def test_password_protected_pdf() -> None:
    data = make_pdf([(100, 100)], password="secret")
    with pytest.raises(ImageError, match="^PDF data is password-protected; remove the protection first$"):
        render_pdf(data)
    with pytest.raises(ImageError, match="password is wrong"):
        render_pdf(data, password="guess")
    # The right password decrypts the content stream: the black square is there, so the file is really encrypted
    # (not merely flagged) and the refusal above is pdfium's.
    (image,) = render_pdf(data, password="secret", dpi=72)
    assert image.getpixel((20, image.height - 20)) == (0, 0, 0)


@pytest.mark.parametrize("data", [
    b"%PDF-1.4\n% nothing else",
    b"not a pdf at all",
    make_pdf([(100, 100)])[:200],      # truncated inside the objects
    make_pdf([(100, 100)])[:-30],      # truncated inside the xref table
], ids=["header-only", "not-pdf", "truncated-objects", "truncated-xref"])
def test_corrupt_pdf_is_one_image_error(data: bytes) -> None:
    with pytest.raises(ImageError, match=r"^PDF data is not a readable PDF \(corrupt, truncated or not a PDF\)$"):
        render_pdf(data)


def test_missing_empty_and_directory_sources(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        render_pdf(tmp_path / "absent.pdf")
    with pytest.raises(ImageError, match="is not a file"):
        render_pdf(tmp_path)
    with pytest.raises(ImageError, match="PDF data is empty"):
        render_pdf(b"")


def test_pixel_caps(three_pages: bytes) -> None:
    # Page 1 at 144 dpi is 400x200 = 80,000 pixels.
    with pytest.raises(ImageError, match="page 1 of PDF data would be 400x200 = 80000 pixels at 144 dpi"):
        render_pdf(three_pages, pages="1", max_pixels=79_999)
    assert len(render_pdf(three_pages, pages="1", max_pixels=80_000)) == 1


@pytest.mark.parametrize("dpi", [MIN_DPI - 1, MAX_DPI + 1, 144.0, "144", True])
def test_bad_dpi(dpi: object) -> None:
    with pytest.raises(UserError, match=f"--dpi: {dpi!r} is not allowed"):
        check_dpi(dpi, "--dpi")


def test_missing_pypdfium2_names_the_extra(monkeypatch: pytest.MonkeyPatch, three_pages: bytes) -> None:
    real_import = builtins.__import__

    def refuse(name: str, *args: object, **kwargs: object) -> object:
        if name == "pypdfium2":
            raise ImportError("No module named 'pypdfium2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(UserError, match=r"pip install 'deepseek-ocr\[pdf\]'"):
        pdf_module.iter_pages(three_pages)


# ------------------------------------------------------------------------------------------ detection
def test_detection(tmp_path: Path, three_pages: bytes) -> None:
    assert is_pdf(three_pages) and is_pdf(b"\n" * 100 + three_pages)
    assert not is_pdf(b"\x89PNG\r\n") and not is_pdf(b"\n" * 1100 + three_pages)
    named = tmp_path / "Doc.PDF"
    named.write_bytes(b"whatever")
    sniffed = tmp_path / "scan"
    sniffed.write_bytes(three_pages)
    png = tmp_path / "page.png"
    Image.new("RGB", (4, 4)).save(png)
    assert is_pdf_file(named) and is_pdf_file(sniffed)
    assert not is_pdf_file(png) and not is_pdf_file(tmp_path / "missing")
