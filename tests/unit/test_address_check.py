"""The SSRF guard of server/images.py: literal addresses, a stubbed resolver, redirect chains on a mock transport.

Nothing here opens a socket: every resolver is a dict lookup and every HTTP answer comes from httpx.MockTransport.
"""
from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from common.errors import ImageError
from server.images import (FetchLimits, ImageLoader, checked_addresses, decode_data_url, decode_image,
                           fetch_image_bytes, is_public_address)

REFUSED = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254",            # link-local: cloud metadata
    "100.64.0.1", "100.127.255.254",  # CGNAT 100.64/10
    "224.0.0.1", "239.255.255.250",   # multicast
    "240.0.0.1", "255.255.255.255",   # reserved, broadcast
    "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",  # IETF / benchmarking / documentation
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped IPv6
    "2002:7f00:0001::1", "2002:0a00:0001::",  # 6to4 wrapping loopback / private
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",   # Teredo
    "64:ff9b::7f00:1", "64:ff9b::a00:1",      # NAT64 wrapping loopback / private
    "64:ff9b::808:808", "64:ff9b:1::808:808",  # NAT64, even wrapping a public IPv4: the translator is local
    "fec0::1", "feff:ffff::1",                # site-local fec0::/10 (deprecated, still routed inside sites)
    "::127.0.0.1",                            # IPv4-compatible (deprecated)
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "100.128.0.1", "2606:4700:4700::1111", "2a00:1450:4001::1",
           "::ffff:8.8.8.8", "2002:0808:0808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_literal_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_literal_addresses_pass(address: str) -> None:
    assert is_public_address(address)


def stub_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return table[host]
    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["10.0.0.5"], ["::1"], ["8.8.8.8", "192.168.0.1"],
                                     ["::ffff:127.0.0.1"], ["100.64.1.1"]])
def test_names_resolving_to_any_private_address_are_refused(answers: list[str]) -> None:
    resolver = stub_resolver({"evil.example": answers})
    with pytest.raises(ImageError, match="non-public"):
        asyncio.run(checked_addresses("evil.example", 80, resolver, allow_private=False))


def test_public_names_pass_and_allow_private_lets_everything_through() -> None:
    resolver = stub_resolver({"ok.example": ["8.8.4.4"], "lan.example": ["192.168.1.7"]})
    assert [str(a) for a in asyncio.run(checked_addresses("ok.example", 443, resolver, False))] == ["8.8.4.4"]
    assert [str(a) for a in asyncio.run(checked_addresses("lan.example", 80, resolver, True))] == ["192.168.1.7"]


def test_literal_hosts_skip_the_resolver() -> None:
    resolver = stub_resolver({})
    with pytest.raises(ImageError):
        asyncio.run(checked_addresses("[::1]", 80, resolver, allow_private=False))
    with pytest.raises(ImageError):
        asyncio.run(checked_addresses("127.0.0.1", 80, resolver, allow_private=False))
    assert resolver.calls == []


def png_bytes(size: tuple[int, int] = (4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def run_fetch(url: str, handler, table: dict[str, list[str]], limits: FetchLimits | None = None) -> bytes:
    async def go() -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False) as client:
            return await fetch_image_bytes(url, client, limits or FetchLimits(), stub_resolver(table))
    return asyncio.run(go())


def test_every_redirect_hop_is_checked_and_pinned() -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["host"], request.url.host))
        if request.headers["host"] == "a.example":
            return httpx.Response(302, headers={"location": "http://b.example/img.png"})
        if request.headers["host"] == "b.example":
            return httpx.Response(301, headers={"location": "https://c.example:8443/final.png"})
        return httpx.Response(200, headers={"content-type": "image/png"}, content=png_bytes())

    table = {"a.example": ["8.8.8.8"], "b.example": ["1.1.1.1"], "c.example": ["9.9.9.9"]}
    assert run_fetch("http://a.example/start", handler, table) == png_bytes()
    # The connection goes to the checked address; the original name stays in Host.
    assert seen == [("a.example", "8.8.8.8"), ("b.example", "1.1.1.1"), ("c.example:8443", "9.9.9.9")]


@pytest.mark.parametrize("target", ["http://internal.example/x.png", "http://127.0.0.1/x.png",
                                    "http://[::1]:8080/x.png", "http://169.254.169.254/latest/meta-data",
                                    "file:///etc/passwd", "ftp://a.example/x.png"])
def test_a_redirect_to_a_private_or_non_http_target_is_refused(target: str) -> None:
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(request.headers["host"])
        if request.headers["host"] == "a.example":
            return httpx.Response(302, headers={"location": target})
        return httpx.Response(200, headers={"content-type": "image/png"}, content=png_bytes())

    with pytest.raises(ImageError):
        run_fetch("http://a.example/", handler, {"a.example": ["8.8.8.8"], "internal.example": ["10.0.0.2"]})
    assert fetched == ["a.example"]  # the private hop was never requested


