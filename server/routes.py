"""Route handlers: parse, fold the chat, queue the request, format the pipeline's events for the wire.

Handlers never touch a model. Both APIs share one path (`_prepare` -> `_pieces`); they differ only in the
objects they write (`formats.py`). A PDF file part is one request per page (`server.documents`), answered as the
pages joined after `<!-- page N -->` markers (`_joined`) or as layout blocks in JSON (`_blocks`). A streamed answer waits for its first event before sending headers, so errors
that happen before any text (a model that fails to load, a bad prompt) still get their proper HTTP status.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from PIL import Image
from sanic import Request as HttpRequest, Sanic
from sanic.exceptions import RequestCancelled
from sanic.response import HTTPResponse, json as json_response

from common.errors import ImageError
from common.generation import GeneratedToken
from common.pipeline import Request, Result
from common.prompts import fold_messages
from common.models import FAMILIES
from common.registry import MODEL_IDS, get_model
from common.results import blocks_page, page_heading

from . import documents, tasks
from .errors import AuthError, RequestError, openai_error
from .formats import ChatFormat, ResponsesFormat, Usage, dumps, sse_data
from .schemas import BLOCKS_FORMAT, CallSpec, parse_chat, parse_responses
from .stops import StopFilter

log = logging.getLogger("deepseek_ocr.server")

_STAND_IN = Image.new("RGB", (1, 1))
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class TextPiece:
    text: str
    tokens: tuple[GeneratedToken, ...] = ()


@dataclass(frozen=True)
class Final:
    finish_reason: str          # "stop" | "length"
    usage: Usage


Piece = TextPiece | Final


# ------------------------------------------------------------------------------------------------ middleware
async def start_request(request: HttpRequest) -> None:
    """Give every request an id (logs, 500 bodies, `x-request-id`).

    The API key is checked by `protected` on each route, not here: Sanic also runs request middleware when it
    answers a protocol error (oversized header, bad framing, a timeout), which must keep its own status.
    """
    given = request.headers.get("x-request-id", "")
    # A client's own id is kept (it ties their logs to ours) only if it cannot forge log lines or headers.
    request.ctx.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
    request.ctx.started = time.perf_counter()


def has_valid_key(request: HttpRequest) -> bool:
    """True when no key is configured or the request carries it; raises `AuthError` for a wrong one."""
    key = request.app.ctx.state.api_key
    if not key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    # Header bytes that are not UTF-8 arrive as surrogate escapes: turn them back into the bytes sent, so they
    # simply do not match (rather than failing to encode). compare_digest: the time taken must not reveal
    # how much of a guessed key was right.
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode()):
        raise AuthError("incorrect API key")
    return True


Handler = Callable[..., Awaitable[Any]]


def protected(handler: Handler, *, admit: bool = False) -> Handler:
    """`handler` behind the API key and, with `admit`, behind the admission gate (`server.admission`): the
    request holds a ticket (429 when the server is full) from before its body is parsed until it ends."""
    @functools.wraps(handler)
    async def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        if not has_valid_key(request):
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        if not admit:
            return await handler(request, *args, **kwargs)
        with request.app.ctx.state.gate.admit() as ticket:
            request.ctx.ticket = ticket
            return await handler(request, *args, **kwargs)
    return guarded


async def finish_request(request: HttpRequest, response: HTTPResponse) -> None:
    """Tag the response with its request id and log one line per request (for streams: when headers go out)."""
    rid = getattr(request.ctx, "request_id", None)
    if rid and response is not None:
        response.headers["x-request-id"] = rid
        started = getattr(request.ctx, "started", None)
        ms = (time.perf_counter() - started) * 1000.0 if started is not None else 0.0
        log.info("%s %s %s -> %s (%.0f ms)", rid, request.method, request.path, response.status, ms)


async def handle_error(request: HttpRequest, exc: Exception) -> HTTPResponse:
    """Every exception leaves as an OpenAI error object (see `errors.openai_error`)."""
    rid = getattr(getattr(request, "ctx", None), "request_id", None) or uuid.uuid4().hex[:16]
    status, body, headers = openai_error(exc, rid)
    headers["x-request-id"] = rid
    if status == 500:
        headers["x-should-retry"] = "false"  # an internal fault does not heal by retrying the same request
    return json_response(body, status=status, headers=headers)


# ------------------------------------------------------------------------------------------------ plain routes
async def health(request: HttpRequest) -> HTTPResponse:
    """Liveness: the event loop answers. No key, no model."""
    return json_response({"status": "ok"})


async def ready(request: HttpRequest) -> HTTPResponse:
    """Readiness: the worker thread is alive and not loading a model. Only a caller with the key (or any caller
    when no key is set) gets the details: models in memory, queue and admission counters."""
    state = request.app.ctx.state
    status = state.scheduler.status()
    is_ready = bool(status.get("worker_alive", True)) and status.get("loading") is None
    body: dict[str, Any] = {"status": "ready" if is_ready else "loading"}
    try:
        detailed = has_valid_key(request)
    except AuthError:
        detailed = False
    if detailed:
        body |= {"available_models": list(MODEL_IDS), **status, **state.gate.status()}
    return json_response(body, status=200 if is_ready else 503)


#: Display names; Open WebUI shows `name` when a model object has one (OpenAI's objects do not, clients ignore it).
MODEL_NAMES = {model_id: family.display_name for model_id, family in FAMILIES.items()}


def _model_object(model_id: str, loaded: list[str]) -> dict[str, Any]:
    """OpenAI's model object plus `name` and `loaded` (resident now: a request for it starts without a load)."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "local",
            "name": MODEL_NAMES.get(model_id, model_id), "loaded": model_id in loaded}


