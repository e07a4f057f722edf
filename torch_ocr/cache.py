"""Key/value caches: `KVCache` for one layer of one batch, `SlotCache` for the engine's slots; preallocated,
written at explicit positions.

Preallocation keeps shapes static (friendly to torch.compile and CUDA graphs) and avoids a concatenation per
step. The caches hold keys and values only; positions are explicit model inputs. Every per-layer object offers
the same two members to the attention: `update(k, v)` -> every key/value so far, and `mask`: None (causal, or all
keys visible for one query) or a (B, 1, L, T) boolean mask for rows of different lengths.
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
        self.mask: torch.Tensor | None = None

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


class SlotCache:
    """Keys and values of every layer for `max_batch` slots, each (max_batch, H_kv, capacity, D_head).

    A slot is prefilled alone (`prefill_view`), then decoded together with the others (`decode_view`): each row
    writes its new key at its own length and attends to its own keys only. `capacity` grows on demand (one copy)
    so a server need not reserve the whole context per slot.
    """

    def __init__(self, num_layers: int, max_batch: int, num_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_layers, self.max_batch, self.num_heads, self.head_dim = num_layers, max_batch, num_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions per slot, keeping what is stored (a no-op when there is room)."""
        if capacity <= self.capacity:
            return
        shape = (self.max_batch, self.num_heads, capacity, self.head_dim)
        old = self.capacity
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    grown[:, :, :old] = store[i]
                if i < len(store):
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    def prefill_view(self, slot: int) -> list[_PrefillView]:
        """Per-layer caches that fill `slot` from position 0, for a model's `prefill` with a batch of one."""
        return [_PrefillView(self.keys[i], self.values[i], slot, self.capacity) for i in range(self.num_layers)]

    def decode_view(self, lengths: list[int]) -> list[_DecodeView]:
        """Per-layer caches for one step over rows 0..len(lengths)-1; row b writes at index `lengths[b]`."""
        rows = len(lengths)
        total = max(lengths) + 1
        if total > self.capacity:
            raise ValueError(f"KV cache full: {total} positions asked, {self.capacity} allocated")
        mask = index = None
        if rows > 1:  # each row sees its own keys only (the attention's batched decode path reads the mask)
            visible = torch.tensor(lengths, device=self.device)[:, None] + 1
            mask = (torch.arange(total, device=self.device)[None] < visible)[:, None, None]  # (B, 1, 1, T)
        if min(lengths) != max(lengths):  # ragged rows: each writes at its own index
            index = torch.tensor(lengths, device=self.device)
        return [_DecodeView(self.keys[i], self.values[i], rows, lengths[0], total, index, mask)
                for i in range(self.num_layers)]


class _PrefillView:
    """One layer of one slot, filled like a `KVCache` of batch one."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: int, capacity: int) -> None:
        self.keys, self.values = keys[slot:slot + 1], values[slot:slot + 1]
        self.offset, self.capacity = 0, capacity
        self.mask: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions asked, {self.capacity} allocated")
        self.keys[:, :, self.offset:end] = keys
        self.values[:, :, self.offset:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class _DecodeView:
    """One layer for one decode step over the first `rows` slots (one new key per row)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, total: int,
                 index: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.keys, self.values = keys[:rows], values[:rows]
        self.start, self.total, self.index, self.mask = start, total, index, mask

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:  # every row at the same length: a plain slice write, as KVCache does
            self.keys[:, :, self.start:self.start + 1] = keys
            self.values[:, :, self.start:self.start + 1] = values
        else:
            rows = torch.arange(self.keys.shape[0], device=keys.device)
            self.keys[rows, :, self.index] = keys[:, :, 0]
            self.values[rows, :, self.index] = values[:, :, 0]
        return self.keys[:, :, :self.total], self.values[:, :, :self.total]
