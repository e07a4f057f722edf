"""The DeepSeek-OCR checkpoint builder and the torch module both have the real hub layout, checked without weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.model_config import DeepseekOCRConfig
from scripts import ckpt_deepseek_ocr

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "deepseek-ocr"


def _manifest() -> dict[str, tuple[int, ...]]:
    data = json.loads((REFERENCE / "manifest_full.json").read_text())
    return {name: tuple(shape) for name, shape, _ in data["tensors"]}


def _diff(ours: dict[str, tuple[int, ...]], real: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(set(real) - set(ours))[:10]
    extra = sorted(set(ours) - set(real))[:10]
    shapes = sorted(f"{k}: {ours[k]} vs {real[k]}" for k in set(ours) & set(real) if ours[k] != real[k])[:10]
    return f"missing {missing}, unexpected {extra}, shapes {shapes}"


def test_full_plan_equals_the_real_manifest() -> None:
    cfg = DeepseekOCRConfig.from_dict(ckpt_deepseek_ocr.config_dict("full"))
    plan = dict(ckpt_deepseek_ocr.tensor_plan(cfg))
    real = _manifest()
    assert len(real) == 2710
    assert plan == real, _diff(plan, real)


def test_full_config_is_the_real_file_unchanged() -> None:
    real = json.loads((REFERENCE / "config.json").read_text())
    assert ckpt_deepseek_ocr.config_dict("full") == real


def test_tiny_config_keeps_the_real_structure() -> None:
    real = json.loads((REFERENCE / "config.json").read_text())
    tiny = ckpt_deepseek_ocr.config_dict("tiny")
    assert set(tiny) == set(real)
    assert set(tiny["language_config"]) == set(real["language_config"])
    # The decoder keys repeated at top level must agree with language_config.
    for key, value in tiny["language_config"].items():
        if key in tiny and key not in ("architectures", "auto_map", "torch_dtype"):
            assert tiny[key] == value, key
    cfg = DeepseekOCRConfig.from_dict(tiny)
    assert cfg.sam.image_size == 1024 and cfg.sam.patch_size == 16 and cfg.sam.window_size == 14
    assert cfg.language.vocab_size == 129280
    assert any(i in cfg.sam.global_attn_indexes for i in range(cfg.sam.layers))
    assert any(i not in cfg.sam.global_attn_indexes for i in range(cfg.sam.layers))
    assert not cfg.language.is_moe_layer(0) and cfg.language.is_moe_layer(1)


@pytest.mark.slow
def test_tiny_build_is_readable_and_deterministic(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    ckpt_deepseek_ocr.build(tmp_path / "a", size="tiny", seed=0)
    ckpt_deepseek_ocr.build(tmp_path / "b", size="tiny", seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (REFERENCE / name).read_bytes()
    cfg = DeepseekOCRConfig.from_file(tmp_path / "a" / "config.json")
    a = load_file(tmp_path / "a" / ckpt_deepseek_ocr.WEIGHTS_FILE)
    b = load_file(tmp_path / "b" / ckpt_deepseek_ocr.WEIGHTS_FILE)
    assert {k: v.shape for k, v in a.items()} == dict(ckpt_deepseek_ocr.tensor_plan(cfg))
    index = json.loads((tmp_path / "a" / ckpt_deepseek_ocr.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in a.values())
    for name, values in a.items():
        assert values.dtype == np.float32
        assert np.all(np.isfinite(values)) and np.any(values != 0), name
        assert not np.array_equal(values, b[name]), f"{name} does not depend on the seed"
    eos = cfg.language.eos_token_id
    head = a["lm_head.weight"]
    assert np.abs(head[eos]).mean() < 0.5 * np.abs(np.delete(head, eos, axis=0)).mean()


@pytest.mark.slow
def test_bfloat16_storage_rounds_to_nearest_even(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    ckpt_deepseek_ocr.build(tmp_path / "f", size="tiny", dtype="float32")
    ckpt_deepseek_ocr.build(tmp_path / "h", size="tiny", dtype="bfloat16")
    f = load_file(tmp_path / "f" / ckpt_deepseek_ocr.WEIGHTS_FILE)
    h = load_file(tmp_path / "h" / ckpt_deepseek_ocr.WEIGHTS_FILE)
    for name in ("model.sam_model.pos_embed", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert h[name].dtype == torch.bfloat16
        assert torch.equal(h[name], f[name].to(torch.bfloat16)), name


def test_torch_module_state_dict_equals_the_real_manifest() -> None:
    torch = pytest.importorskip("torch")
    from torch_ocr import deepseek_ocr

    cfg = DeepseekOCRConfig.from_file(REFERENCE / "config.json")
    with torch.device("meta"):
        model = deepseek_ocr.DeepseekOCRForCausalLM(cfg)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    real = _manifest()
    # sanitize maps original names to module names; apply it to the manifest's (meta) tensors.
    mapped = deepseek_ocr.sanitize({k: torch.empty(v, device="meta") for k, v in real.items()})
    mapped_shapes = {k: tuple(v.shape) for k, v in mapped.items()}
    assert ours == mapped_shapes, _diff(ours, mapped_shapes)


def test_full_bfloat16_header_totals_the_real_size() -> None:
    cfg = DeepseekOCRConfig.from_dict(ckpt_deepseek_ocr.config_dict("full"))
    header, total = ckpt_deepseek_ocr._header(ckpt_deepseek_ocr.tensor_plan(cfg), "bfloat16")
    data = json.loads((REFERENCE / "manifest_full.json").read_text())
    assert total == data["total_bytes_bf16"] == 2 * data["num_params"]
    assert (len(header) - 8) % 8 == 0