def _loaded(request: HttpRequest) -> list[str]:
    # the worker's own snapshot: asking the pipeline could wait for a load in progress
    return list(request.app.ctx.state.scheduler.status().get("loaded_models", []))


async def list_models(request: HttpRequest) -> HTTPResponse:
    loaded = _loaded(request)
    return json_response({"object": "list", "data": [_model_object(m, loaded) for m in MODEL_IDS]})


async def retrieve_model(request: HttpRequest, model_id: str) -> HTTPResponse:
    get_model(model_id)  # UnknownModelError -> 404
    return json_response(_model_object(model_id, _loaded(request)))


# ------------------------------------------------------------------------------------------------ shared path
def parse_json_body(body: bytes) -> Any:
    """The JSON body, refusing (400) malformed JSON and strings that cannot be UTF-8 (a lone surrogate such as
    `"\\ud800"` is valid JSON but would fail later, in the tokenizer or when the answer is written)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"malformed JSON body: {str(exc).splitlines()[0]}", code="invalid_json") from None
    stack = [value]
    while stack:  # iterative: deep nesting cannot exhaust the stack
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("the body holds a string that is not valid Unicode (a lone surrogate)",
                                   code="invalid_json") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


async def _body(request: HttpRequest) -> Any:
    """The parsed JSON body, parsed on the loader's pool: its cost grows with the body, so not on the loop."""
    if not request.body:
        raise RequestError("the request body is empty; send a JSON object")
    return await request.app.ctx.state.loader.run(parse_json_body, request.body)


def _part_url(part: dict[str, Any]) -> str:
    """The URL (http(s) or data:) an image-like content part points at."""
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        return image.get("url") if isinstance(image, dict) else image
    if kind in ("file", "input_file"):
        source = part.get("file") if kind == "file" else part
        source = source if isinstance(source, dict) else {}
        return source.get("file_data") or source.get("file_url") or ""
    value = part.get("image_url") or part.get("image") or part.get("url")
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str):
        raise ImageError(f"a '{kind}' part needs an image URL", param="messages")
    return value


