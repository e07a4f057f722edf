"""PaddleOCR-VL (v1) on PyTorch: NaViT/SigLIP vision tower, `mlp_AR` projector, ERNIE-4.5 dense decoder.

Exact to transformers 5.23.0 `models/paddleocr_vl/modeling_paddleocr_vl.py` (`PaddleOCRVisionEmbeddings`,
`PaddleOCRVisionEncoder`, `PaddleOCRProjector`, `PaddleOCRTextModel`, `PaddleOCRVLForConditionalGeneration`).
Module attributes carry the ORIGINAL checkpoint names (`visual.vision_model.*`, `mlp_AR.*`, `model.*`,
`lm_head`), so `RENAMES` is empty; the two groups the reference never uses are skipped by name.
Deviations, none visible in float32 outputs beyond rounding: the patch convolution runs as one matmul over the
flattened patches, and the position table is resized with `F.interpolate` rather than a 4-tap gather.
Positions (3D M-RoPE) are explicit inputs computed in `common/paddleocr_vl.py`; the model keeps no state.
The decoder's RMSNorm, SiLU-gated MLP, attention and residual layer are `layers.py`'s, shared with DeepSeek-OCR;
loading is `loader.load_module`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.model_config import PaddleOCRVLConfig, PaddleTextConfig, PaddleVisionConfig
from common.paddleocr_vl import PaddleOCRVLInputs

from .cache import KVCache
from .layers import CausalAttention, CausalLM, DecoderBlock, GatedMLP, Linear, RMSNorm, apply_rope, linear
from .loader import load_module


# ------------------------------------------------------------------------------------------------ vision

class VisionAttention(nn.Module):
    """Bidirectional multi-head attention restricted to the patches of one image at a time."""

    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        # The reference rotates in float32 whatever the model dtype.
        c, s = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.float(), c, s).to(x.dtype)
        k = apply_rope(k.float(), c, s).to(x.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, Dh)
        if len(lengths) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            parts = zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
            out = torch.cat([F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in parts], dim=2)
        return self.out_proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
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

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches (N, C*p*p) in raster order per image -> (N, D)."""
        weight = self.patch_embedding.weight
        # A stride-p convolution over one p x p patch is a matmul with the flattened kernel.
        x = linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.patch_embedding.bias)
        side = self.config.position_grid
        table = self.position_embedding.weight.float().reshape(side, side, -1).permute(2, 0, 1)[None]
        pos = []
        for t, h, w in grids:
            resized = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)
            pos.append(resized[0].flatten(1).transpose(0, 1).repeat(t, 1))  # (t*h*w, D)
        return x + torch.cat(pos).to(x.dtype)


