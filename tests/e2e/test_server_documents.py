"""Documents through the real server (a subprocess on 127.0.0.1, the tiny DeepSeek-OCR, torch on the CPU), driven
by the official openai SDK: a 3-page PDF as a chat `file` part and as a Responses `input_file` part is answered
with exactly the answers its pages get when each is sent as an image to the same server, joined after page
markers; the `ocr_blocks` response format gives one JSON document with a page per page; unreadable PDFs and PDFs
over the page cap are 400s. Generation is capped at 6 tokens in "tiny" mode to keep it cheap.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import openai
import pytest

from common.pdf import iter_pages
from common.results import join_pages
from tests.e2e.test_server import KEY, ServerProcess, data_url
from tests.unit.test_pdf import make_pdf

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

MAX_PAGES = 4
PAGES = [(72, 72), (72, 110), (110, 72)]   # points: 144x144, 144x220, 220x144 pixels at the server's 144 dpi
PROMPT = "Free OCR."
TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, deepseek_tiny: Path):
    proc = ServerProcess(tmp_path_factory.mktemp("server-documents"), {"deepseek-ocr": deepseek_tiny},
                         api_key=KEY, max_images_per_request=MAX_PAGES, max_image_pixels=1_000_000)
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.base}/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return make_pdf(PAGES)


@pytest.fixture(scope="module")
def per_page(client: openai.OpenAI, pdf: bytes) -> list:
    """Each page rendered here (same renderer, same dpi) and sent alone as a PNG image: the reference."""
    answers = []
    for _, image in iter_pages(pdf):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        answers.append(client.chat.completions.create(model="deepseek-ocr", max_tokens=TOKENS, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(buffer.getvalue())}},
                                         {"type": "text", "text": PROMPT}]}]))
    return answers


def pdf_url(data: bytes) -> str:
    return f"data:application/pdf;base64,{base64.b64encode(data).decode()}"


def file_turn(data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "file", "file": {"file_data": pdf_url(data), "filename": "x.pdf"}},
                                         {"type": "text", "text": PROMPT}]}]


def input_file_turn(data: bytes) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "input_file", "file_data": pdf_url(data), "filename": "x.pdf"},
        {"type": "input_text", "text": PROMPT}]}]


def expected(per_page: list) -> str:
    return join_pages((n, r.choices[0].message.content) for n, r in enumerate(per_page, 1))


def test_a_pdf_file_part_gives_each_page_its_own_answer_joined_with_markers(client, pdf, per_page) -> None:
    answer = client.chat.completions.create(model="deepseek-ocr", max_tokens=TOKENS, messages=file_turn(pdf))
    text = answer.choices[0].message.content
    assert text == expected(per_page) and text.startswith("<!-- page 1 -->\n\n")
    assert answer.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in per_page)
    assert answer.usage.completion_tokens == sum(r.usage.completion_tokens for r in per_page)
    finishes = {r.choices[0].finish_reason for r in per_page}
    assert answer.choices[0].finish_reason == ("length" if "length" in finishes else "stop")

    chunks = list(client.chat.completions.create(model="deepseek-ocr", max_tokens=TOKENS, messages=file_turn(pdf),
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected(per_page)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_a_pdf_input_file_part_on_the_responses_api(client, pdf, per_page) -> None:
    response = client.responses.create(model="deepseek-ocr", max_output_tokens=TOKENS, input=input_file_turn(pdf))
    assert response.output_text == expected(per_page)
    assert response.usage.input_tokens == sum(r.usage.prompt_tokens for r in per_page)
    events = list(client.responses.create(model="deepseek-ocr", max_output_tokens=TOKENS,
                                          input=input_file_turn(pdf), stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected(per_page)
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_the_blocks_format_returns_one_json_document_with_a_page_per_page(client, pdf, per_page) -> None:
    blocks = {"type": "json_schema", "json_schema": {"name": "ocr_blocks"}}
    answer = client.chat.completions.create(model="deepseek-ocr", max_tokens=TOKENS, messages=file_turn(pdf),
                                            response_format=blocks)
    document = json.loads(answer.choices[0].message.content)
    assert [p["page"] for p in document["pages"]] == [1, 2, 3]
    assert [(p["width"], p["height"]) for p in document["pages"]] == [(144, 144), (144, 220), (220, 144)]
    for page in document["pages"]:
        for block in page["blocks"]:
            assert set(block) >= {"label", "text", "box"}
            assert block["box"] is None or (len(block["box"]) == 4 and block["box"][2] <= page["width"])
    response = client.responses.create(model="deepseek-ocr", max_output_tokens=TOKENS, input=input_file_turn(pdf),
                                       text={"format": {"type": "json_schema", "name": "ocr_blocks",
                                                        "schema": {"type": "object"}}})
    assert json.loads(response.output_text) == document


def test_corrupt_and_oversized_pdfs_are_bad_requests(client, pdf) -> None:
    for data, says in ((pdf[:150], "not a readable PDF"), (b"%PDF-1.4 garbage", "not a readable PDF"),
                       (make_pdf([(72, 72)] * (MAX_PAGES + 1)), "--max-images-per-request"),
                       (make_pdf([(72, 72)], password="secret"), "password-protected")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="deepseek-ocr", max_tokens=TOKENS, messages=file_turn(data))
        assert info.value.status_code == 400 and says in info.value.message
        assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="deepseek-ocr", max_output_tokens=TOKENS, input=input_file_turn(pdf[:150]))