def _fold_parts(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Fold once with stand-ins, which validates the turn: (its prompt text, its image-like parts in order).
    Each part is one `<image>` (a PDF part too: each page is then read on its own with this prompt)."""
    parts: list[dict[str, Any]] = []

    def collect(part: dict[str, Any]) -> Image.Image:
        parts.append(part)
        return _STAND_IN

    return fold_messages(messages, collect).prompt, parts


async def _prepare(request: HttpRequest, spec: CallSpec) -> AsyncIterator[Piece]:
    """Validate against the settings, fold, then queue; returns the answer's pieces (not yet started).

    A turn holding a PDF becomes one request per page (`server.documents`), answered as the pages' texts joined
    after page markers (`_joined`) or, with `spec.blocks`, as one JSON document of layout blocks (`_blocks`)."""
    state = request.app.ctx.state
    get_model(spec.model)
    state.check_overrides(spec)
    ticket = getattr(request.ctx, "ticket", None)
    prompt, parts = _fold_parts(spec.messages)
    document = documents.document_part(parts)
    if document is not None:
        images = await documents.load_pdf(state.loader, document, ticket)
    else:
        images = await state.loader.load_all([_part_url(part) for part in parts], ticket)
        if not spec.blocks:
            if tasks.is_task_request(prompt, len(images)):
                log.info("request %s: Open WebUI task prompt answered without the model", request.ctx.request_id)
                return _canned(await state.loader.run(tasks.answer_task, prompt))
            job = state.scheduler.submit(Request(prompt=prompt, images=images, model=spec.model,
                                                 overrides=spec.overrides()))
            return _pieces(job, spec.stop)
        if len(images) != 1:
            raise RequestError(f"'{BLOCKS_FORMAT}' needs exactly one image or one PDF file in the turn (boxes are "
                               f"in pixels of its page), got {len(images)} images", param="response_format")
    sizes = [image.size for image in images]
    feeder = documents.PageFeeder(state.scheduler, [
        Request(prompt=prompt, images=[image], model=spec.model, overrides=spec.overrides()) for image in images])
    images.clear()  # the requests hold the pages now; they are let go as each page finishes
    if spec.blocks:
        return _blocks(feeder, sizes, spec.stop, state.loader.run)
    return _joined(feeder, spec.stop)


async def _canned(text: str) -> AsyncIterator[Piece]:
    yield TextPiece(text)
    yield Final("stop", Usage(0, 0))


async def _pieces(job: Any, stops: tuple[str, ...]) -> AsyncIterator[Piece]:
    """The job's events as text pieces (stop strings cut out) and one `Final`; cancels the job if abandoned."""
    stop = StopFilter(list(stops))
    result: Result | None = None
    try:
        async for event in job:
            if isinstance(event, Result):
                result = event
                continue
            text = stop.feed(event.text)
            if stop.matched:
                job.cancel()  # no more text is wanted; keep reading for the Result (usage counts)
                if text:
                    yield TextPiece(text, event.tokens)
                continue
            if text or event.tokens:
                yield TextPiece(text, event.tokens)
    finally:
        if not job.done:
            job.cancel()  # the client went away (CancelledError) or the consumer stopped early
    tail = stop.flush()
    if tail:
        yield TextPiece(tail)
    if result is None:
        raise RuntimeError("the pipeline ended without a Result")
    finish = "length" if result.finish_reason == "length" and not stop.matched else "stop"
    yield Final(finish, Usage(result.prompt_tokens, result.completion_tokens))


async def _page_pieces(feeder: documents.PageFeeder, stops: tuple[str, ...]
                       ) -> AsyncIterator[tuple[int, Piece]]:
    """(page index, piece) for every page in order, each page's pieces ending with its `Final`; later pages are
    submitted as the queue makes room; every unfinished page is cancelled if the answer is abandoned."""
    try:
        for index in range(len(feeder)):
            pieces = _pieces(feeder.job(index), stops)
            try:
                async for piece in pieces:
                    feeder.top_up()
                    yield index, piece
            finally:
                await pieces.aclose()
    finally:
        feeder.cancel()


def _summed(finals: list[Final]) -> Final:
    """One `Final` for a document: usage summed over its pages; "length" when any page hit the token cap."""
    finish = "length" if any(f.finish_reason == "length" for f in finals) else "stop"
    return Final(finish, Usage(sum(f.usage.prompt_tokens for f in finals),
                               sum(f.usage.completion_tokens for f in finals)))


async def _joined(feeder: documents.PageFeeder, stops: tuple[str, ...]) -> AsyncIterator[Piece]:
    """The pages' answers as one text, each after its `page_heading` (`<!-- page N -->`): streamed in page
    order, and equal to `common.results.join_pages` of the pages' texts. A page's heading is given once its
    first piece has arrived, so an error before any text keeps its HTTP status."""
    finals: list[Final] = []
    headed = -1
    pages = _page_pieces(feeder, stops)
    try:
        async for index, piece in pages:
            if headed < index:
                headed = index
                yield TextPiece(page_heading(index + 1, first=index == 0))
            if isinstance(piece, Final):
                finals.append(piece)
            else:
                yield piece
    finally:
        await pages.aclose()  # now, not when collected: cancels the pages of an abandoned answer
    yield _summed(finals)


async def _blocks(feeder: documents.PageFeeder, sizes: list[tuple[int, int]], stops: tuple[str, ...],
                  run: Callable[..., Awaitable[Any]]) -> AsyncIterator[Piece]:
    """The answer as ONE JSON text `{"pages": [{page, width, height, blocks, finish_reason}]}` (the blocks of
    `common.results.blocks_page`, boxes in pixels of each page), given once every page is done; `run` puts the
    post-processing on the loader's pool."""
    texts: list[list[str]] = [[] for _ in sizes]
    finals: list[Final] = []
    pages = _page_pieces(feeder, stops)
    try:
        async for index, piece in pages:
            if isinstance(piece, Final):
                finals.append(piece)
            else:
                texts[index].append(piece.text)
    finally:
        await pages.aclose()

    def build() -> str:
        pages = [blocks_page(i + 1, "".join(parts), size, finish_reason=final.finish_reason)
                 for i, (parts, size, final) in enumerate(zip(texts, sizes, finals))]
        return dumps({"pages": pages})

    yield TextPiece(await run(build))
    yield _summed(finals)


async def _collect(pieces: AsyncIterator[Piece]) -> tuple[list[TextPiece], Final]:
    """A whole non-streamed answer: its text pieces and the final piece."""
    texts: list[TextPiece] = []
    try:
        async for piece in pieces:
            if isinstance(piece, Final):
                return texts, piece
            texts.append(piece)
    finally:
        await pieces.aclose()  # runs the generator's cleanup now (cancels the job if the client left)
    raise RuntimeError("the answer ended without a final piece")


def _logprob_entries(tokens: tuple[GeneratedToken, ...], decode: Callable[[int], str], top_n: int
                     ) -> list[dict[str, Any]]:
    """Chat `logprobs.content[]` entries: token text, logprob, UTF-8 bytes, and the top alternatives."""
    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = decode(token_id)
        return {"token": text, "logprob": logprob if logprob is not None else 0.0,
                "bytes": list(text.encode("utf-8"))}
    return [entry(t.token_id, t.logprob) | {"top_logprobs": [entry(a.token_id, a.logprob)
                                                             for a in t.top_logprobs[:top_n]]}
            for t in tokens]


# ------------------------------------------------------------------------------------------------ chat
async def chat_completions(request: HttpRequest) -> HTTPResponse | None:
    spec = parse_chat(await _body(request))
    pieces = await _prepare(request, spec)
    fmt = ChatFormat(spec.model, include_usage=spec.include_usage)
    decode = request.app.ctx.state.token_decoder(spec.model) if spec.logprobs else None

    def logprobs(piece: TextPiece) -> list[dict[str, Any]] | None:
        return _logprob_entries(piece.tokens, decode, spec.top_logprobs) if decode else None

    if not spec.stream:
        texts, final = await _collect(pieces)
        entries = [e for piece in texts for e in logprobs(piece) or []] if decode else None
        return json_response(fmt.completion("".join(p.text for p in texts), final.finish_reason, final.usage,
                                            entries))

    first = await pieces.__anext__()  # errors before any text keep their HTTP status
    response = await request.respond(content_type="text/event-stream", headers=_SSE_HEADERS)
    await response.send(sse_data(fmt.chunk({"role": "assistant", "content": ""})))
    try:
        piece: Piece = first
        while not isinstance(piece, Final):
            await response.send(sse_data(fmt.chunk({"content": piece.text}, logprobs=logprobs(piece))))
            piece = await pieces.__anext__()
        await response.send(sse_data(fmt.chunk({}, finish_reason=piece.finish_reason)))
        if spec.include_usage:
            await response.send(sse_data(fmt.usage_chunk(piece.usage)))
        await response.send(sse_data("[DONE]"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # headers are out: report in-band, as the SDK and Open WebUI expect
        _, body, _ = openai_error(exc, request.ctx.request_id)
        await response.send(sse_data(body))
    finally:
        await pieces.aclose()
    await response.eof()
    return None


# ------------------------------------------------------------------------------------------------ responses
async def responses(request: HttpRequest) -> HTTPResponse | None:
    spec = parse_responses(await _body(request))
    pieces = await _prepare(request, spec)
    fmt = ResponsesFormat(spec.model, instructions=spec.instructions, max_output_tokens=spec.max_tokens,
                          temperature=spec.temperature, top_p=spec.top_p,
                          metadata=spec.extras.get("metadata") or {})

    if not spec.stream:
        texts, final = await _collect(pieces)
        status = "incomplete" if final.finish_reason == "length" else "completed"
        return json_response(fmt.response(status, "".join(p.text for p in texts), final.usage))

    first = await pieces.__anext__()
    response = await request.respond(content_type="text/event-stream", headers=_SSE_HEADERS)
    texts = []
    try:
        for frame in fmt.opening_events():
            await response.send(frame)
        piece = first
        while not isinstance(piece, Final):
            if piece.text:
                texts.append(piece.text)
                await response.send(fmt.delta_event(piece.text))
            piece = await pieces.__anext__()
        status = "incomplete" if piece.finish_reason == "length" else "completed"
        for frame in fmt.closing_events("".join(texts), status, piece.usage):
            await response.send(frame)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _, body, _ = openai_error(exc, request.ctx.request_id)
        await response.send(fmt.failed_event(body["error"]))
    finally:
        await pieces.aclose()
    await response.eof()
    return None


def register(app: Sanic) -> None:
    """Attach routes, middleware and the one error handler to `app`."""
    from sanic.exceptions import MethodNotAllowed, NotFound

    app.add_route(health, "/health", methods=["GET"])
    app.add_route(ready, "/health/ready", methods=["GET"], name="health_ready")
    app.add_route(ready, "/ready", methods=["GET"], name="ready")
    app.add_route(protected(list_models), "/v1/models", methods=["GET"])
    app.add_route(protected(retrieve_model), "/v1/models/<model_id:str>", methods=["GET"])
    app.add_route(protected(chat_completions, admit=True), "/v1/chat/completions", methods=["POST"])
    app.add_route(protected(responses, admit=True), "/v1/responses", methods=["POST"])
    app.register_middleware(start_request, "request")
    app.register_middleware(finish_request, "response")
    # MethodNotAllowed is listed on its own: a handler for Exception alone does not receive it.
    app.error_handler.add(MethodNotAllowed, handle_error)
    app.error_handler.add(NotFound, handle_error)
    app.error_handler.add(Exception, handle_error)
    app.error_handler.add(RequestCancelled, handle_error)  # a BaseException: the line above misses it
