"""Key/value cache for one attention layer on MLX: mlx-lm's `KVCache` with torch_ocr/cache.py's surface.

mlx-lm's cache grows in steps of 256 positions (a lazy concatenation, cheap on unified memory) instead of
preallocating. This subclass only adds torch's constructor and `update`, so the two backends' model files call the
cache identically, and refuses to grow past `max_length` as the preallocated torch cache does.
"""
from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache as _MLXLMKVCache


class KVCache(_MLXLMKVCache):
    """Keys and values of one layer for a batch of sequences, shape (B, H_kv, offset, D_head)."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        *,
        dtype: mx.Dtype,
        device: str | None = None,  # MLX has one default device per process; kept so calls mirror torch's
    ) -> None:
        super().__init__()
        self.batch_size, self.num_heads, self.head_dim = batch_size, num_heads, head_dim
        self.max_length = max_length
        self.dtype = dtype

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H_kv, L, D) keys/values at `offset`; return every key/value so far, (B, H_kv, offset, D)."""
        end = self.offset + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions asked, {self.max_length} allocated")
        return self.update_and_fetch(keys.astype(self.dtype), values.astype(self.dtype))
