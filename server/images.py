"""Image references from requests: `data:` URLs and http(s) URLs, fetched safely, decoded with limits.

Why so careful: the server fetches URLs chosen by its clients, so without checks any client could make it read
internal services (cloud metadata at 169.254.169.254, admin pages on loopback). The check runs on the RESOLVED
addresses of every hop (redirects are followed by hand), and the connection then goes to the checked address
(the host name stays in `Host` and TLS SNI), so a DNS answer that changes between check and connect cannot
slip through. Local paths and `file:` URLs are never read.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image, UnidentifiedImageError

from common.errors import ImageError
from common.images import open_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: host, port -> every address the name resolves to (as strings); injectable so tests never touch DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# IANA special-purpose ranges that are not globally reachable, listed so the answer does not depend on the
# Python version (3.11's `is_global` still calls 192.0.0.8 and multicast global).
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "ff00::/8"))
_ACCEPTED_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image fetch; the defaults match the server settings' defaults."""

    timeout_s: float = 10.0          # total deadline for all hops and the body (httpx only bounds each read)
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False


def is_public_address(address: str | IPAddress) -> bool:
    """True only for globally routable unicast addresses.

    Addresses that embed an IPv4 address (IPv4-mapped, 6to4, NAT64) are judged by the embedded one; Teredo and
    IPv4-compatible addresses are refused outright (they tunnel to hosts we cannot see).
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drops a %scope suffix, which ipaddress keeps in comparisons
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None or ip in _IPV4_COMPATIBLE:
            return False
        for net in _NAT64:
            if ip in net:
                return is_public_address(ipaddress.IPv4Address(ip.packed[-4:]))
    if any(ip in net for net in _NOT_GLOBAL if net.version == ip.version):
        return False
    return bool(ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                      or ip.is_reserved or ip.is_unspecified))


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, via the event loop's non-blocking getaddrinfo."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageError(f"image URL host {host!r} does not resolve", param="messages") from exc
    return [info[4][0] for info in infos]


async def checked_addresses(host: str, port: int, resolver: Resolver, allow_private: bool) -> list[IPAddress]:
    """Resolve `host` and return its addresses; refuse if ANY of them is non-public (unless allowed).

    Refusing when one of several answers is private stops round-robin tricks that mix public and internal IPs.
    """
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        found = [str(literal)]
    except ValueError:
        found = await resolver(host, port)
    if not found:
        raise ImageError(f"image URL host {host!r} does not resolve", param="messages")
    addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
    if not allow_private:
        for ip in addresses:
            if not is_public_address(ip):
                raise ImageError(f"image URL host {host!r} resolves to a non-public address ({ip}); refused",
                                 param="messages", status=400)
    return addresses


def _pinned_request(url: httpx.URL, ip: IPAddress) -> httpx.Request:
    """A GET to `ip` that still names the original host (Host header, TLS SNI and certificate check)."""
    host = url.raw_host.decode("ascii")  # punycode for international names, as on the wire
    name = f"[{host}]" if ":" in host else host
    host_header = name if url.port is None else f"{name}:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return httpx.Request("GET", url.copy_with(host=str(ip)), headers={"Host": host_header, "Accept": "image/*"},
                         extensions=extensions)


def _validate_remote_url(url: httpx.URL) -> None:
    if url.scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme {url.scheme!r} is not allowed (use http, https or data)",
                         param="messages")
    if not url.host:
        raise ImageError("image URL has no host", param="messages")


async def fetch_image_bytes(url: str, client: httpx.AsyncClient, limits: FetchLimits,
                            resolver: Resolver = system_resolver) -> bytes:
    """Download an image over http(s), checking the address of every hop and capping time and size.

    `client` must not follow redirects itself (they are followed here, one checked hop at a time).
    """
    try:
        # wait_for rather than asyncio.timeout: the project still supports Python 3.10.
        return await asyncio.wait_for(_fetch(httpx.URL(url), client, limits, resolver), limits.timeout_s)
    except asyncio.TimeoutError as exc:
        raise ImageError(f"image URL took longer than {limits.timeout_s:g} s to fetch", param="messages") from exc
    except httpx.InvalidURL as exc:
        raise ImageError(f"image URL is not valid: {exc}", param="messages") from exc
    except httpx.HTTPError as exc:
        raise ImageError(f"image URL could not be fetched: {type(exc).__name__}", param="messages") from exc


async def _fetch(url: httpx.URL, client: httpx.AsyncClient, limits: FetchLimits, resolver: Resolver) -> bytes:
    for _ in range(limits.max_redirects + 1):
        _validate_remote_url(url)
        port = url.port or (443 if url.scheme == "https" else 80)
        # The punycode name is resolved: the same name the Host header and TLS will carry.
        addresses = await checked_addresses(url.raw_host.decode("ascii"), port, resolver, limits.allow_private)
        response = await client.send(_pinned_request(url, addresses[0]), stream=True, follow_redirects=False)
        try:
            if response.is_redirect:
                location = response.headers.get("location", "")
                url = url.join(location)  # relative to the ORIGINAL url, not the pinned IP
                continue
            if response.status_code != 200:
                raise ImageError(f"image URL answered HTTP {response.status_code}", param="messages")
            return await _read_capped(response, limits.max_bytes)
        finally:
            await response.aclose()
    raise ImageError(f"image URL redirected more than {limits.max_redirects} times", param="messages")


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not content_type.startswith(_ACCEPTED_TYPES):
        raise ImageError(f"image URL returned {content_type!r}, not an image", param="messages", status=422)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is larger than {max_bytes} bytes", param="messages", status=413)
    chunks, total = [], 0
    async for chunk in response.aiter_bytes():  # decoded bytes: a gzip bomb is counted after inflating
        total += len(chunk)
        if total > max_bytes:
            raise ImageError(f"image is larger than {max_bytes} bytes", param="messages", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:[<mime>][;base64],<payload>` URL; only image types (or none) are accepted."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError("data URL has no ',' separating header and payload", param="messages")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if mime == "application/pdf":
        raise ImageError("PDF files are not accepted here: send each page as an image",
                         param="messages", status=422)
    if mime and not mime.startswith(_ACCEPTED_TYPES):
        raise ImageError(f"data URL type {mime!r} is not an image", param="messages", status=422)
    # base64 inflates by 4/3: refuse oversized payloads before decoding them.
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageError(f"image is larger than {max_bytes} bytes", param="messages", status=413)
    if "base64" in params[1:]:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError("data URL payload is not valid base64", param="messages") from exc
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise ImageError("data URL is empty", param="messages")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into an RGB image (EXIF orientation applied, as `common.images.open_image` does), refusing
    non-images and anything over `max_pixels` with a 422.

    The size is read from the header before any pixel is decoded, so a decompression bomb costs nothing; PIL's
    own bomb error (its global limit may be lower than ours) is reported the same way.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}", param="messages", status=422) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError("image data could not be decoded as an image", param="messages", status=422) from None
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                         param="messages", status=422)
    try:
        return open_image(data)
    except ImageError as exc:
        raise ImageError(str(exc), param="messages", status=422) from None


class ImageLoader:
    """Turns the image URLs of one request into PIL images: data URLs inline, http(s) through checked fetches."""

    def __init__(self, limits: FetchLimits, max_pixels: int, resolver: Resolver = system_resolver,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.limits = limits
        self.max_pixels = max_pixels
        self.resolver = resolver
        self.transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """Created on first use and again after `close()`, so a restarted server gets a working client."""
        if self._client is None or self._client.is_closed:
            timeout = httpx.Timeout(self.limits.timeout_s, connect=min(5.0, self.limits.timeout_s))
            # trust_env=False: a proxy from the environment would fetch for us and bypass the address check.
            self._client = httpx.AsyncClient(transport=self.transport, trust_env=False, follow_redirects=False,
                                             timeout=timeout)
        return self._client

    async def load(self, url: str) -> Image.Image:
        """Fetch or decode one image URL; raises `ImageError` (a user error) for anything refused."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError("image URL is empty", param="messages")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = decode_data_url(url, self.limits.max_bytes)
        elif scheme in ("http", "https"):
            data = await fetch_image_bytes(url, self.client, self.limits, self.resolver)
        elif scheme == "file" or not scheme or len(scheme) == 1:  # "C:\..." parses as scheme "c"
            raise ImageError("local files are not served: send the image as a data: URL or an http(s) URL",
                             param="messages")
        else:
            raise ImageError(f"image URL scheme {scheme!r} is not allowed (use http, https or data)",
                             param="messages")
        # Decoding a large image takes a while: off the event loop, so health checks stay responsive.
        return await asyncio.get_running_loop().run_in_executor(None, decode_image, data, self.max_pixels)

    async def load_all(self, urls: list[str]) -> list[Image.Image]:
        """All images of a request, in order."""
        return [await self.load(url) for url in urls]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
