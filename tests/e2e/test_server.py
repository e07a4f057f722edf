"""The real server (a subprocess on 127.0.0.1) with both tiny checkpoints, driven by the openai SDK and raw httpx.

One server for the module: an isolated config.toml names the tiny snapshots, caps generation at a few tokens and
sets small limits (queue, body, pixels) so every refusal is cheap to provoke. Every URL the tests or the server
touch is loopback; the loopback image URLs are there to be refused.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
MAX_REQUEST_BYTES = 1 << 20
QUEUE_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`deepseek-ocr-server` (or `python -m server` when the package is not installed) on a free loopback port."""

    def __init__(self, workdir: Path, entries: dict[str, Path], **server: object) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        lines = [f'[models.entries."{mid}"]\nmodel_dir = "{path}"' for mid, path in entries.items()]
        # mode "tiny" (one 512 view, no crops) keeps the DeepSeek-OCR vision tower cheap on a shared CPU.
        lines.append('[inference]\ndevice = "cpu"\nbackend = "torch"\nmax_new_tokens = 6\nmode = "tiny"')
        settings = {"host": "127.0.0.1", "port": self.port} | server
        lines.append("[server]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()))
        self.config = workdir / "config.toml"
        self.config.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
        self.log = workdir / "server.log"
        script = shutil.which("deepseek-ocr-server", path=str(Path(sys.executable).parent))
        command = [script] if script else [sys.executable, "-m", "server"]
        # HOME and XDG dirs inside workdir: the user's own config and caches are never read or written.
        env = os.environ | {"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / "xdg-config"),
                            "XDG_CACHE_HOME": str(workdir / "xdg-cache"), "HF_HUB_OFFLINE": "1",
                            "PYTHONPATH": str(ROOT)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*command, "--config", str(self.config)], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, deepseek_tiny: Path, paddle_tiny: Path):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), {"deepseek-ocr": deepseek_tiny,
                                                             "paddleocr-vl": paddle_tiny},
                         api_key=KEY, queue_size=QUEUE_SIZE, max_request_bytes=MAX_REQUEST_BYTES,
                         max_image_pixels=1_000_000, max_resident_models=1)
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


@pytest.fixture()
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.base}/v1", max_retries=0, timeout=120)


@pytest.fixture()
def http(server: ServerProcess):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def png(size=(48, 32), color=(240, 240, 240), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes whose PNG header claims `width` x `height` pixels: a decompression bomb's signature."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_message(url: str, text: str = "Free OCR.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                                         {"type": "text", "text": text}]}]


IMAGE = data_url(png())


def chat_body(model: str = "deepseek-ocr", **fields) -> dict:
    return {"model": model, "messages": image_message(IMAGE), "max_tokens": 4} | fields


def assert_error(response: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "*":
        assert error["param"] == param
    return error


# ------------------------------------------------------------------------------------------------ SDK: happy paths
def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert sorted(m.id for m in models) == ["deepseek-ocr", "deepseek-ocr-2", "glm-ocr", "paddleocr-vl",
                                            "paddleocr-vl-1.5"]
    loaded = {m.id: m.model_extra["loaded"] for m in models}
    assert loaded["deepseek-ocr"] is True and loaded["glm-ocr"] is False  # the active model is preloaded


@pytest.mark.parametrize("model", ["deepseek-ocr", "paddleocr-vl", "deepseek-ocr"])  # switches back and forth
def test_chat_streamed_equals_non_streamed(client: openai.OpenAI, model: str) -> None:
    messages = image_message(IMAGE)
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
    choice = full.choices[0]
    assert full.model == model and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 5 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 5

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content and finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_and_stop_strings(client: openai.OpenAI) -> None:
    messages = image_message(IMAGE)
    full = client.chat.completions.create(model="deepseek-ocr", messages=messages, max_tokens=5, logprobs=True,
                                          top_logprobs=2)
    entries = full.choices[0].logprobs.content
    assert len(entries) == 5
    assert "".join(e.token for e in entries) == full.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6
    # A stop string taken from the middle of the greedy answer: the answer ends before it, finish is "stop".
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2] or text
    cut = client.chat.completions.create(model="deepseek-ocr", messages=messages, max_tokens=5, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="deepseek-ocr", messages=messages, max_tokens=5, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]


def test_multi_turn_chat_folds_to_the_latest_user_turn(client: openai.OpenAI) -> None:
    latest = image_message(IMAGE)[0]
    single = client.chat.completions.create(model="deepseek-ocr", messages=[latest], max_tokens=4)
    history = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": [{"type": "text", "text": "older turn"},
                                            {"type": "image_url", "image_url": {"url": data_url(png(color=(0, 0, 0)))}}]},
               {"role": "assistant", "content": "an older answer"}, latest]
    multi = client.chat.completions.create(model="deepseek-ocr", messages=history, max_tokens=4)
    assert multi.choices[0].message.content == single.choices[0].message.content
    assert multi.usage.prompt_tokens == single.usage.prompt_tokens


