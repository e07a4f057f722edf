"""Admission: what a request or a connection may hold before the server spends memory or CPU on it.

A request is admitted (`AdmissionGate.admit`) before its body is parsed or any image decoded: when
`max_requests` are already in flight it gets a 429 at once, so a full server does not decode images only to
refuse them at the worker's queue. Each image's pixel count, read from its header, is then reserved on the
request's `Ticket` before its pixels are decoded: over the per-request total it is a 400 (it can never fit),
over what all admitted requests may hold together it is a 429 (retry later). The ticket gives everything back
when the request ends, whatever way it ends.

`GuardedProtocol` does the same for connections: a cap on open connections, and a deadline for a request's
header and body counted from its first byte. Sanic's own REQUEST_TIMEOUT restarts at every byte received, and
the body is read under RESPONSE_TIMEOUT, so a client sending a byte every few seconds would be kept forever.
"""
from __future__ import annotations

import logging
from time import monotonic
from typing import Any

from sanic.exceptions import RequestTimeout
from sanic.http.constants import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

from common.errors import ImageError

from .errors import BusyError

log = logging.getLogger("deepseek_ocr.server")


class Ticket:
    """One admitted request's share of the gate; `release()` (idempotent) returns it."""

    def __init__(self, gate: AdmissionGate) -> None:
        self._gate = gate
        self.pixels = 0
        self.released = False

    def reserve_pixels(self, pixels: int) -> None:
        """Charge one image's pixels before it is decoded: 400 over the request's total, 429 over the server's."""
        gate = self._gate
        if self.pixels + pixels > gate.max_request_pixels:
            raise ImageError(f"the images of this request hold {self.pixels + pixels} pixels in all, over the "
                             f"limit of {gate.max_request_pixels} (--max-request-pixels)", param="messages")
        if gate.pixels + pixels > gate.max_pixels:
            raise BusyError("too many image pixels are being processed; retry shortly", retry_after=1)
        self.pixels += pixels
        gate.pixels += pixels

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate.in_flight -= 1
            self._gate.pixels -= self.pixels
            self.pixels = 0

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdmissionGate:
    """In-flight request and pixel budgets. Used from the event loop only, so plain counters suffice."""

    def __init__(self, max_requests: int, max_pixels: int, max_request_pixels: int) -> None:
        self.max_requests = max_requests
        self.max_pixels = max_pixels
        self.max_request_pixels = min(max_request_pixels, max_pixels)  # a request must be able to fit at all
        self.in_flight = 0
        self.pixels = 0

    def admit(self) -> Ticket:
        """A ticket for one request, or `BusyError` (429) when `max_requests` are in flight."""
        if self.in_flight >= self.max_requests:
            raise BusyError(f"the server is busy ({self.in_flight} requests in flight); retry shortly",
                            retry_after=1)
        self.in_flight += 1
        return Ticket(self)

    def status(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "in_flight_pixels": self.pixels}


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
_REFUSED_BODY = (b'{"error":{"message":"too many open connections; retry shortly","type":"service_unavailable",'
                 b'"param":null,"code":"too_many_connections"}}')


class GuardedProtocol(HttpProtocol):
    """Sanic's HTTP protocol with a connection cap and a request deadline that does not restart per byte.

    Reads `app.config.MAX_CONNECTIONS` (0 = no cap) and `REQUEST_TIMEOUT` (the header and the body together must
    arrive within it, counted from the request's first byte; the answer is a 408).
    """

    __slots__ = ("_request_started",)

    def connection_made(self, transport: Any) -> None:
        self._request_started = 0.0
        cap = int(getattr(self.app.config, "MAX_CONNECTIONS", 0) or 0)
        super().connection_made(transport)
        if cap and len(self.connections) > cap:
            log.warning("connection refused: %d connections open (max_connections = %d)",
                        len(self.connections) - 1, cap)
            transport.write(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
            self.close()

    def data_received(self, data: bytes) -> None:
        http = self.http
        reading = http is not None and self._reading_request(http)
        if not reading:
            self._request_started = monotonic()  # the first byte of a new request starts its deadline
        super().data_received(data)

    @staticmethod
    def _reading_request(http: Any) -> bool:
        """True while a request's header or body is still arriving."""
        return http.stage is Stage.REQUEST or (http.stage is Stage.HANDLER and bool(http.request_body))

    def check_timeouts(self) -> None:
        http = self.http
        if (self._task and http is not None and self._reading_request(http)
                and monotonic() - self._request_started > self.request_timeout):
            log.info("request not received within %s s; closing the connection", self.request_timeout)
            http.exception = RequestTimeout("the request was not received in time")
            self._task.cancel()
            return
        super().check_timeouts()
