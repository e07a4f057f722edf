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
import dataclasses
import binascii
import io
import ipaddress
import socket
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image, UnidentifiedImageError

from common.errors import ImageError
from common.images import ALLOWED_FORMATS, open_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: host, port -> every address the name resolves to (as strings); injectable so tests never touch DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]
T = TypeVar("T")

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# IANA special-purpose ranges that are not globally reachable, listed so the answer does not depend on the
# Python version (3.11's `is_global` still calls 192.0.0.8 and multicast global).
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8"))
_ACCEPTED_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image fetch; the defaults match the server settings' defaults."""

    timeout_s: float = 10.0          # total deadline for all hops and the body (httpx only bounds each read)
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    allow_private: bool = False
    max_urls: int = 8                # http(s) image URLs one request may name
    request_bytes: int = 40 * 1024 * 1024   # all fetches of one request together
    request_timeout_s: float = 30.0  # all fetches of one request together


class FetchBudget:
    """What is left of one request's fetch allowance (bytes and time), so N URLs cannot cost N full fetches."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self.bytes_left = limits.request_bytes
        self.deadline = time.monotonic() + limits.request_timeout_s

    def next_fetch(self) -> FetchLimits:
        """The limits for the next fetch: each single-fetch bound, cut to what the request has left."""
        seconds = self.deadline - time.monotonic()
        if seconds <= 0 or self.bytes_left <= 0:
            raise ImageError(f"the image URLs of this request took more than {self.limits.request_timeout_s:g} s "
                             f"or {self.limits.request_bytes} bytes in all", param="messages")
        return dataclasses.replace(self.limits, timeout_s=min(self.limits.timeout_s, seconds),
                                   max_bytes=min(self.limits.max_bytes, self.bytes_left))

    def spend(self, n_bytes: int) -> None:
        self.bytes_left -= n_bytes


class PixelReservation(Protocol):
    """Called with each image's pixel count before it is decoded (see `server.admission.Ticket`)."""

    def reserve_pixels(self, pixels: int) -> None: ...


