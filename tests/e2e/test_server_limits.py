"""The server's connection and admission limits over real sockets on 127.0.0.1, with a scripted scheduler.

The app is the real one (`create_app`, served with `GuardedProtocol` as `main` serves it) on its own event loop in
a thread; only the model side is scripted, so requests can be held open on demand. Every socket goes to loopback.
Time bounds are generous (seconds where the limits are fractions of one); the orderings are what is checked.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import httpx
import pytest
from PIL import Image

from common.config import load_settings
from common.pipeline import Result, TextDelta
from server.admission import GuardedProtocol
from server.app import create_app

KEY = "limits-key"
REQUEST_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 3


class HeldJob:
    """A job that yields one delta, then waits for `release` (or a cancel) before its Result."""

    def __init__(self, scheduler: ScriptedScheduler) -> None:
        self.scheduler = scheduler
        self.done = False
        self.cancelled = threading.Event()
        self._sent = 0

    def __aiter__(self) -> HeldJob:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        self._sent += 1
        if self._sent == 1:
            self.scheduler.running.set()
            return TextDelta("held ")
        while not (self.scheduler.release.is_set() or self.cancelled.is_set()):
            await asyncio.sleep(0.02)
        self.done = True
        return Result(text="", token_ids=[], prompt_tokens=1, completion_tokens=1, finish_reason="stop",
                      model="deepseek-ocr", backend="scripted", device="cpu", dtype="float32", timings_ms={})

    def cancel(self) -> None:
        self.cancelled.set()
        self.scheduler.cancelled.set()


class ScriptedScheduler:
    """The `Scheduler` calls routes use, with jobs held until the test releases them."""

    def __init__(self) -> None:
        self.running, self.release, self.cancelled = threading.Event(), threading.Event(), threading.Event()
        self.release.set()
        self.submitted: list[Any] = []

    def start(self, preload: Iterable[str] = ()) -> None: ...

    def stop(self) -> None:
        self.release.set()

    def submit(self, request: Any) -> HeldJob:
        self.submitted.append(request)
        return HeldJob(self)

    def status(self) -> dict[str, Any]:
        return {"worker_alive": True, "loading": None, "busy": False, "queued": 0, "loaded_models": []}


class LiveServer:
    def __init__(self, tmp_path: Path) -> None:
        config = tmp_path / "config.toml"
        config.write_text(f'[server]\napi_key = "{KEY}"\nrequest_timeout_s = {REQUEST_TIMEOUT_S}\n'
                          f"keep_alive_timeout_s = 1.0\nmax_connections = {MAX_CONNECTIONS}\n"
                          "max_inflight_requests = 1\nmax_request_bytes = 65536\n", encoding="utf-8")
        self.scheduler = ScriptedScheduler()
        self.app = create_app(load_settings(config), pipeline=object(), scheduler=self.scheduler, preload=False)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the server did not start"
        self.base = f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = self.loop.run_until_complete(self.app.create_server(
            host="127.0.0.1", port=self.port, protocol=GuardedProtocol, return_asyncio_server=True))
        self.loop.run_until_complete(self.server.startup())
        self.loop.run_until_complete(self.server.before_start())
        self.loop.run_until_complete(self.server.after_start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.server.before_stop()
            self.server.close()
            await self.server.after_stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("limits"))
    yield server
    server.stop()


@pytest.fixture()
def scheduler(live: LiveServer) -> ScriptedScheduler:
    live.scheduler.running.clear()
    live.scheduler.cancelled.clear()
    live.scheduler.release.set()
    return live.scheduler


def read_all(sock: socket.socket, within_s: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (or `within_s` passes)."""
    sock.settimeout(0.5)
    deadline, data = time.monotonic() + within_s, b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return data


def trickle(sock: socket.socket, data: bytes, every_s: float, for_s: float) -> bytes:
    """Send `data` one byte at a time, `every_s` apart (far below the deadline), until the server answers."""
    sock.settimeout(every_s)
    deadline = time.monotonic() + for_s
    for byte in data:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(65536)
            if answer or answer == b"":
                return answer + read_all(sock, 2) if answer else answer
        except socket.timeout:
            continue
        except ConnectionError:
            return b""
    return b"(still open)"


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


