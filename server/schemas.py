"""Request bodies of the two OpenAI APIs, validated into one `CallSpec` the routes hand to the pipeline.

Validation is strict about what we use (types, ranges, `n`, the shape of messages and parts) and silent about
what we do not: clients send many extra keys (`user`, `metadata`, `tools`, `logit_bias`, ...), and OpenAI
itself ignores unknown keys. Absent sampling fields fall back to the server's configured defaults (greedy unless
configured otherwise), not to OpenAI's temperature 1: an OCR answer should not change between two calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

# A sanity cap, not a context check: the backends preallocate the KV cache for prompt + max_tokens, so a
# nonsense value (1e9) must not reach them. 16k is twice DeepSeek-OCR's whole context.
MAX_TOKENS_LIMIT = 1 << 14
MAX_TOP_LOGPROBS = 20             # OpenAI's own bound
MAX_STOPS = 4
#: Stop strings are matched against every streamed delta on the event loop; their length bounds that work.
MAX_STOP_CHARS = 1000
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
IMAGE_DETAILS = ("auto", "low", "high", "original")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
#: The `json_schema` name that asks for the layout blocks of each page as the answer, a JSON document
#: `{"pages": [{"page", "width", "height", "blocks": [{"label", "text", "box"}], "finish_reason"}]}`.
BLOCKS_FORMAT = "ocr_blocks"


@dataclass(frozen=True)
class CallSpec:
    """Everything a route needs from a request body, in one API-neutral shape."""

    api: str                                    # "chat" | "responses"
    model: str
    messages: list[dict[str, Any]]              # chat-form messages; fold_messages picks the latest user turn
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    instructions: str | None = None             # Responses only: echoed back, never shown to the model
    blocks: bool = False                        # answer with the pages' layout blocks as JSON (BLOCKS_FORMAT)
    extras: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """Inference keys (as in config.toml `[inference]`) this request overrides, for `Request.overrides`."""
        out: dict[str, Any] = {}
        if self.max_tokens is not None:
            out["max_new_tokens"] = self.max_tokens
        if self.temperature is not None:
            # OpenAI's temperature 0 means greedy; anything above it turns sampling on.
            out["do_sample"] = self.temperature > 0
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.seed is not None:
            out["seed"] = self.seed
        if self.logprobs:
            # The backend reports the chosen token's logprob only along with a top-N list, so N is at least 1.
            out["logprobs"] = max(1, self.top_logprobs)
        return out


def _fail(message: str, param: str) -> RequestError:
    return RequestError(message, param=param)


def _get(body: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    """`body[key]` if present and not null, checked against `kinds` (bool is never accepted as a number)."""
    value = body.get(key)
    if value is None:
        return None
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in kinds) or not isinstance(value, kinds):
        raise _fail(f"'{key}' must be {what}, not {type(value).__name__}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"'{key}' must be a finite number", key)
    return value


def _int_in(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = _get(body, key, (int,), "an integer")
    if value is not None and not low <= value <= high:
        raise _fail(f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def _number_in(body: dict[str, Any], key: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = _get(body, key, (int, float), "a number")
    if value is None:
        return None
    if value > high or value < low or (open_low and value == low):
        bound = f"above {low:g}" if open_low else f"at least {low:g}"
        raise _fail(f"'{key}' must be {bound} and at most {high:g}, got {value}", key)
    return float(value)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_json_kind(body)}", param=None)
    return body


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _model(body: dict[str, Any]) -> str:
    model = _get(body, "model", (str,), "a string")
    if not model:
        raise _fail("'model' is required (see GET /v1/models)", "model")
    return model


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _fail("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOPS:
        raise _fail(f"'stop' holds at most {MAX_STOPS} strings, got {len(items)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise _fail(f"each 'stop' string may be at most {MAX_STOP_CHARS} characters long", "stop")
    return tuple(s for s in items if s)


def _check_part(part: Any, param: str) -> None:
    """Shape checks on one content part; the image data itself is checked when it is loaded."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _fail("each content part must be an object with a string 'type'", param)
    kind = part["type"]
    if kind in ("text", "input_text", "output_text", "refusal"):
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise _fail(f"a '{kind}' part needs a string '{key}'", param)
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise _fail("an 'image_url' part needs 'image_url' as a URL string or {\"url\": ...}", param)
        detail = image.get("detail") if isinstance(image, dict) else None
        if detail is not None and detail not in IMAGE_DETAILS:
            raise _fail(f"'detail' must be one of {', '.join(IMAGE_DETAILS)}", param)
    elif kind == "input_image":
        if not isinstance(part.get("image_url"), str) or not part["image_url"]:
            hint = "; file ids are not supported" if part.get("file_id") else ""
            raise _fail(f"an 'input_image' part needs 'image_url' (a URL or data URL){hint}", param)
    elif kind in ("file", "input_file"):
        source = part.get("file") if kind == "file" else part
        if not isinstance(source, dict) or not any(isinstance(source.get(k), str) and source.get(k)
                                                   for k in ("file_data", "file_url")):
            raise _fail(f"a '{kind}' part needs 'file_data' (a data URL); file ids are not supported", param)


