"""Request validation, stop strings, Open WebUI task answers and the error mapping of the server, without a server."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sanic.exceptions import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge

from common.errors import ImageError, ModelFilesError, UnknownModelError, UserError
from server.errors import AuthError, BusyError, RequestError, openai_error
from server.formats import ChatFormat, ResponsesFormat, Usage
from server.schemas import parse_chat, parse_responses
from server.stops import StopFilter
from server.tasks import answer_task, is_task_request

USER = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return parse_chat({"model": "deepseek-ocr", "messages": USER, **fields})


def test_chat_defaults_leave_sampling_to_the_server_settings() -> None:
    spec = chat()
    assert (spec.model, spec.stream, spec.include_usage, spec.stop) == ("deepseek-ocr", False, False, ())
    assert spec.overrides() == {}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=10).max_tokens == 10
    assert chat(max_tokens=10, max_completion_tokens=3).max_tokens == 3
    assert chat(max_completion_tokens=7).overrides() == {"max_new_tokens": 7}


def test_temperature_zero_is_greedy_and_above_zero_samples() -> None:
    assert chat(temperature=0).overrides() == {"do_sample": False, "temperature": 0.0}
    assert chat(temperature=0.7, top_p=0.9, seed=3).overrides() == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 3}


def test_logprobs_ask_the_backend_for_at_least_one_alternative() -> None:
    assert chat(logprobs=True).overrides() == {"logprobs": 1}
    assert chat(logprobs=True, top_logprobs=5).overrides() == {"logprobs": 5}


def test_stop_accepts_a_string_or_up_to_four_strings() -> None:
    assert chat(stop="END").stop == ("END",)
    assert chat(stop=["a", "b", "c", "d"]).stop == ("a", "b", "c", "d")


def test_stream_options_and_unknown_keys() -> None:
    spec = chat(stream=True, stream_options={"include_usage": True}, user="x", tools=[], logit_bias={"1": 2})
    assert spec.stream and spec.include_usage


@pytest.mark.parametrize("fields, param", [
    ({"model": 3}, "model"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "x", "detail": "max"}}]}]}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "include_usage"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_chat_fields_are_400s_naming_the_field(fields, param) -> None:
    body = {"model": "deepseek-ocr", "messages": USER} | fields
    with pytest.raises(RequestError) as info:
        parse_chat(body)
    assert info.value.status == 400 and info.value.param == param


def test_missing_fields_and_non_object_bodies() -> None:
    with pytest.raises(RequestError, match="'model' is required"):
        parse_chat({"messages": USER})
    with pytest.raises(RequestError, match="'messages'"):
        parse_chat({"model": "deepseek-ocr"})
    for body in ([USER], "text", 3, None, True):
        with pytest.raises(RequestError, match="must be a JSON object"):
            parse_chat(body)


def test_responses_input_string_and_parts() -> None:
    spec = parse_responses({"model": "paddleocr-vl", "input": "read this", "instructions": "be brief",
                            "max_output_tokens": 9})
    assert spec.messages == [{"role": "user", "content": "read this"}]
    assert (spec.instructions, spec.overrides()) == ("be brief", {"max_new_tokens": 9})
    parts = [{"type": "input_text", "text": "OCR:"},
             {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"}]
    spec = parse_responses({"model": "paddleocr-vl", "input": [{"type": "message", "role": "user", "content": parts}]})
    assert spec.messages == [{"role": "user", "content": parts}]


@pytest.mark.parametrize("fields, param", [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "instructions": 3}, "instructions"),
])
def test_bad_responses_fields(fields, param) -> None:
    with pytest.raises(RequestError) as info:
        parse_responses({"model": "deepseek-ocr"} | fields)
    assert info.value.param == param


@pytest.mark.parametrize("deltas, stops, expected, matched", [
    (["Hel", "lo wor", "ld"], ["wor"], "Hello ", True),
    (["ab", "c", "d"], ["cd"], "ab", True),
    (["a", "b", "c"], ["bd"], "abc", False),            # held-back "b" is released at the end
    (["x<", "|e", "nd|>y"], ["<|end|>"], "x", True),
    (["one", " two"], [], "one two", False),
    (["STOP"], ["STOP"], "", True),
    (["aXb", "Yc"], ["Y", "X"], "a", True),               # the earliest match wins, whichever stop it is
])
def test_stop_filter_cuts_at_the_first_stop_across_deltas(deltas, stops, expected, matched) -> None:
    f = StopFilter(stops)
    out = "".join(f.feed(d) for d in deltas) + f.flush()
    assert (out, f.matched) == (expected, matched)
    whole = StopFilter(stops)                             # the answer fed in one piece ends at the same place
    assert (whole.feed("".join(deltas)) + whole.flush(), whole.matched) == (expected, matched)


def test_stop_filter_holds_back_only_possible_prefixes() -> None:
    f = StopFilter(["END"])
    assert f.feed("hello E") == "hello "
    assert f.feed("x") == "Ex"


TITLE_PROMPT = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Output:
JSON format: { "title": "your concise title here" }
### Chat History:
<chat_history>
USER: Convert the document to markdown.
ASSISTANT: <|ref|>title<|/ref|><|det|>[[12, 30, 400, 60]]<|/det|>
# Quarterly **Revenue** Report for the Northern Region
Some text.
</chat_history>"""