def test_redirect_loops_stop_at_the_limit() -> None:
    count = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal count
        count += 1
        return httpx.Response(302, headers={"location": "/again"})

    with pytest.raises(ImageError, match="redirected more than 3"):
        run_fetch("http://a.example/", handler, {"a.example": ["8.8.8.8"]}, FetchLimits(max_redirects=3))
    assert count == 4


def test_size_cap_content_type_and_status_are_enforced() -> None:
    big = httpx.Response(200, headers={"content-type": "image/png"}, content=b"x" * 2000)
    html = httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>")
    missing = httpx.Response(404)
    table = {"a.example": ["8.8.8.8"]}
    with pytest.raises(ImageError, match="larger than 1000"):
        run_fetch("http://a.example/", lambda r: big, table, FetchLimits(max_bytes=1000))
    with pytest.raises(ImageError, match="not an image"):
        run_fetch("http://a.example/", lambda r: html, table)
    with pytest.raises(ImageError, match="HTTP 404"):
        run_fetch("http://a.example/", lambda r: missing, table)


def test_a_body_without_content_length_is_counted_while_streaming() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "image/png"},
                              stream=httpx.ByteStream(b"y" * 5000))  # no length header from a ByteStream body
    with pytest.raises(ImageError, match="larger than"):
        run_fetch("http://a.example/", handler, {"a.example": ["8.8.8.8"]}, FetchLimits(max_bytes=4096))


def test_allow_private_urls_fetches_loopback_names() -> None:
    ok = httpx.Response(200, headers={"content-type": "image/png"}, content=png_bytes())
    data = run_fetch("http://localhost:9/x.png", lambda r: ok, {"localhost": ["127.0.0.1"]},
                     FetchLimits(allow_private=True))
    assert data == png_bytes()


def test_loader_refuses_local_paths_and_file_urls() -> None:
    loader = ImageLoader(FetchLimits(), max_pixels=10_000, resolver=stub_resolver({}))
    for url in ["/etc/passwd", "file:///etc/passwd", "FILE:/tmp/x.png", "C:\\img.png", "relative/img.png"]:
        with pytest.raises(ImageError, match="local files"):
            asyncio.run(loader.load(url))
    with pytest.raises(ImageError, match="scheme 'gopher'"):
        asyncio.run(loader.load("gopher://a.example/"))


def test_data_urls_decode_and_bad_ones_are_refused() -> None:
    payload = base64.b64encode(png_bytes()).decode()
    assert decode_data_url(f"data:image/png;base64,{payload}", 1 << 20) == png_bytes()
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,@@@not-base64@@@", 1 << 20)
    with pytest.raises(ImageError, match="not an image"):
        decode_data_url(f"data:text/plain;base64,{payload}", 1 << 20)
    with pytest.raises(ImageError, match="larger than"):
        decode_data_url(f"data:image/png;base64,{payload}", 16)


def test_decode_image_refuses_non_images_and_pixel_bombs_from_the_header() -> None:
    assert decode_image(png_bytes((4, 3)), max_pixels=12).size == (4, 3)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(png_bytes((4, 3)), max_pixels=11)
    with pytest.raises(ImageError, match="could not be decoded"):
        decode_image(b"GIF89a but not really", max_pixels=100)


def test_real_transport_fetches_through_the_pinned_address_only_when_private_urls_are_allowed() -> None:
    """A stdlib server on 127.0.0.1: the real httpx transport, the Host header kept, a redirect followed."""
    import http.server
    import threading

    seen: list[tuple[str, str]] = []
    image = png_bytes((5, 7))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append((self.path, self.headers["Host"]))
            if self.path == "/start":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    loopback = stub_resolver({"pages.test": ["127.0.0.1"]})
    try:
        async def load(allow: bool):
            loader = ImageLoader(FetchLimits(allow_private=allow), max_pixels=1000, resolver=loopback)
            try:
                return await loader.load(f"http://pages.test:{port}/start")
            finally:
                await loader.close()

        with pytest.raises(ImageError, match="non-public"):
            asyncio.run(load(False))
        assert seen == []
        assert asyncio.run(load(True)).size == (5, 7)
        assert seen == [("/start", f"pages.test:{port}"), ("/img.png", f"pages.test:{port}")]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("url, host_header, ip", [
    ("http://[2606:4700::1]:8080/x.png", "[2606:4700::1]:8080", "2606:4700::1"),
    ("http://bücher.example/x.png", "xn--bcher-kva.example", "8.8.8.8"),
])
def test_host_header_for_ipv6_literals_and_international_names(url: str, host_header: str, ip: str) -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["host"], request.url.host))
        return httpx.Response(200, headers={"content-type": "image/png"}, content=png_bytes())

    run_fetch(url, handler, {"xn--bcher-kva.example": ["8.8.8.8"]})
    assert seen == [(host_header, ip)]
