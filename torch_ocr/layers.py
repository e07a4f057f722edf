"""Decoder building blocks both PyTorch models share: float32 RMSNorm, half-split RoPE, the SiLU-gated MLP,
causal attention over a KV cache and the pre-norm residual layer around them.

DeepSeek-OCR's decoder (`modeling_deepseekv2.py`: `DeepseekV2RMSNorm`, `DeepseekV2MLP`, LlamaAttention with
use_mla false) and PaddleOCR-VL's ERNIE-4.5 decoder (transformers `modeling_paddleocr_vl.py`) compute these the
same way; they differ only in sizes, eps and bias flags, which the callers pass from their configs. Parameters
carry the checkpoint names of both (`weight`, `{gate,up,down}_proj`, `{q,k,v,o}_proj`, `input_layernorm`,
`post_attention_layernorm`), so each model's checkpoint mapping stays the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.model_config import DeepseekV2Config, PaddleTextConfig

from .cache import KVCache, SlotCache
from .quantize import QuantizedLinear


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()


def _onednn_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's linear serves this call: float32 on the CPU, inference only."""
    return (_ONEDNN_LINEAR and x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu"
            and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN's linear on the CPU in float32 (inference only).

    Measured on a 2-core AVX-512 CPU, the default float32 CPU linear streamed weights at 14-56 GB/s in a decode
    step and oneDNN's at 31-123 GB/s on the same dense weight (1.7-4x per call at 1-8 rows, 1.1-1.2x at 1024+
    rows). Results differ from `F.linear` by summation order only (about 1e-6 relative). bfloat16 gained
    nothing this way, so every other case keeps `F.linear`. `Linear` goes further and packs its weight.
    """
    if _onednn_float32(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


#: The row count oneDNN's packed weight layout is tuned for: the engine's batched decode steps. Any row count
#: runs on it (measured: 1 row as fast as the dense weight, 8 rows 1.3-2x faster, 1024 rows 1.05-1.15x).
PACK_ROWS = 8


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) whose forward is `linear` above, with one step more
    in float32 on the CPU: its first call replaces the weight by oneDNN's packed (blocked) copy of it, the dense
    one freed, so memory stays one copy. Packed, a row's result no longer depends on how many rows share the
    call (on the dense weight one row takes another kernel than two or more, about 1e-4 apart), so a batched
    decode row equals the same request decoded alone, and 8-row steps run 1.3-2x faster per call.

    The packed weight is an opaque oneDNN tensor: it keeps its shape, dtype and device but has no storage;
    `state_dict` gives it back dense (a copy, on request only). `--quantize` swaps the module for a
    `quantize.QuantizedLinear`, which has the same call.
    """

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.detach().to_dense()

    def pack(self) -> bool:
        """Replace the weight by oneDNN's packed copy now (True) when this module's calls would pack it."""
        weight = self.weight
        if weight.is_mkldnn or not _onednn_float32(weight.new_empty(0), weight):
            return weight.is_mkldnn
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        self.weight = nn.Parameter(packed, requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not weight.is_mkldnn and _onednn_float32(x, weight):
            self.pack()
            weight = self.weight
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return linear(x, weight, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Pack every `Linear` of a float32 CPU model at load time, so the one-off reorder (about a second per
    1.5 GB of weights) is part of loading, not of the first page's vision and prefill; returns how many."""
    with torch.inference_mode():
        return sum(module.pack() for module in model.modules() if isinstance(module, Linear))


class RMSNorm(nn.Module):
    """RMSNorm normalised in float32, cast back, THEN scaled by the weight (the order of both references)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split (Llama) RoPE in the dtype of its inputs; cos/sin broadcast against x."""
    return x * cos + rotate_half(x) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the MLX mirror compiles it into one fused kernel)."""
    return F.silu(gate) * up


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): DeepseekV2MLP (dense layers, shared experts) and ERNIE-4.5's MLP."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over that row's keys (a batched decode step on the CPU), in float32: q (B, H, 1, Dh),
    k and v (B, H_kv, T, Dh), mask (B, 1, 1, T) -> (B, H, 1, Dh) in q's dtype. The fused CPU kernel is slow for
    many rows of a single query (about 20x here in bfloat16); a batch of one keeps the fused kernel."""
    b, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().view(b, kv_heads, heads // kv_heads, dim)         # query heads sharing a kv head
    scores = (grouped @ k.float().transpose(-1, -2)) * dim ** -0.5        # (B, H_kv, H / H_kv, T)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (weights @ v.float()).view(b, heads, 1, dim).to(q.dtype)


class CausalAttention(nn.Module):
    """Causal multi-head / grouped-query attention over an optional KV cache, RoPE from the caller's cos/sin.

    `project` and `attend` are separate so a model can rotate q and k its own way in between.
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, bias: bool,
                 out_bias: bool | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=bias)
        # Qwen2 has biases on q/k/v only: `out_bias` False there; None follows `bias`.
        self.o_proj = Linear(heads * head_dim, hidden, bias=bias if out_bias is None else out_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> q (B, H, L, Dh), k and v (B, H_kv, L, Dh)."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Rotated q, k and v of the new positions -> (B, L, D) after `o_proj`; appends k, v to the cache."""
        b, _, length, _ = q.shape
        mask, causal = None, False
        if cache is not None:
            k, v = cache.update(k, v)
            mask = cache.mask  # rows of different lengths in a batched step (SlotCache)
        total = k.shape[2]
        if mask is None and length == total:
            causal = length > 1
        elif mask is None and length > 1:  # a chunk after cached positions: query i sees keys to (total - length + i)
            mask = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(total - length)
        if mask is not None and length == 1 and q.device.type == "cpu":
            out = decode_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Base of both top models: the untied `lm_head` and what the shared generate loop reads besides the four
    calls (device, dtype, one KV cache per decoder layer), all from the decoder config."""

    def __init__(self, decoder: DeepseekV2Config | PaddleTextConfig) -> None:
        super().__init__()
        self.decoder_config = decoder
        self.lm_head = Linear(decoder.hidden_size, decoder.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of activations and caches (a quantized head's weight is an integer tensor)."""
        head = self.lm_head
        return head.dtype if isinstance(head, QuantizedLinear) else head.weight.dtype

    def make_cache(self, batch_size: int, max_length: int) -> list[KVCache]:
        """One preallocated KVCache per decoder layer, in the model's dtype on its device."""
        d = self.decoder_config
        return [KVCache(batch_size, d.num_key_value_heads, d.head_dim, max_length, dtype=self.dtype,
                        device=self.device) for _ in range(d.num_hidden_layers)]

    def make_slot_cache(self, max_batch: int, capacity: int) -> SlotCache:
        """The engine's cache: `max_batch` slots of `capacity` positions for every decoder layer."""
        d = self.decoder_config
        return SlotCache(d.num_hidden_layers, max_batch, d.num_key_value_heads, d.head_dim, capacity,
                         dtype=self.dtype, device=self.device)
