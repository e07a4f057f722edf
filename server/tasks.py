"""Open WebUI's background "task" requests (title, tags, follow-ups, ...), answered without the model.

Open WebUI sends them to the chat model itself, text-only, after each answer: `### Task:` + guidelines + an
`### Output:` section naming the JSON it wants + the chat in `<chat_history>`. An OCR model cannot follow such
instructions (it would transcribe the prompt), and running it would hold the one generation slot for a useless
answer. So these requests get the JSON shape the template asks for, built from the chat history: a title from
the first line of the OCR answer, a generic tag, and empty lists where suggestions are asked for. Open WebUI
parses the JSON and keeps working; a template we do not recognise gets an empty JSON object, which it tolerates.
"""
from __future__ import annotations

import json
import re
from typing import Any

_TASK_START = "### Task:"
_HISTORY = re.compile(r"<chat_history>(.*?)(?:</chat_history>|$)", re.S)
_JSON_KEY = re.compile(r'JSON format:\s*\{\s*"(\w+)"', re.S)
# DeepSeek-OCR grounding: a label in ref tags and its boxes in det tags, both dropped whole; then stray tags.
_SPECIAL = re.compile(r"<\|ref\|>.*?<\|/ref\|>|<\|det\|>.*?<\|/det\|>|<\|[^|]*\|>")
_MARKUP = re.compile(r"[#*_`>|~<>\[\]()]+")
_TURN = re.compile(r"^(USER|ASSISTANT):\s?", re.M)
_TITLE_WORDS = 6
_FALLBACK_TITLE = "Document OCR"


def is_task_request(prompt: str, n_images: int) -> bool:
    """True for an Open WebUI task prompt: text-only and starting with its `### Task:` header."""
    return n_images == 0 and prompt.lstrip().startswith(_TASK_START) and "<chat_history>" in prompt


def answer_task(prompt: str) -> str:
    """The text to answer a task prompt with (JSON, or plain title text when the template asks for that)."""
    key_match = _JSON_KEY.search(prompt)
    title = _title(prompt)
    if key_match is None:
        # Newer title templates ask for bare text: "Return ONLY the title text".
        return title if "title" in prompt.lower() else "{}"
    key = key_match.group(1)
    answers: dict[str, Any] = {"title": title, "tags": ["Document"], "follow_ups": [], "queries": [],
                               "prompt": title, "text": ""}
    return json.dumps({key: answers.get(key, "")}, ensure_ascii=False)


def _title(prompt: str) -> str:
    """A few words from the first non-empty assistant line of the history (else the user's, else a default)."""
    history = _HISTORY.search(prompt)
    turns = _TURN.split(history.group(1)) if history else []
    # split() gives ["", role, text, role, text, ...]
    by_role: dict[str, list[str]] = {"ASSISTANT": [], "USER": []}
    for role, text in zip(turns[1::2], turns[2::2]):
        by_role[role].append(text)
    for text in [*by_role["ASSISTANT"], *by_role["USER"]]:
        for line in text.splitlines():
            words = _MARKUP.sub(" ", _SPECIAL.sub(" ", line)).split()
            if words:
                return " ".join(words[:_TITLE_WORDS])
    return _FALLBACK_TITLE
