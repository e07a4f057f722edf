"""DeepSeek-OCR in PyTorch: SAM ViT-B + CLIP-L vision, linear projector, DeepSeek-V2 MoE decoder (MHA, no MLA).

Exact to the official remote code (`deepencoder.py`: `ImageEncoderViT`, `Block`, `Attention`, `get_rel_pos`,
`VitModel`; `modeling_deepseekocr.py`: `DeepseekOCRModel.forward`; `modeling_deepseekv2.py`: decoder, `MoEGate`,
`moe_infer`), rule by rule as in the DeepSeek-OCR RULES (6-11). One deliberate deviation, numerically
equivalent: the routed experts are stacked per layer and run as one grouped matmul (`sanitize` stacks them).
The decoder's RMSNorm, SiLU-gated MLP, attention and residual layer are `layers.py`'s, shared with PaddleOCR-VL;
loading is `loader.load_module`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.deepseek_ocr import DeepseekOCRInputs
from common.errors import CheckpointError
from common.model_config import ClipConfig, DeepseekOCRConfig, DeepseekV2Config, SamConfig

from .cache import KVCache
from .layers import CausalAttention, CausalLM, DecoderBlock, GatedMLP, Linear, RMSNorm, linear
from .loader import load_module
from .quantize import QuantizedExperts

# Architecture constants of the official SAM neck and downsampler (deepencoder.py `ImageEncoderViT`).
NECK_KERNEL = 3
DOWNSAMPLE_STRIDE = 2
QUICK_GELU_SCALE = 1.702
RGB_CHANNELS = 3  # both patch convs read RGB pixels


# ----------------------------------------------------------------------------------------------- SAM leaves

def resize_grid_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """(1, S, S, C) table -> (1, size, size, C): bicubic + antialias in float32 (`get_abs_pos_sam`)."""
    if table.shape[1] == size:
        return table
    resized = F.interpolate(table.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic",
                            antialias=True, align_corners=False)
    return resized.to(table.dtype).permute(0, 2, 3, 1)


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """(2K-1, C) rel-pos table -> (size, size, C) with R[qi - kj + size - 1] (`get_rel_pos`, q and k same size)."""
    rows = 2 * size - 1
    if table.shape[0] != rows:
        # Linear resize in float32, align_corners False, as the official code does for global blocks.
        table = F.interpolate(table.float().t()[None], size=rows, mode="linear")[0].t().to(table.dtype)
    coords = torch.arange(size, device=table.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


class SamAttention(nn.Module):
    """Multi-head attention with SAM's decomposed relative-position bias (`deepencoder.Attention`)."""

    def __init__(self, cfg: SamConfig, span: int) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = Linear(cfg.width, 3 * cfg.width)
        self.proj = Linear(cfg.width, cfg.width)
        self.rel_pos_h = nn.Parameter(torch.empty(2 * span - 1, cfg.head_dim))
        self.rel_pos_w = nn.Parameter(torch.empty(2 * span - 1, cfg.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), full attention over the H*W tokens."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, HW, hd)
        # The bias uses the UNscaled q: rel_h[q, kh] = q . Rh[qh, kh], rel_w likewise over the width axis.
        grid_q = q.reshape(b, self.heads, h, w, self.head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, relative_table(self.rel_pos_h, h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, relative_table(self.rel_pos_w, w))
        # Materialised (HW, HW) additive bias, as the official code: with a mask SDPA still takes the fused CPU
        # kernel, which measured faster than folding the bias into wider q/k.
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class SamMLP(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.lin1 = Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.lin2 = Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of the neck, written out like the official one (same op order in low precision)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            s = self.window
            # Pad the NORMALISED grid bottom/right; padded tokens take part in attention unmasked.
            y = F.pad(y, (0, 0, 0, -w % s, 0, -h % s))
            hp, wp = y.shape[1], y.shape[2]
            y = y.view(b, hp // s, s, wp // s, s, c).transpose(2, 3).reshape(-1, s, s, c)
            y = self.attn(y)
            y = y.view(b, hp // s, wp // s, s, s, c).transpose(2, 3).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SamPatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(RGB_CHANNELS, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).permute(0, 2, 3, 1)  # (B, G, G, C)


class SamEncoder(nn.Module):
    """SAM ViT-B, neck and two stride-2 convs (`deepencoder.ImageEncoderViT`): (B, 3, S, S) -> (B, C3, S/64, S/64)."""

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        first, second = cfg.downsample_channels
        self.patch_embed = SamPatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(SamBlock(cfg, i) for i in range(cfg.layers))
        pad = NECK_KERNEL // 2
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.width, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans, cfg.layer_norm_eps),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=NECK_KERNEL, padding=pad, bias=False),
            LayerNorm2d(cfg.out_chans, cfg.layer_norm_eps),
        )
        self.net_2 = nn.Conv2d(cfg.out_chans, first, NECK_KERNEL, stride=DOWNSAMPLE_STRIDE, padding=pad, bias=False)
        self.net_3 = nn.Conv2d(first, second, NECK_KERNEL, stride=DOWNSAMPLE_STRIDE, padding=pad, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = x + resize_grid_table(self.pos_embed, x.shape[1])
        for block in self.blocks:
            x = block(x)
        return self.net_3(self.net_2(self.neck(x.permute(0, 3, 1, 2))))


# ----------------------------------------------------------------------------------------------- CLIP

class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.width, 3 * cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv_proj(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, c))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(QUICK_GELU_SCALE * x))


class ClipBlock(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    """CLS + SAM features as patch embeddings + resized positions. `patch_embedding` is loaded but never used."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(RGB_CHANNELS, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.width)
        self.grid = cfg.grid

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, n, n) SAM output -> (B, 1 + n*n, C)."""
        b, c, n, _ = features.shape
        x = torch.cat([self.class_embedding.expand(b, 1, c), features.flatten(2).transpose(1, 2)], dim=1)
        table = self.position_embedding.weight
        if n != self.grid:
            # Only the grid part is resized (bicubic + antialias, float32); the CLS row is kept (`get_abs_pos`).
            grid = table[1:].view(1, self.grid, self.grid, c)
            table = torch.cat([table[:1], resize_grid_table(grid, n).reshape(n * n, c)], dim=0)
        return x + table


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_features)))


