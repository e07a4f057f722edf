"""GLM-OCR on PyTorch against transformers 5.23.0, live, on the tiny real-layout checkpoint (float32, CPU).

transformers loads the snapshot with its own `from_pretrained`. Its `Glm46VProcessor` cannot be built here (its
video half needs torchvision), so the reference inputs come from its parts: the tokenizer renders the chat
template (`apply_chat_template`), `Glm46VImageProcessorPil` makes pixels and grids, and the processor's one text
rule (each `<|image|>` repeated grid.prod() / merge^2 times; `mm_token_type_ids` 1 on those) is applied by hand.
Two inputs are handed to transformers already converted, where we deliberately differ from its processor (as for
PaddleOCR-VL): RGBA (transformers composites on white; we drop alpha) and EXIF orientation (applied on open).
"""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import glm_ocr as g  # noqa: E402
from common.images import open_image  # noqa: E402
from common.paddleocr_vl import load_chat_template  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from tests.parity.test_paddleocr_vl_torch import _exif_jpeg, _noise, _rgba  # noqa: E402
from torch_ocr import glm_ocr as tm  # noqa: E402

EOS = (59246, 59253)
NEW_TOKENS = 16
RTOL = 1e-4


class Env:
    """Both implementations of one snapshot, loaded once for the module."""

    def __init__(self, snapshot: Path) -> None:
        from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

        self.ref = transformers.GlmOcrForConditionalGeneration.from_pretrained(
            str(snapshot), dtype=torch.float32).eval()
        self.image_processor = Glm46VImageProcessorPil.from_pretrained(str(snapshot))
        self.ref_tokenizer = transformers.AutoTokenizer.from_pretrained(str(snapshot))
        self.ref_tokenizer.chat_template = (snapshot / "chat_template.jinja").read_text()
        self.ours = tm.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")
        self.template = load_chat_template(snapshot)
        self.pre = json.loads((snapshot / "preprocessor_config.json").read_text())

    def reference_inputs(self, prompt: str, images: list[Image.Image]) -> dict:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]
        text = self.ref_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        pixels = self.image_processor(images=images, return_tensors="pt") if images else {}
        parts = text.split(g.IMAGE_TOKEN)
        grids = pixels["image_grid_thw"] if images else []
        text = parts[0] + "".join(g.IMAGE_TOKEN * int(grid.prod() // 4) + piece
                                  for grid, piece in zip(grids, parts[1:]))
        ids = self.ref_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == g.IMAGE_TOKEN_ID).int(), **pixels}


@pytest.fixture(scope="module")
def env(glm_tiny: Path) -> Env:
    return Env(glm_tiny)


