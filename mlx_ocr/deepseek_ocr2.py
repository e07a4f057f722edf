"""DeepSeek-OCR-2 in MLX: SAM ViT-B, a Qwen2 encoder over SAM tokens + learned queries, linear projector,
DeepSeek-V2 MoE decoder; a mirror of `torch_ocr/deepseek_ocr2.py`.

Exact to transformers 5.23 `modeling_deepseek_ocr2.py`; the SAM tower, projector, decoder and checkpoint
`sanitize` are DeepSeek-OCR's (`deepseek_ocr.py`), imported. Framework differences, numerically equivalent:
channels-last images, and the encoder's RoPE is `mx.fast.rope` (half-split form, offset 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.deepseek_ocr import DeepseekOCRInputs
from common.model_config import DeepseekOCR2Config, Qwen2EncoderConfig

from .deepseek_ocr import QUANTIZE_PREFIXES, DeepseekOCRForCausalLM, DeepseekV2Model, Projector, SamEncoder, sanitize
from .layers import CausalAttention, DecoderBlock, GatedMLP, RMSNorm
from .loader import load_module

# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.sam_model.", "model.qwen2_model.", "model.projector.")


# ----------------------------------------------------------------------------------------------- Qwen2 encoder

def hybrid_mask(length: int, image_tokens: int) -> mx.array:
    """(L, L) bool, True = may attend: causal, plus every image token sees every image token (not the queries)."""
    rows = mx.arange(length)
    causal = rows[:, None] >= rows[None, :]
    both_image = (rows[:, None] < image_tokens) & (rows[None, :] < image_tokens)
    return causal | both_image


class EncoderAttention(CausalAttention):
    """Qwen2 attention (GQA, q/k/v biases, no o_proj bias) under the encoder's hybrid mask; no KV cache."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         bias=True, out_bias=False)
        self.rope_theta = cfg.rope_theta

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, length, _ = x.shape
        q, k, v = self.project(x)
        q, k = (mx.fast.rope(t, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
                for t in (q, k))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, self.heads * self.head_dim))


class EncoderLayer(DecoderBlock):
    """A Qwen2 decoder layer: pre-norm attention and SiLU-gated MLP (no biases), RMSNorm eps 1e-6."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.rms_norm_eps, EncoderAttention(cfg),
                         GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False))

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        # Positions are 0..L-1 for every view: the attention rotates with `mx.fast.rope` at offset 0.
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Stack(nn.Module):
    """`qwen2_model.model.model.*`: the decoder layers and final norm (its token embedding is deleted)."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2Encoder(nn.Module):
    """`qwen2_model.*`: SAM tokens then one query bank, positions 0..L-1 over both; the query outputs leave."""

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        super().__init__()
        self.model = {"model": Qwen2Stack(cfg.encoder)}  # the official double `.model.model`
        for name, rows in cfg.query_banks:
            setattr(self, name, nn.Embedding(rows, cfg.encoder.hidden_size))
        self.config = cfg

    def queries(self, image_tokens: int) -> mx.array:
        """The bank for a view of `image_tokens` SAM tokens: the smallest bank at least that large (<= 144: 768)."""
        banks = self.config.query_banks
        name = next((n for n, rows in banks if image_tokens <= rows), banks[-1][0])
        return getattr(self, name).weight

    def __call__(self, sam: mx.array) -> mx.array:
        """(B, n, n, C) SAM features -> (B, queries, C) encoder outputs of the query positions."""
        b, n, _, c = sam.shape
        count = n * n
        queries = self.queries(count)
        x = mx.concatenate([sam.reshape(b, count, c), mx.broadcast_to(queries, (b, *queries.shape))], axis=1)
        mask = hybrid_mask(x.shape[1], count)
        stack = self.model["model"]
        for layer in stack.layers:
            x = layer(x, mask)
        return stack.norm(x)[:, count:]


# ----------------------------------------------------------------------------------------------- top model

class DeepseekOCR2Model(DeepseekV2Model):
    """`model.*`: the DeepSeek-V2 decoder stack, SAM, the Qwen2 encoder, projector and `view_seperator`."""

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.qwen2_model = Qwen2Encoder(cfg)
        self.projector = Projector(cfg)
        self.view_seperator = mx.zeros((cfg.n_embed,))

    def image_features(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) views -> (B, queries, hidden): SAM, the Qwen2 encoder, the projector."""
        return self.projector(self.qwen2_model(self.sam_model(pixels)))


class DeepseekOCR2ForCausalLM(DeepseekOCRForCausalLM):
    """DeepSeek-OCR's top model with OCR-2's `model.*` and image layout; prefill, step and the batched vision
    pass (same-size views stacked across prompts) are DeepSeek-OCR's."""

    model_class = DeepseekOCR2Model

    def _assemble(self, inputs: DeepseekOCRInputs, features_of: Any) -> mx.array | None:
        """Per image: the tiles' query outputs row-major, the global view's, then `view_seperator`."""
        if not inputs.images:
            return None
        pieces = []
        for image in inputs.images:
            if image.tiles.shape[0]:
                tiles = features_of(image.tiles)
                pieces.append(tiles.reshape(-1, tiles.shape[-1]))
            glob = features_of(image.global_view[None])[0]
            pieces.append(glob)
            pieces.append(self.model.view_seperator[None].astype(glob.dtype))
        return self._checked(inputs, mx.concatenate(pieces, axis=0))


# ----------------------------------------------------------------------------------------------- loading

def load(config_path: str | Path, weights_path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu",
         quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> DeepseekOCR2ForCausalLM:
    """Build from config.json, read the original checkpoint (lazily: one copy) and assign it strictly.

    The checkpoint mapping is DeepSeek-OCR's `sanitize` (identity names, experts stacked, convs channels-last);
    `quantize` 4 or 8 quantizes the decoder, `quantize_vision` also SAM, the encoder and the projector.
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    return load_module(DeepseekOCR2ForCausalLM, DeepseekOCR2Config, config_path, weights_path, dtype=dtype,
                       device=device, sanitize=sanitize, quantize=quantize, group_size=group_size, prefixes=prefixes)