# ------------------------------------------------------------------------------------------------ slow clients
def test_a_header_sent_a_byte_at_a_time_is_cut_at_the_deadline(live: LiveServer) -> None:
    with live.connect() as sock:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
        started = time.monotonic()
        answer = trickle(sock, head, every_s=0.25, for_s=20)
    # Sanic alone restarts its timeout at every byte: this connection would stay open for the whole trickle.
    assert status_of(answer) == 408, answer[:200]
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_deadline(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 400\r\n\r\n")
        answer = trickle(sock, b"{" + b" " * 398 + b"}", every_s=0.25, for_s=20)
    assert status_of(answer) == 408, answer[:200]


def test_an_idle_kept_alive_connection_is_closed(live: LiveServer) -> None:
    with live.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_all(sock, within_s=15)  # returns when the server closes the idle connection
    assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1


def test_connections_beyond_the_cap_are_refused_until_one_closes(live: LiveServer) -> None:
    held = [live.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # each one is accepted: it answers a request (and then sits idle, kept alive)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(10)
            assert status_of(sock.recv(65536)) == 200
        with live.connect() as extra:
            answer = read_all(extra, within_s=10)
        assert status_of(answer) == 503 and b"too_many_connections" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{live.base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail("the server did not accept connections again after the held ones closed")


# ------------------------------------------------------------------------------------------------ protocol errors
def raw(live: LiveServer, request: bytes) -> bytes:
    with live.connect() as sock:
        sock.sendall(request)
        return read_all(sock, within_s=10)


def test_protocol_errors_keep_their_status_without_a_key(live: LiveServer) -> None:
    big = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert status_of(raw(live, big)) == 431
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"zz\r\nnot a chunk\r\n")
    assert status_of(raw(live, chunked)) == 400
    too_big = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999999\r\n\r\n"
    assert status_of(raw(live, too_big)) == 413


def test_a_non_utf8_authorization_header_is_a_401(live: LiveServer) -> None:
    answer = raw(live, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                       b"Connection: close\r\n\r\n")
    assert status_of(answer) == 401 and b"invalid_api_key" in answer


def test_a_lone_surrogate_in_the_message_text_is_a_400(live: LiveServer) -> None:
    body = b'{"model": "deepseek-ocr", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
    r = httpx.post(f"{live.base}/v1/chat/completions", content=body, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ off the loop
def png_url(size: tuple[int, int] = (8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(content: Any, **fields: Any) -> dict:
    return {"model": "deepseek-ocr", "messages": [{"role": "user", "content": content}]} | fields


def post_in_thread(live: LiveServer, body: dict) -> tuple[threading.Thread, list]:
    out: list = []

    def go() -> None:
        try:
            out.append(httpx.post(f"{live.base}/v1/chat/completions", json=body, timeout=30,
                                  headers={"Authorization": f"Bearer {KEY}"}))
        except httpx.HTTPError as exc:
            out.append(exc)
    thread = threading.Thread(target=go)
    thread.start()
    return thread, out


def health_answers_while(live: LiveServer, blocked: threading.Event, unblock: threading.Event) -> None:
    """`/health` answers while the request's CPU work is stuck; only then is the work let go."""
    assert blocked.wait(15), "the request never reached the blocking step"
    try:
        assert httpx.get(f"{live.base}/health", timeout=10).status_code == 200
    finally:
        unblock.set()


def test_health_answers_while_a_task_prompt_is_being_answered(live: LiveServer, scheduler, monkeypatch) -> None:
    from server import tasks
    blocked, unblock = threading.Event(), threading.Event()
    real = tasks.answer_task

    def slow_answer(prompt: str) -> str:  # stands in for a prompt that takes a long time to parse
        blocked.set()
        unblock.wait(20)
        return real(prompt)
    monkeypatch.setattr(tasks, "answer_task", slow_answer)
    task = '### Task:\nJSON format: { "title": "t" }\n<chat_history>\nASSISTANT: Invoice\n</chat_history>'
    thread, out = post_in_thread(live, chat(task))
    health_answers_while(live, blocked, unblock)
    thread.join(30)
    assert out[0].status_code == 200 and out[0].json()["choices"][0]["message"]["content"] == '{"title": "Invoice"}'


def test_health_answers_while_an_image_is_decoded(live: LiveServer, scheduler, monkeypatch) -> None:
    import server.images as images
    blocked, unblock = threading.Event(), threading.Event()
    real = images.decode_image

    def slow_decode(data: bytes, max_pixels: int):
        blocked.set()
        unblock.wait(20)
        return real(data, max_pixels)
    monkeypatch.setattr(images, "decode_image", slow_decode)
    thread, out = post_in_thread(live, chat([{"type": "image_url", "image_url": {"url": png_url()}}]))
    health_answers_while(live, blocked, unblock)
    thread.join(30)
    assert out[0].status_code == 200


# ------------------------------------------------------------------------------------------------ admission
def ready_details(live: LiveServer) -> dict:
    return httpx.get(f"{live.base}/health/ready", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_a_full_server_refuses_before_decoding_and_frees_everything(live: LiveServer, scheduler,
                                                                     monkeypatch) -> None:
    import server.images as images
    probed: list[int] = []
    real = images.image_size
    monkeypatch.setattr(images, "image_size", lambda data, limit: probed.append(len(data)) or real(data, limit))
    scheduler.release.clear()
    first, out = post_in_thread(live, chat("hold the only slot"))
    try:
        assert scheduler.running.wait(15)
        assert ready_details(live)["in_flight"] == 1
        many = [{"type": "image_url", "image_url": {"url": png_url((64, 64))}} for _ in range(4)]
        second = httpx.post(f"{live.base}/v1/chat/completions", json=chat(many), timeout=10,
                            headers={"Authorization": f"Bearer {KEY}"})
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
        assert probed == []  # refused before a single image was even looked at
    finally:
        scheduler.release.set()
        first.join(30)
    assert out[0].status_code == 200
    details = ready_details(live)
    assert (details["in_flight"], details["in_flight_pixels"]) == (0, 0)


def test_a_client_that_disconnects_is_not_an_internal_error(live: LiveServer, scheduler, caplog) -> None:
    scheduler.release.clear()
    body = b'{"model": "deepseek-ocr", "messages": [{"role": "user", "content": "hold"}]}'
    with caplog.at_level(logging.INFO):
        with live.connect() as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert scheduler.running.wait(15)
        assert scheduler.cancelled.wait(15), "the abandoned job was not cancelled"
        deadline = time.monotonic() + 15
        while ready_details(live)["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
    assert ready_details(live)["in_flight"] == 0
    # the server's own loggers only: another test's leftover client task may be collected (and logged by asyncio)
    # while this one runs
    ours = [r for r in caplog.records if r.name.startswith(("deepseek_ocr", "sanic"))]
    assert not [r for r in ours if r.levelno >= logging.ERROR], [r.getMessage() for r in ours]
