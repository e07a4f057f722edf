"""PaddleOCR-VL (v1) on MLX: NaViT/SigLIP vision tower, `mlp_AR` projector, ERNIE-4.5 dense decoder.

Exact to transformers 5.23.0 `models/paddleocr_vl/modeling_paddleocr_vl.py`, and a mirror of
`torch_ocr/paddleocr_vl.py` (same classes, functions and order). Module attributes carry the ORIGINAL
checkpoint names (`visual.vision_model.*`, `mlp_AR.*`, `model.*`, `lm_head`), so `RENAMES` is empty; the two
groups the reference never uses are skipped by name, and `sanitize` only moves conv weights to channels-last.
MLX has no bilinear resize matching PyTorch's, so the position table is resized by a fixed linear map
(`loader.resize_table`, float32, held equal to `F.interpolate` in a test). Positions (3D M-RoPE) are explicit
inputs computed in `common/paddleocr_vl.py`; the model keeps no state. The decoder's RMSNorm, SiLU-gated MLP,
attention and residual layer are `layers.py`'s, shared with DeepSeek-OCR; loading is `loader.load_module`.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.model_config import PaddleOCRVLConfig, PaddleTextConfig, PaddleVisionConfig
from common.paddleocr_vl import PaddleOCRVLInputs

from .cache import KVCache
from .layers import CausalAttention, CausalLM, DecoderBlock, GatedMLP, RMSNorm, apply_rope
from .loader import load_module, resize_table


# ------------------------------------------------------------------------------------------------ vision

class VisionAttention(nn.Module):
    """Bidirectional multi-head attention restricted to the patches of one image at a time."""

    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scale = config.head_dim ** -0.5
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, lengths: list[int]) -> mx.array:
        n = x.shape[0]
        q = self.q_proj(x).reshape(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).reshape(n, self.num_heads, self.head_dim)
        # The reference rotates in float32 whatever the model dtype.
        c, s = cos[:, None, :], sin[:, None, :]
        qf, kf = q.astype(mx.float32), k.astype(mx.float32)
        q = apply_rope(qf, c, s).astype(x.dtype)
        k = apply_rope(kf, c, s).astype(x.dtype)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # (1, H, N, Dh)
        parts, start = [], 0
        for length in lengths:
            qi, ki, vi = (t[:, :, start:start + length] for t in (q, k, v))
            parts.append(mx.fast.scaled_dot_product_attention(qi, ki, vi, scale=self.scale))
            start += length
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
        return self.out_proj(out[0].transpose(1, 0, 2).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))  # MLX's gelu_approx is the tanh form


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, lengths: list[int]) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, lengths)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    """Patch projection plus the learned square position table resized (bilinear) to each image's grid."""

    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)
        self.position_embedding = nn.Embedding(config.position_grid ** 2, config.hidden_size)

    def __call__(self, patches: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        """patches (N, C*p*p) in raster order per image -> (N, D)."""
        weight = self.patch_embedding.weight  # (O, p, p, C) after sanitize
        c, p = self.config.num_channels, self.config.patch_size
        # A stride-p convolution over one p x p patch is a matmul with the flattened kernel, taken in the
        # checkpoint's (C, p, p) order so the patches need no transpose.
        kernel = weight.transpose(0, 3, 1, 2).reshape(weight.shape[0], c * p * p)
        x = patches.astype(weight.dtype) @ kernel.T + self.patch_embedding.bias
        side = self.config.position_grid
        table = self.position_embedding.weight.astype(mx.float32).reshape(side, side, -1)
        pos = []
        for t, h, w in grids:
            resized = resize_table(table, (h, w), "linear").reshape(h * w, -1)
            pos.append(mx.tile(resized, (t, 1)))  # (t*h*w, D)
        return x + mx.concatenate(pos, axis=0).astype(x.dtype)


class VisionEncoder(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.layers = [VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class VisionTransformer(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def rope(self, grids: list[tuple[int, int, int]]) -> tuple[mx.array, mx.array]:
        """2D RoPE cos/sin (N, Dh) float32: rows then columns of each image's patch grid, restarting per image."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (mx.arange(0, quarter, 2, dtype=mx.float32) / quarter))
        rows, cols = [], []
        for t, h, w in grids:
            index = np.tile(np.arange(h * w), t)
            rows.append(index // w)
            cols.append(index % w)
        row = mx.array(np.concatenate(rows).astype(np.float32))
        col = mx.array(np.concatenate(cols).astype(np.float32))
        angles = mx.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], axis=-1)
        angles = mx.concatenate([angles, angles], axis=-1)
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, patches: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        x = self.embeddings(patches, grids)
        cos, sin = self.rope(grids)
        lengths = [t * h * w for t, h, w in grids]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, lengths)
        return self.post_layernorm(x)


class VisionModel(nn.Module):
    """`visual`: a wrapper level that only exists to keep the checkpoint prefix `visual.vision_model.`."""

    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(config)


class Projector(nn.Module):
    """`mlp_AR`: LayerNorm per patch, 2x2 merge (TL, TR, BL, BR), linear -> exact GELU -> linear."""

    def __init__(self, config: PaddleOCRVLConfig) -> None:
        super().__init__()
        self.merge = config.vision.spatial_merge_size
        width = config.vision.hidden_size
        merged = width * self.merge * self.merge
        self.pre_norm = nn.LayerNorm(width, eps=config.projector_layer_norm_eps)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, config.text.hidden_size)

    def __call__(self, features: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        x, m, rows, start = self.pre_norm(features), self.merge, [], 0
        for t, h, w in grids:
            chunk = x[start:start + t * h * w]
            blocks = chunk.reshape(t, h // m, m, w // m, m, -1).transpose(0, 1, 3, 2, 4, 5)  # (t, h/m, w/m, m, m, D)
            rows.append(blocks.reshape(t * (h // m) * (w // m), -1))
            start += t * h * w
        return self.linear_2(nn.gelu(self.linear_1(mx.concatenate(rows, axis=0))))


# ------------------------------------------------------------------------------------------------ decoder

class TextAttention(CausalAttention):
    """Grouped-query causal attention with M-RoPE applied by the caller's cos/sin."""

    def __init__(self, config: PaddleTextConfig) -> None:
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, bias=config.use_bias)


class DecoderLayer(DecoderBlock):
    """An ERNIE-4.5 layer: grouped-query attention and a SiLU-gated MLP, biases as `use_bias`."""

    def __init__(self, config: PaddleTextConfig) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported text hidden_act {config.hidden_act!r}")
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        super().__init__(config.hidden_size, config.rms_norm_eps, TextAttention(config), mlp)


class TextModel(nn.Module):
    """`model`: token embeddings, decoder layers, final norm (the lm_head sits beside it, untied)."""

    def __init__(self, config: PaddleTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._tables: tuple[mx.array, mx.array] | None = None

    def _rope_tables(self) -> tuple[mx.array, mx.array]:
        """inv_freq (Dh/2,) and the axis (0 t, 1 h, 2 w) of each frequency slot, computed once (MLX has one
        default device, so one copy; `_` keeps them out of the parameters)."""
        if self._tables is None:
            cfg = self.config
            inv_freq = 1.0 / (cfg.rope_theta ** (mx.arange(0, cfg.head_dim, 2, dtype=mx.float32) / cfg.head_dim))
            axis = mx.array(np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section))
            self._tables = (inv_freq, axis)
        return self._tables

    def rope(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """M-RoPE cos/sin (B, 1, L, Dh) from positions (3, B, L): frequency slot k reads the t, h or w position
        by contiguous sections (mrope_section), then the halves repeat; cast to the model dtype as the reference."""
        inv_freq, axis = self._rope_tables()
        chosen = positions.astype(mx.float32)[axis]  # (Dh/2, B, L): each slot's axis
        freqs = chosen.transpose(1, 2, 0) * inv_freq  # (B, L, Dh/2)
        emb = mx.concatenate([freqs, freqs], axis=-1)[:, None]
        return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)

    def __call__(self, x: mx.array, positions: mx.array, caches: list[KVCache] | None) -> mx.array:
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.norm(x)


# ------------------------------------------------------------------------------------------------ top model

class PaddleOCRVL(CausalLM):
    """The whole model, attribute names = checkpoint prefixes: `visual`, `mlp_AR`, `model`, `lm_head`."""

    def __init__(self, config: PaddleOCRVLConfig) -> None:
        super().__init__(config.text)
        self.config = config
        self.visual = VisionModel(config.vision)
        self.mlp_AR = Projector(config)
        self.model = TextModel(config.text)

    def encode_images(self, inputs: PaddleOCRVLInputs) -> mx.array | None:
        """(N_image_tokens, hidden) in the model dtype, images in prompt order; None when there are none."""
        if inputs.image_grid_thw.shape[0] == 0:
            return None
        grids = [tuple(int(v) for v in g) for g in inputs.image_grid_thw]
        return self._vision(mx.array(inputs.pixel_values), grids)

    def _vision(self, patches: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        """Patches of every image, concatenated -> their merged tokens (N_image_tokens, hidden)."""
        return self.mlp_AR(self.visual.vision_model(patches, grids), grids)

    @property
    def decoder(self) -> nn.Module:
        """The text model the four calls drive (`model`): `embed_tokens` and __call__(x, positions, caches)."""
        return self.model

    def encode_images_batch(self, batch: list[PaddleOCRVLInputs]) -> list[mx.array | None]:
        """`encode_images` of several prompts in one pass: their patches concatenated (the tower already keeps
        every image's attention to itself), then split back per prompt."""
        grids = [tuple(int(v) for v in g) for inputs in batch for g in inputs.image_grid_thw]
        if not grids:
            return [None] * len(batch)
        patches = mx.array(np.concatenate([inputs.pixel_values for inputs in batch]))
        merged = self._vision(patches, grids)
        merge = self.config.vision.spatial_merge_size ** 2
        counts = [sum(int(t * h * w) // merge for t, h, w in inputs.image_grid_thw) for inputs in batch]
        parts = mx.split(merged, np.cumsum(counts)[:-1].tolist())
        return [part if count else None for part, count in zip(parts, counts)]

    def _logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(hidden).astype(mx.float32)

    def prefill(self, inputs: PaddleOCRVLInputs, image_embeds: mx.array | None,
                cache: list[KVCache] | None) -> mx.array:
        """(1, vocab) float32 logits at the last prompt position; image embeddings replace the placeholders in
        order. `cache=None` is a plain full forward."""
        ids = np.asarray(inputs.input_ids, dtype=np.int64)
        x = self.decoder.embed_tokens(mx.array(ids))
        slots = np.flatnonzero(ids == inputs.image_token_id)
        count = 0 if image_embeds is None else image_embeds.shape[0]
        if slots.size != count:
            raise ValueError(f"{slots.size} image placeholders for {count} image embeddings")
        if image_embeds is not None:
            x[mx.array(slots)] = image_embeds.astype(x.dtype)
        positions = mx.array(inputs.position_ids)[:, None]  # (3, 1, L)
        hidden = self.decoder(x[None], positions, cache)
        return self._logits(hidden[:, -1])

    def step(self, token_ids: mx.array, positions: mx.array, cache: list[KVCache]) -> mx.array:
        """One token per sequence: token_ids (B,), positions (B,) used on all three axes -> (B, vocab) float32."""
        x = self.decoder.embed_tokens(token_ids)[:, None]  # (B, 1, D)
        pos = mx.broadcast_to(positions.reshape(1, -1, 1), (3, positions.shape[0], 1))
        hidden = self.decoder(x, pos, cache)
        return self._logits(hidden[:, -1])


# Original name -> module name. Empty: the modules are named after the checkpoint.
RENAMES: list[tuple[str, str]] = []

# Tensors of the original file the reference never reads (NaViT packing table, SigLIP pooling head).
SKIP_PREFIXES: tuple[str, ...] = (
    "visual.vision_model.embeddings.packing_position_embedding.",
    "visual.vision_model.head.",
)

# What `--quantize` touches: the decoder (embeddings, layers, head). The vision tower and projector stay float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.", "lm_head")
# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("visual.", "mlp_AR.")


def is_skipped(name: str) -> bool:
    return name.startswith(SKIP_PREFIXES)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Original checkpoint names in, module names out: unused tensors dropped, RENAMES applied by prefix, the
    patch conv (O, C, kh, kw) moved to MLX's channels-last (O, kh, kw, C)."""
    out = {}
    for name, tensor in weights.items():
        if is_skipped(name):
            continue
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor.transpose(0, 2, 3, 1) if tensor.ndim == 4 and name.endswith(".weight") else tensor
    return out


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu",
         quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> PaddleOCRVL:
    """Build from config.json and assign the original safetensors strictly (lazily: one copy of the weights).

    `quantize` 4 or 8 quantizes the decoder (`QUANTIZE_PREFIXES`), `quantize_vision` also the tower and
    projector; a converted snapshot loads as saved (`loader.load_module`).
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(PaddleOCRVL, PaddleOCRVLConfig, config_path, weights_path, dtype=dtype, device=device,
                       sanitize=sanitize, skip=is_skipped, quantize=quantize, group_size=group_size,
                       prefixes=prefixes)
