"""GLM-OCR on MLX against the PyTorch backend, on the tiny real-layout checkpoint (float32, MLX on CPU).

The torch backend is held equal to transformers 5.23 in test_glm_ocr_torch.py; here the MLX model must give the
same prefill logits (1e-4 relative to the largest logit) and the same greedy ids on the same kinds of images
(the generators are PaddleOCR-VL's torch parity file's) and every task prompt, plus component checks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("transformers")  # the torch parity module imported below needs it at import time

from common import glm_ocr as g  # noqa: E402
from common.images import open_image  # noqa: E402
from common.paddleocr_vl import load_chat_template  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import glm_ocr as mg  # noqa: E402
from tests.parity.test_paddleocr_vl_torch import _exif_jpeg, _noise, _rgba  # noqa: E402
from torch_ocr import glm_ocr as tg  # noqa: E402

pytestmark = pytest.mark.mlx

EOS = (59246, 59253)
NEW_TOKENS = 12
RTOL = 1e-4


class Env:
    def __init__(self, snapshot: Path) -> None:
        mx.set_default_device(mx.cpu)
        self.torch = tg.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.mlx = mg.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
        self.template = load_chat_template(snapshot)
        self.pre = json.loads((snapshot / "preprocessor_config.json").read_text())

    def inputs(self, images: list[Image.Image], prompt: str = "Text Recognition:") -> g.GlmOcrInputs:
        return g.build_inputs(prompt, images, self.tokenizer, self.template, self.pre)


@pytest.fixture(scope="module")
def env(glm_tiny: Path) -> Env:
    return Env(glm_tiny)


def _greedy(model, inputs: g.GlmOcrInputs, lib) -> tuple[np.ndarray, list[int]]:
    """Prefill logits and greedy ids with the KV cache on either backend (`lib` builds its int arrays)."""
    cache = model.make_cache(1, len(inputs.input_ids) + NEW_TOKENS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = np.array(logits), []
    for n in range(NEW_TOKENS):
        token = int(np.array(logits).argmax(-1)[0])
        ids.append(token)
        if token in EOS:
            break
        logits = model.step(lib([token]), lib([inputs.next_position + n]), cache)
    return first, ids


def _compare(env: Env, images: list[Image.Image], prompt: str = "Text Recognition:") -> None:
    inputs = env.inputs(images, prompt)
    ours, ours_ids = _greedy(env.mlx, inputs, mx.array)
    want, want_ids = _greedy(env.torch, inputs, torch.tensor)
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()))
    assert ours_ids == want_ids
    assert ours_ids[0] not in EOS


@pytest.mark.parametrize("case", ["line", "wide", "tall", "tiny", "rgba", "gray", "exif", "two"])
def test_images(env: Env, case: str) -> None:
    images = {
        "line": lambda: [_noise(300, 40, 1)], "wide": lambda: [_noise(3000, 40, 3)],
        "tall": lambda: [_noise(50, 1400, 4)], "tiny": lambda: [_noise(9, 6, 5)], "rgba": lambda: [_rgba()],
        "gray": lambda: [_noise(240, 180, 8, mode="L")], "exif": lambda: [open_image(_exif_jpeg())],
        "two": lambda: [_noise(400, 300, 9), _noise(120, 700, 10)],
    }[case]()
    _compare(env, images)


@pytest.mark.parametrize("task", sorted(g.TASKS))
def test_task_prompts(env: Env, task: str) -> None:
    _compare(env, [_noise(500, 200, 11)], g.TASKS[task])


def test_vision_tower(env: Env) -> None:
    inputs = env.inputs([_noise(200, 120, 14), _noise(90, 300, 15)])
    ours = np.array(env.mlx.encode_images(inputs))
    want = env.torch.encode_images(inputs).numpy()
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=1e-5)


def test_batched_encode_equals_single(env: Env) -> None:
    a, b = env.inputs([_noise(200, 80, 13)]), env.inputs([_noise(90, 150, 14), _noise(60, 60, 15)])
    for got, inputs in zip(env.mlx.encode_images_batch([a, b]), (a, b)):
        np.testing.assert_allclose(np.array(got), np.array(env.mlx.encode_images(inputs)), rtol=RTOL, atol=1e-5)


def test_interleaved_rotation_matches_torch() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    assert np.array_equal(np.array(mg.rotate_interleaved(mx.array(x))),
                          tg.rotate_interleaved(torch.from_numpy(x)).numpy())