def _messages(messages: Any, param: str = "messages") -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _fail(f"'{param}' must be a non-empty list of messages", param)
    for message in messages:
        if not isinstance(message, dict):
            raise _fail("each message must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _fail(f"message role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param)
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                _check_part(part, param)
        elif content is not None and not isinstance(content, str):
            raise _fail("message 'content' must be a string or a list of parts", param)
    return messages


def parse_chat(body: Any) -> CallSpec:
    """Validate a `POST /v1/chat/completions` body (raises `RequestError`, a 400, naming the field)."""
    body = _object(body)
    n = _int_in(body, "n", 1, MAX_TOKENS_LIMIT)
    if n not in (None, 1):
        raise _fail("only 'n': 1 is supported", "n")
    max_tokens = _int_in(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    max_completion = _int_in(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = _get(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_get(options, "include_usage", (bool,), "a boolean"))
    fmt = _get(body, "response_format", (dict,), "an object")
    if fmt is not None and fmt.get("type") not in RESPONSE_FORMATS:
        raise _fail(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    blocks = fmt is not None and fmt.get("type") == "json_schema" and _is_blocks_schema(fmt.get("json_schema"))
    logprobs = bool(_get(body, "logprobs", (bool,), "a boolean"))
    top_logprobs = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top_logprobs and not logprobs:
        raise _fail("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if blocks and logprobs:
        raise _fail(f"'logprobs' cannot be combined with the '{BLOCKS_FORMAT}' response format (the answer is "
                    "JSON built from the model's text, not its tokens)", "logprobs")
    return CallSpec(
        api="chat", model=_model(body), messages=_messages(body.get("messages")),
        max_tokens=max_completion if max_completion is not None else max_tokens,  # the newer name wins
        temperature=_number_in(body, "temperature", 0.0, 2.0),
        top_p=_number_in(body, "top_p", 0.0, 1.0, open_low=True),
        seed=_int_in(body, "seed", 0, (1 << 63) - 1),  # the range config.toml allows
        stop=_stop(body), logprobs=logprobs, top_logprobs=top_logprobs,
        stream=stream, include_usage=include_usage, blocks=blocks)


def _is_blocks_schema(schema: Any) -> bool:
    """True for a json_schema object named `BLOCKS_FORMAT`; any other schema keeps the plain answer (as
    before: the OCR models cannot follow a schema)."""
    return isinstance(schema, dict) and schema.get("name") == BLOCKS_FORMAT


def _responses_blocks(body: dict[str, Any]) -> bool:
    """Responses' structured output, `text: {"format": {"type": "json_schema", "name": "ocr_blocks"}}`."""
    text = _get(body, "text", (dict,), "an object") or {}
    fmt = _get(text, "format", (dict,), "an object")
    if fmt is None:
        return False
    if fmt.get("type") not in RESPONSE_FORMATS:
        raise _fail(f"'text.format.type' must be one of {', '.join(RESPONSE_FORMATS)}", "text")
    return fmt.get("type") == "json_schema" and _is_blocks_schema(fmt)


def _response_input(value: Any) -> list[dict[str, Any]]:
    """Responses `input` (a string or a list of message items) as chat-form messages."""
    if isinstance(value, str):
        if not value:
            raise _fail("'input' must not be empty", "input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _fail("'input' must be a string or a non-empty list of messages", "input")
    messages = []
    for item in value:
        if not isinstance(item, dict):
            raise _fail("each 'input' item must be an object", "input")
        kind = item.get("type", "message")
        if kind != "message":
            raise _fail(f"input items of type {kind!r} are not supported (only messages)", "input")
        messages.append({"role": item.get("role"), "content": item.get("content")})
    return _messages(messages, "input")


def parse_responses(body: Any) -> CallSpec:
    """Validate a `POST /v1/responses` body (raises `RequestError`, a 400, naming the field)."""
    body = _object(body)
    if "input" not in body:
        raise _fail("'input' is required", "input")
    instructions = _get(body, "instructions", (str,), "a string")
    return CallSpec(
        api="responses", model=_model(body), messages=_response_input(body["input"]),
        max_tokens=_int_in(body, "max_output_tokens", 1, MAX_TOKENS_LIMIT),
        temperature=_number_in(body, "temperature", 0.0, 2.0),
        top_p=_number_in(body, "top_p", 0.0, 1.0, open_low=True),
        stream=bool(_get(body, "stream", (bool,), "a boolean")), instructions=instructions,
        blocks=_responses_blocks(body),
        extras={"metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {}})