@pytest.mark.parametrize("model", ["paddleocr-vl", "deepseek-ocr"])
def test_responses_streamed_equals_non_streamed(client: openai.OpenAI, model: str) -> None:
    content = [{"type": "input_text", "text": "OCR:"}, {"type": "input_image", "image_url": IMAGE, "detail": "auto"}]
    request = dict(model=model, input=[{"role": "user", "content": content}], instructions="ignored",
                   max_output_tokens=5)
    full = client.responses.create(**request)
    assert full.status == "incomplete" and full.incomplete_details.reason == "max_output_tokens"
    assert full.usage.output_tokens == 5 and full.instructions == "ignored"
    with client.responses.stream(**request) as stream:  # the SDK helper checks the event order as it goes
        events = list(stream)
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert len({events[0].response.id, events[-1].response.id}) == 1
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full.output_text
    assert events[-1].response.output[0].content[0].text == full.output_text


def test_responses_stream_helper_accepts_a_completed_answer(client: openai.OpenAI) -> None:
    # A completed (not capped) answer on demand: an Open WebUI task prompt, answered without the model.
    task = ('### Task:\nGenerate a title.\n### Output:\nJSON format: { "title": "t" }\n'
            "<chat_history>\nUSER: hi\nASSISTANT: Scanned Invoice\n</chat_history>")
    with client.responses.stream(model="paddleocr-vl", input=task) as stream:
        final = stream.get_final_response()  # raises unless response.completed arrived in a valid sequence
    assert final.status == "completed" and json.loads(final.output_text) == {"title": "Scanned Invoice"}


def test_responses_plain_string_input(client: openai.OpenAI) -> None:
    full = client.responses.create(model="deepseek-ocr", input="What is OCR?", max_output_tokens=3)
    assert full.object == "response" and full.usage.output_tokens == 3 and isinstance(full.output_text, str)


# ------------------------------------------------------------------------------------------------ raw HTTP refusals
def test_health_needs_no_key_and_readiness_lists_models(server: ServerProcess, http: httpx.Client) -> None:
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/health/ready").json() == {"status": "ready"}  # details only with the key
    for wrong in ["Bearer nope", b"Bearer \xff\xfe"]:
        assert httpx.get(f"{server.base}/health/ready", headers={"Authorization": wrong}).json() == {
            "status": "ready"}
    ready = http.get("/health/ready").json()
    assert ready["status"] == "ready" and set(ready["loaded_models"]) <= {"deepseek-ocr", "paddleocr-vl"}


