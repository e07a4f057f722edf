"""torch_ocr.deepseek_ocr on the tiny real-layout checkpoint: loading, image layout, cache equivalence, components.

Component checks hold our blocks equal to transformers' own implementations given the same weights (SAM vision
layer and neck, CLIP encoder layer with quick_gelu, Llama attention/decoder layer with half-split RoPE,
DeepSeek-V2 MoE and RMSNorm). Full-model parity against the official remote code lives in tests/parity/.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.deepseek_ocr import DeepseekOCRImage, DeepseekOCRInputs
from common.errors import CheckpointError
from torch_ocr import deepseek_ocr as ds

IMAGE = 128815
BOS = 0


@pytest.fixture(scope="module")
def model(deepseek_tiny: Path) -> ds.DeepseekOCRForCausalLM:
    torch.manual_seed(0)
    return ds.load(deepseek_tiny / "config.json", deepseek_tiny, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def encoded(model: ds.DeepseekOCRForCausalLM) -> dict[str, tuple[DeepseekOCRInputs, torch.Tensor]]:
    """Prompts with one image each and their embeddings, encoded once (SAM at real sizes is the slow part)."""
    prompts = {
        "global_1024": _inputs((_image(0, 1024),), [273], [300, 400, 500]),
        "tiled_2x1": _inputs((_image(1, 1024, (2, 1)),), [483], [300, 400, 500]),
        "global_640": _inputs((_image(2, 640),), [111], [300, 301]),
    }
    return {name: (inputs, model.encode_images(inputs)) for name, inputs in prompts.items()}


def _view(rng: np.random.Generator, size: int, count: int | None = None) -> np.ndarray:
    shape = (3, size, size) if count is None else (count, 3, size, size)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def _image(seed: int, base: int, tiles: tuple[int, int] | None = None, tile: int = 640) -> DeepseekOCRImage:
    rng = np.random.default_rng(seed)
    if tiles is None:
        return DeepseekOCRImage(global_view=_view(rng, base), tiles=np.zeros((0, 3, tile, tile), np.float32),
                                crop=(1, 1))
    return DeepseekOCRImage(global_view=_view(rng, base), tiles=_view(rng, tile, tiles[0] * tiles[1]), crop=tiles)


def _inputs(images: tuple[DeepseekOCRImage, ...], counts: list[int], text: list[int]) -> DeepseekOCRInputs:
    ids = [BOS]
    for count in counts:
        ids += [IMAGE] * count + [201]
    return DeepseekOCRInputs(input_ids=np.array(ids + text, dtype=np.int64), images=images)


# ----------------------------------------------------------------------------------------------- loading

def test_load_gives_real_tensors_in_the_asked_dtype(model: ds.DeepseekOCRForCausalLM) -> None:
    tensors = list(model.state_dict().values()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert not any(t.is_meta for t in tensors)
    assert torch.all(model.model.rope_inv_freq > 0)
    assert not torch.is_grad_enabled() or not any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_load_bfloat16(deepseek_tiny: Path, model: ds.DeepseekOCRForCausalLM, encoded) -> None:
    half = ds.load(deepseek_tiny / "config.json", deepseek_tiny, dtype="bfloat16", device="cpu")
    assert half.dtype == torch.bfloat16
    inputs, ref_embeds = encoded["global_640"]
    embeds = half.encode_images(inputs)
    assert embeds.dtype == torch.bfloat16
    assert torch.corrcoef(torch.stack([embeds.float().flatten(), ref_embeds.flatten()]))[0, 1] > 0.99
    low = half.prefill(inputs, embeds, None)
    assert low.dtype == torch.float32
    ref = model.prefill(inputs, ref_embeds, None)
    # bfloat16 tracks float32 loosely: strongly correlated logits, not bit-equal.
    assert torch.corrcoef(torch.stack([low[0], ref[0]]))[0, 1] > 0.98


def _copy_with(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (dst / "model.safetensors.index.json").unlink()
    path = dst / "model-00001-of-000001.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dst


def test_strict_load_names_missing_unexpected_and_misshaped(deepseek_tiny: Path, tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.0.self_attn.k_proj.weight"]
        t["model.sam_model.extra.weight"] = torch.zeros(2)
        t["model.view_seperator"] = torch.zeros(3)

    broken = _copy_with(deepseek_tiny, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        ds.load(broken / "config.json", broken, dtype="float32", device="cpu")
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert "model.sam_model.extra.weight" in message
    assert "model.view_seperator" in message


def test_strict_load_names_a_missing_expert_matrix(deepseek_tiny: Path, tmp_path: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.2.mlp.experts.5.up_proj.weight"]

    broken = _copy_with(deepseek_tiny, tmp_path / "expert", edit)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        ds.load(broken / "config.json", broken, dtype="float32", device="cpu")


def test_sanitize_stacks_experts_gate_first(model: ds.DeepseekOCRForCausalLM, deepseek_tiny: Path) -> None:
    from safetensors.torch import load_file

    raw = load_file(deepseek_tiny / "model-00001-of-000001.safetensors")
    stacked = model.model.layers[1].mlp.experts
    i = model.config.language.moe_intermediate_size
    assert torch.equal(stacked.gate_up_proj[4, :i], raw["model.layers.1.mlp.experts.4.gate_proj.weight"])
    assert torch.equal(stacked.gate_up_proj[4, i:], raw["model.layers.1.mlp.experts.4.up_proj.weight"])
    assert torch.equal(stacked.down_proj[7], raw["model.layers.1.mlp.experts.7.down_proj.weight"])


# ----------------------------------------------------------------------------------------------- images

def test_encode_images_token_counts(model: ds.DeepseekOCRForCausalLM, encoded) -> None:
    assert model.encode_images(_inputs((), [], [5])) is None
    hidden = model.config.n_embed
    assert encoded["global_1024"][1].shape == (273, hidden)
    assert encoded["tiled_2x1"][1].shape == (483, hidden)
    assert encoded["global_640"][1].shape == (111, hidden)
    small = encoded["global_640"][1]
    image = encoded["global_640"][0].images[0]
    two = model.encode_images(_inputs((image, image), [111, 111], [5]))
    assert torch.allclose(two, torch.cat([small, small]), atol=1e-5)
    with pytest.raises(ValueError, match="image tokens"):
        model.encode_images(_inputs((image,), [110], [5]))


def test_tiled_layout_is_rows_of_tiles_then_global_then_separator(model: ds.DeepseekOCRForCausalLM) -> None:
    # 512-pixel views (n = 8) keep this cheap; the layout does not depend on the view size.
    wide, high, n = 3, 2, 8
    image = _image(4, 512, (wide, high), tile=512)
    out = model.encode_images(_inputs((image,), [(n + 1) * n + 1 + (n * wide + 1) * n * high], [5]))
    m = model.model
    with torch.inference_mode():
        tiles = m.image_features(torch.from_numpy(image.tiles)).view(wide * high, n, n, -1)
        glob = m.image_features(torch.from_numpy(image.global_view[None])).view(n, n, -1)
    newline, sep = m.image_newline, m.view_seperator
    row_len = n * wide + 1
    for r in range(n * high):
        row = out[r * row_len:(r + 1) * row_len]
        for c in range(n * wide):
            # Tile k sits at column k % wide, row k // wide (row-major cut of the resized image).
            k = (r // n) * wide + c // n
            assert torch.allclose(row[c], tiles[k, r % n, c % n], atol=1e-5), (r, c)
        assert torch.equal(row[-1], newline)
    start = n * high * row_len
    for r in range(n):
        row = out[start + r * (n + 1):start + (r + 1) * (n + 1)]
        assert torch.allclose(row[:n], glob[r], atol=1e-5)
        assert torch.equal(row[n], newline)
    assert torch.equal(out[-1], sep) and out.shape[0] == start + n * (n + 1) + 1


def test_image_embeddings_replace_image_tokens_in_order(model: ds.DeepseekOCRForCausalLM, encoded) -> None:
    inputs, embeds = encoded["global_640"]
    base = model.prefill(inputs, embeds, None)
    shuffled = model.prefill(inputs, embeds.flip(0), None)
    assert not torch.allclose(base, shuffled, atol=1e-3)
    with pytest.raises(ValueError, match="image"):
        model.prefill(inputs, embeds[:-1], None)


# ----------------------------------------------------------------------------------------------- decoding

def _greedy_with_cache(model, inputs, embeds, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = model.make_cache(1, inputs.input_ids.size + steps)
    logits = model.prefill(inputs, embeds, cache)
    ids, all_logits = [], [logits]
    for i in range(steps):
        token = logits.argmax(-1)
        ids.append(int(token))
        logits = model.step(token, torch.tensor([inputs.next_position + i]), cache)
        all_logits.append(logits)
    return ids, all_logits


@pytest.mark.parametrize("prompt", ["global_1024", "tiled_2x1"])
@pytest.mark.slow
def test_cached_decoding_equals_full_forward(model: ds.DeepseekOCRForCausalLM, encoded, prompt: str) -> None:
    inputs, embeds = encoded[prompt]
    ids, cached = _greedy_with_cache(model, inputs, embeds, 6)
    for n in range(len(ids) + 1):
        full = model.prefill(inputs.extended(ids[:n]), embeds, None)
        assert torch.allclose(cached[n], full, atol=2e-4, rtol=1e-4), n
    assert ids[0] != model.config.language.eos_token_id


def test_text_only_and_batched_step(model: ds.DeepseekOCRForCausalLM) -> None:
    inputs = DeepseekOCRInputs(input_ids=np.array([BOS, 300, 301, 302], dtype=np.int64))
    single = model.make_cache(1, 8)
    logits = model.prefill(inputs, None, single)
    token = logits.argmax(-1)
    one = model.step(token, torch.tensor([4]), single)
    double = model.make_cache(2, 8)
    for layer, src in zip(double, single):
        # Two identical sequences in a batch of two: copy the prompt's cache into both rows.
        layer.update(src.keys[:, :, :4].expand(2, -1, -1, -1), src.values[:, :, :4].expand(2, -1, -1, -1))
    two = model.step(token.expand(2), torch.tensor([4, 4]), double)
    assert two.shape == (2, model.config.language.vocab_size)
    assert torch.allclose(two[0], one[0], atol=1e-5) and torch.allclose(two[1], one[0], atol=1e-5)


def test_chunked_prompt_with_cache_equals_one_pass(model: ds.DeepseekOCRForCausalLM) -> None:
    m = model.model
    ids = torch.tensor([[BOS, 10, 20, 30, 40, 50, 60]])
    with torch.inference_mode():
        embeds = m.embed_tokens(ids)
        whole = m.decode(embeds, torch.arange(7)[None], None)
        cache = model.make_cache(1, 7)
        first = m.decode(embeds[:, :3], torch.arange(3)[None], cache)
        rest = m.decode(embeds[:, 3:], torch.arange(3, 7)[None], cache)
    assert torch.allclose(torch.cat([first, rest], 1), whole, atol=1e-5)


def test_positions_matter_relatively(model: ds.DeepseekOCRForCausalLM) -> None:
    m = model.model
    ids = torch.tensor([[BOS, 10, 20, 30]])
    with torch.inference_mode():
        embeds = m.embed_tokens(ids)
        a = m.decode(embeds, torch.arange(4)[None], None)
        shifted = m.decode(embeds, torch.arange(4)[None] + 7, None)
        spread = m.decode(embeds, 2 * torch.arange(4)[None], None)
    # RoPE sees only position differences: a common shift changes nothing, other spacings do.
    assert torch.allclose(a, shifted, atol=1e-4)
    assert torch.allclose(a[:, 0], spread[:, 0], atol=1e-5) and not torch.allclose(a, spread, atol=1e-3)


# ----------------------------------------------------------------------------------------------- components

def test_sam_blocks_match_transformers(model: ds.DeepseekOCRForCausalLM) -> None:
    from transformers.models.sam.configuration_sam import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionLayer, SamVisionNeck

    sam = model.config.sam
    config = SamVisionConfig(hidden_size=sam.width, num_attention_heads=sam.heads, image_size=sam.image_size,
                             patch_size=sam.patch_size, mlp_dim=sam.width * sam.mlp_ratio,
                             output_channels=sam.out_chans,
                             layer_norm_eps=sam.layer_norm_eps, use_rel_pos=True, qkv_bias=True, hidden_act="gelu")
    config._attn_implementation = "eager"
    ours_blocks = model.model.sam_model.blocks
    windowed = next(b for b in ours_blocks if b.window)
    glob = next(b for b in ours_blocks if not b.window)
    torch.manual_seed(0)
    for block, window in ((windowed, sam.window_size), (glob, 0)):
        theirs = SamVisionLayer(config, window).eval()
        state = {k.replace("norm1", "layer_norm1").replace("norm2", "layer_norm2"): v
                 for k, v in block.state_dict().items()}
        theirs.load_state_dict(state, strict=True)
        # 40 = a 640 tile (padding to 42 in windowed blocks, rel-pos resized in global ones), 64 = 1024.
        for grid in (40, 64):
            x = torch.randn(1, grid, grid, sam.width)
            with torch.inference_mode():
                assert torch.allclose(block(x), theirs(x), atol=1e-4), (window, grid)
    neck = SamVisionNeck(config).eval()
    ours = model.model.sam_model.neck
    names = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
    neck.load_state_dict({k: ours.state_dict()[names[k.split(".")[0]] + "." + k.split(".")[1]]
                          for k in neck.state_dict()}, strict=True)
    x = torch.randn(2, 20, 20, sam.width)
    with torch.inference_mode():
        assert torch.allclose(ours(x.permute(0, 3, 1, 2)), neck(x), atol=1e-4)


def test_clip_block_matches_transformers(model: ds.DeepseekOCRForCausalLM) -> None:
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    clip = model.config.clip
    config = CLIPVisionConfig(hidden_size=clip.width, intermediate_size=clip.intermediate_size,
                              num_attention_heads=clip.heads, hidden_act="quick_gelu",
                              layer_norm_eps=clip.layer_norm_eps)
    config._attn_implementation = "eager"
    ours = model.model.vision_model.transformer.layers[0]
    theirs = CLIPEncoderLayer(config).eval()
    state = dict(ours.state_dict())
    for kind in ("weight", "bias"):
        q, k, v = state.pop(f"self_attn.qkv_proj.{kind}").chunk(3, dim=0)
        state.update({f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v})
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 101, clip.width)
    with torch.inference_mode():
        expected = theirs(x, None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert torch.allclose(ours(x), expected, atol=1e-4)


def _llama_config(lm):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=lm.hidden_size, num_attention_heads=lm.num_attention_heads,
                         num_key_value_heads=lm.num_key_value_heads, head_dim=lm.head_dim,
                         intermediate_size=lm.intermediate_size, rms_norm_eps=lm.rms_norm_eps, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta}, vocab_size=16)
    config._attn_implementation = "eager"
    return config


def test_dense_decoder_layer_matches_llama(model: ds.DeepseekOCRForCausalLM) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    lm = model.config.language
    config = _llama_config(lm)
    ours = model.model.layers[0]
    theirs = LlamaDecoderLayer(config, 0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    length = 9
    x = torch.randn(1, length, lm.hidden_size)
    positions = torch.arange(length)[None] + 3
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.inference_mode():
        cos, sin = LlamaRotaryEmbedding(config)(x, positions)
        expected = theirs(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        expected = expected[0] if isinstance(expected, tuple) else expected
        our_cos, our_sin = ds.rope_tables(model.model.rope_inv_freq, positions, x.dtype)
        got = ours(x, our_cos, our_sin, None)
    assert torch.allclose(our_cos[:, 0], cos, atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-4)


def test_moe_decoder_layer_matches_llama_layer_with_deepseek_v2_moe(model: ds.DeepseekOCRForCausalLM) -> None:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    lm = model.config.language
    config = _llama_config(lm)
    theirs = LlamaDecoderLayer(config, 1).eval()
    # DeepseekV2DecoderLayer with use_mla false = Llama attention + norms around the DeepSeek-V2 MoE.
    theirs.mlp = DeepseekV2Moe(DeepseekV2Config(
        hidden_size=lm.hidden_size, moe_intermediate_size=lm.moe_intermediate_size,
        n_routed_experts=lm.n_routed_experts, n_shared_experts=lm.n_shared_experts,
        num_experts_per_tok=lm.num_experts_per_tok, topk_method="greedy", hidden_act="silu",
        routed_scaling_factor=lm.routed_scaling_factor)).eval()
    ours = model.model.layers[2]
    theirs.load_state_dict(ours.state_dict(), strict=True)
    length = 7
    x = torch.randn(1, length, lm.hidden_size)
    positions = torch.arange(length)[None]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    with torch.inference_mode():
        expected = theirs(x, attention_mask=mask, position_ids=positions,
                          position_embeddings=LlamaRotaryEmbedding(config)(x, positions))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours(x, *ds.rope_tables(model.model.rope_inv_freq, positions, x.dtype), None)
    assert torch.allclose(got, expected, atol=1e-4)


def test_returned_logits_can_be_edited_in_place(model: ds.DeepseekOCRForCausalLM) -> None:
    # Logits processors (bans, penalties) may write into the logits outside any inference-mode context.
    inputs = DeepseekOCRInputs(input_ids=np.array([BOS, 300], dtype=np.int64))
    cache = model.make_cache(1, 4)
    logits = model.prefill(inputs, None, cache)
    logits[:, 1] = float("-inf")
    step = model.step(logits.argmax(-1), torch.tensor([2]), cache)
    step[:, 1] = float("-inf")
    assert torch.isinf(step[0, 1])


def test_moe_and_rmsnorm_match_deepseek_v2(model: ds.DeepseekOCRForCausalLM) -> None:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe, DeepseekV2RMSNorm

    lm = model.config.language
    config = DeepseekV2Config(hidden_size=lm.hidden_size, moe_intermediate_size=lm.moe_intermediate_size,
                              n_routed_experts=lm.n_routed_experts, n_shared_experts=lm.n_shared_experts,
                              num_experts_per_tok=lm.num_experts_per_tok, topk_method="greedy", hidden_act="silu",
                              routed_scaling_factor=lm.routed_scaling_factor)
    ours = model.model.layers[1].mlp
    theirs = DeepseekV2Moe(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 13, lm.hidden_size)
    with torch.inference_mode():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
        one = x[:1, :1]  # a single decode token takes the same path
        assert torch.allclose(ours(one), theirs(one), atol=1e-5)
    norm = DeepseekV2RMSNorm(lm.hidden_size, lm.rms_norm_eps)
    ours_norm = model.model.layers[1].input_layernorm
    norm.load_state_dict(ours_norm.state_dict())
    with torch.inference_mode():
        assert torch.allclose(ours_norm(x), norm(x), atol=1e-6)
        half = x.to(torch.bfloat16)
        assert torch.equal(ours_norm.to(torch.bfloat16)(half), norm.to(torch.bfloat16)(half))
    ours_norm.float()


def test_moe_routes_only_the_top_k_experts(model: ds.DeepseekOCRForCausalLM) -> None:
    moe = model.model.layers[2].mlp
    x = torch.randn(5, model.config.language.hidden_size)
    with torch.inference_mode():
        weights, ids = moe.gate(x)
        got = moe.experts(x, weights, ids)
        expected = torch.zeros_like(x)
        i = model.config.language.moe_intermediate_size
        for t in range(x.shape[0]):
            for w, e in zip(weights[t], ids[t]):
                gate_up = moe.experts.gate_up_proj[e]
                h = torch.nn.functional.silu(x[t] @ gate_up[:i].T) * (x[t] @ gate_up[i:].T)
                expected[t] += w * (h @ moe.experts.down_proj[e].T)
    assert ids.shape == (5, model.config.language.num_experts_per_tok)
    assert torch.allclose(got, expected, atol=1e-5)


def test_full_size_forward_shapes_on_meta() -> None:
    """The real dimensions end to end without weights; bfloat16 on meta runs the CUDA grouped-GEMM checks."""
    from common.model_config import DeepseekOCRConfig

    reference = Path(__file__).resolve().parents[1] / "data" / "reference" / "deepseek-ocr" / "config.json"
    cfg = DeepseekOCRConfig.from_file(reference)
    with torch.device("meta"):
        full = ds.DeepseekOCRForCausalLM(cfg).to(torch.bfloat16)
    full.model.rope_inv_freq = ds.rope_inv_freq(cfg.language, "meta")
    image = DeepseekOCRImage(global_view=np.zeros((3, 1024, 1024), np.float32),
                             tiles=np.zeros((2, 3, 640, 640), np.float32), crop=(2, 1))
    inputs = _inputs((image,), [483], [300])
    embeds = full.encode_images(inputs)
    assert embeds.shape == (483, cfg.n_embed) and embeds.dtype == torch.bfloat16
    cache = full.make_cache(1, inputs.input_ids.size + 1)
    assert full.prefill(inputs, embeds, cache).shape == (1, cfg.language.vocab_size)
    step = full.step(torch.tensor([5]), torch.tensor([inputs.next_position]), cache)
    assert step.shape == (1, cfg.language.vocab_size)