# ----------------------------------------------------------------------------------------------- projector

class Projector(nn.Module):
    """`MlpProjector` of type "linear": one Linear with bias."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.layers = Linear(cfg.projector_input_dim, cfg.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------------------------- decoder

def rope_inv_freq(cfg: DeepseekV2Config, device: torch.device | str) -> torch.Tensor:
    """Llama default RoPE frequencies, float32 (head_dim / 2,)."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float() / cfg.head_dim
    return 1.0 / (cfg.rope_theta ** exponents)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) positions -> cos, sin (B, 1, L, head_dim), computed in float32 and cast like LlamaRotaryEmbedding."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DecoderAttention(CausalAttention):
    """LlamaAttention ("mha_eager", use_mla false): no biases, half-split RoPE, causal, optional KV cache."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         bias=False)


class MoEGate(nn.Module):
    """float32 softmax router, greedy top-k (`MoEGate`); weights renormalised only when norm_topk_prob."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k, self.normalise, self.scale = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) -> top-k weights (T, k) float32 and expert ids (T, k)."""
        scores = linear(x.float(), self.weight.float()).softmax(dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.normalise and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


def grouped_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedExperts, ends: torch.Tensor) -> torch.Tensor:
    """Rows of `x` sorted by group, group g (rows ends[g-1]:ends[g]) times weight[g].T: (M, K), (G, N, K) -> (M, N).

    One grouped GEMM without a host sync where torch has the kernel (CPU, bfloat16 on CUDA); elsewhere, and for
    quantized experts, a loop over the non-empty groups, which reads the group ends on the host.
    """
    if isinstance(weight, QuantizedExperts):
        return weight(x, ends)
    if x.device.type == "cpu" or x.dtype == torch.bfloat16:
        return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[g].T
        start = end
    return out