def test_open_webui_task_prompts_get_the_json_they_ask_for() -> None:
    assert is_task_request(TITLE_PROMPT, 0) and not is_task_request(TITLE_PROMPT, 1)
    assert not is_task_request("<image>\nConvert the document to markdown.", 1)
    assert json.loads(answer_task(TITLE_PROMPT)) == {"title": "Quarterly Revenue Report for the Northern"}
    tags = TITLE_PROMPT.replace('{ "title": "your concise title here" }', '{ "tags": ["tag1", "tag2"] }')
    assert json.loads(answer_task(tags)) == {"tags": ["Document"]}
    follow = TITLE_PROMPT.replace('{ "title": "your concise title here" }', '{ "follow_ups": ["Q?"] }')
    assert json.loads(answer_task(follow)) == {"follow_ups": []}
    bare = TITLE_PROMPT.replace('JSON format: { "title": "your concise title here" }', "Return ONLY the title text")
    assert answer_task(bare) == "Quarterly Revenue Report for the Northern"
    empty = "### Task:\nGenerate a title\n### Output:\nJSON format: { \"title\": \"t\" }\n<chat_history>\n</chat_history>"
    assert json.loads(answer_task(empty)) == {"title": "Document OCR"}


@pytest.mark.parametrize("exc, status, code", [
    (RequestError("bad", param="top_p"), 400, None),
    (AuthError("no key"), 401, "invalid_api_key"),
    (UnknownModelError("unknown model 'x'"), 404, "model_not_found"),
    (ImageError("not an image", status=422), 422, "invalid_image"),
    (ModelFilesError("weights missing"), 503, None),
    (UserError("two\nlines"), 400, None),
    (BusyError("full", status=429, retry_after=2), 429, "queue_full"),
    (BusyError("loading", status=503, retry_after=9), 503, "model_loading"),
    (NotFound("no route"), 404, "not_found"),
    (MethodNotAllowed("PUT", "PUT", ["GET"]), 405, "method_not_allowed"),
    (PayloadTooLarge("big"), 413, "request_too_large"),
    (BadRequest("Failed when parsing body as json"), 400, "invalid_json"),
    (KeyError("secret internals"), 500, "internal_error"),
])
def test_every_exception_maps_to_an_openai_error_object(exc, status, code) -> None:
    got_status, body, headers = openai_error(exc, "rid42")
    assert got_status == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert "\n" not in body["error"]["message"]
    if status == 500:
        assert "secret" not in body["error"]["message"] and "rid42" in body["error"]["message"]
    if isinstance(exc, BusyError):
        assert headers["Retry-After"] == str(exc.retry_after)
    if status == 405:
        assert headers["Allow"] == "GET"


def test_chat_chunks_share_id_and_carry_null_usage_when_usage_is_asked_for() -> None:
    fmt = ChatFormat("deepseek-ocr", include_usage=True)
    first, last = fmt.chunk({"role": "assistant", "content": ""}), fmt.chunk({}, finish_reason="length")
    usage = fmt.usage_chunk(Usage(5, 2))
    assert first["id"] == last["id"] == usage["id"] and first["usage"] is None
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                          "total_tokens": 7}
    assert "usage" not in ChatFormat("deepseek-ocr").chunk({"content": "x"})


