"""Decoder building blocks both MLX models share: fused RMSNorm, half-split RoPE, the SiLU-gated MLP, causal
attention over a KV cache and the pre-norm residual layer around them.

A mirror of `torch_ocr/layers.py` (same names, same order). DeepSeek-OCR's decoder and PaddleOCR-VL's ERNIE-4.5
decoder compute these the same way; they differ only in sizes, eps and bias flags, which the callers pass from
their configs. Parameters carry the checkpoint names of both, so each model's checkpoint mapping stays the
identity. DeepSeek-OCR rotates q and k with `mx.fast.rope` between `project` and `attend` instead of cos/sin.
"""
from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from common.model_config import DeepseekV2Config, PaddleTextConfig

from .cache import KVCache, SlotCache


class RMSNorm(nn.Module):
    """RMSNorm through `mx.fast.rms_norm`: float32 accumulation, the weight applied in the fused kernel.

    In float16/bfloat16 the weight is applied before the final rounding rather than after it (a last-bit
    difference from the references, which cast back and then scale).
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((size,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def rotate_half(x: mx.array) -> mx.array:
    """NeoX-style rotation: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Half-split (Llama) RoPE in the dtype of its inputs; cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (compiled once for every shape, as mlx-lm's SwitchGLU does)."""
    return nn.silu(gate) * up


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): DeepseekV2MLP (dense layers, shared experts) and ERNIE-4.5's MLP."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class CausalAttention(nn.Module):
    """Causal multi-head / grouped-query attention over an optional KV cache, RoPE from the caller's cos/sin.

    `project` and `attend` are separate so a model can rotate q and k its own way in between.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool,
                 out_bias: bool | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        # Qwen2 has biases on q/k/v only: `out_bias` False there; None follows `bias`.
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias if out_bias is None else out_bias)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(B, L, D) -> q (B, H, L, Dh), k and v (B, H_kv, L, Dh)."""
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k, v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache | None) -> mx.array:
        """Rotated q, k and v of the new positions -> (B, L, D) after `o_proj`; appends k, v to the cache."""
        b, _, length, _ = q.shape
        mask = None
        if cache is not None:
            k, v = cache.update(k, v)
            mask = cache.mask  # rows of different lengths in a batched step (SlotCache)
        # MLX's "causal" aligns the last query with the last key: also right for a chunk after cached positions.
        if mask is None and length > 1:
            mask = "causal"
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, self.heads * self.head_dim))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache | None) -> mx.array:
        q, k, v = self.project(x)
        return self.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache)


class DecoderBlock(nn.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then + mlp(norm(x)); both norms RMSNorm with one eps."""

    def __init__(self, hidden: int, eps: float, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache | None) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Base of both top models: the untied `lm_head` and what the shared generate loop reads besides the four
    calls (device, dtype, one KV cache per decoder layer), all from the decoder config. A subclass keeps its
    decoder under `model`, whose final `norm` gives the dtype."""

    def __init__(self, decoder: DeepseekV2Config | PaddleTextConfig) -> None:
        super().__init__()
        self.decoder_config = decoder
        self.lm_head = nn.Linear(decoder.hidden_size, decoder.vocab_size, bias=False)

    @property
    def device(self) -> str:
        return str(mx.default_device())

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype  # never quantized, unlike lm_head

    def make_cache(self, batch_size: int, max_length: int) -> list[KVCache]:
        """One KVCache per decoder layer, in the model's dtype."""
        d = self.decoder_config
        return [KVCache(batch_size, d.num_key_value_heads, d.head_dim, max_length, dtype=self.dtype,
                        device=self.device) for _ in range(d.num_hidden_layers)]

    def make_slot_cache(self, max_batch: int, capacity: int) -> SlotCache:
        """The engine's cache: `max_batch` slots of `capacity` positions for every decoder layer."""
        d = self.decoder_config
        return SlotCache(d.num_hidden_layers, max_batch, d.num_key_value_heads, d.head_dim, capacity,
                         dtype=self.dtype, device=self.device)