def test_api_key_missing_or_wrong(server: ServerProcess) -> None:
    url = f"{server.base}/v1/models"
    assert_error(httpx.get(url), 401)
    assert_error(httpx.get(url, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(url, headers={"Authorization": KEY}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=f"{server.base}/v1", max_retries=0).models.list()


def test_malformed_bodies(http: httpx.Client) -> None:
    url = "/v1/chat/completions"
    assert_error(http.post(url, content=b'{"model": "deepseek-ocr", "messages": [', headers={
        "Content-Type": "application/json"}), 400)
    assert_error(http.post(url, json=[chat_body()]), 400)
    assert_error(http.post(url, content=b""), 400)
    assert_error(http.post(url, json={"model": "deepseek-ocr"}), 400, "messages")
    assert_error(http.post(url, json={"messages": image_message(IMAGE)}), 400, "model")
    assert_error(http.post(url, json=chat_body(max_tokens="many")), 400, "max_tokens")
    assert_error(http.post(url, json=chat_body(stream="yes")), 400, "stream")
    assert_error(http.post(url, json=chat_body(messages=[{"role": "user", "content": 12}])), 400, "messages")
    assert_error(http.post("/v1/responses", json={"model": "deepseek-ocr", "input": 5}), 400, "input")


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"), ({"n": 3}, "n"), ({"top_logprobs": 50}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"seed": -1}, "seed")])
def test_out_of_range_parameters(http: httpx.Client, fields: dict, param: str) -> None:
    assert_error(http.post("/v1/chat/completions", json=chat_body(**fields)), 400, param)


def test_unknown_model_route_and_method(http: httpx.Client, client: openai.OpenAI) -> None:
    error = assert_error(http.post("/v1/chat/completions", json=chat_body(model="gpt-4o")), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=image_message(IMAGE))
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_error(http.delete("/v1/models"), 405)


def test_image_refusals(http: httpx.Client, server: ServerProcess) -> None:
    def post(url: str) -> httpx.Response:
        return http.post("/v1/chat/completions", json=chat_body(messages=image_message(url)))

    assert_error(post("data:image/png;base64,%%%not base64%%%"), 400, "messages")
    # As OpenAI answers them: 400 invalid_request_error (the SDK raises BadRequestError), not 422.
    assert_error(post(data_url(b"just some text, not an image")), 400, "messages")
    assert_error(post(data_url(b"text", mime="text/plain")), 400, "messages")
    assert_error(post(data_url(png((2000, 1000), mode="L"))), 400, "messages")   # 2 Mpx of zeros in ~2 KB
    assert_error(post(data_url(png_claiming(100_000, 100_000))), 400, "messages")
    for local in ["/etc/passwd", "file:///etc/passwd", "page.png", "C:\\scan.png"]:
        assert "local files" in assert_error(post(local), 400, "messages")["message"]
    for loopback in [f"{server.base}/health", f"http://localhost:{server.port}/health",
                     f"http://[::1]:{server.port}/health", "http://127.0.0.2/x.png", "http://0.0.0.0/x.png"]:
        assert "non-public" in assert_error(post(loopback), 400, "messages")["message"]
    # An image part without its image, and a placeholder without an image.
    no_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]
    assert_error(http.post("/v1/chat/completions", json=chat_body(messages=no_url)), 400, "messages")
    placeholder = [{"role": "user", "content": "<image>\n<image>\nFree OCR."}]
    assert_error(http.post("/v1/chat/completions", json=chat_body(messages=placeholder)), 400)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = chat_body(messages=image_message(data_url(os.urandom(MAX_REQUEST_BYTES))))
    error = assert_error(http.post("/v1/chat/completions", json=big), 413)
    assert error["type"] == "invalid_request_error"


def test_client_disconnect_stops_generation(server: ServerProcess, http: httpx.Client) -> None:
    body = chat_body(max_tokens=4000, stream=True)
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as streaming:
        with streaming.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [line for line, _ in zip(lines, range(6))]
            assert got[0].startswith("data: ")
            # While it generates, the cheap routes still answer.
            t0 = time.monotonic()
            assert http.get("/health").status_code == 200 and http.get("/v1/models").status_code == 200
            assert time.monotonic() - t0 < 5
            assert http.get("/health/ready").json()["busy"] is True
        # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 15
    while http.get("/health/ready").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.get("/health/ready").json()["busy"] is False  # 4000 tokens would take minutes: it was stopped
    after = http.post("/v1/chat/completions", json=chat_body())
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"


def test_burst_beyond_the_queue(server: ServerProcess, http: httpx.Client) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=chat_body(max_tokens=3))
                                          for _ in range(QUEUE_SIZE + 6)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503} and codes.count(200) >= 1 and (codes.count(429) + codes.count(503)) >= 1
    for r in responses:
        if r.status_code == 200:
            body = r.json()
            assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
        else:
            assert_error(r, r.status_code)
            assert int(r.headers["retry-after"]) >= 1
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200  # still serving
