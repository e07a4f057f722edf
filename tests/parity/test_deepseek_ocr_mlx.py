"""DeepSeek-OCR on MLX against the PyTorch backend, on the tiny real-layout checkpoint (float32, MLX on CPU).

The torch backend is held to transformers' blocks and the official code elsewhere; here the MLX model must give
the same prefill logits (1e-4 relative to the largest logit) and the same greedy ids over image cases that
exercise every table resize (SAM grids 32 / 40 / 64, CLIP 8 / 10 / 16), window padding, tiling, the image
kinds of the preprocessing goldens and two images in one prompt; then component checks, the resize maps
against `F.interpolate`, strict loading and cache equivalence. Views stay at 512/640 where they can: MLX's CPU
matmul is slow, and a 1024 view (4096-token global attention, the default mode) is one case only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

import torch.nn.functional as F  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from common import deepseek_ocr as cd  # noqa: E402
from common.errors import CheckpointError  # noqa: E402
from common.images import open_image  # noqa: E402
from common.tokenizer import Tokenizer  # noqa: E402
from mlx_ocr import deepseek_ocr as md  # noqa: E402
from mlx_ocr.loader import interpolation_matrix, resize_table  # noqa: E402
from tests.goldens.deepseek_ocr.patterns import make_image, png_bytes  # noqa: E402
from torch_ocr import deepseek_ocr as td  # noqa: E402

pytestmark = pytest.mark.mlx

EOS = 1
NEW_TOKENS = 8
RTOL = 1e-4
FREE_OCR = "<image>\nFree OCR."
GROUNDING = "<image>\n<|grounding|>Convert the document to markdown."


class Env:
    def __init__(self, snapshot: Path) -> None:
        mx.set_default_device(mx.cpu)
        self.snapshot = snapshot
        self.torch = td.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.mlx = md.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
        self.tokenizer = Tokenizer.from_files(snapshot / "tokenizer.json", snapshot / "tokenizer_config.json")

    def inputs(self, prompt: str, images: list, *, base: int, size: int, crop: bool) -> cd.DeepseekOCRInputs:
        return cd.build_inputs(prompt, images, self.tokenizer, base_size=base, image_size=size, crop_mode=crop)


@pytest.fixture(scope="module")
def env(deepseek_tiny: Path) -> Env:
    return Env(deepseek_tiny)


def _image(kind: str, width: int, height: int, seed: int):
    """A goldens pattern image, saved as PNG and opened the way the pipeline opens files."""
    return open_image(png_bytes(make_image(kind, width, height, seed)))


def greedy_mlx(model: md.DeepseekOCRForCausalLM, inputs: cd.DeepseekOCRInputs, steps: int,
               embeds=None) -> tuple[np.ndarray, list[int]]:
    cache = model.make_cache(1, len(inputs.input_ids) + steps)
    logits = model.prefill(inputs, model.encode_images(inputs) if embeds is None else embeds, cache)
    first, ids = np.array(logits), []
    for n in range(steps):
        token = int(mx.argmax(logits, axis=-1).item())
        ids.append(token)
        if token == EOS:
            break
        logits = model.step(mx.array([token]), mx.array([inputs.next_position + n]), cache)
    return first, ids


def greedy_torch(model: td.DeepseekOCRForCausalLM, inputs: cd.DeepseekOCRInputs,
                 steps: int) -> tuple[np.ndarray, list[int]]:
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


# name, prompt, images (kind, width, height, seed), base_size, image_size, crop_mode
CASES = [
    ("text_only", "Describe a receipt.", [], 512, 512, False),
    ("nocrop_512_rgb", FREE_OCR, [("rgb", 300, 200, 1)], 512, 512, False),
    ("nocrop_640_palette", GROUNDING, [("palette", 500, 300, 2)], 640, 640, False),
    ("crop_small_gray_base512", FREE_OCR, [("gray", 400, 300, 3)], 512, 640, True),
    ("crop_tiled_rgba_base512", FREE_OCR, [("rgba", 900, 420, 4)], 512, 640, True),
    ("two_images_nocrop_512", "<image>\n<image>\nCompare.", [("rgb", 120, 330, 5), ("gray", 640, 90, 6)],
     512, 512, False),
    ("crop_tiled_base1024", FREE_OCR, [("rgb", 1000, 560, 7)], 1024, 640, True),  # the default mode
]


@pytest.mark.parametrize("name, prompt, images, base, size, crop", CASES, ids=[c[0] for c in CASES])
def test_prefill_logits_and_greedy_ids_equal_torch(env: Env, name: str, prompt: str, images: list, base: int,
                                                   size: int, crop: bool) -> None:
    inputs = env.inputs(prompt, [_image(*spec) for spec in images], base=base, size=size, crop=crop)
    if name.startswith("crop_tiled"):
        assert inputs.images[0].tiles.shape[0] >= 2
    ours, ours_ids = greedy_mlx(env.mlx, inputs, NEW_TOKENS)
    ref, ref_ids = greedy_torch(env.torch, inputs, NEW_TOKENS)
    assert_logits_close(ours, ref)
    assert ours_ids == ref_ids
    assert ours_ids[0] != EOS, "the tiny checkpoint must not stop at once"


def test_image_embeddings_equal_torch(env: Env) -> None:
    inputs = env.inputs(FREE_OCR, [_image("rgb", 900, 500, 8)], base=512, size=640, crop=True)
    ours = np.array(env.mlx.encode_images(inputs))
    ref = env.torch.encode_images(inputs).numpy()
    assert ours.shape == ref.shape == (int((inputs.input_ids == 128815).sum()), env.mlx.config.n_embed)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=1e-4 * float(np.abs(ref).max()))


def test_uncached_generation_equals_cached(env: Env) -> None:
    inputs = env.inputs(FREE_OCR, [_image("rgb", 200, 150, 9)], base=512, size=512, crop=False)
    embeds = env.mlx.encode_images(inputs)
    _, cached = greedy_mlx(env.mlx, inputs, 5, embeds)
    ids: list[int] = []
    for _ in range(len(cached)):
        ids.append(int(mx.argmax(env.mlx.prefill(inputs.extended(ids), embeds, None), axis=-1).item()))
    assert ids == cached


def test_text_only_batched_step_equals_single(env: Env) -> None:
    inputs = env.inputs("Hello there, general", [], base=512, size=512, crop=False)
    model = env.mlx
    both, single = model.make_cache(2, 64), model.make_cache(1, 64)
    model.prefill(inputs, None, single)
    for layer, one in zip(both, single):
        k, v = one.keys[:, :, :one.offset], one.values[:, :, :one.offset]
        layer.update(mx.concatenate([k, k]), mx.concatenate([v, v]))
    pos = inputs.next_position
    pair = model.step(mx.array([5, 900]), mx.array([pos, pos]), both)
    alone = model.step(mx.array([900]), mx.array([pos]), single)
    np.testing.assert_allclose(np.array(pair[1:]), np.array(alone), rtol=RTOL, atol=1e-5)
    with torch.inference_mode():
        tc = env.torch.make_cache(1, 64)
        env.torch.prefill(inputs, None, tc)
        ref = env.torch.step(torch.tensor([900]), torch.tensor([pos]), tc).numpy()
    assert_logits_close(np.array(alone), ref)


# ----------------------------------------------------------------------------------------------- components

def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_sam_blocks_equal_torch(env: Env) -> None:
    width = env.mlx.config.sam.width
    for ours, ref in zip(env.mlx.model.sam_model.blocks, env.torch.model.sam_model.blocks):
        for grid in (32, 40):  # 512 and 640 views: rel-pos resized in global blocks, 40 padded to 42 in windowed
            x = _random((1, grid, grid, width), grid)
            with torch.inference_mode():
                expected = ref(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(np.array(ours(mx.array(x))), expected, atol=1e-4, err_msg=f"{grid}")


def test_sam_neck_and_downsample_equal_torch(env: Env) -> None:
    sam_m, sam_t = env.mlx.model.sam_model, env.torch.model.sam_model
    x = _random((2, 20, 20, env.mlx.config.sam.width), 1)
    y = mx.array(x)
    for layer in sam_m.neck:
        y = layer(y)
    y = sam_m.net_3(sam_m.net_2(y))
    with torch.inference_mode():
        expected = sam_t.net_3(sam_t.net_2(sam_t.neck(torch.from_numpy(x).permute(0, 3, 1, 2))))
    np.testing.assert_allclose(np.array(y), expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_clip_tower_equals_torch(env: Env) -> None:
    channels = env.mlx.config.sam.downsample_channels[-1]
    for n in (8, 10, 16):  # 512, 640, 1024 views: the position table resized, or not
        x = _random((2, n, n, channels), n)
        with torch.inference_mode():
            expected = env.torch.model.vision_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(np.array(env.mlx.model.vision_model(mx.array(x))), expected, atol=1e-4)


def test_decoder_layers_equal_torch(env: Env) -> None:
    """Layer 0 is the dense MLP, layer 1 the MoE; positions 3..L+2 so the RoPE offset matters."""
    lm = env.mlx.config.language
    length = 37
    x = _random((1, length, lm.hidden_size), 2)
    positions = np.arange(3, 3 + length)[None]
    with torch.inference_mode():
        cos, sin = td.rope_tables(env.torch.model.rope_inv_freq, torch.from_numpy(positions), torch.float32)
        for index in (0, 1):
            expected = env.torch.model.layers[index](torch.from_numpy(x), cos, sin, None).numpy()
            ours = env.mlx.model.layers[index](mx.array(x), mx.array(3), None)
            np.testing.assert_allclose(np.array(ours), expected, atol=1e-4, err_msg=f"layer {index}")


def test_router_chooses_the_same_experts(env: Env) -> None:
    x = _random((50, env.mlx.config.language.hidden_size), 3)
    weights, ids = env.mlx.model.layers[1].mlp.gate(mx.array(x))
    with torch.inference_mode():
        ref_w, ref_ids = env.torch.model.layers[1].mlp.gate(torch.from_numpy(x))
    order, ref_order = np.argsort(np.array(ids), -1), ref_ids.argsort(-1).numpy()
    np.testing.assert_array_equal(np.take_along_axis(np.array(ids), order, -1),
                                  np.take_along_axis(ref_ids.numpy(), ref_order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.array(weights), order, -1),
                               np.take_along_axis(ref_w.numpy(), ref_order, -1), atol=1e-6)


@pytest.mark.parametrize("in_size, out_size", [(64, 32), (64, 40), (64, 80), (16, 8), (16, 10), (16, 20)])
def test_bicubic_antialias_map_equals_interpolate(in_size: int, out_size: int) -> None:
    table = _random((in_size, in_size, 6), in_size + out_size)
    ref = F.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=(out_size, out_size), mode="bicubic",
                        antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    ours = np.array(resize_table(mx.array(table), (out_size, out_size), "bicubic_aa"))
    # Weights agree to a few float32 ulps; the tables are unit-variance.
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("out_size", [63, 79, 159])
def test_linear_map_equals_interpolate(out_size: int) -> None:
    table = _random((127, 5), out_size)
    ref = F.interpolate(torch.from_numpy(table).t()[None], size=out_size, mode="linear")[0].t().numpy()
    np.testing.assert_allclose(interpolation_matrix(127, out_size, "linear") @ table, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------- loading

def test_load_layout(env: Env) -> None:
    params = dict(tree_flatten(env.mlx.parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    moe = env.mlx.model.layers[1].mlp.experts
    lm = env.mlx.config.language
    assert moe.gate_proj.weight.shape == (lm.n_routed_experts, lm.moe_intermediate_size, lm.hidden_size)
    assert moe.down_proj.weight.shape == (lm.n_routed_experts, lm.hidden_size, lm.moe_intermediate_size)
    ref = env.torch.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(np.array(moe.gate_proj.weight), ref[:, :lm.moe_intermediate_size])
    np.testing.assert_array_equal(np.array(moe.up_proj.weight), ref[:, lm.moe_intermediate_size:])
    conv = env.torch.model.sam_model.net_2.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(env.mlx.model.sam_model.net_2.weight), conv.transpose(0, 2, 3, 1))
    assert "model.sam_model.neck.0.weight" in params and "model.sam_model.pos_embed" in params


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
    (shard,) = src.glob("*.safetensors")  # the tiny snapshot has one shard (and the index naming it)
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(dst / shard.name))
    return dst


def test_strict_load_names_missing_unexpected_and_misshaped(deepseek_tiny: Path, tmp_path: Path) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        del t["model.norm.weight"]
        t["model.extra.weight"] = np.zeros(3, np.float32)
        t["model.view_seperator"] = np.zeros(5, np.float32)

    snapshot = _copy_with(deepseek_tiny, tmp_path / "edited", edit)
    with pytest.raises(CheckpointError) as err:
        md.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")
    message = str(err.value)
    assert "model.norm.weight" in message and "model.extra.weight" in message
    assert "model.view_seperator" in message


def test_strict_load_names_a_missing_expert_matrix(deepseek_tiny: Path, tmp_path: Path) -> None:
    snapshot = _copy_with(deepseek_tiny, tmp_path / "edited",
                          lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        md.load(snapshot / "config.json", snapshot, dtype="float32", device="cpu")


def test_load_bfloat16_runs_close_to_float32(env: Env) -> None:
    model = md.load(env.snapshot / "config.json", env.snapshot, dtype="bfloat16", device="cpu")
    assert model.dtype == mx.bfloat16
    inputs = env.inputs(FREE_OCR, [_image("rgb", 200, 150, 10)], base=512, size=512, crop=False)
    embeds = model.encode_images(inputs)
    assert embeds.dtype == mx.bfloat16
    low = np.array(model.prefill(inputs, embeds, None))
    high = np.array(env.mlx.prefill(inputs, env.mlx.encode_images(inputs), None))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.corrcoef(low.ravel(), high.ravel())[0, 1] > 0.99


def test_cpu_low_precision_expert_path_equals_gather_mm(env: Env) -> None:
    """The per-expert fallback (MLX's CPU gather_mm is float32-only) computes what SwitchGLU computes."""
    experts = env.mlx.model.layers[1].mlp.experts
    x = mx.array(_random((40, env.mlx.config.language.hidden_size), 4))
    _, ids = env.mlx.model.layers[1].mlp.gate(x)
    np.testing.assert_allclose(np.array(experts._each_expert(x, ids)),
                               np.array(super(md.RoutedExperts, experts).__call__(x, ids)), atol=1e-5)


def test_resolve_device_and_dtype_errors(deepseek_tiny: Path) -> None:
    from common.errors import UserError
    from mlx_ocr.loader import resolve_device

    assert resolve_device("cpu") == "cpu" and mx.default_device() == mx.cpu
    if not mx.metal.is_available():
        with pytest.raises(UserError, match="Metal"):
            resolve_device("metal")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="unknown dtype"):
        md.load(deepseek_tiny / "config.json", deepseek_tiny, dtype="float64", device="cpu")
    mx.set_default_device(mx.cpu)