def test_responses_events_are_numbered_from_zero_in_order() -> None:
    fmt = ResponsesFormat("paddleocr-vl")
    frames = [*fmt.opening_events(), fmt.delta_event("ab"), *fmt.closing_events("ab", "incomplete", Usage(3, 1))]
    payloads = [json.loads(f.split("data: ", 1)[1]) for f in frames]
    assert [p["sequence_number"] for p in payloads] == list(range(len(frames)))
    assert [p["type"] for p in payloads] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    final = payloads[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["total_tokens"] == 4 and final["output"][0]["content"][0]["text"] == "ab"


# ------------------------------------------------------------------------------------------------------------------
# The worker queue and the in-band error frames, with a scripted pipeline (no model): these behaviours depend on
# timing a real model cannot be made to show on demand.
import asyncio  # noqa: E402
import threading  # noqa: E402

from common.pipeline import Request, Result, TextDelta  # noqa: E402
from server.worker import Worker  # noqa: E402


class ScriptedBatch:
    """The `common.batching.Batch` surface, scripted: each request yields `tokens` deltas "<prompt><i> "; every
    step waits for the pipeline's `release`; a step may fail at token `fail_at`."""

    def __init__(self, pipeline: ScriptedPipeline, model_id: str, max_batch: int) -> None:
        self.pipeline, self.model_id, self.max_batch = pipeline, model_id, max_batch
        self.entries: dict = {}
        self.steps, self.widest = 0, 0
        pipeline.batches.append(self)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.entries)

    @property
    def active(self) -> int:
        return len(self.entries)

    def admit(self, request: Request, key=None, cancel: threading.Event | None = None) -> None:
        self.pipeline.started.append(request.prompt)
        self.entries[key] = [request, 0, cancel]
        self.pipeline.running.set()

    def _result(self, request: Request, count: int, finish: str) -> Result:
        return Result(text="", token_ids=[], prompt_tokens=2, completion_tokens=count, finish_reason=finish,
                      model=request.model, backend="scripted", device="cpu", dtype="float32", timings_ms={})

    def step(self) -> list:
        self.pipeline.release.wait(10)
        self.steps, self.widest = self.steps + 1, max(self.widest, len(self.entries))
        out = []
        for key, entry in list(self.entries.items()):
            request, count, cancel = entry
            if cancel is not None and cancel.is_set():
                out.append((key, [self._result(request, count, "cancelled")]))
                del self.entries[key]
                continue
            if self.pipeline.fail_at == count:
                raise RuntimeError("backend fault")
            entry[1] = count + 1
            events = [TextDelta(f"{request.prompt}{count} ")]
            if count + 1 == self.pipeline.tokens:
                events.append(self._result(request, count + 1, "length"))
                del self.entries[key]
            out.append((key, events))
        return out

    def cancel_all(self) -> list:
        out = [(key, [self._result(e[0], e[1], "cancelled")]) for key, e in self.entries.items()]
        self.entries.clear()
        return out


class ScriptedPipeline:
    """Serves `ScriptedBatch`es; holds each step at `release` until released; loads wait for `load_gate`."""

    def __init__(self, tokens: int = 3, fail_at: int | None = None) -> None:
        self.tokens, self.fail_at = tokens, fail_at
        self.settings = SimpleNamespace(active_model="deepseek-ocr")
        self.loaded: list[str] = []
        self.started: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.running = threading.Event()
        self.batches: list[ScriptedBatch] = []

    def loaded_models(self) -> list[str]:
        return list(self.loaded)

    def loaded_tokenizer(self, model: str) -> None:
        return None

    def load(self, model: str) -> SimpleNamespace:
        self.load_gate.wait(10)
        self.loaded = [model]
        return SimpleNamespace(device="cpu")

    def batch(self, model: str, max_batch: int) -> ScriptedBatch:
        return ScriptedBatch(self, model, max_batch)


async def drain(job) -> list:
    return [event async for event in job]


