"""Documents in the server (server/documents.py, the document paths of server/routes.py), without a model.

The routes run in Sanic's test client over a scripted scheduler whose answer to a page names the page's pixel
size (with a grounding reference covering its top half), so the joining, the markers, the summed usage, the
blocks JSON and every PDF refusal are checked exactly, on PDFs written by hand (`tests.unit.test_pdf.make_pdf`).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from common.errors import ImageError
from common.pipeline import Request, Result, TextDelta
from common.results import blocks_page, join_markdown, join_pages, page_heading
from server.documents import PageFeeder, document_part, is_pdf_part, open_checked
from server.errors import BusyError, RequestError
from server.schemas import parse_chat, parse_responses
from tests.unit.test_pdf import make_pdf

PAGES = [(72, 72), (72, 100), (100, 72)]                 # points; 144 dpi doubles them
SIZES = [(144, 144), (144, 200), (200, 144)]
USER = [{"role": "user", "content": "hello"}]


def answer(size: tuple[int, int]) -> str:
    width, height = size
    return f"<|ref|>title<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>\nw{width} h{height}"


class ScriptedJob:
    """Answers one page in three pieces: the grounding markup, a newline, then the page's size."""

    def __init__(self, request: Request) -> None:
        text = answer(request.images[0].size) if request.images else "no\nimage"
        cut = text.index("\n")
        self.events: list = [TextDelta(text[:cut]), TextDelta(text[cut:cut + 1]), TextDelta(text[cut + 1:]),
                             Result(text=text, token_ids=[], prompt_tokens=10, completion_tokens=3,
                                    finish_reason="stop", model="deepseek-ocr", backend="scripted", device="cpu",
                                    dtype="float32", timings_ms={})]
        self.done = False
        self.cancelled = False

    def __aiter__(self) -> ScriptedJob:
        return self

    async def __anext__(self):
        if not self.events:
            self.done = True
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedScheduler:
    """The `Scheduler` surface; refuses submissions (429) while `room` is 0 (None: always room)."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.submitted: list[Request] = []

    def start(self, preload=()) -> None:
        pass

    def stop(self) -> None:
        pass

    def status(self) -> dict:
        return {"loaded_models": ["deepseek-ocr"], "loading": None}

    def submit(self, request: Request) -> ScriptedJob:
        if self.room == 0:
            raise BusyError("server is busy")
        if self.room is not None:
            self.room -= 1
        self.submitted.append(request)
        return ScriptedJob(request)


def pdf_url(data: bytes, mime: str = "application/pdf") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_file(url: str, text: str = "Free OCR.", **fields) -> dict:
    content = [{"type": "file", "file": {"file_data": url, "filename": "doc.pdf"}}, {"type": "text", "text": text}]
    return {"model": "deepseek-ocr", "messages": [{"role": "user", "content": content}]} | fields


def responses_file(url: str, **fields) -> dict:
    content = [{"type": "input_text", "text": "Free OCR."},
               {"type": "input_file", "file_data": url, "filename": "doc.pdf"}]
    return {"model": "deepseek-ocr", "input": [{"role": "user", "content": content}]} | fields


@pytest.fixture()
def make_app(tmp_path: Path):
    from common.config import load_settings
    from server.app import create_app

    def make(scheduler: ScriptedScheduler | None = None, **server: object):
        lines = ['host = "127.0.0.1"'] + [f"{k} = {v}" for k, v in server.items()]
        config = tmp_path / "config.toml"
        config.write_text("[server]\n" + "\n".join(lines) + "\n", encoding="utf-8")
        scheduler = scheduler if scheduler is not None else ScriptedScheduler()
        app = create_app(load_settings(config), pipeline=SimpleNamespace(), scheduler=scheduler, preload=False)
        return app, scheduler
    return make


def joined(sizes: list[tuple[int, int]] = SIZES) -> str:
    return join_pages((n, answer(size)) for n, size in enumerate(sizes, 1))


def error_of(response) -> dict:
    assert response.status == 400, response.text
    error = response.json["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    return error


# ------------------------------------------------------------------------------------------ schemas
def test_the_blocks_format_is_a_named_json_schema_in_both_apis() -> None:
    def chat(**fields):
        return parse_chat({"model": "deepseek-ocr", "messages": USER, **fields})

    assert chat(response_format={"type": "json_schema", "json_schema": {"name": "ocr_blocks"}}).blocks
    assert not chat(response_format={"type": "json_schema", "json_schema": {"name": "other", "schema": {}}}).blocks
    assert not chat(response_format={"type": "json_object"}).blocks and not chat().blocks
    with pytest.raises(RequestError) as info:
        chat(response_format={"type": "json_schema", "json_schema": {"name": "ocr_blocks"}}, logprobs=True)
    assert info.value.param == "logprobs"

    def responses(**fields):
        return parse_responses({"model": "deepseek-ocr", "input": "x", **fields})

    assert responses(text={"format": {"type": "json_schema", "name": "ocr_blocks", "schema": {}}}).blocks
    assert not responses(text={"format": {"type": "text"}}).blocks and not responses().blocks
    with pytest.raises(RequestError):
        responses(text={"format": {"type": "yaml"}})


def test_pdf_parts_are_told_by_their_data_url_type_or_file_name() -> None:
    def part(url: str, name: str | None = None, kind: str = "file") -> dict:
        source = {"file_data": url} | ({"filename": name} if name else {})
        return {"type": kind, "file": source} if kind == "file" else {"type": kind, **source}

    assert is_pdf_part(part("data:application/pdf;base64,AAAA"))
    assert is_pdf_part(part("DATA:Application/PDF;base64,AAAA", kind="input_file"))
    assert is_pdf_part(part("data:application/octet-stream;base64,AAAA", "scan.PDF"))
    assert not is_pdf_part(part("data:image/png;base64,AAAA", "scan.pdf"))  # a typed image stays an image
    assert not is_pdf_part(part("data:application/octet-stream;base64,AAAA", "scan.png"))
    assert not is_pdf_part({"type": "image_url", "image_url": {"url": "data:application/pdf;base64,AAAA"}})
    pdf, image = part("data:application/pdf;base64,AAAA"), part("data:image/png;base64,AAAA")
    assert document_part([pdf]) is pdf and document_part([image, image]) is None
    with pytest.raises(ImageError, match="no other images"):
        document_part([pdf, image])


# ------------------------------------------------------------------------------------------ joining
def test_joined_pages_follow_their_markers_and_streamed_headings_concatenate_to_them() -> None:
    text = join_pages([(1, "a"), (2, ""), (3, "c\n")])
    assert text == "<!-- page 1 -->\n\na\n\n<!-- page 2 -->\n\n\n\n<!-- page 3 -->\n\nc\n"
    streamed = page_heading(1, first=True) + "a" + page_heading(2, first=False) + page_heading(3, first=False) + "c\n"
    assert streamed == text
    # result.md of --output-dir uses the same markers
    assert join_markdown([{"page": 1, "markdown": "a"}, {"page": 2, "markdown": "b"}]) == join_pages(
        [(1, "a"), (2, "b")]) + "\n"


def test_blocks_page_gives_pixel_boxes_of_the_page_without_figure_files() -> None:
    page = blocks_page(2, answer((200, 100)) + "<|ref|>image<|/ref|><|det|>[[0, 500, 999, 999]]<|/det|>",
                       (200, 100), finish_reason="length")
    assert page["page"] == 2 and (page["width"], page["height"]) == (200, 100) and page["finish_reason"] == "length"
    assert page["blocks"][0] == {"label": "title", "text": "w200 h100", "box": [0, 0, 200, 49]}
    assert page["blocks"][1]["box"] == [0, 50, 200, 100] and "figures" not in page["blocks"][1]
    assert blocks_page(1, "plain words", (30, 20))["blocks"] == [{"label": "text", "text": "plain words",
                                                                  "box": [0, 0, 30, 20]}]


# ------------------------------------------------------------------------------------------ the feeder
def test_pages_wait_for_queue_room_and_the_first_page_needs_it_at_once() -> None:
    requests = [Request(prompt=str(i)) for i in range(3)]
    with pytest.raises(BusyError):
        PageFeeder(ScriptedScheduler(room=0), requests)
    scheduler = ScriptedScheduler(room=1)
    feeder = PageFeeder(scheduler, requests)
    assert len(feeder.jobs) == 1 and len(feeder) == 3
    scheduler.room = 5
    assert feeder.job(1) is feeder.jobs[1] and len(feeder.jobs) == 3  # topped up in order
    assert [r.prompt for r in scheduler.submitted] == ["0", "1", "2"]
    feeder.cancel()
    assert all(job.cancelled for job in feeder.jobs)
    late = PageFeeder(ScriptedScheduler(room=1), requests)
    with pytest.raises(BusyError):
        late.job(1)  # no room when its turn comes: the queue's own 429


# ------------------------------------------------------------------------------------------ the routes
def test_a_pdf_is_answered_page_by_page_joined_with_markers(make_app) -> None:
    app, scheduler = make_app()
    url = pdf_url(make_pdf(PAGES))
    _, response = app.test_client.post("/v1/chat/completions", json=chat_file(url))
    assert response.status == 200, response.text
    body = response.json
    assert body["choices"][0]["message"]["content"] == joined()
    assert body["usage"] == {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}
    assert [r.prompt for r in scheduler.submitted] == ["<image>\nFree OCR."] * 3
    assert [r.images[0].size for r in scheduler.submitted] == SIZES

    _, stream = app.test_client.post("/v1/chat/completions", json=chat_file(url, stream=True))
    frames = [f[len("data: "):] for f in stream.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]"
    deltas = [json.loads(f)["choices"][0]["delta"].get("content") or "" for f in frames[:-1]]
    assert "".join(deltas) == joined() and deltas[1] == page_heading(1, first=True)

    _, response = app.test_client.post("/v1/responses", json=responses_file(url))
    assert response.status == 200, response.text
    assert response.json["output"][0]["content"][0]["text"] == joined()
    assert response.json["usage"]["input_tokens"] == 30 and response.json["status"] == "completed"
    _, stream = app.test_client.post("/v1/responses", json=responses_file(url, stream=True))
    events = [json.loads(f.split("data: ", 1)[1]) for f in stream.text.split("\n\n") if f.strip()]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == joined()
    assert events[-1]["type"] == "response.completed"


def test_blocks_come_as_one_json_document_for_a_pdf_or_an_image(make_app) -> None:
    app, _ = make_app()
    blocks = {"type": "json_schema", "json_schema": {"name": "ocr_blocks"}}
    url = pdf_url(make_pdf(PAGES))
    _, response = app.test_client.post("/v1/chat/completions", json=chat_file(url, response_format=blocks))
    document = json.loads(response.json["choices"][0]["message"]["content"])
    assert [p["page"] for p in document["pages"]] == [1, 2, 3]
    for page, (width, height) in zip(document["pages"], SIZES):
        assert page["blocks"] == [{"label": "title", "text": f"w{width} h{height}",
                                   "box": [0, 0, width, height * 499 // 999]}]
    # streamed: the same document as one delta, after the last page
    _, stream = app.test_client.post("/v1/chat/completions",
                                     json=chat_file(url, response_format=blocks, stream=True))
    frames = [json.loads(f[len("data: "):]) for f in stream.text.split("\n\n") if f.strip() and "[DONE]" not in f]
    contents = [f["choices"][0]["delta"].get("content") for f in frames if f["choices"][0]["delta"].get("content")]
    assert len(contents) == 1 and json.loads(contents[0]) == document

    fmt = {"format": {"type": "json_schema", "name": "ocr_blocks", "schema": {}}}
    _, response = app.test_client.post("/v1/responses", json=responses_file(url, text=fmt))
    assert json.loads(response.json["output"][0]["content"][0]["text"]) == document

    image = "data:image/png;base64," + base64.b64encode(_png((40, 30))).decode()
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]
    _, response = app.test_client.post("/v1/chat/completions", json={
        "model": "deepseek-ocr", "messages": message, "response_format": blocks})
    pages = json.loads(response.json["choices"][0]["message"]["content"])["pages"]
    assert len(pages) == 1 and pages[0]["blocks"][0]["box"] == [0, 0, 40, 14]

    _, response = app.test_client.post("/v1/chat/completions", json={
        "model": "deepseek-ocr", "messages": USER, "response_format": blocks})
    assert error_of(response)["param"] == "response_format"


def _png(size: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (250, 250, 250)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_pdfs_and_pdfs_over_the_caps_are_400s_naming_why(make_app, monkeypatch) -> None:
    from common.pdf import PdfFile

    rendered: list[int] = []
    original = PdfFile.render
    monkeypatch.setattr(PdfFile, "render", lambda self, n, *a: rendered.append(n) or original(self, n, *a))
    app, scheduler = make_app(max_images_per_request=3, max_image_pixels=30_000, max_request_pixels=60_000)

    def refused(data: bytes, mime: str = "application/pdf") -> str:
        _, response = app.test_client.post("/v1/chat/completions", json=chat_file(pdf_url(data, mime)))
        return error_of(response)["message"]

    assert "--max-images-per-request" in refused(make_pdf([(72, 72)] * 4))
    assert "--max-image-pixels" in refused(make_pdf([(72, 72), (200, 200)]))
    assert "--max-request-pixels" in refused(make_pdf([(72, 72)] * 3))       # 3 x 20736 over the request's 60000
    assert rendered == []                                               # every refusal came before rendering
    assert "password-protected" in refused(make_pdf([(72, 72)], password="secret"))
    assert "not a readable PDF" in refused(make_pdf(PAGES)[:200])
    assert "not a readable PDF" in refused(b"hello, not a pdf")
    assert "as an image" in refused(make_pdf(PAGES), mime="image/png")  # typed as an image: read as one
    assert "not a readable PDF" in refused(_png((4, 4)), mime="")       # no type, named .pdf: a PDF
    assert scheduler.submitted == []

    app, _ = make_app(image_max_bytes=300)
    _, response = app.test_client.post("/v1/chat/completions", json=chat_file(pdf_url(make_pdf(PAGES))))
    assert "--image-max-bytes" in error_of(response)["message"]


def test_a_pdf_in_an_image_part_points_to_file_parts(make_app) -> None:
    app, _ = make_app()
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": pdf_url(make_pdf(PAGES))}}]}]
    _, response = app.test_client.post("/v1/chat/completions", json={"model": "deepseek-ocr", "messages": message})
    assert "'file' part" in error_of(response)["message"]


def test_open_checked_counts_before_rendering_and_reports_empty_pdfs() -> None:
    pdf, sizes = open_checked(make_pdf(PAGES), max_pages=3, max_pixels=10**6)
    pdf.close()
    assert sizes == SIZES
    with pytest.raises(ImageError, match="has no pages|not a readable PDF"):
        open_checked(make_pdf([]), max_pages=3, max_pixels=10**6)


def test_an_abandoned_document_answer_cancels_its_unfinished_pages() -> None:
    import asyncio

    from server.routes import TextPiece, _joined

    async def go() -> None:
        scheduler = ScriptedScheduler()
        feeder = PageFeeder(scheduler, [Request(prompt="p", images=[Image.new("RGB", s)]) for s in SIZES])
        pieces = _joined(feeder, ())
        first = await pieces.__anext__()
        assert first == TextPiece(page_heading(1, first=True))
        await pieces.aclose()  # the client went away during page 1
        assert all(job.cancelled for job in feeder.jobs) and len(feeder.jobs) == 3
    asyncio.run(go())
