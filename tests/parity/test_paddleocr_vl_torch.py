"""PaddleOCR-VL on PyTorch against transformers 5.23.0, live, on the tiny real-layout checkpoint (float32, CPU).

transformers loads the snapshot through its own `from_pretrained` (original names via its conversion mapping).
Its processor is fed the prompt text written out by hand from RULES.md 8 (one IMAGE_START + placeholder +
IMAGE_END per image), because its `apply_chat_template` passes `image_token` and loses the markers.
Two inputs are handed to transformers already converted, where RULES.md deliberately differs from its processor:
RGBA (transformers composites on white; the official pipeline drops alpha) and EXIF orientation (transformers
ignores it; the official loader applies it when opening a file).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import paddleocr_vl as pv  # noqa: E402
from common.images import open_image  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from torch_ocr import paddleocr_vl as tm  # noqa: E402

EOS = 2
NEW_TOKENS = 16
RTOL = 1e-4


class Env:
    """Both implementations of one snapshot, loaded once for the module."""

    def __init__(self, snapshot: Path) -> None:
        self.ref = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(
            str(snapshot), dtype=torch.float32).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(str(snapshot))
        self.ours = tm.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
        self.template = pv.load_chat_template(snapshot)
        self.pre = json.loads((snapshot / "preprocessor_config.json").read_text())


@pytest.fixture(scope="module")
def env(paddle_tiny: Path) -> Env:
    torch.manual_seed(0)
    return Env(paddle_tiny)


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth-ish random image (noise plus gradients) so resampling matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base * 0.6 + rng.integers(0, 102, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def _rgba() -> Image.Image:
    image = _noise(260, 90, 5).convert("RGBA")
    alpha = np.zeros((90, 260), dtype=np.uint8)
    alpha[:, 130:] = 255  # left half fully transparent: its stored colour must survive
    image.putalpha(Image.fromarray(alpha))
    return image


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    _noise(320, 120, 7).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def _reference_text(prompt: str, n_images: int) -> str:
    return ("<|begin_of_sentence|>User: " + "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" * n_images
            + prompt + "\nAssistant: ")


def _greedy_ours(env: Env, inputs: pv.PaddleOCRVLInputs) -> tuple[torch.Tensor, list[int]]:
    model = env.ours
    cache = model.make_cache(1, len(inputs.input_ids) + NEW_TOKENS)
    embeds = model.encode_images(inputs)
    logits = model.prefill(inputs, embeds, cache)
    first, ids = logits, []
    for n in range(NEW_TOKENS):
        token = int(logits.argmax(-1))
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return first, ids


def _compare(env: Env, images: list[Image.Image], prompt: str = "OCR:",
             reference_images: list[Image.Image] | None = None) -> list[int]:
    """Preprocessing equal exactly, prefill logits within RTOL, positions and greedy ids identical."""
    inputs = pv.build_inputs(prompt, images, env.tokenizer, env.template, env.pre)
    ref_in = env.processor(text=[_reference_text(prompt, len(images))], images=reference_images or images,
                           return_tensors="pt")
    assert inputs.input_ids.tolist() == ref_in["input_ids"][0].tolist()
    assert inputs.image_grid_thw.tolist() == ref_in["image_grid_thw"].tolist()
    ref_pixels = ref_in["pixel_values"].reshape(ref_in["pixel_values"].shape[0], -1).numpy()
    assert inputs.pixel_values.dtype == np.float32 and np.array_equal(inputs.pixel_values, ref_pixels)

    positions, _ = env.ref.model.get_rope_index(ref_in["input_ids"], ref_in["mm_token_type_ids"],
                                                ref_in["image_grid_thw"])
    assert np.array_equal(inputs.position_ids, positions[:, 0].numpy())

    logits, ours_ids = _greedy_ours(env, inputs)
    with torch.no_grad():
        ref_logits = env.ref(**ref_in).logits[:, -1].float()
        generated = env.ref.generate(**ref_in, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=RTOL * float(ref_logits.abs().max()))
    ref_ids = generated[0, ref_in["input_ids"].shape[1]:].tolist()
    assert ours_ids == ref_ids
    assert ours_ids[0] != EOS, "the tiny checkpoint must not stop at once"
    return ours_ids


# ------------------------------------------------------------------------------------------------ end to end

def test_short_text_line_upscaled(env: Env) -> None:
    image = _noise(300, 40, 1)
    _compare(env, [image])
    assert pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre).image_grid_thw.tolist() == \
        [[1, 12, 76]]


def test_large_page_above_max_pixels(env: Env) -> None:
    image = _noise(2480, 3508, 2)  # A4 at 300 dpi: 8.7 Mpx, resized down to the real max_pixels
    inputs = pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre)
    t, gh, gw = inputs.image_grid_thw[0].tolist()
    assert gh * gw * 196 <= env.pre["max_pixels"] and gh * gw // 4 > 2048  # past mlx-vlm's chunk size
    _compare(env, [image])


def test_very_wide_image(env: Env) -> None:
    _compare(env, [_noise(4000, 40, 3)])


def test_image_smaller_than_one_patch_row(env: Env) -> None:
    _compare(env, [_noise(9, 6, 4)])


def test_half_to_even_size(env: Env) -> None:
    image = _noise(1190, 742, 6)
    _compare(env, [image])
    grid = pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre).image_grid_thw
    assert grid.tolist() == [[1, 728 // 14, 1176 // 14]]


def test_rgba_alpha_dropped(env: Env) -> None:
    image = _rgba()
    _compare(env, [image], reference_images=[image.convert("RGB")])
    composited = env.processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
    ours = pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre).pixel_values
    assert not np.array_equal(ours, composited.reshape(composited.shape[0], -1))  # the documented deviation


def test_grayscale(env: Env) -> None:
    _compare(env, [_noise(240, 180, 8, mode="L")])


def test_exif_rotated_jpeg(env: Env) -> None:
    data = _exif_jpeg()
    ours = open_image(data)
    assert ours.size == (120, 320)  # portrait after the EXIF rotation
    _compare(env, [ours], reference_images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")])


def test_two_images_of_different_sizes(env: Env) -> None:
    _compare(env, [_noise(400, 300, 9), _noise(120, 700, 10)])


@pytest.mark.parametrize("task", sorted(pv.TASKS))
def test_task_prompts(env: Env, task: str) -> None:
    _compare(env, [_noise(500, 200, 11)], prompt=pv.TASKS[task])


def test_uncached_generation_equals_cached(env: Env) -> None:
    inputs = pv.build_inputs("OCR:", [_noise(300, 60, 12)], env.tokenizer, env.template, env.pre)
    _, cached = _greedy_ours(env, inputs)
    embeds = env.ours.encode_images(inputs)
    ids: list[int] = []
    for _ in range(len(cached)):
        ids.append(int(env.ours.prefill(inputs.extended(ids), embeds, None).argmax(-1)))
    assert ids == cached


def test_batched_step_equals_single(env: Env) -> None:
    inputs = pv.build_inputs("OCR:", [_noise(200, 80, 13)], env.tokenizer, env.template, env.pre)
    model = env.ours
    embeds = model.encode_images(inputs)
    caches = model.make_cache(2, len(inputs.input_ids) + 2)
    single = model.make_cache(1, len(inputs.input_ids) + 2)
    model.prefill(inputs, embeds, single)
    for layer, one in zip(caches, single):  # both rows start from the same prompt
        layer.update(one.keys[:, :, :one.offset].expand(2, -1, -1, -1),
                     one.values[:, :, :one.offset].expand(2, -1, -1, -1))
    pos = inputs.next_position
    both = model.step(torch.tensor([5, 900]), torch.tensor([pos, pos]), caches)
    alone = model.step(torch.tensor([900]), torch.tensor([pos]), single)
    torch.testing.assert_close(both[1:], alone, rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------------------------------------------ components

def _ref_inputs(env: Env, images: list[Image.Image]) -> dict:
    return env.processor(text=[_reference_text("OCR:", len(images))], images=images, return_tensors="pt")


def test_vision_encoder_and_projector(env: Env) -> None:
    images = [_noise(200, 120, 14), _noise(90, 300, 15)]
    ref_in = _ref_inputs(env, images)
    grid_thw = ref_in["image_grid_thw"]
    grids = [tuple(g) for g in grid_thw.tolist()]
    patches = ref_in["pixel_values"].reshape(ref_in["pixel_values"].shape[0], -1)
    with torch.no_grad():
        ref_features = env.ref.model.visual(pixel_values=ref_in["pixel_values"][None],
                                            grid_thw=grid_thw).last_hidden_state
        ours_features = env.ours.visual.vision_model(patches, grids)
        torch.testing.assert_close(ours_features, ref_features, rtol=RTOL, atol=1e-4)
        ref_proj = env.ref.model.projector(ref_features, grid_thw)
        ours_proj = env.ours.mlp_AR(ref_features, grids)
    torch.testing.assert_close(ours_proj, ref_proj, rtol=RTOL, atol=1e-5)
    assert ours_proj.shape == (sum(h * w // 4 for _, h, w in grids), env.ours.config.text.hidden_size)


def test_one_decoder_layer(env: Env) -> None:
    inputs = pv.build_inputs("OCR:", [_noise(150, 150, 16)], env.tokenizer, env.template, env.pre)
    positions = torch.from_numpy(inputs.position_ids)[:, None]  # (3, 1, L)
    hidden = torch.randn(1, positions.shape[-1], env.ours.config.text.hidden_size, generator=torch.Generator()
                         .manual_seed(0))
    with torch.no_grad():
        lm = env.ref.model.language_model
        cos_sin = lm.rotary_emb(hidden, position_ids=positions)
        ref_out = lm.layers[0](hidden, attention_mask=None, position_embeddings=cos_sin)
        cos, sin = env.ours.model.rope(positions, hidden.dtype)
        ours_out = env.ours.model.layers[0](hidden, cos, sin, None)
    torch.testing.assert_close(ours_out, ref_out, rtol=RTOL, atol=1e-5)


def test_checkpoint_is_sensitive_to_positions(env: Env) -> None:
    """The tiny weights must make a wrong position encoding visible, or the checks above prove little."""
    inputs = pv.build_inputs("OCR:", [_noise(300, 100, 17)], env.tokenizer, env.template, env.pre)
    embeds = env.ours.encode_images(inputs)
    right = env.ours.prefill(inputs, embeds, None)
    flat = np.broadcast_to(np.arange(len(inputs.input_ids)), (3, len(inputs.input_ids))).copy()
    from dataclasses import replace

    wrong = env.ours.prefill(replace(inputs, position_ids=flat), embeds, None)
    assert float((right - wrong).abs().max()) > 100 * RTOL * float(right.abs().max())


def test_bfloat16_close_to_reference_bfloat16(paddle_tiny: Path, env: Env) -> None:
    """bf16 is not bit-exact (the patch matmul and the table resize round differently); it stays close."""
    ref = transformers.PaddleOCRVLForConditionalGeneration.from_pretrained(
        str(paddle_tiny), dtype=torch.bfloat16).eval()
    ours = tm.load(paddle_tiny / "config.json", paddle_tiny, dtype="bfloat16", device="cpu")
    image = _noise(500, 300, 18)
    inputs = pv.build_inputs("OCR:", [image], env.tokenizer, env.template, env.pre)
    embeds = ours.encode_images(inputs)
    assert embeds.dtype == torch.bfloat16
    logits = ours.prefill(inputs, embeds, None)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        ref_logits = ref(**_ref_inputs(env, [image])).logits[:, -1].float()
    assert float((logits - ref_logits).abs().max()) < 0.05 * float(ref_logits.abs().max())
    assert int(logits.argmax()) == int(ref_logits.argmax())


@pytest.mark.parametrize("use_cache", [True, False])
def test_shared_generate_loop_matches_reference(paddle_tiny: Path, env: Env, use_cache: bool) -> None:
    """The backend's generate loop with the checkpoint's generation defaults gives transformers' greedy ids."""
    from dataclasses import replace

    from common.timing import Timings
    from torch_ocr.backend import load_model

    loaded = load_model("paddleocr-vl", paddle_tiny / "config.json", paddle_tiny, dtype="float32", device="cpu")
    options = pv.generation_defaults(json.loads((paddle_tiny / "generation_config.json").read_text()))
    options = replace(options, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
    images = [_noise(420, 90, 19)]
    inputs = pv.build_inputs("OCR:", images, env.tokenizer, env.template, env.pre)
    ids = [t.token_id for t in loaded.generate(inputs, options, Timings())]
    with torch.no_grad():
        generated = env.ref.generate(**_ref_inputs(env, images), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     use_cache=True)
    assert ids == generated[0, len(inputs.input_ids):].tolist()
