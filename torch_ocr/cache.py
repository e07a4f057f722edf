"""Key/value cache for one attention layer: preallocated, written at explicit positions.

Preallocation keeps shapes static (friendly to torch.compile and CUDA graphs) and avoids a concatenation per
step. The cache holds keys and values only; positions are explicit model inputs.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one layer for a batch of sequences, shape (B, H_kv, max_length, D_head)."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.offset = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, L, D) keys/values at `offset`; return every key/value so far, (B, H_kv, offset, D)."""
        length = keys.shape[2]
        end = self.offset + length
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions asked, {self.max_length} allocated")
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]
