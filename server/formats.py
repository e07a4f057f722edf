"""The JSON objects and SSE frames of both OpenAI APIs, exactly as the SDK and Open WebUI parse them.

Chat Completions streams `data: <json>` frames ending with `data: [DONE]`; Responses streams `event: <type>` +
`data: <json>` with a strictly increasing `sequence_number` and no `[DONE]`. Ids and timestamps are fixed per
answer, so every chunk of one answer agrees.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def dumps(obj: Any) -> str:
    # ensure_ascii=False: OCR output is often non-Latin, and escaping it would triple its size on the wire.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n"


def sse_event(event_type: str, obj: Any) -> str:
    return f"event: {event_type}\ndata: {dumps(obj)}\n\n"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatFormat:
    """Builds one chat completion (or its chunks) for `model`."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: _new_id("chatcmpl-"))
    created: int = field(default_factory=lambda: int(time.time()))

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        choice["logprobs"] = {"content": logprobs} if logprobs is not None else None
        out = self._base("chat.completion.chunk") | {"choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # every chunk but the last carries a null usage when usage was asked for
        return out

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._base("chat.completion.chunk") | {"choices": [], "usage": _chat_usage(usage)}

    def completion(self, text: str, finish_reason: str, usage: Usage,
                   logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None}
        return self._base("chat.completion") | {"choices": [choice], "usage": _chat_usage(usage)}


def _chat_usage(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


@dataclass
class ResponsesFormat:
    """Builds one Responses API object and its streamed events, numbering the events as it goes."""

    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: _new_id("resp_"))
    item_id: str = field(default_factory=lambda: _new_id("msg_"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        """The one assistant message; `text` None means no content part yet."""
        content = [] if text is None else [_text_part(text)]
        return {"type": "message", "id": self.item_id, "role": "assistant", "status": status, "content": content}

    def response(self, status: str, text: str | None = None, usage: Usage | None = None) -> dict[str, Any]:
        """`status`: in_progress | completed | incomplete | failed (incomplete means the token cap cut it)."""
        output = [] if text is None else [self.item(text, "incomplete" if status == "incomplete" else "completed")]
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output,
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens},
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "temperature": self.temperature, "top_p": self.top_p, "metadata": self.metadata,
        }

    def event(self, event_type: str, **payload: Any) -> str:
        """One SSE frame; sequence numbers start at 0 and grow by one per event."""
        frame = sse_event(event_type, {"type": event_type, "sequence_number": self.sequence, **payload})
        self.sequence += 1
        return frame

    def opening_events(self) -> list[str]:
        """created, in_progress, output_item.added, content_part.added: everything before the first delta."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self.event("response.created", response=self.response("in_progress")),
            self.event("response.in_progress", response=self.response("in_progress")),
            self.event("response.output_item.added", output_index=0, item=self.item(None, "in_progress")),
            self.event("response.content_part.added", **where, part=_text_part("")),
        ]

    def delta_event(self, text: str) -> str:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing_events(self, text: str, status: str, usage: Usage) -> list[str]:
        """text.done, content_part.done, output_item.done, then response.completed or response.incomplete."""
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        final = "response.completed" if status == "completed" else "response.incomplete"
        return [
            self.event("response.output_text.done", **where, text=text, logprobs=[]),
            self.event("response.content_part.done", **where, part=_text_part(text)),
            self.event("response.output_item.done", output_index=0,
                       item=self.item(text, "incomplete" if status == "incomplete" else "completed")),
            self.event(final, response=self.response(status, text, usage)),
        ]

    def failed_event(self, error: dict[str, Any]) -> str:
        """response.failed carrying the OpenAI error (code and message) when generation breaks mid-stream."""
        response = self.response("failed")
        response["error"] = {"code": error.get("code") or error.get("type"), "message": error.get("message")}
        return self.event("response.failed", response=response)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
