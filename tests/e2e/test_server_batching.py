"""Continuous batching in the real server (a subprocess on 127.0.0.1, tiny checkpoints, torch on the CPU).

Eight concurrent streamed requests with different images and max_tokens, through the official openai SDK, must
give exactly the answers they give one at a time; a request cancelled mid-stream must not disturb the others;
`/health/ready` reports the batch.
"""
from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.test_server import KEY, ServerProcess

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out


def _data_url(seed: int, width: int, height: int) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, deepseek_tiny: Path, paddle_tiny: Path):
    proc = ServerProcess(tmp_path_factory.mktemp("batching"), {"deepseek-ocr": deepseek_tiny,
                                                               "paddleocr-vl": paddle_tiny},
                         api_key=KEY, queue_size=16, max_batch_size=4)
    yield proc
    proc.stop()


def _messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(seed, 32 + 16 * seed, 48)}},
        {"type": "text", "text": "Free OCR."}]}]


async def _streamed(client: openai.AsyncOpenAI, model: str, seed: int, max_tokens: int) -> str:
    stream = await client.chat.completions.create(model=model, messages=_messages(seed), max_tokens=max_tokens,
                                                  stream=True, extra_body={"ignore_eos": True})
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


@pytest.mark.parametrize("model", ["deepseek-ocr", "paddleocr-vl"])
def test_concurrent_streams_equal_their_sequential_answers(server: ServerProcess, model: str) -> None:
    jobs = [(seed, 3 + seed % 4) for seed in range(8)]
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=300)
    sequential = []
    for seed, max_tokens in jobs:
        answer = client.chat.completions.create(model=model, messages=_messages(seed), max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == max_tokens
        sequential.append(answer.choices[0].message.content)

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[_streamed(aclient, model, seed, n) for seed, n in jobs])

    assert asyncio.run(together()) == sequential
    ready = httpx.get(f"{server.base}/health/ready", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ready["max_batch_size"] == 4 and ready["active"] == 0 and ready["queued"] == 0


def test_a_cancelled_stream_leaves_the_others_intact(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=300)
    want = client.chat.completions.create(model="deepseek-ocr", messages=_messages(1), max_tokens=6,
                                          extra_body={"ignore_eos": True}).choices[0].message.content

    async def run() -> str:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=300)

        async def abandon() -> None:
            stream = await aclient.chat.completions.create(model="deepseek-ocr", messages=_messages(2),
                                                           max_tokens=200, stream=True,
                                                           extra_body={"ignore_eos": True})
            async for _ in stream:
                break
            await stream.close()

        kept, _ = await asyncio.gather(_streamed(aclient, "deepseek-ocr", 1, 6), abandon())
        return kept

    assert asyncio.run(run()) == want
