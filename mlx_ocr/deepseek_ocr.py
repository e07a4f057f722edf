"""DeepSeek-OCR in MLX: SAM ViT-B + CLIP-L vision, linear projector, DeepSeek-V2 MoE decoder (MHA, no MLA).

Exact to the official remote code (`deepencoder.py`: `ImageEncoderViT`, `Block`, `Attention`, `get_rel_pos`,
`VitModel`; `modeling_deepseekocr.py`: `DeepseekOCRModel.forward`; `modeling_deepseekv2.py`: decoder, `MoEGate`,
`moe_infer`), rule by rule as in the DeepSeek-OCR RULES (6-11), and a mirror of `torch_ocr/deepseek_ocr.py`.
Framework differences, all numerically equivalent: images run channels-last (MLX convolutions), position tables
are resized by fixed linear maps equal to PyTorch's `F.interpolate` (MLX has no antialiased bicubic), the decoder
RoPE is `mx.fast.rope` (half-split form), and the routed experts are mlx-lm's `SwitchGLU` (gather_mm: only the
chosen experts are computed), stacked per projection by `sanitize`. The decoder's RMSNorm, SiLU-gated MLP,
attention and residual layer are `layers.py`'s, shared with PaddleOCR-VL; loading is `loader.load_module`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

from common.deepseek_ocr import DeepseekOCRInputs
from common.errors import CheckpointError
from common.model_config import ClipConfig, DeepseekOCRConfig, DeepseekV2Config, SamConfig

from .cache import KVCache
from .layers import CausalAttention, CausalLM, DecoderBlock, GatedMLP, RMSNorm
from .loader import interpolation_matrix, load_module, resize_table

# Architecture constants of the official SAM neck and downsampler (deepencoder.py `ImageEncoderViT`).
NECK_KERNEL = 3
DOWNSAMPLE_STRIDE = 2
QUICK_GELU_SCALE = 1.702
RGB_CHANNELS = 3  # both patch convs read RGB pixels


# ----------------------------------------------------------------------------------------------- SAM leaves

def resize_grid_table(table: mx.array, size: int) -> mx.array:
    """(1, S, S, C) table -> (1, size, size, C): bicubic + antialias in float32 (`get_abs_pos_sam`)."""
    if table.shape[1] == size:
        return table
    return resize_table(table[0], (size, size), "bicubic_aa")[None].astype(table.dtype)


def relative_table(table: mx.array, size: int) -> mx.array:
    """(2K-1, C) rel-pos table -> (size, size, C) with R[qi - kj + size - 1] (`get_rel_pos`, q and k same size)."""
    rows = 2 * size - 1
    if table.shape[0] != rows:
        # Linear resize in float32, align_corners False, as the official code does for global blocks.
        matrix = mx.array(interpolation_matrix(table.shape[0], rows, "linear"))
        table = (matrix @ table.astype(mx.float32)).astype(table.dtype)
    coords = np.arange(size)
    return table[mx.array(coords[:, None] - coords[None, :] + (size - 1))]


class SamAttention(nn.Module):
    """Multi-head attention with SAM's decomposed relative-position bias (`deepencoder.Attention`)."""

    def __init__(self, cfg: SamConfig, span: int) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.rel_pos_h = mx.zeros((2 * span - 1, cfg.head_dim))
        self.rel_pos_w = mx.zeros((2 * span - 1, cfg.head_dim))

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) -> (B, H, W, C), full attention over the H*W tokens."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, HW, hd)
        # The bias uses the UNscaled q: rel_h[q, kh] = q . Rh[qh, kh], rel_w likewise over the width axis.
        grid_q = q.reshape(b, self.heads, h, w, self.head_dim)
        rel_h = mx.einsum("bnhwc,hkc->bnhwk", grid_q, relative_table(self.rel_pos_h, h))
        rel_w = mx.einsum("bnhwc,wkc->bnhwk", grid_q, relative_table(self.rel_pos_w, w))
        # Materialised (HW, HW) additive bias, as the official code (and torch_ocr): with head_dim intact the
        # Metal SDPA kernel still applies, where bias-folded wider q/k would not.
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=bias)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, c))


