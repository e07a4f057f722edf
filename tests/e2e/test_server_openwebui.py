"""Open WebUI 0.12's request shapes, replayed against the real server, and the answers it needs from them.

Open WebUI lists models (`data[].id`, `name`), streams chats with the text part first and a data-URL image,
repeats earlier images in later user turns, and then fires non-streamed, text-only task requests (title, tags,
follow-ups) at the same model, whose answers it parses as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import ServerProcess, data_url, png

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

KEY = "webui-key"
IMAGE = data_url(png((40, 30), color=(250, 250, 250)))


@pytest.fixture(scope="module")
def webui(tmp_path_factory, deepseek_tiny: Path, paddle_tiny: Path):
    proc = ServerProcess(tmp_path_factory.mktemp("webui"), {"deepseek-ocr": deepseek_tiny,
                                                            "paddleocr-vl": paddle_tiny}, api_key=KEY)
    with httpx.Client(base_url=f"{proc.base}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c
    assert proc.stop() == 0


def sse_payloads(response: httpx.Response) -> list:
    """The `data:` payloads of a Chat Completions stream; Open WebUI's parser wants nothing else on the wire."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    assert all(f.startswith("data: ") and "\nevent:" not in f for f in frames)
    return [f[len("data: "):] if f == "data: [DONE]" else json.loads(f[len("data: "):]) for f in frames]


def user_turn(text: str, image: str | None = IMAGE) -> dict:
    parts = [{"type": "text", "text": text}]
    if image:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": parts}


def chat_payload(messages: list, **params) -> dict:
    # What Open WebUI sends: flattened params (max_completion_tokens already renamed to max_tokens) and
    # keys of its own that the server must ignore.
    return {"model": "deepseek-ocr", "messages": messages, "stream": True, "max_tokens": 5,
            "temperature": 0, "user": {"name": "Jane", "id": "u1", "role": "user"}, "metadata": {"chat_id": "c1"},
            **params}


def test_model_list_has_ids_and_names(webui: httpx.Client) -> None:
    body = webui.get("/models", timeout=10).json()
    assert body["object"] == "list"
    assert {m["id"]: m["name"] for m in body["data"]} == {
        "deepseek-ocr": "DeepSeek-OCR", "paddleocr-vl": "PaddleOCR-VL", "deepseek-ocr-2": "DeepSeek-OCR-2",
        "glm-ocr": "GLM-OCR", "paddleocr-vl-1.5": "PaddleOCR-VL 1.5"}


def streamed_text(webui: httpx.Client, payload: dict) -> tuple[str, list]:
    response = webui.post("/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), chunks


def test_streamed_chat_with_a_data_url_image_text_part_first(webui: httpx.Client) -> None:
    text, chunks = streamed_text(webui, chat_payload([{"role": "system", "content": "Be helpful."},
                                                      user_turn("Convert the document to markdown.")]))
    assert text and all("usage" not in c for c in chunks)
    # The same question in a later turn (earlier images repeated, an assistant answer between) gives the same
    # greedy answer: only the latest user turn reaches the model.
    history = [user_turn("Convert the document to markdown."), {"role": "assistant", "content": text},
               user_turn("Convert the document to markdown.")]
    again, _ = streamed_text(webui, chat_payload(history))
    assert again == text


def test_usage_chunk_when_the_usage_capability_is_on(webui: httpx.Client) -> None:
    _, chunks = streamed_text(webui, chat_payload([user_turn("Free OCR.")],
                                                  stream_options={"include_usage": True}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_text_only_follow_up_question_is_answered(webui: httpx.Client) -> None:
    text, _ = streamed_text(webui, chat_payload([user_turn("Free OCR."), {"role": "assistant", "content": "x"},
                                                 user_turn("What does it say?", image=None)]))
    assert isinstance(text, str)


TASK = """### Task:
{task}
### Guidelines:
- Keep it short.
### Output:
{output}
### Chat History:
<chat_history>
USER: Convert the document to markdown.
ASSISTANT: # Invoice No. 4711 from ACME Corporation
| item | price |
</chat_history>"""


@pytest.mark.parametrize("task, output, key, expected", [
    ("Generate a concise, 3-5 word title with an emoji summarizing the chat history.",
     'JSON format: { "title": "your concise title here" }', "title", "Invoice No. 4711 from ACME Corporation"),
    ("Generate 1-3 broad tags categorizing the main themes of the chat history.",
     'JSON format: { "tags": ["tag1", "tag2", "tag3"] }', "tags", ["Document"]),
    ("Suggest 3-5 relevant follow-up questions or prompts that the user might naturally ask next.",
     'JSON format: { "follow_ups": ["Question 1?", "Question 2?", "Question 3?"] }', "follow_ups", []),
])
def test_task_requests_get_the_json_open_webui_parses(webui: httpx.Client, task, output, key, expected) -> None:
    payload = {"model": "deepseek-ocr", "stream": False, "max_tokens": 1000,
               "messages": [{"role": "user", "content": TASK.format(task=task, output=output)}]}
    response = webui.post("/chat/completions", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "stop"
    assert json.loads(body["choices"][0]["message"]["content"]) == {key: expected}


def test_task_request_for_the_other_model_works_too(webui: httpx.Client) -> None:
    payload = {"model": "paddleocr-vl", "stream": False, "max_tokens": 1000, "messages": [{
        "role": "user", "content": TASK.format(task="Generate a title.", output='JSON format: { "title": "t" }')}]}
    body = webui.post("/chat/completions", json=payload).json()
    assert json.loads(body["choices"][0]["message"]["content"])["title"]
