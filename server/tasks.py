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
_HISTORY_OPEN, _HISTORY_CLOSE = "<chat_history>", "</chat_history>"
_JSON_KEY = re.compile(r'JSON format:\s{0,64}\{\s{0,64}"(\w{1,64})"')
# DeepSeek-OCR grounding: a label in ref tags and its boxes in det tags, both dropped whole; then stray tags.
_PAIRED = (("<|ref|>", "<|/ref|>"), ("<|det|>", "<|/det|>"))
_MARKUP = re.compile(r"[#*_`>|~<>\[\]()]+")
_ROLES = ("USER:", "ASSISTANT:")
#: Only this much of the template and of the chat history is read: the title comes from the first line of an
#: answer, and a bounded read keeps a huge prompt from holding the CPU (the parsing below is linear anyway).
MAX_SCAN_CHARS = 16_384
_TITLE_WORDS = 6
_FALLBACK_TITLE = "Document OCR"


def is_task_request(prompt: str, n_images: int) -> bool:
    """True for an Open WebUI task prompt: text-only and starting with its `### Task:` header."""
    return n_images == 0 and prompt.lstrip().startswith(_TASK_START) and "<chat_history>" in prompt


def answer_task(prompt: str) -> str:
    """The text to answer a task prompt with (JSON, or plain title text when the template asks for that).

    Reads at most `MAX_SCAN_CHARS` of the template and of the history, so its cost does not grow with the prompt.
    """
    opening = prompt.find(_HISTORY_OPEN)
    template = prompt[:MAX_SCAN_CHARS if opening < 0 else min(opening, MAX_SCAN_CHARS)]
    key_match = _JSON_KEY.search(template)
    title = _title(_history(prompt, opening))
    if key_match is None:
        # Newer title templates ask for bare text: "Return ONLY the title text".
        return title if "title" in template.lower() else "{}"
    key = key_match.group(1)
    answers: dict[str, Any] = {"title": title, "tags": ["Document"], "follow_ups": [], "queries": [],
                               "prompt": title, "text": ""}
    return json.dumps({key: answers.get(key, "")}, ensure_ascii=False)


def _history(prompt: str, opening: int) -> str:
    """At most `MAX_SCAN_CHARS` of the text inside `<chat_history>` (to its end tag, or the prompt's end)."""
    if opening < 0:
        return ""
    start = opening + len(_HISTORY_OPEN)
    window = prompt[start:start + MAX_SCAN_CHARS]
    end = window.find(_HISTORY_CLOSE)
    return window if end < 0 else window[:end]


def _strip_special(line: str) -> str:
    """`line` without grounding spans (`<|ref|>..<|/ref|>`, `<|det|>..<|/det|>`) and stray `<|...|>` tags.

    One left-to-right pass with `str.find`; a closing tag found missing is not searched for again, so many
    unclosed tags cost linear time, not quadratic.
    """
    out: list[str] = []
    pos, missing = 0, set()
    while True:
        tag = line.find("<|", pos)
        if tag < 0:
            out.append(line[pos:])
            return " ".join(out)
        out.append(line[pos:tag])
        for opening, closing in _PAIRED:
            if line.startswith(opening, tag) and closing not in missing:
                end = line.find(closing, tag + len(opening))
                if end >= 0:
                    pos = end + len(closing)
                    break
                missing.add(closing)
        else:
            end = -1 if "|>" in missing else line.find("|>", tag + 2)
            if end < 0:
                missing.add("|>")
            pos = tag + 2 if end < 0 else end + 2


def _title(history: str) -> str:
    """A few words from the first non-empty assistant line of the history (else the user's, else a default)."""
    by_role: dict[str, list[str]] = {"ASSISTANT:": [], "USER:": []}
    current: list[str] | None = None
    for line in history.splitlines():
        role = next((r for r in _ROLES if line.startswith(r)), None)
        if role is not None:
            current = by_role[role]
            line = line[len(role):]
        if current is not None:
            current.append(line)
    for line in [*by_role["ASSISTANT:"], *by_role["USER:"]]:
        words = _MARKUP.sub(" ", _strip_special(line)).split()
        if words:
            return " ".join(words[:_TITLE_WORDS])
    return _FALLBACK_TITLE
