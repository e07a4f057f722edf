"""Every failure becomes an OpenAI error object, in ONE function (`openai_error`).

The openai SDK picks its exception class from the status and reads `type`, `param` and `code` from the body, so
all four keys are always present. Internal faults are logged with the request id and the traceback; the client
gets the id and nothing else.
"""
from __future__ import annotations

import logging

from sanic.exceptions import (BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, RequestCancelled,
                              RequestTimeout, SanicException, ServiceUnavailable)

from common.errors import ImageError, UnknownModelError, UserError

log = logging.getLogger("deepseek_ocr.server")


class RequestError(UserError):
    """A request body or header the client must fix (wrong type, missing field, out of range)."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param, status=status)
        if code is not None:
            self.code = code


class AuthError(RequestError):
    """Missing or wrong API key."""

    status = 401
    code = "invalid_api_key"


class BusyError(UserError):
    """The queue is full (429) or a model is being loaded (503); the client should retry after `retry_after` s."""

    status = 429

    def __init__(self, message: str, *, status: int = 429, retry_after: int = 1) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          431: "invalid_request_error", 503: "service_unavailable"}
#: Not sent (nobody is listening): the status logged for a client that went away, as nginx names it.
CLIENT_GONE = 499


def client_disconnected(exc: BaseException) -> bool:
    """True for the ways a vanished client shows up: Sanic's cancellation or a broken socket."""
    return isinstance(exc, (RequestCancelled, ConnectionError))


def openai_error(exc: BaseException, request_id: str) -> tuple[int, dict, dict[str, str]]:
    """Map any exception to (HTTP status, `{"error": {message, type, param, code}}`, extra headers)."""
    headers: dict[str, str] = {}
    param: str | None = None
    code: str | None = None
    if client_disconnected(exc):
        log.info("request %s: the client disconnected", request_id)
        status, message, code = CLIENT_GONE, "client disconnected", "client_disconnected"
    elif isinstance(exc, BusyError):
        status, message = exc.status, str(exc)
        headers["Retry-After"] = str(exc.retry_after)
        code = "queue_full" if status == 429 else "model_loading"
    elif isinstance(exc, UserError):
        status, message, param = exc.status, str(exc), exc.param
        code = getattr(exc, "code", None)
        if isinstance(exc, UnknownModelError):
            code = "model_not_found"
        elif isinstance(exc, ImageError):
            code = "invalid_image"
    elif isinstance(exc, MethodNotAllowed):
        status, message, code = 405, str(exc) or "method not allowed", "method_not_allowed"
        allowed = getattr(exc, "allowed_methods", None)
        if allowed:
            headers["Allow"] = ", ".join(sorted(allowed))
    elif isinstance(exc, NotFound):
        status, message, code = 404, str(exc) or "not found", "not_found"
    elif isinstance(exc, PayloadTooLarge) and "header" in str(exc).lower():
        status, message, code = 431, "request header is too large", "header_too_large"
    elif isinstance(exc, PayloadTooLarge):
        status, message, code = 413, "request body is too large", "request_too_large"
    elif isinstance(exc, BadRequest):
        # Sanic raises this when request.json meets a malformed body.
        status, message, code = 400, str(exc) or "malformed request body", "invalid_json"
    elif isinstance(exc, RequestTimeout):
        status, message, code = 408, str(exc) or "request timed out", "request_timeout"
    elif isinstance(exc, ServiceUnavailable):
        status, message = exc.status_code, str(exc) or "request timed out"
    elif isinstance(exc, SanicException) and 400 <= exc.status_code < 500:
        status, message = exc.status_code, str(exc) or "bad request"
    else:
        status, code = 500, "internal_error"
        message = f"internal server error (request id {request_id})"
        log.error("internal error in request %s", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    if status > 500:  # 503s (busy, model files missing) are expected conditions: no traceback
        log.warning("request %s: %s %s", request_id, status, message)
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message.splitlines()[0] if message else "error", "type": error_type,
                      "param": param, "code": code}}
    return status, body, headers