class SamMLP(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.lin2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.gelu(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of the neck, written out like the official one; channels are the LAST axis here."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        x = (x - mean) / mx.sqrt(var + self.eps)
        return self.weight * x + self.bias


# ----------------------------------------------------------------------------------------------- SAM encoder

class SamBlock(nn.Module):
    """Pre-norm block; windowed ones attend inside zero-padded window x window tiles (`deepencoder.Block`)."""

    def __init__(self, cfg: SamConfig, index: int) -> None:
        super().__init__()
        self.window = 0 if index in cfg.global_attn_indexes else cfg.window_size
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = SamAttention(cfg, self.window or cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SamMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            s = self.window
            # Pad the NORMALISED grid bottom/right; padded tokens take part in attention unmasked.
            y = mx.pad(y, [(0, 0), (0, -h % s), (0, -w % s), (0, 0)])
            hp, wp = y.shape[1], y.shape[2]
            y = y.reshape(b, hp // s, s, wp // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            y = self.attn(y)
            y = y.reshape(b, hp // s, wp // s, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SamPatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(RGB_CHANNELS, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.proj(pixels)  # channels-last in and out: (B, G, G, C)


class SamEncoder(nn.Module):
    """SAM ViT-B with neck and two stride-2 convs (`deepencoder.ImageEncoderViT`).

    Channels-last: (B, S, S, 3) -> (B, S/64, S/64, C3).
    """

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        first, second = cfg.downsample_channels
        self.patch_embed = SamPatchEmbed(cfg)
        self.pos_embed = mx.zeros((1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = [SamBlock(cfg, i) for i in range(cfg.layers)]
        pad = NECK_KERNEL // 2
        # A plain list, not nn.Sequential, so the parameter names stay `neck.0.weight` as in the checkpoint.
        self.neck = [
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans, cfg.layer_norm_eps),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=NECK_KERNEL, padding=pad, bias=False),
            LayerNorm2d(cfg.out_chans, cfg.layer_norm_eps),
        ]
        self.net_2 = nn.Conv2d(cfg.out_chans, first, NECK_KERNEL, stride=DOWNSAMPLE_STRIDE, padding=pad, bias=False)
        self.net_3 = nn.Conv2d(first, second, NECK_KERNEL, stride=DOWNSAMPLE_STRIDE, padding=pad, bias=False)

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.patch_embed(pixels)
        x = x + resize_grid_table(self.pos_embed, x.shape[1])
        for block in self.blocks:
            x = block(x)
        for layer in self.neck:
            x = layer(x)
        return self.net_3(self.net_2(x))


# ----------------------------------------------------------------------------------------------- CLIP

class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        b, s, c = x.shape
        qkv = self.qkv_proj(x).reshape(b, s, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, s, c))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.fc1(x)
        return self.fc2(x * mx.sigmoid(QUICK_GELU_SCALE * x))


class ClipBlock(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    """CLS + SAM features as patch embeddings + resized positions. `patch_embedding` is loaded but never used."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = mx.zeros((cfg.width,))
        self.patch_embedding = nn.Conv2d(RGB_CHANNELS, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.width)
        self.grid = cfg.grid

    def __call__(self, features: mx.array) -> mx.array:
        """(B, n, n, C) SAM output (channels-last) -> (B, 1 + n*n, C)."""
        b, n, _, c = features.shape
        cls = mx.broadcast_to(self.class_embedding, (b, 1, c)).astype(features.dtype)
        x = mx.concatenate([cls, features.reshape(b, n * n, c)], axis=1)
        table = self.position_embedding.weight
        if n != self.grid:
            # Only the grid part is resized (bicubic + antialias, float32); the CLS row is kept (`get_abs_pos`).
            grid = table[1:].reshape(1, self.grid, self.grid, c)
            table = mx.concatenate([table[:1], resize_grid_table(grid, n).reshape(n * n, c)], axis=0)
        return x + table


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = [ClipBlock(cfg) for _ in range(cfg.layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    """CLIP-L fed with SAM features (`deepencoder.VitModel`); no post-layernorm."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.transformer = ClipTransformer(cfg)

    def __call__(self, sam_features: mx.array) -> mx.array:
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_features)))


# ----------------------------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """`MlpProjector` of type "linear": one Linear with bias."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.layers = nn.Linear(cfg.projector_input_dim, cfg.n_embed)

    def __call__(self, x: mx.array) -> mx.array:
        return self.layers(x)


# ----------------------------------------------------------------------------------------------- decoder

class DecoderAttention(CausalAttention):
    """LlamaAttention ("mha_eager", use_mla false): no biases, half-split RoPE, causal, optional KV cache."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         bias=False)
        self.rope_theta = cfg.rope_theta

    def rope(self, x: mx.array, offset: mx.array) -> mx.array:
        # traditional=False is Llama's rotate_half (half-split) form, not DeepSeek-V2's interleaved MLA one.
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)

    def __call__(self, x: mx.array, offset: mx.array, cache: KVCache | None) -> mx.array:
        q, k, v = self.project(x)
        return self.attend(self.rope(q, offset), self.rope(k, offset), v, cache)


class MoEGate(nn.Module):
    """float32 softmax router, greedy top-k (`MoEGate`); weights renormalised only when norm_topk_prob.

    A plain weight rather than a Linear, so load-time quantization leaves the routing in float.
    """

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.weight = mx.zeros((cfg.n_routed_experts, cfg.hidden_size))
        self.top_k, self.normalise, self.scale = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(T, D) -> top-k weights (T, k) float32 and expert ids (T, k)."""
        scores = mx.softmax(x.astype(mx.float32) @ self.weight.astype(mx.float32).T, axis=-1)
        ids = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., :self.top_k]
        weights = mx.take_along_axis(scores, ids, axis=-1)
        if self.normalise and self.top_k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return weights * self.scale, ids


class RoutedExperts(SwitchGLU):
    """The routed experts of one layer, stacked: gate_proj / up_proj (E, I, D), down_proj (E, D, I).

    mlx-lm's SwitchGLU gathers each token's chosen experts (`gather_mm`, sorted by expert for long prompts):
    only the routed experts are computed, and quantization turns them into `gather_qmm`.
    """

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts)

    def __call__(self, x: mx.array, weights: mx.array, ids: mx.array) -> mx.array:
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu and isinstance(self.gate_proj, SwitchLinear):
            out = self._each_expert(x, ids)
        else:
            out = super().__call__(x, ids)  # (T, k, D)
        # The weighted sum runs in float32 (the gate's dtype), then back to the model dtype (`moe_infer`).
        return (out.astype(mx.float32) * weights[..., None]).sum(axis=1).astype(x.dtype)


    def _each_expert(self, x: mx.array, ids: mx.array) -> mx.array:
        """(T, D), (T, k) -> (T, k, D) one chosen expert at a time, in float32.

        MLX's CPU `gather_mm` runs float32 only, and casting every expert per call would cost a float32 copy
        of the layer; this reads the ids on the host and casts only the experts in use.
        """
        chosen = np.array(ids)
        tokens, k = chosen.shape
        out = mx.zeros((tokens * k, x.shape[-1]), dtype=mx.float32)
        flat = chosen.reshape(-1)
        for expert in np.unique(flat):
            slots = np.flatnonzero(flat == expert)
            rows = x[mx.array(slots // k)].astype(mx.float32)
            gate = rows @ self.gate_proj.weight[int(expert)].astype(mx.float32).T
            up = rows @ self.up_proj.weight[int(expert)].astype(mx.float32).T
            down = self.down_proj.weight[int(expert)].astype(mx.float32)
            out[mx.array(slots)] = (nn.silu(gate) * up) @ down.T
        return out.reshape(tokens, k, -1)


class DecoderMoE(nn.Module):
    """Routed experts (weighted top-k) plus one shared SiLU MLP of width moe_intermediate * n_shared."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        return self.experts(flat, weights, ids).reshape(x.shape) + self.shared_experts(x)


class DecoderLayer(DecoderBlock):
    """A DeepSeek-V2 layer with use_mla false: Llama attention, then the MoE or (first layers) a dense MLP."""

    def __init__(self, cfg: DeepseekV2Config, index: int) -> None:
        mlp = DecoderMoE(cfg) if cfg.is_moe_layer(index) else GatedMLP(cfg.hidden_size, cfg.intermediate_size,
                                                                        bias=False)
        super().__init__(cfg.hidden_size, cfg.rms_norm_eps, DecoderAttention(cfg), mlp)

    def __call__(self, x: mx.array, offset: mx.array, cache: KVCache | None) -> mx.array:
        # The RoPE offset stands in for cos/sin: the attention rotates with `mx.fast.rope`.
        x = x + self.self_attn(self.input_layernorm(x), offset, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------- top model

class DeepseekV2Model(nn.Module):
    """The decoder half of `model.*` (embed_tokens, layers, norm), shared with DeepSeek-OCR-2."""

    def __init__(self, lm: DeepseekV2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = [DecoderLayer(lm, i) for i in range(lm.num_hidden_layers)]
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)

    def decode(self, embeds: mx.array, positions: mx.array, caches: list[KVCache] | None) -> mx.array:
        """(B, L, D) embeddings at (B, L) positions -> final-normed hidden states (B, L, D).

        Positions run contiguously within a row (0..L-1 in prefill, one per step), so each row's first
        position is the RoPE offset.
        """
        offset = positions[:, 0] if positions.shape[0] > 1 else positions[0, 0]
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, offset, None if caches is None else caches[i])
        return self.norm(x)


class DeepseekOCRModel(DeepseekV2Model):
    """`model.*` of the checkpoint: the decoder stack, vision towers, projector and layout vectors."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipVisionModel(cfg.clip)
        self.projector = Projector(cfg)
        self.image_newline = mx.zeros((cfg.n_embed,))
        self.view_seperator = mx.zeros((cfg.n_embed,))

    def image_features(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) views -> (B, n*n, hidden): [CLIP without CLS, SAM] through the projector (rule 9)."""
        sam = self.sam_model(pixels)
        clip = self.vision_model(sam)
        b, n, _, c = sam.shape
        return self.projector(mx.concatenate([clip[:, 1:], sam.reshape(b, n * n, c)], axis=-1))

    def with_newlines(self, grid: mx.array) -> mx.array:
        """(rows, cols, D) -> (rows * (cols + 1), D): `image_newline` at the end of every row."""
        rows, _, d = grid.shape
        newline = mx.broadcast_to(self.image_newline.astype(grid.dtype), (rows, 1, d))
        return mx.concatenate([grid, newline], axis=1).reshape(-1, d)


def _views(inputs: DeepseekOCRInputs) -> list[np.ndarray]:
    """The pixel views of a prompt in encoding order: per image its tiles (when tiled), then its global view."""
    out = []
    for image in inputs.images:
        if image.tiles.shape[0]:
            out.append(image.tiles)
        out.append(image.global_view[None])
    return out


class DeepseekOCRForCausalLM(CausalLM):
    """The whole model; implements the shared model protocol (encode_images, prefill, step, make_cache)."""

    model_class: type[DeepseekV2Model] = DeepseekOCRModel  # DeepSeek-OCR-2 swaps in its own `model.*`

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg.language)
        self.config = cfg
        self.model = self.model_class(cfg)

    def _pixels(self, array: np.ndarray) -> mx.array:
        # (..., 3, S, S) channels-first NumPy -> channels-last for MLX's convolutions.
        return mx.array(np.ascontiguousarray(np.moveaxis(array, -3, -1))).astype(self.dtype)

    def encode_images(self, inputs: DeepseekOCRInputs) -> mx.array | None:
        """Every image's embeddings in prompt order, (N_image_tokens, hidden) in the model dtype; None if no image.

        Per image (rule 6): tiles as a (height tiles * n) x (width tiles * n) grid with a newline after every row,
        then the global view's grid with newlines, then one `view_seperator`.
        """
        return self._assemble(inputs, lambda views: self.model.image_features(self._pixels(views)))

    def encode_images_batch(self, batch: list[DeepseekOCRInputs]) -> list[mx.array | None]:
        """`encode_images` of several prompts, with one vision pass per view size: every tile and global view of
        the same size, across all prompts, goes through SAM, CLIP and the projector stacked."""
        groups: dict[tuple[int, ...], list[np.ndarray]] = {}
        for inputs in batch:
            for views in _views(inputs):
                groups.setdefault(views.shape[1:], []).append(views)
        features = {shape: iter(mx.split(self.model.image_features(self._pixels(np.concatenate(arrays))),
                                         np.cumsum([a.shape[0] for a in arrays])[:-1].tolist()))
                    for shape, arrays in groups.items()}
        # _assemble asks for the views in the order _views listed them, so each group hands out its rows in turn
        return [self._assemble(inputs, lambda views: next(features[views.shape[1:]])) for inputs in batch]

    def _assemble(self, inputs: DeepseekOCRInputs, features_of: Any) -> mx.array | None:
        """The prompt's image embeddings from `features_of(views)` ((V, 3, S, S) NumPy -> (V, n*n, hidden)), asked in
        `_views` order."""
        if not inputs.images:
            return None
        m = self.model
        pieces = []
        for image in inputs.images:
            if image.tiles.shape[0]:
                wide, high = image.crop
                tiles = features_of(image.tiles)
                n = int(round(tiles.shape[1] ** 0.5))
                grid = tiles.reshape(high, wide, n, n, -1).transpose(0, 2, 1, 3, 4).reshape(high * n, wide * n, -1)
                pieces.append(m.with_newlines(grid))
            glob = features_of(image.global_view[None])
            n = int(round(glob.shape[1] ** 0.5))
            pieces.append(m.with_newlines(glob.reshape(n, n, -1)))
            pieces.append(m.view_seperator[None].astype(glob.dtype))
        return self._checked(inputs, mx.concatenate(pieces, axis=0))

    def _checked(self, inputs: DeepseekOCRInputs, embeds: mx.array) -> mx.array:
        """`embeds`, after checking there is one per image token of the prompt."""
        expected = int(np.count_nonzero(inputs.input_ids == self.config.image_token_id))
        if embeds.shape[0] != expected:
            raise ValueError(f"the images give {embeds.shape[0]} embeddings but the prompt has {expected} image "
                             f"tokens (id {self.config.image_token_id}): the prompt layout does not match the views")
        return embeds

    def prefill(self, inputs: DeepseekOCRInputs, image_embeds: mx.array | None,
                cache: list[KVCache] | None) -> mx.array:
        """Run the whole prompt at positions 0..L-1; (1, vocab) float32 logits of the last position.

        `cache=None` is a plain full forward (nothing kept); otherwise the caches must be empty and are filled.
        """
        ids = np.asarray(inputs.input_ids, dtype=np.int64)
        slots = np.flatnonzero(ids == self.config.image_token_id)
        count = 0 if image_embeds is None else image_embeds.shape[0]
        if count != slots.size:
            raise ValueError(f"{count} image embeddings for {slots.size} image tokens in the prompt")
        if cache is not None and cache[0].offset != 0:
            raise ValueError("prefill needs empty caches (offset 0)")
        embeds = self.model.embed_tokens(mx.array(ids))
        if count:
            embeds[mx.array(slots)] = image_embeds.astype(embeds.dtype)
        positions = mx.arange(ids.size)[None]
        hidden = self.model.decode(embeds[None], positions, cache)
        return self.lm_head(hidden[:, -1]).astype(mx.float32)

    def step(self, token_ids: mx.array, positions: mx.array, cache: list[KVCache]) -> mx.array:
        """One new token per sequence: (B,) ids at (B,) positions -> (B, vocab) float32 logits."""
        tokens = token_ids.astype(mx.int64)[:, None]
        hidden = self.model.decode(self.model.embed_tokens(tokens), positions[:, None], cache)
        return self.lm_head(hidden[:, -1]).astype(mx.float32)


# ----------------------------------------------------------------------------------------------- loading

# Original name -> module name. Empty: attributes carry the checkpoint names. The layout changes are in
# `sanitize`: each MoE layer's per-expert matrices are stacked for SwitchGLU, conv weights go channels-last.
RENAMES: list[tuple[str, str]] = []
EXPERT_PROJECTIONS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

# What `--quantize` touches: the decoder (embeddings, attention, MLPs, routed experts, head). The router,
# norms, vision towers, projector and layout vectors stay float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.layers.", "model.embed_tokens", "lm_head")
# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.sam_model.", "model.vision_model.", "model.projector.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Original checkpoint tensors -> module tensors. Consumes the per-expert entries of `weights`.

    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` become
    `model.layers.N.mlp.experts.{gate,up,down}_proj.weight` stacked over E ((E, I, D), (E, I, D), (E, D, I)); conv weights (O, I, kh, kw) become (O, kh, kw, I).
    """
    for old, new in RENAMES:
        if old in weights:
            weights[new] = weights.pop(old)
    # Conv kernels only: `pos_embed` is 4D too but already channels-last.
    for name in [n for n, t in weights.items() if t.ndim == 4 and n.endswith(".weight")]:
        weights[name] = weights[name].transpose(0, 2, 3, 1)
    layers: dict[str, dict[int, dict[str, mx.array]]] = {}
    for name in [n for n in weights if ".mlp.experts." in n]:
        prefix, rest = name.split(".mlp.experts.", 1)
        expert, proj = rest.split(".", 1)
        if not expert.isdigit() or proj not in EXPERT_PROJECTIONS:
            continue  # left in place: strict assignment reports it as unexpected
        layers.setdefault(prefix, {}).setdefault(int(expert), {})[proj] = weights.pop(name)
    for prefix, experts in layers.items():
        count = max(experts) + 1
        missing = [f"{prefix}.mlp.experts.{e}.{p}" for e in range(count)
                   for p in EXPERT_PROJECTIONS if p not in experts.get(e, {})]
        if missing:
            raise CheckpointError("checkpoint does not match the model: missing tensors: " + ", ".join(missing[:20]))
        ordered = [experts.pop(e) for e in range(count)]
        for proj in EXPERT_PROJECTIONS:
            weights[f"{prefix}.mlp.experts.{proj}"] = mx.stack([t[proj] for t in ordered])
    return weights


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu",
         quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> DeepseekOCRForCausalLM:
    """Build from config.json, read the original checkpoint (lazily: one copy) and assign it strictly.

    `quantize` 4 or 8 quantizes the decoder (`QUANTIZE_PREFIXES`), `quantize_vision` also the towers and
    projector; a converted snapshot loads as saved (`loader.load_module`).
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(DeepseekOCRForCausalLM, DeepseekOCRConfig, config_path, weights_path, dtype=dtype,
                       device=device, sanitize=sanitize, quantize=quantize, group_size=group_size, prefixes=prefixes)