def _greedy_ours(env: Env, inputs: g.GlmOcrInputs) -> tuple[torch.Tensor, list[int]]:
    model = env.ours
    cache = model.make_cache(1, len(inputs.input_ids) + NEW_TOKENS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = logits, []
    for n in range(NEW_TOKENS):
        token = int(logits.argmax(-1))
        ids.append(token)
        if token in EOS:
            break
        logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return first, ids


def _compare(env: Env, images: list[Image.Image], prompt: str = "Text Recognition:",
             reference_images: list[Image.Image] | None = None) -> list[int]:
    """Preprocessing equal exactly, prefill logits within RTOL, positions and greedy ids identical."""
    inputs = g.build_inputs(prompt, images, env.tokenizer, env.template, env.pre)
    ref_in = env.reference_inputs(prompt, reference_images or images)
    assert inputs.input_ids.tolist() == ref_in["input_ids"][0].tolist()
    if images:
        assert inputs.image_grid_thw.tolist() == ref_in["image_grid_thw"].tolist()
        assert inputs.pixel_values.dtype == np.float32
        assert np.array_equal(inputs.pixel_values, ref_in["pixel_values"].numpy())
        positions, _ = env.ref.model.get_rope_index(ref_in["input_ids"], ref_in["mm_token_type_ids"],
                                                    ref_in["image_grid_thw"])
        assert np.array_equal(inputs.position_ids, positions[:, 0].numpy())
    logits, ours_ids = _greedy_ours(env, inputs)
    with torch.no_grad():
        ref_logits = env.ref(**ref_in).logits[:, -1].float()
        generated = env.ref.generate(**ref_in, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=RTOL * float(ref_logits.abs().max()))
    assert ours_ids == generated[0, ref_in["input_ids"].shape[1]:].tolist()
    assert ours_ids[0] not in EOS, "the tiny checkpoint must not stop at once"
    return ours_ids


# ------------------------------------------------------------------------------------------------ end to end

def test_prompt_is_the_documented_sequence(env: Env) -> None:
    inputs = g.build_inputs("Text Recognition:", [_noise(56, 56, 0)], env.tokenizer, env.template, env.pre)
    ids = inputs.input_ids.tolist()
    n = int(inputs.image_grid_thw[0].prod()) // 4
    assert ids[:5] == [59248, 59250, 59253, 10, 59256] and ids[5:5 + n] == [59280] * n
    assert ids[5 + n] == 59257 and ids[-2:] == [59254, 10]


def test_short_text_line(env: Env) -> None:
    _compare(env, [_noise(300, 40, 1)])


def test_page_sized_image(env: Env) -> None:
    _compare(env, [_noise(1200, 900, 2)])


def test_wide_tall_tiny(env: Env) -> None:
    for seed, image in enumerate((_noise(3000, 40, 3), _noise(50, 1400, 4), _noise(9, 6, 5))):
        _compare(env, [image])


def test_smart_resize_equals_reference_over_many_sizes() -> None:
    from transformers.models.glm46v.image_processing_pil_glm46v import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (5, 900), (27, 28), (28, 28), (742, 1190), (3508, 2480), (9000, 7000), (20, 3900)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    for h, w in sizes:
        try:
            want = smart_resize(2, h, w, factor=28, min_pixels=12544, max_pixels=9633792)
        except ValueError:
            with pytest.raises(Exception, match="aspect ratio"):
                g.smart_resize(h, w, factor=28, min_pixels=12544, max_pixels=9633792)
            continue
        assert g.smart_resize(h, w, factor=28, min_pixels=12544, max_pixels=9633792) == want, (h, w)


def test_rgba_alpha_dropped(env: Env) -> None:
    image = _rgba()
    _compare(env, [image], reference_images=[image.convert("RGB")])


def test_grayscale(env: Env) -> None:
    _compare(env, [_noise(240, 180, 8, mode="L")])


def test_exif_rotated_jpeg(env: Env) -> None:
    data = _exif_jpeg()
    ours = open_image(data)
    assert ours.size == (120, 320)
    _compare(env, [ours], reference_images=[ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")])


def test_two_images_of_different_sizes(env: Env) -> None:
    _compare(env, [_noise(400, 300, 9), _noise(120, 700, 10)])


def test_text_only_prompt(env: Env) -> None:
    _compare(env, [], prompt="Hello there")


@pytest.mark.parametrize("task", sorted(g.TASKS))
def test_task_prompts(env: Env, task: str) -> None:
    _compare(env, [_noise(500, 200, 11)], prompt=g.TASKS[task])


def test_uncached_generation_equals_cached(env: Env) -> None:
    inputs = g.build_inputs("Text Recognition:", [_noise(300, 60, 12)], env.tokenizer, env.template, env.pre)
    _, cached = _greedy_ours(env, inputs)
    embeds = env.ours.encode_images(inputs)
    ids: list[int] = []
    for _ in range(len(cached)):
        ids.append(int(env.ours.prefill(inputs.extended(ids), embeds, None).argmax(-1)))
    assert ids == cached


def test_batched_encode_equals_single(env: Env) -> None:
    a = g.build_inputs("Text Recognition:", [_noise(200, 80, 13)], env.tokenizer, env.template, env.pre)
    b = g.build_inputs("Table Recognition:", [_noise(90, 150, 14), _noise(60, 60, 15)], env.tokenizer,
                       env.template, env.pre)
    both = env.ours.encode_images_batch([a, b])
    for got, inputs in zip(both, (a, b)):
        torch.testing.assert_close(got, env.ours.encode_images(inputs), rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------------------------------------------ components

def test_vision_tower(env: Env) -> None:
    images = [_noise(200, 120, 14), _noise(90, 300, 15)]
    ref_in = env.reference_inputs("Text Recognition:", images)
    grids = [tuple(grid) for grid in ref_in["image_grid_thw"].tolist()]
    with torch.no_grad():
        ref_out = env.ref.model.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"]).pooler_output
        ours = env.ours.model.visual(ref_in["pixel_values"], grids)
    torch.testing.assert_close(ours, ref_out, rtol=RTOL, atol=1e-5)


def test_one_decoder_layer(env: Env) -> None:
    inputs = g.build_inputs("Text Recognition:", [_noise(150, 150, 16)], env.tokenizer, env.template, env.pre)
    positions = torch.from_numpy(inputs.position_ids)[:, None]
    hidden = torch.randn(1, positions.shape[-1], env.ours.config.text.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm = env.ref.model.language_model
        ref_out = lm.layers[0](hidden, attention_mask=None, position_embeddings=lm.rotary_emb(hidden, positions))
        cos, sin = env.ours.decoder.rope(positions, hidden.dtype)
        ours_out = env.ours.decoder.layers[0](hidden, cos, sin, None)
    # The reference without a mask attends bidirectionally; compare the last row, which sees everything either way.
    torch.testing.assert_close(ours_out[:, -1], ref_out[:, -1], rtol=RTOL, atol=1e-5)


def test_checkpoint_is_sensitive_to_positions(env: Env) -> None:
    inputs = g.build_inputs("Text Recognition:", [_noise(300, 100, 17)], env.tokenizer, env.template, env.pre)
    embeds = env.ours.encode_images(inputs)
    right = env.ours.prefill(inputs, embeds, None)
    flat = np.broadcast_to(np.arange(len(inputs.input_ids)), (3, len(inputs.input_ids))).copy()
    wrong = env.ours.prefill(replace(inputs, position_ids=flat), embeds, None)
    assert float((right - wrong).abs().max()) > 100 * RTOL * float(right.abs().max())


def test_mtp_layer_is_skipped_by_index(glm_tiny: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(glm_tiny / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    skip = tm.mtp_skipper(2)
    skipped = {n for n in names if skip(n)}
    assert skipped and all(n.startswith("model.language_model.layers.2.") for n in skipped)
    assert not tm.mtp_skipper(3)("model.language_model.layers.2.enorm.weight")


def test_bfloat16_close_to_reference_bfloat16(glm_tiny: Path, env: Env) -> None:
    ref = transformers.GlmOcrForConditionalGeneration.from_pretrained(str(glm_tiny), dtype=torch.bfloat16).eval()
    ours = tm.load(glm_tiny / "config.json", glm_tiny, dtype="bfloat16", device="cpu")
    image = _noise(500, 300, 18)
    inputs = g.build_inputs("Text Recognition:", [image], env.tokenizer, env.template, env.pre)
    logits = ours.prefill(inputs, ours.encode_images(inputs), None)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        ref_logits = ref(**env.reference_inputs("Text Recognition:", [image])).logits[:, -1].float()
    assert float((logits - ref_logits).abs().max()) < 0.05 * float(ref_logits.abs().max())
    assert int(logits.argmax()) == int(ref_logits.argmax())


@pytest.mark.parametrize("use_cache", [True, False])
def test_shared_generate_loop_matches_reference(glm_tiny: Path, env: Env, use_cache: bool) -> None:
    """The backend's generate loop with the checkpoint's generation defaults gives transformers' greedy ids."""
    from common.timing import Timings
    from torch_ocr.backend import load_model

    loaded = load_model("glm-ocr", glm_tiny / "config.json", glm_tiny, dtype="float32", device="cpu")
    options = g.generation_defaults(json.loads((glm_tiny / "generation_config.json").read_text()))
    assert set(options.stop_token_ids) == set(EOS)
    options = replace(options, max_new_tokens=NEW_TOKENS, use_cache=use_cache)
    images = [_noise(420, 90, 19)]
    inputs = g.build_inputs("Text Recognition:", images, env.tokenizer, env.template, env.pre)
    ids = [t.token_id for t in loaded.generate(inputs, options, Timings())]
    with torch.no_grad():
        generated = env.ref.generate(**env.reference_inputs("Text Recognition:", images),
                                     max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    assert ids == generated[0, len(inputs.input_ids):].tolist()
