"""GLM-OCR on MLX: the GLM vision tower (Conv3d patches, RMSNorm blocks with q/k norms and 2D RoPE, 2x2
downsample convolution, gated merger) and the GLM decoder (sandwich norms, interleaved M-RoPE).

Exact to transformers 5.23.0 `models/glm_ocr/modeling_glm_ocr.py`, and a mirror of `torch_ocr/glm_ocr.py` (same
classes, functions and order). Module names are the original names (`model.visual.*`, `model.language_model.*`,
`lm_head`); the multi-token-prediction layer is skipped by index, and `sanitize` only moves the convolution
weights to MLX's channels-last layout. The patch Conv3d runs as one matmul over the flattened patches.
"""
from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from common.model_config import GlmOcrConfig, GlmOcrTextConfig, GlmOcrVisionConfig

from .cache import KVCache
from .layers import CausalAttention, CausalLM, GatedMLP, RMSNorm, apply_rope, swiglu
from .loader import load_module
from .paddleocr_vl import PaddleOCRVL


# ------------------------------------------------------------------------------------------------ vision

class VisionAttention(nn.Module):
    """Bidirectional attention within each image: fused qkv, per-head RMSNorm on q and k, half-split 2D RoPE in
    float32."""

    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        width, bias = config.hidden_size, config.attention_bias
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, lengths: list[int]) -> mx.array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = self.q_norm(q), self.k_norm(k)
        c, s = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.astype(mx.float32), c, s).astype(x.dtype)
        k = apply_rope(k.astype(mx.float32), c, s).astype(x.dtype)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))  # (1, H, N, Dh)
        parts, start = [], 0
        for length in lengths:
            qi, ki, vi = (t[:, :, start:start + length] for t in (q, k, v))
            parts.append(mx.fast.scaled_dot_product_attention(qi, ki, vi, scale=self.scale))
            start += length
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
        return self.proj(out[0].transpose(1, 0, 2).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.attention_bias)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, lengths: list[int]) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """`patch_embed.proj`: a Conv3d whose kernel is the whole (C, T, p, p) patch, run as a matmul."""

    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def __call__(self, patches: mx.array) -> mx.array:
        weight = self.proj.weight  # (O, T, p, p, C) after sanitize; the patches are in (C, T, p, p) order
        kernel = weight.transpose(0, 4, 1, 2, 3).reshape(weight.shape[0], -1)
        return patches.astype(weight.dtype) @ kernel.T + self.proj.bias


