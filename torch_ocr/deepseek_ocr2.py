"""DeepSeek-OCR-2 in PyTorch: SAM ViT-B, a Qwen2 encoder over SAM tokens + learned queries, linear projector,
DeepSeek-V2 MoE decoder.

Exact to transformers 5.23 `modeling_deepseek_ocr2.py` (`DeepseekOcr2VisionModel`, `DeepseekOcr2VisionEncoder`,
`DeepseekOcr2Model.get_image_features`); the SAM tower, projector, decoder and checkpoint `sanitize` are
DeepSeek-OCR's (`deepseek_ocr.py`), imported, since both references compute them the same way. The module
attributes carry the ORIGINAL checkpoint names (`sam_model`, `qwen2_model.model.model.layers`, `query_768`,
`view_seperator`); transformers' conversion mapping renames them, we do not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.deepseek_ocr import DeepseekOCRInputs
from common.model_config import DeepseekOCR2Config, Qwen2EncoderConfig

from .deepseek_ocr import (QUANTIZE_PREFIXES, DeepseekOCRForCausalLM, DeepseekV2Model, Projector, SamEncoder,
                           rope_inv_freq, rope_tables, sanitize)
from .layers import CausalAttention, DecoderBlock, GatedMLP, RMSNorm, apply_rope
from .loader import load_module

# Added by `quantize_vision`: the towers' and projector's linears (convolutions always stay float).
VISION_PREFIXES: tuple[str, ...] = ("model.sam_model.", "model.qwen2_model.", "model.projector.")


# ----------------------------------------------------------------------------------------------- Qwen2 encoder

def hybrid_mask(length: int, image_tokens: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True = may attend: causal, plus every image token sees every image token (not the queries)."""
    rows = torch.arange(length, device=device)
    causal = rows[:, None] >= rows[None, :]
    both_image = (rows[:, None] < image_tokens) & (rows[None, :] < image_tokens)
    return causal | both_image


class EncoderAttention(CausalAttention):
    """Qwen2 attention (GQA, q/k/v biases, no o_proj bias) under the encoder's hybrid mask; no KV cache."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         bias=True, out_bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`DecoderBlock` hands its last argument through: here the (L, L) mask instead of a cache."""
        b, length, _ = x.shape
        q, k, v = self.project(x)
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))


class EncoderLayer(DecoderBlock):
    """A Qwen2 decoder layer: pre-norm attention and SiLU-gated MLP (no biases), RMSNorm eps 1e-6."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.rms_norm_eps, EncoderAttention(cfg),
                         GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False))


class Qwen2Stack(nn.Module):
    """`qwen2_model.model.model.*`: the decoder layers and final norm (its token embedding is deleted)."""

    def __init__(self, cfg: Qwen2EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2Encoder(nn.Module):
    """`qwen2_model.*`: SAM tokens then one query bank, positions 0..L-1 over both; the query outputs leave."""

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"model": Qwen2Stack(cfg.encoder)})  # the official double `.model.model`
        for name, rows in cfg.query_banks:
            self.add_module(name, nn.Embedding(rows, cfg.encoder.hidden_size))
        self.config = cfg
        self.register_buffer("rope_inv_freq", torch.empty(cfg.encoder.head_dim // 2), persistent=False)

    def queries(self, image_tokens: int) -> torch.Tensor:
        """The bank for a view of `image_tokens` SAM tokens: the smallest bank at least that large (<= 144: 768)."""
        banks = self.config.query_banks
        name = next((n for n, rows in banks if image_tokens <= rows), banks[-1][0])
        return getattr(self, name).weight

    def forward(self, sam: torch.Tensor) -> torch.Tensor:
        """(B, C, n, n) SAM features -> (B, queries, C) encoder outputs of the query positions."""
        tokens = sam.flatten(2).transpose(1, 2)
        b, count, _ = tokens.shape
        queries = self.queries(count)
        x = torch.cat([tokens, queries.expand(b, -1, -1)], dim=1)
        length = x.shape[1]
        cos, sin = rope_tables(self.rope_inv_freq, torch.arange(length, device=x.device)[None], x.dtype)
        mask = hybrid_mask(length, count, x.device)
        stack = self.model["model"]
        for layer in stack.layers:
            x = layer(x, cos, sin, mask)
        return stack.norm(x)[:, count:]


# ----------------------------------------------------------------------------------------------- top model

class DeepseekOCR2Model(DeepseekV2Model):
    """`model.*`: the DeepSeek-V2 decoder stack, SAM, the Qwen2 encoder, projector and `view_seperator`."""

    def __init__(self, cfg: DeepseekOCR2Config) -> None:
        super().__init__(cfg.language)
        self.sam_model = SamEncoder(cfg.sam)
        self.qwen2_model = Qwen2Encoder(cfg)
        self.projector = Projector(cfg)
        self.view_seperator = nn.Parameter(torch.empty(cfg.n_embed))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) views -> (B, queries, hidden): SAM, the Qwen2 encoder, the projector."""
        return self.projector(self.qwen2_model(self.sam_model(pixels)))


class DeepseekOCR2ForCausalLM(DeepseekOCRForCausalLM):
    """DeepSeek-OCR's top model with OCR-2's `model.*` and image layout; prefill, step and the batched vision
    pass (same-size views stacked across prompts) are DeepSeek-OCR's."""

    model_class = DeepseekOCR2Model

    def _assemble(self, inputs: DeepseekOCRInputs, features_of: Any) -> torch.Tensor | None:
        """Per image: the tiles' query outputs row-major, the global view's, then `view_seperator`."""
        if not inputs.images:
            return None
        pieces = []
        for image in inputs.images:
            if image.tiles.shape[0]:
                pieces.append(features_of(image.tiles).flatten(0, 1))
            pieces.append(features_of(image.global_view[None])[0])
            pieces.append(self.model.view_seperator[None])
        return self._checked(inputs, torch.cat(pieces, dim=0))


# ----------------------------------------------------------------------------------------------- loading

def load(config_path: str | Path, weights_path: str | Path, *, dtype: str | torch.dtype = "bfloat16",
         device: str | torch.device = "cpu", quantize: int | None = None, group_size: int = 64,
         quantize_vision: bool = False) -> DeepseekOCR2ForCausalLM:
    """Build on the meta device, read the original checkpoint (memory-mapped) and assign it strictly.

    The checkpoint mapping is DeepSeek-OCR's `sanitize` (identity names, per-expert MoE weights stacked);
    `quantize` 4 or 8 quantizes the decoder, `quantize_vision` also SAM, the encoder and the projector.
    """
    prefixes = QUANTIZE_PREFIXES + (VISION_PREFIXES if quantize_vision else ())
    model = load_module(DeepseekOCR2ForCausalLM, DeepseekOCR2Config, config_path, weights_path, dtype=dtype,
                        device=device, sanitize=sanitize, quantize=quantize, group_size=group_size, prefixes=prefixes)
    model.model.rope_inv_freq = rope_inv_freq(model.config.language, model.device)
    model.model.qwen2_model.rope_inv_freq = rope_inv_freq(model.config.encoder, model.device)
    return model
