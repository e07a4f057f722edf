"""The server's limits as functions: admission budgets, per-request image and URL caps, JSON checks, API-key
sources, exposure rules, linear task parsing, image formats and the status of protocol errors. No sockets."""
from __future__ import annotations

import asyncio
import io
import logging
import time

import httpx
import pytest
from PIL import Image
from sanic.exceptions import PayloadTooLarge, RequestCancelled, RequestTimeout

from common.config import ServerSettings
from common.errors import ImageError, UserError
from common.images import ALLOWED_FORMATS, open_image
from server import tasks
from server.admission import AdmissionGate
from server.app import check_exposure, is_loopback_host, parse_command_line, resolve_api_key
from server.errors import BusyError, RequestError, openai_error
from server.images import FetchLimits, ImageLoader, decode_image, image_size
from server.routes import parse_json_body


def picture(fmt: str, size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ admission
def test_the_gate_refuses_requests_beyond_its_budget_and_takes_them_back() -> None:
    gate = AdmissionGate(max_requests=2, max_pixels=100, max_request_pixels=60)
    first, second = gate.admit(), gate.admit()
    with pytest.raises(BusyError) as info:
        gate.admit()
    assert info.value.status == 429
    first.release()
    first.release()  # idempotent: a second release must not free someone else's slot
    assert gate.in_flight == 1
    with gate.admit() as third:
        third.reserve_pixels(50)
        with pytest.raises(ImageError) as too_big:  # over the request's own total: it can never fit -> 400
            third.reserve_pixels(11)
        assert too_big.value.status == 400
        second.reserve_pixels(50)
        with pytest.raises(BusyError):                # over what all requests may hold: retry later -> 429
            second.reserve_pixels(1)
    assert gate.pixels == 50 and gate.in_flight == 1   # leaving the block returned the ticket and its pixels
    second.release()
    assert gate.status() == {"in_flight": 0, "in_flight_pixels": 0}


def test_a_request_budget_larger_than_the_server_budget_is_clamped() -> None:
    gate = AdmissionGate(max_requests=1, max_pixels=10, max_request_pixels=1000)
    with pytest.raises(ImageError):
        gate.admit().reserve_pixels(11)


class Refuse:
    """A reservation that refuses every image, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def reserve_pixels(self, pixels: int) -> None:
        self.calls += 1
        raise BusyError("full")


def test_pixels_are_reserved_from_the_header_before_any_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []
    monkeypatch.setattr("server.images.decode_image", lambda data, limit: decoded.append(data))
    loader = ImageLoader(FetchLimits(), max_pixels=10_000)
    url = "data:image/png;base64," + __import__("base64").b64encode(picture("PNG")).decode()
    refuse = Refuse()
    with pytest.raises(BusyError):
        asyncio.run(loader.load_all([url, url], refuse))
    assert refuse.calls == 1 and decoded == []
    loader.shutdown()


def counting_transport(body: bytes, delay_s: float = 0.0):
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if delay_s:
            await asyncio.sleep(delay_s)
        return httpx.Response(200, headers={"content-type": "image/png"}, content=body)
    return httpx.MockTransport(handler), calls


async def public(host: str, port: int) -> list[str]:
    return ["93.184.215.14"]  # a documentation-free public address; the mock transport never connects


def test_image_and_url_counts_are_refused_before_anything_is_fetched() -> None:
    transport, calls = counting_transport(picture("PNG"))
    loader = ImageLoader(FetchLimits(max_urls=3), max_pixels=10_000, resolver=public, transport=transport,
                         max_images=5)
    with pytest.raises(ImageError, match="at most 3 image URLs") as info:
        asyncio.run(loader.load_all([f"http://img.example/{i}.png" for i in range(4)]))
    assert info.value.status == 400 and calls == []
    with pytest.raises(ImageError, match="at most 5 images"):
        asyncio.run(loader.load_all(["data:image/png;base64,AAAA"] * 6))
    assert len(asyncio.run(loader.load_all([f"http://img.example/{i}.png" for i in range(3)]))) == 3
    assert len(calls) == 3
    loader.shutdown()


def test_all_fetches_of_a_request_share_one_byte_budget() -> None:
    body = picture("PNG", (40, 40))
    transport, calls = counting_transport(body)
    limits = FetchLimits(request_bytes=len(body) * 2 + len(body) // 2)
    loader = ImageLoader(limits, max_pixels=10_000, resolver=public, transport=transport)
    with pytest.raises(ImageError, match="larger than"):
        asyncio.run(loader.load_all([f"http://img.example/{i}.png" for i in range(3)]))
    assert len(calls) == 3  # the third fetch was cut at what the first two left over
    loader.shutdown()


def test_all_fetches_of_a_request_share_one_deadline() -> None:
    transport, calls = counting_transport(picture("PNG"), delay_s=1.0)
    loader = ImageLoader(FetchLimits(timeout_s=30, request_timeout_s=1.5), max_pixels=10_000, resolver=public,
                         transport=transport)
    started = time.monotonic()
    with pytest.raises(ImageError, match="longer than"):
        asyncio.run(loader.load_all([f"http://img.example/{i}.png" for i in range(5)]))
    assert len(calls) == 2 and time.monotonic() - started < 20  # not 5 fetches of up to 30 s each
    loader.shutdown()


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_allowed_formats_decode(fmt: str) -> None:
    assert fmt in ALLOWED_FORMATS
    assert decode_image(picture(fmt), max_pixels=100).size == (6, 4)
    assert open_image(picture(fmt)).mode == "RGB"


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 6 4\n%%EndComments\n"
       b"0 0 moveto 6 4 lineto stroke\nshowpage\n%%EOF\n")


@pytest.mark.parametrize("data", [EPS, picture("PCX"), picture("TGA"), picture("PPM")], ids=["eps", "pcx", "tga", "ppm"])
def test_other_formats_are_refused_as_not_images(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        image_size(data, max_pixels=10_000)
    assert info.value.status == 400
    with pytest.raises(ImageError, match="supported image format"):
        open_image(data)


def test_image_refusals_are_400s_as_openai_answers_them() -> None:
    for data, limit in [(b"not an image", 100), (picture("PNG", (20, 20)), 100)]:
        with pytest.raises(ImageError) as info:
            decode_image(data, limit)
        status, body, _ = openai_error(info.value, "rid")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------------------------ request bodies
@pytest.mark.parametrize("body", [b'{"messages": [{"content": "a\\ud800b"}]}', b'{"\\udfff": 1}',
                                  b'[[[["\\ud83d"]]]]'])
def test_lone_surrogates_are_a_400(body: bytes) -> None:
    with pytest.raises(RequestError, match="surrogate") as info:
        parse_json_body(body)
    assert info.value.status == 400


def test_json_bodies_parse_and_malformed_ones_are_a_400() -> None:
    assert parse_json_body(b'{"t": "\\ud83d\\ude00"}') == {"t": "\U0001F600"}  # a proper pair is fine
    for bad in [b'{"a": ', b"\xff\xfe", b"[" * 100_000]:
        with pytest.raises(RequestError) as info:
            parse_json_body(bad)
        assert info.value.status == 400


@pytest.mark.parametrize("body", ["<|ref|>" * 300_000, "<|det|>a" * 250_000, "<|" * 1_000_000,
                                  ("x" * 1000 + "\n") * 2000])
def test_task_prompts_are_parsed_in_time_that_does_not_grow_with_their_size(body: str) -> None:
    # The old regular expressions took about 2 s on 56 KB of these and grew with the square of the size.
    prompt = ('### Task:\nGenerate a title.\nJSON format: { "title": "t" }\n<chat_history>\nUSER: hi\n'
              f"ASSISTANT: {body}\n</chat_history>")
    started = time.perf_counter()
    answer = tasks.answer_task(prompt)
    assert time.perf_counter() - started < 5 and answer.startswith('{"title": ')


def test_task_titles_skip_grounding_tags_as_before() -> None:
    prompt = ('### Task:\nJSON format: { "title": "t" }\n<chat_history>\nUSER: scan this\nASSISTANT: '
              "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Quarterly <|x|>Report 2024\n</chat_history>")
    assert tasks.answer_task(prompt) == '{"title": "Quarterly Report 2024"}'


# ------------------------------------------------------------------------------------------------ exposure, keys
def test_loopback_hosts() -> None:
    assert all(map(is_loopback_host, ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "::", "10.0.0.1", "example.org", "192.168.1.2"]))


def test_the_default_is_loopback_and_an_open_host_needs_a_key_or_an_explicit_opt_out() -> None:
    assert ServerSettings().host == "127.0.0.1"
    check_exposure(ServerSettings(), None)
    with pytest.raises(UserError, match="--insecure-no-auth"):
        check_exposure(ServerSettings(host="0.0.0.0"), None)
    check_exposure(ServerSettings(host="0.0.0.0"), "k")
    check_exposure(ServerSettings(host="0.0.0.0", insecure_no_auth=True), None)


def test_the_key_comes_from_the_flag_a_file_or_the_environment(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n", encoding="utf-8")
    env = {"DEEPSEEK_OCR_API_KEY": "from-env"}
    assert resolve_api_key(ServerSettings(api_key="flag"), env) == "flag"
    assert resolve_api_key(ServerSettings(api_key_file=str(key_file)), env) == "from-file"
    assert resolve_api_key(ServerSettings(), env) == "from-env"
    assert resolve_api_key(ServerSettings(), {}) is None
    with pytest.raises(UserError, match="both"):
        resolve_api_key(ServerSettings(api_key="a", api_key_file=str(key_file)), {})
    with pytest.raises(UserError, match="cannot read"):
        resolve_api_key(ServerSettings(api_key_file=str(tmp_path / "missing")), {})


@pytest.mark.parametrize("source", ["env", "file", "empty-file"])
def test_a_blank_key_from_any_source_is_an_error(tmp_path, source: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("" if source == "empty-file" else "   \n", encoding="utf-8")
    settings = ServerSettings() if source == "env" else ServerSettings(api_key_file=str(key_file))
    with pytest.raises(UserError, match="blank"):
        resolve_api_key(settings, {"DEEPSEEK_OCR_API_KEY": " \t"})


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_key_flag_is_refused(tmp_path, value: str) -> None:
    (tmp_path / "config.toml").touch()
    with pytest.raises(UserError, match="--api-key"):
        parse_command_line(["--config", str(tmp_path / "config.toml"), "--api-key", value])


def test_new_limits_have_flags(tmp_path) -> None:
    (tmp_path / "config.toml").touch()
    settings, _ = parse_command_line(["--config", str(tmp_path / "config.toml"), "--max-image-urls", "2",
                                      "--max-connections", "5", "--request-timeout-s", "3.5",
                                      "--insecure-no-auth", "--max-inflight-pixels", "1000"])
    server = settings.server
    assert (server.max_image_urls, server.max_connections, server.request_timeout_s) == (2, 5, 3.5)
    assert server.insecure_no_auth is True and server.max_inflight_pixels == 1000


# ------------------------------------------------------------------------------------------------ statuses
def test_protocol_errors_keep_their_status_and_a_gone_client_is_not_a_500(caplog) -> None:
    assert openai_error(PayloadTooLarge("Request header exceeds the size limit"), "r")[0] == 431
    assert openai_error(PayloadTooLarge("Request body exceeds the size limit"), "r")[0] == 413
    assert openai_error(RequestTimeout("Request Timeout"), "r")[0] == 408
    with caplog.at_level(logging.INFO, logger="deepseek_ocr.server"):
        for gone in (RequestCancelled(), ConnectionResetError()):
            status, body, _ = openai_error(gone, "r")
            assert status == 499 and body["error"]["code"] == "client_disconnected"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("disconnected" in r.getMessage() for r in caplog.records)


def test_stop_strings_are_capped_in_length() -> None:
    # Each streamed delta is checked against every stop string's prefixes on the event loop.
    from server.schemas import MAX_STOP_CHARS, parse_chat
    user = [{"role": "user", "content": "hi"}]
    assert parse_chat({"model": "deepseek-ocr", "messages": user, "stop": "x" * MAX_STOP_CHARS}).stop
    with pytest.raises(RequestError) as info:
        parse_chat({"model": "deepseek-ocr", "messages": user, "stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]})
    assert info.value.param == "stop" and info.value.status == 400


def test_main_refuses_an_open_host_without_a_key_before_binding(tmp_path, monkeypatch, capsys) -> None:
    from server.app import main
    monkeypatch.delenv("DEEPSEEK_OCR_API_KEY", raising=False)
    (tmp_path / "config.toml").touch()
    assert main(["--config", str(tmp_path / "config.toml"), "--host", "0.0.0.0", "--no-preload"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err