class PatchMerger(GatedMLP):
    """`merger`: linear, LayerNorm (with bias), exact GELU, then the SiLU-gated MLP (no biases)."""

    def __init__(self, width: int, context: int) -> None:
        super().__init__(width, context, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.post_projection_norm = nn.LayerNorm(width)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(nn.gelu(self.post_projection_norm(self.proj(x))))


class VisionModel(nn.Module):
    """`model.visual`: patches (N, C*T*p*p) in merge-window order -> merged tokens (N / m^2, text hidden)."""

    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        self.config = config
        m = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(config.out_hidden_size, config.out_hidden_size * config.in_channels)

    def rope(self, grids: list[tuple[int, int, int]]) -> tuple[mx.array, mx.array]:
        """2D RoPE cos/sin (N, Dh) float32: each patch's (row, col) in merge-window order, rows then columns over
        head_dim / 4 frequencies each, the pair repeated (half-split)."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (mx.arange(0, quarter, 2, dtype=mx.float32) / quarter))
        m, rows, cols = self.config.spatial_merge_size, [], []
        for t, h, w in grids:
            hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            rows.append(np.tile(hh.reshape(shape).transpose(0, 2, 1, 3).ravel(), t))
            cols.append(np.tile(ww.reshape(shape).transpose(0, 2, 1, 3).ravel(), t))
        row = mx.array(np.concatenate(rows).astype(np.float32))
        col = mx.array(np.concatenate(cols).astype(np.float32))
        angles = mx.concatenate([row[:, None] * inv_freq, col[:, None] * inv_freq], axis=-1)
        angles = mx.concatenate([angles, angles], axis=-1)
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, patches: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        x = self.patch_embed(patches)
        cos, sin = self.rope(grids)
        lengths = [t * h * w for t, h, w in grids]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)
        m = self.config.spatial_merge_size
        x = x.reshape(-1, m, m, x.shape[-1])  # one 2x2 window per row, already channels-last for MLX
        return self.merger(self.downsample(x).reshape(-1, self.config.out_hidden_size))


# ------------------------------------------------------------------------------------------------ decoder

def rotate_interleaved(x: mx.array) -> mx.array:
    """GLM's rotation of adjacent pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return mx.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)


def apply_rope_interleaved(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved RoPE over the first cos.shape[-1] channels; the rest passes through (partial rotary)."""
    dim = cos.shape[-1]
    rotated = x[..., :dim] * cos + rotate_interleaved(x[..., :dim]) * sin
    return rotated if dim == x.shape[-1] else mx.concatenate([rotated, x[..., dim:]], axis=-1)


class TextAttention(CausalAttention):
    """Grouped-query causal attention (no biases) with interleaved M-RoPE."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache | None) -> mx.array:
        q, k, v = self.project(x)
        return self.attend(apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin), v, cache)


class TextMLP(nn.Module):
    """down(silu(gate) * up) with gate and up fused in one `gate_up_proj` (gate first)."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Sandwich norms: x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported text hidden_act {config.hidden_act!r}")
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = TextAttention(config)
        self.mlp = TextMLP(config)
        self.input_layernorm = RMSNorm(size, eps)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.post_self_attn_layernorm = RMSNorm(size, eps)
        self.post_mlp_layernorm = RMSNorm(size, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache | None) -> mx.array:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    """`model.language_model`: embeddings, decoder layers, final norm."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._tables: tuple[mx.array, mx.array] | None = None

    def _rope_tables(self) -> tuple[mx.array, mx.array]:
        """inv_freq (rotary/2,) and the axis (0 t, 1 h, 2 w) of each frequency slot, computed once."""
        if self._tables is None:
            cfg = self.config
            dim = int(cfg.head_dim * cfg.partial_rotary_factor)
            inv_freq = 1.0 / (cfg.rope_theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
            axis = mx.array(np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section))
            self._tables = (inv_freq, axis)
        return self._tables

    def rope(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos/sin (B, 1, L, rotary) from positions (3, B, L): slot k reads its section's axis, then each
        frequency is repeated in place (pairs 2i, 2i+1); cast to the model dtype as the reference."""
        inv_freq, axis = self._rope_tables()
        freqs = positions.astype(mx.float32)[axis].transpose(1, 2, 0) * inv_freq  # (B, L, rotary/2)
        emb = mx.repeat(freqs, 2, axis=-1)[:, None]
        return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)

    def __call__(self, x: mx.array, positions: mx.array, caches: list[KVCache] | None) -> mx.array:
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.norm(x)


class Model(nn.Module):
    """`model`: a level that only exists to keep the checkpoint prefixes `model.visual.`, `model.language_model.`."""

    def __init__(self, config: GlmOcrConfig) -> None:
        super().__init__()
        self.visual = VisionModel(config.vision)
        self.language_model = TextModel(config.text)


# ------------------------------------------------------------------------------------------------ top model

class GlmOCR(CausalLM):
    """The whole model: `model.visual`, `model.language_model`, `lm_head` (untied). The four engine calls are
    PaddleOCR-VL's, through its two hooks `_vision` and `decoder`."""

    def __init__(self, config: GlmOcrConfig) -> None:
        super().__init__(config.text)
        self.config = config
        self.model = Model(config)

    @property
    def decoder(self) -> TextModel:
        return self.model.language_model

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.norm.weight.dtype  # never quantized, unlike lm_head

    def _vision(self, patches: mx.array, grids: list[tuple[int, int, int]]) -> mx.array:
        return self.model.visual(patches, grids)

    encode_images = PaddleOCRVL.encode_images
    encode_images_batch = PaddleOCRVL.encode_images_batch
    _logits = PaddleOCRVL._logits
    prefill = PaddleOCRVL.prefill
    step = PaddleOCRVL.step


_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.")

# What `--quantize` touches: the decoder (embeddings, layers, head). The vision tower stays float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.language_model.", "lm_head")
# Added by `quantize_vision`: the tower's and merger's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.visual.",)


def mtp_skipper(num_hidden_layers: int):
    """`skip` for the loader: the multi-token-prediction layer(s), indices at and past num_hidden_layers."""
    def skip(name: str) -> bool:
        match = _LAYER.match(name)
        return match is not None and int(match.group(1)) >= num_hidden_layers
    return skip


def mlx_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A checkpoint tensor's shape in MLX: convolution weights channels-last (O, C, ...) -> (O, ..., C)."""
    if len(shape) >= 4 and name.endswith(".weight"):
        return (shape[0], *shape[2:], shape[1])
    return tuple(shape)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Original names are module names; convolution weights move to channels-last (Conv3d and Conv2d)."""
    out = {}
    for name, tensor in weights.items():
        if tensor.ndim >= 4 and name.endswith(".weight"):
            tensor = mx.moveaxis(tensor, 1, -1)
        out[name] = tensor
    return out


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu",
         quantize: int | None = None, group_size: int = 64, quantize_vision: bool = False) -> GlmOCR:
    """Build from config.json and assign the original safetensors strictly (lazily: one copy of the weights)."""
    layers = GlmOcrConfig.from_file(config_path).text.num_hidden_layers
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(GlmOCR, GlmOcrConfig, config_path, weights_path, dtype=dtype, device=device,
                       sanitize=sanitize, skip=mtp_skipper(layers), quantize=quantize, group_size=group_size,
                       prefixes=prefixes)
