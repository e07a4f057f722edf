"""PaddleOCR-VL on MLX against the PyTorch backend, on the tiny real-layout checkpoint (float32, MLX on CPU).

The torch backend is held equal to transformers 5.23 in test_paddleocr_vl_torch.py; here the MLX model must give
the same prefill logits (1e-4 relative to the largest logit) and the same greedy ids on the same image cases
(the image generators are that file's), plus component checks. The 8.7 Mpx page of the torch file is left out:
MLX's CPU matmul makes its ~11k-patch vision attention take minutes on a shared runner.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("transformers")  # the torch parity module imported below needs it at import time

from common import paddleocr_vl as pv  # noqa: E402
from common.images import open_image  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import paddleocr_vl as mp  # noqa: E402
from mlx_ocr.loader import resize_table  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from tests.parity.test_paddleocr_vl_torch import _exif_jpeg, _noise, _rgba  # noqa: E402
from torch_ocr import paddleocr_vl as tp  # noqa: E402

pytestmark = pytest.mark.mlx

EOS = 2
NEW_TOKENS = 12
RTOL = 1e-4


class Env:
    """Both backends on one snapshot, loaded once for the module."""

    def __init__(self, snapshot: Path) -> None:
        mx.set_default_device(mx.cpu)
        self.torch = tp.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.mlx = mp.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
        self.template = pv.load_chat_template(snapshot)
        self.pre = json.loads((snapshot / "preprocessor_config.json").read_text())

    def inputs(self, images: list[Image.Image], prompt: str = "OCR:") -> pv.PaddleOCRVLInputs:
        return pv.build_inputs(prompt, images, self.tokenizer, self.template, self.pre)


@pytest.fixture(scope="module")
def env(paddle_tiny: Path) -> Env:
    return Env(paddle_tiny)


def greedy_mlx(model: mp.PaddleOCRVL, inputs: pv.PaddleOCRVLInputs, steps: int) -> tuple[np.ndarray, list[int]]:
    """Prefill logits (1, vocab) and greedy ids with the KV cache, stopping after EOS."""
    cache = model.make_cache(1, len(inputs.input_ids) + steps)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = np.array(logits), []
    for n in range(steps):
        token = int(mx.argmax(logits, axis=-1).item())
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(mx.array([token]), mx.array([inputs.next_position + n]), cache)
    return first, ids


def greedy_torch(model: tp.PaddleOCRVL, inputs: pv.PaddleOCRVLInputs, steps: int) -> tuple[np.ndarray, list[int]]:
    cache = model.make_cache(1, len(inputs.input_ids) + steps)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = logits.numpy(), []
    for n in range(steps):
        token = int(logits.argmax(-1))
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return first, ids


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= RTOL * scale, f"max |mlx - torch| = {err:.3g}, allowed {RTOL * scale:.3g}"


def _compare(env: Env, images: list[Image.Image], prompt: str = "OCR:") -> list[int]:
    inputs = env.inputs(images, prompt)
    ours, ours_ids = greedy_mlx(env.mlx, inputs, NEW_TOKENS)
    ref, ref_ids = greedy_torch(env.torch, inputs, NEW_TOKENS)
    assert_logits_close(ours, ref)
    assert ours_ids == ref_ids
    assert ours_ids[0] != EOS, "the tiny checkpoint must not stop at once"
    return ours_ids


# ------------------------------------------------------------------------------------------------ end to end

def test_short_text_line_upscaled(env: Env) -> None:
    _compare(env, [_noise(300, 40, 1)])


def test_very_wide_image(env: Env) -> None:
    _compare(env, [_noise(4000, 40, 3)])


def test_image_smaller_than_one_patch_row(env: Env) -> None:
    _compare(env, [_noise(9, 6, 4)])


def test_half_to_even_size(env: Env) -> None:
    _compare(env, [_noise(1190, 742, 6)])


def test_rgba_alpha_dropped(env: Env) -> None:
    _compare(env, [_rgba()])


def test_grayscale(env: Env) -> None:
    _compare(env, [_noise(240, 180, 8, mode="L")])


def test_exif_rotated_jpeg(env: Env) -> None:
    image = open_image(_exif_jpeg())
    assert image.size == (120, 320)
    _compare(env, [image])


def test_two_images_of_different_sizes(env: Env) -> None:
    _compare(env, [_noise(400, 300, 9), _noise(120, 700, 10)])


@pytest.mark.parametrize("task", sorted(pv.TASKS))
def test_task_prompts(env: Env, task: str) -> None:
    _compare(env, [_noise(500, 200, 11)], prompt=pv.TASKS[task])


def test_uncached_generation_equals_cached(env: Env) -> None:
    inputs = env.inputs([_noise(300, 60, 12)])
    _, cached = greedy_mlx(env.mlx, inputs, 6)
    embeds = env.mlx.encode_images(inputs)
    ids: list[int] = []
    for _ in range(len(cached)):
        ids.append(int(mx.argmax(env.mlx.prefill(inputs.extended(ids), embeds, None), axis=-1).item()))
    assert ids == cached


def test_batched_step_equals_single(env: Env) -> None:
    inputs = env.inputs([_noise(200, 80, 13)])
    model = env.mlx
    embeds = model.encode_images(inputs)
    both = model.make_cache(2, len(inputs.input_ids) + 2)
    single = model.make_cache(1, len(inputs.input_ids) + 2)
    model.prefill(inputs, embeds, single)
    for layer, one in zip(both, single):  # both rows start from the same prompt
        k, v = one.keys[:, :, :one.offset], one.values[:, :, :one.offset]
        layer.update(mx.concatenate([k, k]), mx.concatenate([v, v]))
    pos = inputs.next_position
    pair = model.step(mx.array([5, 900]), mx.array([pos, pos]), both)
    alone = model.step(mx.array([900]), mx.array([pos]), single)
    np.testing.assert_allclose(np.array(pair[1:]), np.array(alone), rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------------------------------------------ components

def test_vision_encoder_and_projector(env: Env) -> None:
    inputs = env.inputs([_noise(200, 120, 14), _noise(90, 300, 15)])
    grids = [tuple(int(v) for v in g) for g in inputs.image_grid_thw]
    with torch.no_grad():
        ref = env.torch.visual.vision_model(torch.from_numpy(inputs.pixel_values), grids)
        ref_proj = env.torch.mlp_AR(ref, grids)
    ours = env.mlx.visual.vision_model(mx.array(inputs.pixel_values), grids)
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=RTOL, atol=1e-4)
    ours_proj = env.mlx.mlp_AR(mx.array(ref.numpy()), grids)
    np.testing.assert_allclose(np.array(ours_proj), ref_proj.numpy(), rtol=RTOL, atol=1e-5)


def test_one_decoder_layer(env: Env) -> None:
    inputs = env.inputs([_noise(150, 150, 16)])
    positions = inputs.position_ids[:, None]  # (3, 1, L)
    hidden = np.random.default_rng(0).standard_normal(
        (1, positions.shape[-1], env.mlx.config.text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        cos, sin = env.torch.model.rope(torch.from_numpy(positions), torch.float32)
        ref = env.torch.model.layers[0](torch.from_numpy(hidden), cos, sin, None)
    cos_m, sin_m = env.mlx.model.rope(mx.array(positions), mx.float32)
    np.testing.assert_allclose(np.array(cos_m), cos.numpy(), atol=1e-6)
    ours = env.mlx.model.layers[0](mx.array(hidden), cos_m, sin_m, None)
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=RTOL, atol=1e-5)


def test_position_table_resize_equals_bilinear_interpolate() -> None:
    table = np.random.default_rng(1).standard_normal((27, 27, 8)).astype(np.float32)
    for size in [(12, 76), (2, 286), (52, 84), (60, 4), (27, 27)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=size,
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(np.array(resize_table(mx.array(table), size, "linear")), ref, atol=2e-6)


def test_checkpoint_is_sensitive_to_positions(env: Env) -> None:
    """The tiny weights must make a wrong position encoding visible, or the checks above prove little."""
    inputs = env.inputs([_noise(300, 100, 17)])
    embeds = env.mlx.encode_images(inputs)
    right = np.array(env.mlx.prefill(inputs, embeds, None))
    flat = np.broadcast_to(np.arange(len(inputs.input_ids)), (3, len(inputs.input_ids))).copy()
    wrong = np.array(env.mlx.prefill(replace(inputs, position_ids=flat), embeds, None))
    assert float(np.abs(right - wrong).max()) > 100 * RTOL * float(np.abs(right).max())


def test_load_skips_unused_groups_and_moves_the_patch_conv_channels_last(env: Env) -> None:
    weight = env.mlx.visual.vision_model.embeddings.patch_embedding.weight
    ref = env.torch.visual.vision_model.embeddings.patch_embedding.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(weight), ref.transpose(0, 2, 3, 1))
    names = {name for name, _ in tree_flatten(env.mlx.parameters())}
    assert not any(name.startswith(mp.SKIP_PREFIXES) for name in names)


def test_load_bfloat16_runs_close_to_float32(env: Env, paddle_tiny: Path) -> None:
    model = mp.load(paddle_tiny / "config.json", paddle_tiny, dtype="bfloat16", device="cpu")
    assert model.dtype == mx.bfloat16
    inputs = env.inputs([_noise(200, 80, 18)])
    low = np.array(model.prefill(inputs, model.encode_images(inputs), None))
    high = np.array(env.mlx.prefill(inputs, env.mlx.encode_images(inputs), None))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.corrcoef(low.ravel(), high.ravel())[0, 1] > 0.99