def is_public_address(address: str | IPAddress) -> bool:
    """True only for globally routable unicast addresses.

    Addresses that embed an IPv4 address (IPv4-mapped, 6to4) are judged by the embedded one; Teredo, NAT64
    (64:ff9b::/96, 64:ff9b:1::/48: a translator on the local network picks the destination) and IPv4-compatible
    addresses are refused outright (they reach hosts we cannot see). Site-local fec0::/10 is refused too.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drops a %scope suffix, which ipaddress keeps in comparisons
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None or ip in _IPV4_COMPATIBLE or any(ip in net for net in _NAT64):
            return False
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
                # The address itself is not named: it would tell a prober what an internal name resolves to.
                raise ImageError(f"image URL host {host!r} resolves to a non-public address; refused",
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
        raise ImageError(f"image URL returned {content_type!r}, not an image", param="messages")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is larger than {max_bytes} bytes", param="messages")
    chunks, total = [], 0
    async for chunk in response.aiter_bytes():  # decoded bytes: a gzip bomb is counted after inflating
        total += len(chunk)
        if total > max_bytes:
            raise ImageError(f"image is larger than {max_bytes} bytes", param="messages")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_data_url(url: str, max_bytes: int, *, pdf: bool = False) -> bytes:
    """The bytes of a `data:[<mime>][;base64],<payload>` URL; only image types (or none) are accepted, or with
    `pdf` (a PDF file part) `application/pdf` (or none). Both are capped at `max_bytes` (`--image-max-bytes`)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError("data URL has no ',' separating header and payload", param="messages")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if pdf and mime not in ("", "application/pdf", "application/octet-stream"):
        raise ImageError(f"a PDF file part holds data URL type {mime!r}, not application/pdf", param="messages")
    if not pdf and mime == "application/pdf":
        raise ImageError("PDF files are not accepted in image parts: send a PDF as a 'file' part (chat) or an "
                         "'input_file' part (responses)", param="messages")
    if not pdf and mime and not mime.startswith(_ACCEPTED_TYPES):
        raise ImageError(f"data URL type {mime!r} is not an image", param="messages")
    # base64 inflates by 4/3: refuse oversized payloads before decoding them.
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageError(f"{'PDF file' if pdf else 'image'} is larger than {max_bytes} bytes (--image-max-bytes)",
                         param="messages")
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


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone, refusing non-images, formats outside `ALLOWED_FORMATS` and anything
    over `max_pixels` (all 400s): a decompression bomb costs nothing. PIL's own bomb error (its global limit may
    be lower than ours) is reported the same way."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}", param="messages") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(f"image data could not be decoded as an image ({', '.join(ALLOWED_FORMATS)})",
                         param="messages") from None
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                         param="messages")
    return width, height


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into an RGB image (EXIF orientation applied, as `common.images.open_image` does) after
    `image_size` has checked the header; every refusal is a 400 `ImageError`."""
    image_size(data, max_pixels)
    try:
        return open_image(data)
    except ImageError as exc:
        raise ImageError(str(exc), param="messages") from None


class ImageLoader:
    """Turns the image URLs of one request into PIL images: data URLs inline, http(s) through checked fetches.

    Base64 and image decoding run on a small thread pool of its own (`decode_workers` threads), never on the
    event loop and never more at once than that, however many requests arrive.
    """

    def __init__(self, limits: FetchLimits, max_pixels: int, resolver: Resolver = system_resolver,
                 transport: httpx.AsyncBaseTransport | None = None, *, max_images: int = 16,
                 decode_workers: int = 2) -> None:
        self.limits = limits
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.resolver = resolver
        self.transport = transport
        self.decode_workers = decode_workers
        self._pool: Executor | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def pool(self) -> Executor:
        """Created on first use and again after `shutdown()`, as `client` is."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.decode_workers, thread_name_prefix="image-decode")
        return self._pool

    @property
    def client(self) -> httpx.AsyncClient:
        """Created on first use and again after `close()`, so a restarted server gets a working client."""
        if self._client is None or self._client.is_closed:
            timeout = httpx.Timeout(self.limits.timeout_s, connect=min(5.0, self.limits.timeout_s))
            # trust_env=False: a proxy from the environment would fetch for us and bypass the address check.
            self._client = httpx.AsyncClient(transport=self.transport, trust_env=False, follow_redirects=False,
                                             timeout=timeout)
        return self._client

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the loader's bounded pool: CPU work that grows with the request stays off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_counts(self, urls: list[str]) -> None:
        """Refuse (400) a request naming more images, or more http(s) URLs, than allowed, before any work."""
        if len(urls) > self.max_images:
            raise ImageError(f"a request may hold at most {self.max_images} images, got {len(urls)}",
                             param="messages")
        remote = sum(1 for url in urls if isinstance(url, str) and _scheme(url.strip()) in ("http", "https"))
        if remote > self.limits.max_urls:
            raise ImageError(f"a request may name at most {self.limits.max_urls} image URLs, got {remote}",
                             param="messages")

    async def fetch(self, url: str, budget: FetchBudget | None = None) -> bytes:
        """The bytes behind one image URL; raises `ImageError` (a user error) for anything refused."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError("image URL is empty", param="messages")
        url = url.strip()
        scheme = _scheme(url)
        if scheme == "data":
            return await self.run(decode_data_url, url, self.limits.max_bytes)
        if scheme in ("http", "https"):
            budget = budget if budget is not None else FetchBudget(self.limits)
            data = await fetch_image_bytes(url, self.client, budget.next_fetch(), self.resolver)
            budget.spend(len(data))
            return data
        if scheme == "file" or not scheme or len(scheme) == 1:  # "C:\..." parses as scheme "c"
            raise ImageError("local files are not served: send the image as a data: URL or an http(s) URL",
                             param="messages")
        raise ImageError(f"image URL scheme {scheme!r} is not allowed (use http, https or data)", param="messages")

    async def load(self, url: str, budget: FetchBudget | None = None,
                   reservation: PixelReservation | None = None) -> Image.Image:
        """Fetch or decode one image URL. The header is read first; `reservation` is charged its pixel count
        before the pixels are decoded, so a refusal costs no decoded memory."""
        data = await self.fetch(url, budget)
        width, height = await self.run(image_size, data, self.max_pixels)
        if reservation is not None:
            reservation.reserve_pixels(width * height)
        return await self.run(decode_image, data, self.max_pixels)

    async def load_all(self, urls: list[str], reservation: PixelReservation | None = None) -> list[Image.Image]:
        """All images of a request, in order, under one fetch budget; nothing is kept when one is refused."""
        self.check_counts(urls)
        budget = FetchBudget(self.limits)
        images: list[Image.Image] = []
        try:
            for url in urls:
                images.append(await self.load(url, budget, reservation))
        except BaseException:
            images.clear()  # the traceback keeps this frame alive: do not let it keep the pixels too
            raise
        return images

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def shutdown(self) -> None:
        """Stop the decode threads (the server is stopping)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""
