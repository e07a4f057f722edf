"""Key/value caches on MLX: `KVCache` for one layer of one batch (mlx-lm's, with torch_ocr/cache.py's surface),
`SlotCache` for the engine's slots (preallocated, written at explicit positions, as torch's).

mlx-lm's cache grows in steps of 256 positions (a lazy concatenation, cheap on unified memory) instead of
preallocating; the `KVCache` subclass only adds torch's constructor and `update`, so the two backends' model files
call the cache identically, and refuses to grow past `max_length` as the preallocated torch cache does. Every
per-layer object offers the same two members to the attention: `update(k, v)` -> every key/value so far, and
`mask`: None (causal, or all keys visible for one query) or a (B, 1, L, T) boolean mask for rows of different
lengths. MLX arrays are values, not buffers: a view cannot write through, so the slot views below hold the whole
layer array and assign into it (MLX updates the array object in place).
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
        self.mask: mx.array | None = None

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H_kv, L, D) keys/values at `offset`; return every key/value so far, (B, H_kv, offset, D)."""
        end = self.offset + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions asked, {self.max_length} allocated")
        return self.update_and_fetch(keys.astype(self.dtype), values.astype(self.dtype))


class SlotCache:
    """Keys and values of every layer for `max_batch` slots, each (max_batch, H_kv, capacity, D_head).

    A slot is prefilled alone (`prefill_view`), then decoded together with the others (`decode_view`): each row
    writes its new key at its own length and attends to its own keys only. `capacity` grows on demand (one copy)
    so a server need not reserve the whole context per slot.
    """

    def __init__(self, num_layers: int, max_batch: int, num_heads: int, head_dim: int, capacity: int, *,
                 dtype: mx.Dtype, device: str | None = None) -> None:
        self.num_layers, self.max_batch, self.num_heads, self.head_dim = num_layers, max_batch, num_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []
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
                grown = mx.zeros(shape, dtype=self.dtype)
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
        mask = None
        if min(lengths) != max(lengths):  # ragged rows: each sees its own keys only
            visible = mx.array(lengths)[:, None] + 1
            mask = (mx.arange(total)[None] < visible)[:, None, None]  # (B, 1, 1, T)
            index = mx.array(lengths)
        else:
            index = None
        return [_DecodeView(self.keys[i], self.values[i], rows, lengths[0], total, index, mask)
                for i in range(self.num_layers)]


class _PrefillView:
    """One layer of one slot, filled like a `KVCache` of batch one."""

    def __init__(self, keys: mx.array, values: mx.array, slot: int, capacity: int) -> None:
        self.keys, self.values, self.slot = keys, values, slot  # the whole layer: MLX slices do not write through
        self.offset, self.capacity = 0, capacity
        self.mask: mx.array | None = None

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions asked, {self.capacity} allocated")
        row = slice(self.slot, self.slot + 1)
        self.keys[row, :, self.offset:end] = keys.astype(self.keys.dtype)
        self.values[row, :, self.offset:end] = values.astype(self.values.dtype)
        self.offset = end
        return self.keys[row, :, :end], self.values[row, :, :end]


class _DecodeView:
    """One layer for one decode step over the first `rows` slots (one new key per row)."""

    def __init__(self, keys: mx.array, values: mx.array, rows: int, start: int, total: int,
                 index: mx.array | None, mask: mx.array | None) -> None:
        self.keys, self.values, self.rows = keys, values, rows  # the whole layer: MLX slices do not write through
        self.start, self.total, self.index, self.mask = start, total, index, mask

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keys, values = keys.astype(self.keys.dtype), values.astype(self.values.dtype)
        if self.index is None:  # every row at the same length: a plain slice write, as KVCache does
            self.keys[:self.rows, :, self.start:self.start + 1] = keys
            self.values[:self.rows, :, self.start:self.start + 1] = values
        else:
            rows = mx.arange(self.rows)
            self.keys[rows, :, self.index] = keys[:, :, 0]
            self.values[rows, :, self.index] = values[:, :, 0]
        return self.keys[:self.rows, :, :self.total], self.values[:self.rows, :, :self.total]