class VisionEncoder(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, config: PaddleVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def rope(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE cos/sin (N, Dh) float32: rows then columns of each image's patch grid, restarting per image."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))
        rows, cols = [], []
        for t, h, w in grids:
            index = torch.arange(h * w, device=device).repeat(t)
            rows.append(index // w)
            cols.append(index % w)
        row, col = torch.cat(rows).float(), torch.cat(cols).float()
        angles = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.embeddings(patches, grids)
        cos, sin = self.rope(grids, x.device)
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
        self.linear_1 = Linear(merged, merged)
        self.linear_2 = Linear(merged, config.text.hidden_size)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x, m, rows = self.pre_norm(features), self.merge, []
        for chunk, (t, h, w) in zip(x.split([t * h * w for t, h, w in grids]), grids):
            blocks = chunk.reshape(t, h // m, m, w // m, m, -1).transpose(2, 3)  # (t, h/m, w/m, m, m, D)
            rows.append(blocks.reshape(t * (h // m) * (w // m), -1))
        return self.linear_2(F.gelu(self.linear_1(torch.cat(rows))))


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
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """inv_freq (Dh/2,) and the axis (0 t, 1 h, 2 w) of each frequency slot; kept per device, not as
        buffers, because the module is built on the meta device and buffers would need re-creating."""
        if device not in self._tables:
            cfg = self.config
            inv_freq = 1.0 / (cfg.rope_theta ** (
                torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
            axis = torch.repeat_interleave(torch.arange(len(cfg.mrope_section), device=device) % 3,
                                           torch.tensor(cfg.mrope_section, device=device))
            self._tables[device] = (inv_freq, axis)
        return self._tables[device]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE cos/sin (B, 1, L, Dh) from positions (3, B, L): frequency slot k reads the t, h or w position
        by contiguous sections (mrope_section), then the halves repeat; cast to the model dtype as the reference."""
        inv_freq, axis = self._rope_tables(positions.device)
        chosen = positions.float()[axis]  # (Dh/2, B, L): each slot's axis
        freqs = chosen.permute(1, 2, 0) * inv_freq  # (B, L, Dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
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

    @torch.no_grad()
    def encode_images(self, inputs: PaddleOCRVLInputs) -> torch.Tensor | None:
        """(N_image_tokens, hidden) in the model dtype, images in prompt order; None when there are none."""
        if inputs.image_grid_thw.shape[0] == 0:
            return None
        grids = [tuple(int(v) for v in g) for g in inputs.image_grid_thw]
        return self._vision(torch.from_numpy(inputs.pixel_values).to(self.device), grids)

    def _vision(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Patches of every image, concatenated -> their merged tokens (N_image_tokens, hidden)."""
        return self.mlp_AR(self.visual.vision_model(patches, grids), grids)

    @property
    def decoder(self) -> nn.Module:
        """The text model the four calls drive (`model`): `embed_tokens` and forward(x, positions, caches)."""
        return self.model

    @torch.no_grad()
    def encode_images_batch(self, batch: list[PaddleOCRVLInputs]) -> list[torch.Tensor | None]:
        """`encode_images` of several prompts in one pass: their patches concatenated (the tower already keeps
        every image's attention to itself), then split back per prompt."""
        grids = [tuple(int(v) for v in g) for inputs in batch for g in inputs.image_grid_thw]
        if not grids:
            return [None] * len(batch)
        patches = torch.from_numpy(np.concatenate([inputs.pixel_values for inputs in batch])).to(self.device)
        merged = self._vision(patches, grids)
        merge = self.config.vision.spatial_merge_size ** 2
        counts = [sum(int(t * h * w) // merge for t, h, w in inputs.image_grid_thw) for inputs in batch]
        return [part if count else None for part, count in zip(merged.split(counts), counts)]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def prefill(self, inputs: PaddleOCRVLInputs, image_embeds: torch.Tensor | None,
                cache: list[KVCache] | None) -> torch.Tensor:
        """(1, vocab) float32 logits at the last prompt position; image embeddings replace the placeholders in
        order. `cache=None` is a plain full forward."""
        ids = torch.from_numpy(inputs.input_ids).to(self.device)
        x = self.decoder.embed_tokens(ids)
        placeholders = int(np.count_nonzero(inputs.input_ids == inputs.image_token_id))
        count = 0 if image_embeds is None else image_embeds.shape[0]
        if placeholders != count:
            raise ValueError(f"{placeholders} image placeholders for {count} image embeddings")
        if image_embeds is not None:
            x[ids == inputs.image_token_id] = image_embeds.to(x.dtype)
        positions = torch.from_numpy(inputs.position_ids).to(self.device)[:, None]  # (3, 1, L)
        hidden = self.decoder(x[None], positions, cache)
        return self._logits(hidden[:, -1])

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        """One token per sequence: token_ids (B,), positions (B,) used on all three axes -> (B, vocab) float32."""
        x = self.decoder.embed_tokens(token_ids.to(self.device))[:, None]  # (B, 1, D)
        pos = positions.to(self.device).view(1, -1, 1).expand(3, -1, -1)
        hidden = self.decoder(x, pos, cache)
        return self._logits(hidden[:, -1])


# Original name -> module name. Empty: the modules are named after the checkpoint.
RENAMES: list[tuple[str, str]] = []

# Tensors of the original file the reference never reads (NaViT packing table, SigLIP pooling head).
SKIP_PREFIXES: tuple[str, ...] = (
    "visual.vision_model.embeddings.packing_position_embedding.",
    "visual.vision_model.head.",
)

# What `--quantize` touches: the decoder (layers and head; the embedding stays float on torch, see quantize.py).
# The vision tower and projector stay float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.", "lm_head")
# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("visual.", "mlp_AR.")


def is_skipped(name: str) -> bool:
    return name.startswith(SKIP_PREFIXES)


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original checkpoint names in, module names out: unused tensors dropped, RENAMES applied by prefix."""
    out = {}
    for name, tensor in weights.items():
        if is_skipped(name):
            continue
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor
    return out


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str | torch.dtype = "bfloat16",
         device: str | torch.device = "cpu", quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> PaddleOCRVL:
    """Build on the meta device from config.json and assign the original safetensors strictly.

    `quantize` 4 or 8 quantizes the decoder (`QUANTIZE_PREFIXES`), `quantize_vision` also the tower and
    projector; a converted snapshot loads as saved (`loader.load_module`).
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(PaddleOCRVL, PaddleOCRVLConfig, config_path, weights_path, dtype=dtype, device=device,
                       sanitize=sanitize, skip=is_skipped, quantize=quantize, group_size=group_size,
                       prefixes=prefixes)
