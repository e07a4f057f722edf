"""Alternating model names on a server that may keep both resident: each model loads once, none is dropped.

A server with `max_resident_models = 2` gets requests for DeepSeek-OCR and PaddleOCR-VL in turn; a reload per
request would show in the server's log (one "loaded <model>" line per load, "unloading" when one is dropped) and
in `/v1/models`, which must say both are loaded. The repeated requests must also get the same answers.
"""
from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest

from tests.e2e.test_server import ServerProcess, data_url, image_message, png

KEY = "residency-key"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, deepseek_tiny: Path, paddle_tiny: Path):
    proc = ServerProcess(tmp_path_factory.mktemp("residency"), {"deepseek-ocr": deepseek_tiny,
                                                                "paddleocr-vl": paddle_tiny},
                         api_key=KEY, max_resident_models=2)
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def _loads(log: str, model: str) -> int:
    return len(re.findall(rf"\bloaded {re.escape(model)} on ", log))


def test_alternating_models_load_each_once_and_both_stay_loaded(server: ServerProcess) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=f"{server.base}/v1", max_retries=0, timeout=120)
    page = data_url(png((64, 40), (200, 210, 220)))
    prompts = {"deepseek-ocr": "Free OCR.", "paddleocr-vl": "OCR:"}
    answers: dict[str, list[str]] = {model: [] for model in prompts}
    for model in ["deepseek-ocr", "paddleocr-vl"] * 3:
        reply = client.chat.completions.create(model=model, max_tokens=4,
                                               messages=image_message(page, prompts[model]))
        assert reply.model == model
        answers[model].append(reply.choices[0].message.content)
    for model, texts in answers.items():
        assert len(set(texts)) == 1, (model, texts)  # the same answer each time

    log = server.log.read_text()
    assert (_loads(log, "deepseek-ocr"), _loads(log, "paddleocr-vl")) == (1, 1), log[-3000:]
    assert "unloading" not in log
    loaded = {m.id: m.model_extra["loaded"] for m in client.models.list().data}
    assert loaded["deepseek-ocr"] is True and loaded["paddleocr-vl"] is True
    assert loaded["glm-ocr"] is False