class RoutedExperts(nn.Module):
    """The routed experts of one layer, stacked: gate_up_proj (E, 2I, D) = [gate; up], down_proj (E, D, I).

    `--quantize` replaces either stack by a `QuantizedExperts` (quantize.py), which `grouped_linear` runs.
    """

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.count = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts run: the (token, slot) pairs are sorted by expert and grouped."""
        tokens, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # searchsorted instead of bincount: group ends with no host sync.
        experts = torch.arange(self.count, device=x.device, dtype=flat.dtype)
        ends = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)
        rows = x[order // k]
        gate, up = grouped_linear(rows, self.gate_up_proj, ends).chunk(2, dim=-1)
        out_sorted = grouped_linear(F.silu(gate) * up, self.down_proj, ends)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        # The weighted sum runs in float32 (the gate's dtype), then back to the model dtype (`moe_infer`).
        return (out.view(tokens, k, -1).float() * weights[..., None]).sum(dim=1).to(x.dtype)


class DecoderMoE(nn.Module):
    """Routed experts (weighted top-k) plus one shared SiLU MLP of width moe_intermediate * n_shared."""

    def __init__(self, cfg: DeepseekV2Config) -> None:
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        return self.experts(flat, weights, ids).view(x.shape) + self.shared_experts(x)


class DecoderLayer(DecoderBlock):
    """A DeepSeek-V2 layer with use_mla false: Llama attention, then the MoE or (first layers) a dense MLP."""

    def __init__(self, cfg: DeepseekV2Config, index: int) -> None:
        mlp = DecoderMoE(cfg) if cfg.is_moe_layer(index) else GatedMLP(cfg.hidden_size, cfg.intermediate_size,
                                                                        bias=False)
        super().__init__(cfg.hidden_size, cfg.rms_norm_eps, DecoderAttention(cfg), mlp)


# ----------------------------------------------------------------------------------------------- top model

class DeepseekV2Model(nn.Module):
    """The decoder half of `model.*` (embed_tokens, layers, norm), shared with DeepSeek-OCR-2."""

    def __init__(self, lm: DeepseekV2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(lm.vocab_size, lm.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(lm, i) for i in range(lm.num_hidden_layers))
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        # Computed, not loaded: `load` fills it on the real device after the meta build.
        self.register_buffer("rope_inv_freq", torch.empty(lm.head_dim // 2), persistent=False)

    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        """(B, L, D) embeddings at (B, L) positions -> final-normed hidden states (B, L, D)."""
        cos, sin = rope_tables(self.rope_inv_freq, positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.norm(x)


class DeepseekOCRModel(DeepseekV2Model):
    """`model.*` of the checkpoint: the decoder stack, vision towers, projector and layout vectors."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.vision_model = ClipVisionModel(cfg.clip)
        self.projector = Projector(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.n_embed))
        self.view_seperator = nn.Parameter(torch.empty(cfg.n_embed))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) views -> (B, n*n, hidden): [CLIP without CLS, SAM] through the projector (rule 9)."""
        sam = self.sam_model(pixels)
        clip = self.vision_model(sam)
        return self.projector(torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1))

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols, D) -> (rows * (cols + 1), D): `image_newline` at the end of every row."""
        rows, _, d = grid.shape
        return torch.cat([grid, self.image_newline.expand(rows, 1, d)], dim=1).reshape(-1, d)


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

    def _pixels(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, inputs: DeepseekOCRInputs) -> torch.Tensor | None:
        """Every image's embeddings in prompt order, (N_image_tokens, hidden) in the model dtype; None if no image.

        Per image (rule 6): tiles as a (height tiles * n) x (width tiles * n) grid with a newline after every row,
        then the global view's grid with newlines, then one `view_seperator`.
        """
        return self._assemble(inputs, lambda views: self.model.image_features(self._pixels(views)))

    @torch.no_grad()
    def encode_images_batch(self, batch: list[DeepseekOCRInputs]) -> list[torch.Tensor | None]:
        """`encode_images` of several prompts, with one vision pass per view size: every tile and global view of
        the same size, across all prompts, goes through SAM, CLIP and the projector stacked."""
        groups: dict[tuple[int, ...], list[np.ndarray]] = {}
        for inputs in batch:
            for views in _views(inputs):
                groups.setdefault(views.shape[1:], []).append(views)
        features = {shape: iter(self.model.image_features(self._pixels(np.concatenate(arrays))).split(
            [a.shape[0] for a in arrays])) for shape, arrays in groups.items()}
        # _assemble asks for the views in the order _views listed them, so each group hands out its rows in turn
        return [self._assemble(inputs, lambda views: next(features[views.shape[1:]])) for inputs in batch]

    def _assemble(self, inputs: DeepseekOCRInputs, features_of: Any) -> torch.Tensor | None:
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
                grid = tiles.view(high, wide, n, n, -1).permute(0, 2, 1, 3, 4).reshape(high * n, wide * n, -1)
                pieces.append(m.with_newlines(grid))
            glob = features_of(image.global_view[None])
            n = int(round(glob.shape[1] ** 0.5))
            pieces.append(m.with_newlines(glob.view(n, n, -1)))
            pieces.append(m.view_seperator[None])
        return self._checked(inputs, torch.cat(pieces, dim=0))

    def _checked(self, inputs: DeepseekOCRInputs, embeds: torch.Tensor) -> torch.Tensor:
        """`embeds`, after checking there is one per image token of the prompt."""
        expected = int(np.count_nonzero(inputs.input_ids == self.config.image_token_id))
        if embeds.shape[0] != expected:
            raise ValueError(f"the images give {embeds.shape[0]} embeddings but the prompt has {expected} image "
                             f"tokens (id {self.config.image_token_id}): the prompt layout does not match the views")
        return embeds

    @torch.no_grad()
    def prefill(self, inputs: DeepseekOCRInputs, image_embeds: torch.Tensor | None,
                cache: list[KVCache] | None) -> torch.Tensor:
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
        tokens = torch.from_numpy(ids).to(self.device)
        embeds = self.model.embed_tokens(tokens)
        if count:
            # Long-index assignment rather than a boolean mask: no host sync on CUDA.
            embeds[torch.from_numpy(slots).to(self.device)] = image_embeds.to(embeds.dtype)
        positions = torch.arange(ids.size, device=self.device)[None]
        hidden = self.model.decode(embeds[None], positions, cache)
        return self.lm_head(hidden[:, -1]).float()

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: list[KVCache]) -> torch.Tensor:
        """One new token per sequence: (B,) ids at (B,) positions -> (B, vocab) float32 logits."""
        tokens = token_ids.to(self.device, torch.int64)[:, None]
        hidden = self.model.decode(self.model.embed_tokens(tokens), positions.to(self.device)[:, None], cache)
        return self.lm_head(hidden[:, -1]).float()