def test_worker_serves_in_order_and_answers_429_when_the_queue_is_full() -> None:
    async def go() -> None:
        pipeline = ScriptedPipeline()
        pipeline.release.clear()
        worker = Worker(pipeline, queue_size=2)
        worker.start()
        try:
            first = worker.submit(Request("a", model="deepseek-ocr"))
            await asyncio.get_running_loop().run_in_executor(None, pipeline.running.wait, 5)
            queued = [worker.submit(Request(p, model="deepseek-ocr")) for p in ("b", "c")]
            with pytest.raises(BusyError) as info:
                worker.submit(Request("d", model="deepseek-ocr"))
            assert info.value.status == 429 and info.value.retry_after >= 1
            assert worker.status()["queued"] == 2 and worker.status()["busy"] is True
            pipeline.release.set()
            results = [await drain(job) for job in (first, *queued)]
            assert pipeline.started == ["a", "b", "c"]
            assert [e.text for e in results[1] if isinstance(e, TextDelta)] == ["b0 ", "b1 ", "b2 "]
            assert all(isinstance(r[-1], Result) for r in results)
        finally:
            worker.stop()
    asyncio.run(go())


def test_worker_admits_queued_jobs_between_steps_and_decodes_them_together() -> None:
    async def go() -> None:
        pipeline = ScriptedPipeline(tokens=3)
        pipeline.release.clear()
        worker = Worker(pipeline, queue_size=4, max_batch_size=3)
        worker.start()
        try:
            first = worker.submit(Request("a", model="deepseek-ocr"))
            await asyncio.get_running_loop().run_in_executor(None, pipeline.running.wait, 5)
            later = [worker.submit(Request(p, model="deepseek-ocr")) for p in ("b", "c", "d")]
            pipeline.release.set()
            results = [await drain(job) for job in (first, *later)]
            assert [[e.text for e in r if isinstance(e, TextDelta)] for r in results] == [
                [f"{p}{i} " for i in range(3)] for p in "abcd"]
            (batch,) = pipeline.batches
            assert batch.max_batch == 3 and batch.widest == 3        # three rows in one step
            assert batch.steps < 4 * 3                               # not one job after another
            assert worker.status()["active"] == 0 and worker.status()["max_batch_size"] == 3
        finally:
            worker.stop()
    asyncio.run(go())


def test_a_job_for_another_model_waits_for_the_batch_to_drain_and_keeps_its_place() -> None:
    async def go() -> None:
        pipeline = ScriptedPipeline(tokens=2)
        pipeline.release.clear()
        worker = Worker(pipeline, queue_size=4, max_batch_size=4)
        worker.start()
        try:
            jobs = [worker.submit(Request("a", model="deepseek-ocr"))]
            await asyncio.get_running_loop().run_in_executor(None, pipeline.running.wait, 5)
            jobs += [worker.submit(Request("b", model="paddleocr-vl")),
                     worker.submit(Request("c", model="deepseek-ocr"))]
            pipeline.release.set()
            for job in jobs:
                assert isinstance((await drain(job))[-1], Result)
            assert pipeline.started == ["a", "b", "c"]               # c did not jump ahead of b
            assert [b.model_id for b in pipeline.batches] == ["deepseek-ocr", "paddleocr-vl", "deepseek-ocr"]
        finally:
            worker.stop()
    asyncio.run(go())


def test_a_full_queue_while_a_model_loads_is_a_503_with_a_longer_retry() -> None:
    async def go() -> None:
        pipeline = ScriptedPipeline()
        pipeline.load_gate.clear()
        worker = Worker(pipeline, queue_size=1, load_retry_after_s=7)
        worker.start()
        try:
            first = worker.submit(Request("a", model="paddleocr-vl"))
            for _ in range(250):
                if worker.status()["loading"] == "paddleocr-vl":
                    break
                await asyncio.sleep(0.02)
            assert worker.status()["loading"] == "paddleocr-vl"
            second = worker.submit(Request("b", model="paddleocr-vl"))
            with pytest.raises(BusyError) as info:
                worker.submit(Request("c", model="paddleocr-vl"))
            assert (info.value.status, info.value.retry_after) == (503, 7)
            pipeline.load_gate.set()
            assert isinstance((await drain(first))[-1], Result) and isinstance((await drain(second))[-1], Result)
            assert worker.status()["loaded_models"] == ["paddleocr-vl"] and worker.status()["loading"] is None
        finally:
            worker.stop()
    asyncio.run(go())


