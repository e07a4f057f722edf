"""The default batch size (common/batch_size.py): KV cache per slot against free memory, capped per device."""
from __future__ import annotations

from common.batch_size import KVShape, default_batch_size, kv_shape


def test_kv_shape_from_nested_or_top_level_config() -> None:
    nested = {"language_config": {"num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10,
                                  "hidden_size": 1280}}
    assert kv_shape(nested) == KVShape(12, 10, 128)
    top = {"num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
           "hidden_size": 1024}
    assert kv_shape(top) == KVShape(18, 2, 128)
    assert kv_shape({"vision_config": {}}) is None


def test_bytes_per_slot_is_layers_times_two_times_heads_dim_tokens_bytes() -> None:
    assert KVShape(12, 10, 128).bytes_per_slot(1000, 2) == 12 * 2 * 10 * 128 * 1000 * 2


def test_default_fits_half_the_free_memory_and_caps_per_device() -> None:
    shape = KVShape(12, 10, 128)
    per_slot = shape.bytes_per_slot(2048 + 512, 2)
    args = {"max_new_tokens": 512, "dtype": "bfloat16"}
    assert default_batch_size(shape, device="cuda", free_bytes=per_slot * 6, **args) == 3
    assert default_batch_size(shape, device="cuda", free_bytes=per_slot * 100, **args) == 8
    assert default_batch_size(shape, device="cpu", free_bytes=per_slot * 100, **args) == 4
    assert default_batch_size(shape, device="cuda", free_bytes=1, **args) == 1
    assert default_batch_size(None, device="metal", free_bytes=None, **args) == 8
    # float32 needs twice the bytes of bfloat16: half the slots.
    assert default_batch_size(shape, device="cuda", free_bytes=per_slot * 12, max_new_tokens=512,
                              dtype="float32") == 3
