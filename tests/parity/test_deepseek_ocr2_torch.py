"""DeepSeek-OCR-2 on PyTorch against transformers 5.23.0, live, on the tiny real-layout checkpoint (float32, CPU).

transformers loads the ORIGINAL checkpoint through its own `from_pretrained` and conversion mapping: the test
writes transformers' config.json for the same sizes beside links to the snapshot's files. Its processor is the PIL
one (`DeepseekOcr2ImageProcessorPil`) with the snapshot's tokenizer; that tokenizer does not add BOS, so the
reference text starts with the BOS token written out (RULES: the model code adds it). RGBA and EXIF images are
handed to transformers already converted (RULES: alpha dropped, orientation applied; transformers composites on
white and ignores EXIF).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import deepseek_ocr2 as d2  # noqa: E402
from common.images import open_image  # noqa: E402
from common.model_config import DeepseekOCR2Config  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from torch_ocr import deepseek_ocr2 as tm  # noqa: E402

EOS = 1
BOS_TEXT = "<｜begin▁of▁sentence｜>"
NEW_TOKENS = 12
RTOL = 1e-4
MARKDOWN = "<image>\n<|grounding|>Convert the document to markdown."


def reference_config(cfg: DeepseekOCR2Config) -> transformers.DeepseekOcr2Config:
    """transformers' config for the sizes our parser read from the original config.json."""
    sam, enc, lm = cfg.sam, cfg.encoder, cfg.language
    sam_config = {"hidden_size": sam.width, "output_channels": sam.out_chans, "num_hidden_layers": sam.layers,
                  "num_attention_heads": sam.heads, "image_size": sam.image_size, "patch_size": sam.patch_size,
                  "window_size": sam.window_size, "global_attn_indexes": list(sam.global_attn_indexes),
                  "mlp_ratio": float(sam.mlp_ratio), "downsample_channels": list(sam.downsample_channels),
                  "layer_norm_eps": sam.layer_norm_eps}
    encoder_config = {"hidden_size": enc.hidden_size, "intermediate_size": enc.intermediate_size,
                      "num_hidden_layers": enc.num_hidden_layers, "num_attention_heads": enc.num_attention_heads,
                      "num_key_value_heads": enc.num_key_value_heads, "rms_norm_eps": enc.rms_norm_eps,
                      "rope_parameters": {"rope_type": "default", "rope_theta": enc.rope_theta}}
    text_config = {
        "vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
        "moe_intermediate_size": lm.moe_intermediate_size, "num_hidden_layers": lm.num_hidden_layers,
        "num_attention_heads": lm.num_attention_heads, "num_key_value_heads": lm.num_key_value_heads,
        "n_routed_experts": lm.n_routed_experts, "n_shared_experts": lm.n_shared_experts,
        "num_experts_per_tok": lm.num_experts_per_tok, "routed_scaling_factor": lm.routed_scaling_factor,
        "topk_method": lm.topk_method, "n_group": 1, "topk_group": 1, "rms_norm_eps": lm.rms_norm_eps,
        "max_position_embeddings": lm.max_position_embeddings, "bos_token_id": lm.bos_token_id,
        "eos_token_id": lm.eos_token_id,
        "mlp_layer_types": ["sparse" if lm.is_moe_layer(i) else "dense" for i in range(lm.num_hidden_layers)],
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta}}
    return transformers.DeepseekOcr2Config(vision_config={"sam_config": sam_config, "encoder_config": encoder_config},
                                           text_config=text_config, image_token_id=cfg.image_token_id)


class Env:
    """Both implementations of one snapshot, loaded once for the module."""

    def __init__(self, snapshot: Path, scratch: Path) -> None:
        reference_config(DeepseekOCR2Config.from_file(snapshot / "config.json")).save_pretrained(scratch)
        for name in os.listdir(snapshot):
            if name != "config.json":
                os.symlink(snapshot / name, scratch / name)
        self.ref, info = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(
            str(scratch), dtype=torch.float32, output_loading_info=True)
        assert not any(info.values()), info  # every original tensor mapped, none left over
        self.ref.eval()
        self.processor = transformers.DeepseekOcr2Processor(
            image_processor=transformers.DeepseekOcr2ImageProcessorPil(),
            tokenizer=transformers.AutoTokenizer.from_pretrained(str(snapshot)))
        self.ours = tm.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json")