def test_cancel_frees_a_queued_slot_and_stops_a_running_job() -> None:
    async def go() -> None:
        pipeline = ScriptedPipeline(tokens=1000)
        pipeline.release.clear()
        worker = Worker(pipeline, queue_size=1)
        worker.start()
        try:
            running = worker.submit(Request("a", model="deepseek-ocr"))
            await asyncio.get_running_loop().run_in_executor(None, pipeline.running.wait, 5)
            queued = worker.submit(Request("b", model="deepseek-ocr"))
            with pytest.raises(BusyError):
                worker.submit(Request("c", model="deepseek-ocr"))
            queued.cancel()
            assert await drain(queued) == []          # never started, ended at once
            replacement = worker.submit(Request("d", model="deepseek-ocr"))  # its slot is free again
            running.cancel()
            pipeline.release.set()
            events = await drain(running)
            assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 1000
            assert isinstance((await drain(replacement))[-1], Result)
            assert pipeline.started == ["a", "d"]
        finally:
            worker.stop()
    asyncio.run(go())


def test_a_pipeline_error_reaches_the_request_that_caused_it() -> None:
    async def go() -> None:
        worker = Worker(ScriptedPipeline(fail_at=1), queue_size=1)
        worker.start()
        try:
            job = worker.submit(Request("a", model="deepseek-ocr"))
            first = await job.__anext__()
            assert first.text == "a0 "
            with pytest.raises(RuntimeError, match="backend fault"):
                await drain(job)
            assert worker.status()["worker_alive"] is True
        finally:
            worker.stop()
    asyncio.run(go())


def test_errors_after_the_headers_are_sent_in_band(tmp_path) -> None:
    from common.config import load_settings
    from server.app import create_app

    (tmp_path / "config.toml").write_text('[server]\nhost = "127.0.0.1"\n', encoding="utf-8")
    app = create_app(load_settings(tmp_path / "config.toml"), pipeline=ScriptedPipeline(fail_at=2), preload=False)
    body = {"model": "deepseek-ocr", "messages": USER, "stream": True}
    _, chat_response = app.test_client.post("/v1/chat/completions", json=body)
    frames = [f[len("data: "):] for f in chat_response.text.split("\n\n") if f.strip()]
    assert chat_response.status == 200 and "[DONE]" not in frames
    error = json.loads(frames[-1])["error"]
    assert error["code"] == "internal_error" and "backend fault" not in error["message"]
    assert [json.loads(f)["choices"][0]["delta"].get("content") for f in frames[1:-1]] == ["hello0 ", "hello1 "]

    _, resp = app.test_client.post("/v1/responses", json={"model": "deepseek-ocr", "input": "x", "stream": True})
    events = [json.loads(f.split("data: ", 1)[1]) for f in resp.text.split("\n\n") if f.strip()]
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["status"] == "failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_command_line_flags_beat_config_toml_which_beats_defaults(tmp_path) -> None:
    from server.app import parse_command_line

    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = 8100\nqueue_size = 3\n[inference]\nmax_new_tokens = 99\n', encoding="utf-8")
    settings, options = parse_command_line(["--config", str(config), "--port", "9001", "--allow-private-urls",
                                            "--max-new-tokens", "7", "--api-key", "k", "--model", "paddleocr-vl",
                                            "--model-dir", str(tmp_path), "--no-preload"])
    assert (settings.server.port, settings.server.queue_size, settings.server.api_key) == (9001, 3, "k")
    assert settings.server.allow_private_urls is True and settings.server.max_request_bytes == 50 * 1024 * 1024
    assert settings.inference.max_new_tokens == 7 and settings.active_model == "paddleocr-vl"
    assert settings.entry("paddleocr-vl").model_dir == tmp_path and options["preload"] is False
    settings, _ = parse_command_line(["--config", str(config), "--allow-private-urls", "false"])
    assert settings.server.port == 8100 and settings.server.allow_private_urls is False
    with pytest.raises(UserError, match="--port"):
        parse_command_line(["--config", str(config), "--port", "http"])