# ----------------------------------------------------------------------------------------------- loading

# Original name -> module name. Empty: attributes carry the checkpoint names. The only layout change is in
# `sanitize`: each MoE layer's per-expert gate/up/down matrices are stacked for the grouped matmul.
RENAMES: list[tuple[str, str]] = []
EXPERT_PROJECTIONS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

# What `--quantize` touches: the decoder (attention, MLPs, routed experts, head; the embedding stays float on
# torch, see quantize.py). The router, norms, vision towers, projector and layout vectors stay float.
QUANTIZE_PREFIXES: tuple[str, ...] = ("model.layers.", "model.embed_tokens", "lm_head")
# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.sam_model.", "model.vision_model.", "model.projector.")


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original checkpoint tensors -> module tensors. Consumes the per-expert entries of `weights` (frees them).

    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` become `model.layers.N.mlp.experts.gate_up_proj`
    (E, 2I, D) with gate rows first, and `...experts.down_proj` (E, D, I). Everything else passes unchanged.
    """
    for old, new in RENAMES:
        if old in weights:
            weights[new] = weights.pop(old)
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
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
        weights[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([t["gate_proj.weight"], t["up_proj.weight"]], dim=0) for t in ordered])
        weights[f"{prefix}.mlp.experts.down_proj"] = torch.stack([t["down_proj.weight"] for t in ordered])
    return weights


def load(config_path: str | Path, weights_path: str | Path, *, dtype: str | torch.dtype = "bfloat16",
         device: str | torch.device = "cpu", quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> DeepseekOCRForCausalLM:
    """Build on the meta device, read the original checkpoint (memory-mapped) and assign it strictly.

    `quantize` 4 or 8 quantizes the decoder (`QUANTIZE_PREFIXES`), `quantize_vision` also the towers and
    projector; a converted snapshot loads as saved (`loader.load_module`).
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    model = load_module(DeepseekOCRForCausalLM, DeepseekOCRConfig, config_path, weights_path, dtype=dtype,
                        device=device, sanitize=sanitize, quantize=quantize, group_size=group_size, prefixes=prefixes)
    model.model.rope_inv_freq = rope_inv_freq(model.config.language, model.device)
    return model
