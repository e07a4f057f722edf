"""GLM-OCR on PyTorch: the GLM vision tower (Conv3d patches, RMSNorm blocks with q/k norms and 2D RoPE, 2x2
downsample convolution, gated merger) and the GLM decoder (sandwich norms, interleaved M-RoPE).

Exact to transformers 5.23.0 `models/glm_ocr/modeling_glm_ocr.py` (`GlmOcrVisionModel`, `GlmOcrTextModel`,
`GlmOcrForConditionalGeneration`). The checkpoint is transformers' own, so the module names ARE the original
names (`model.visual.*`, `model.language_model.*`, `lm_head`); the multi-token-prediction layer stored as
`model.language_model.layers.{num_hidden_layers}.*` is skipped by index. One deviation, invisible in float32
beyond rounding: the patch Conv3d runs as one matmul over the flattened patches (kernel = stride = patch).
Positions (3D M-RoPE) are explicit inputs computed in `common/glm_ocr.py`; the model keeps no state.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.model_config import GlmOcrConfig, GlmOcrTextConfig, GlmOcrVisionConfig

from .cache import KVCache
from .layers import CausalAttention, CausalLM, GatedMLP, Linear, RMSNorm, apply_rope, linear, swiglu
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
        self.qkv = Linear(width, 3 * width, bias=bias)
        self.proj = Linear(width, width, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        c, s = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.float(), c, s).to(x.dtype)
        k = apply_rope(k.float(), c, s).to(x.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, Dh)
        parts = zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
        out = torch.cat([F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in parts], dim=2)
        return self.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """`patch_embed.proj`: a Conv3d whose kernel is the whole (C, T, p, p) patch, run as a matmul."""

    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


class PatchMerger(GatedMLP):
    """`merger`: linear, LayerNorm (with bias), exact GELU, then the SiLU-gated MLP (no biases)."""

    def __init__(self, width: int, context: int) -> None:
        super().__init__(width, context, bias=False)
        self.proj = Linear(width, width, bias=False)
        self.post_projection_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class VisionModel(nn.Module):
    """`model.visual`: patches (N, C*T*p*p) in merge-window order -> merged tokens (N / m^2, text hidden)."""

    def __init__(self, config: GlmOcrVisionConfig) -> None:
        super().__init__()
        self.config = config
        m = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(config.out_hidden_size, config.out_hidden_size * config.in_channels)

    def rope(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE cos/sin (N, Dh) float32: each patch's (row, col) in merge-window order, rows then columns over
        head_dim / 4 frequencies each, the pair repeated (half-split)."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))
        m, rows, cols = self.config.spatial_merge_size, [], []
        for t, h, w in grids:
            hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            shape = (h // m, m, w // m, m)
            rows.append(hh.reshape(shape).transpose(1, 2).flatten().repeat(t))
            cols.append(ww.reshape(shape).transpose(1, 2).flatten().repeat(t))
        row, col = torch.cat(rows).float(), torch.cat(cols).float()
        angles = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.patch_embed(patches)
        cos, sin = self.rope(grids, x.device)
        lengths = [t * h * w for t, h, w in grids]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)
        m = self.config.spatial_merge_size
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)  # one 2x2 window per row: (N/4, D, m, m)
        return self.merger(self.downsample(x).view(-1, self.config.out_hidden_size))


# ------------------------------------------------------------------------------------------------ decoder

def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GLM's rotation of adjacent pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE over the first cos.shape[-1] channels; the rest passes through (partial rotary)."""
    dim = cos.shape[-1]
    rotated = x[..., :dim] * cos + rotate_interleaved(x[..., :dim]) * sin
    return rotated if dim == x.shape[-1] else torch.cat([rotated, x[..., dim:]], dim=-1)


class TextAttention(CausalAttention):
    """Grouped-query causal attention (no biases) with interleaved M-RoPE."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.attend(apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin), v, cache)


class TextMLP(nn.Module):
    """down(silu(gate) * up) with gate and up fused in one `gate_up_proj` (gate first)."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    """`model.language_model`: embeddings, decoder layers, final norm."""

    def __init__(self, config: GlmOcrTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """inv_freq (rotary/2,) and the axis (0 t, 1 h, 2 w) of each frequency slot, kept per device."""
        if device not in self._tables:
            cfg = self.config
            dim = int(cfg.head_dim * cfg.partial_rotary_factor)
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
            axis = torch.repeat_interleave(torch.arange(len(cfg.mrope_section), device=device) % 3,
                                           torch.tensor(cfg.mrope_section, device=device))
            self._tables[device] = (inv_freq, axis)
        return self._tables[device]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, L, rotary) from positions (3, B, L): slot k reads its section's axis, then each
        frequency is repeated in place (pairs 2i, 2i+1); cast to the model dtype as the reference."""
        inv_freq, axis = self._rope_tables(positions.device)
        freqs = positions.float()[axis].permute(1, 2, 0) * inv_freq  # (B, L, rotary/2)
        emb = freqs.repeat_interleave(2, dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
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

    def _vision(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.model.visual(patches, grids)

    encode_images = PaddleOCRVL.encode_images
    encode_images_batch = PaddleOCRVL.encode_images_batch
    _logits = PaddleOCRVL._logits
    prefill = PaddleOCRVL.prefill
    step = PaddleOCRVL.step


_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.")

# What `--quantize` touches: the decoder (layers and head; the embedding stays float on torch, see quantize.py).
# The vision tower stays float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.language_model.", "lm_head")
# Added by `quantize_vision`: the tower's and merger's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.visual.",)


def mtp_skipper(num_hidden_layers: int):
    """`skip` for the loader: the multi-token-prediction layer(s), indices at and past num_hidden_layers."""
    def skip(name: str) -> bool:
        match = _LAYER.match(name)
        return match is not None and int(match.group(1)) >= num_hidden_layers
    return skip


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names are module names: nothing to rename (skipped tensors never reach here)."""
    return weights


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str | torch.dtype = "bfloat16",
         device: str | torch.device = "cpu", quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> GlmOCR:
    """Build on the meta device from config.json and assign the original safetensors strictly."""
    layers = GlmOcrConfig.from_file(config_path).text.num_hidden_layers
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(GlmOCR, GlmOcrConfig, config_path, weights_path, dtype=dtype, device=device,
                       sanitize=sanitize, skip=mtp_skipper(layers), quantize=quantize, group_size=group_size,
                       prefixes=prefixes)