@pytest.fixture(scope="module")
def env(deepseek2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(deepseek2_tiny, tmp_path_factory.mktemp("deepseek-ocr-2-reference"))


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth-ish random image (noise plus gradients) so resampling matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base * 0.6 + rng.integers(0, 102, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image if mode == "RGB" else image.convert(mode)


def _greedy_ours(env: Env, inputs: d2.DeepseekOCRInputs) -> tuple[torch.Tensor, list[int]]:
    model = env.ours
    cache = model.make_cache(1, len(inputs.input_ids) + NEW_TOKENS)
    logits = model.prefill(inputs, model.encode_images(inputs), cache)
    first, ids = logits, []
    for n in range(NEW_TOKENS):
        token = int(logits.argmax(-1))
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(torch.tensor([token]), torch.tensor([inputs.next_position + n]), cache)
    return first, ids


def _compare(env: Env, images: list[Image.Image], prompt: str = MARKDOWN,
             reference_images: list[Image.Image] | None = None) -> d2.DeepseekOCRInputs:
    """Prompt ids and pixels equal exactly, prefill logits within RTOL, greedy ids identical."""
    inputs = d2.build_inputs(prompt, images, env.tokenizer)
    ref_in = env.processor(images=(reference_images or images) or None, text=[BOS_TEXT + prompt.strip()],
                           return_tensors="pt")
    assert inputs.input_ids.tolist() == ref_in["input_ids"][0].tolist()
    ref_in.pop("attention_mask")
    if images:
        assert np.array_equal(np.stack([im.global_view for im in inputs.images]), ref_in["pixel_values"].numpy())
        tiles = [im.tiles for im in inputs.images if im.tiles.shape[0]]
        assert ref_in["num_local_patches"].tolist() == [im.tiles.shape[0] for im in inputs.images]
        if tiles:
            assert np.array_equal(np.concatenate(tiles), ref_in["pixel_values_local"].numpy())
    logits, ours_ids = _greedy_ours(env, inputs)
    with torch.no_grad():
        ref_logits = env.ref(**ref_in).logits[:, -1].float()
        generated = env.ref.generate(**ref_in, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=RTOL * float(ref_logits.abs().max()))
    assert ours_ids == generated[0, ref_in["input_ids"].shape[1]:].tolist()
    assert ours_ids[0] != EOS, "the tiny checkpoint must not stop at once"
    return inputs


# ------------------------------------------------------------------------------------------------ end to end

def test_small_image_is_not_tiled(env: Env) -> None:
    inputs = _compare(env, [_noise(300, 200, 1)])
    assert inputs.images[0].tiles.shape[0] == 0 and len(inputs.input_ids) == 1 + 256 + 1 + 9


def test_wide_page_gets_a_row_of_tiles(env: Env) -> None:
    inputs = _compare(env, [_noise(2000, 500, 2)])
    assert inputs.images[0].crop == (4, 1)


def test_tall_page_gets_a_column_of_tiles(env: Env) -> None:
    inputs = _compare(env, [_noise(400, 1600, 3)], prompt="<image>\nFree OCR.")
    assert inputs.images[0].crop == (1, 4)


def test_tiny_image_and_the_locate_prompt(env: Env) -> None:
    _compare(env, [_noise(9, 6, 4)], prompt="<image>\nLocate <|ref|>the title<|/ref|> in the image.")


def test_rgba_drops_alpha(env: Env) -> None:
    image = _noise(260, 90, 5).convert("RGBA")
    alpha = np.zeros((90, 260), dtype=np.uint8)
    alpha[:, 130:] = 255  # left half fully transparent: its stored colour must survive
    image.putalpha(Image.fromarray(alpha))
    rgb = image.convert("RGB")
    _compare(env, [rgb], reference_images=[rgb])


def test_grayscale_and_exif_rotation(env: Env) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    _noise(900, 300, 7).save(buf, "JPEG", quality=90, exif=exif)
    rotated = open_image(buf.getvalue())
    assert rotated.size == (300, 900)
    gray = _noise(500, 400, 8, mode="L").convert("RGB")
    _compare(env, [rotated, gray], prompt="<image>\n<image>\n<|grounding|>OCR this image.",
             reference_images=[ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"), gray])


def test_text_only_prompt(env: Env) -> None:
    _compare(env, [], prompt="Describe a table.")


def test_batched_vision_pass_equals_one_by_one(env: Env) -> None:
    """`encode_images_batch` stacks same-size views across prompts; each prompt's embeddings are unchanged."""
    batch = [d2.build_inputs(MARKDOWN, [_noise(w, h, s)], env.tokenizer) for w, h, s in
             ((1000, 900, 9), (300, 200, 10), (2000, 500, 11))]
    together = env.ours.encode_images_batch(batch)
    for inputs, embeds in zip(batch, together):
        torch.testing.assert_close(embeds, env.ours.encode_images(inputs), rtol=1e-5, atol=1e-5)
