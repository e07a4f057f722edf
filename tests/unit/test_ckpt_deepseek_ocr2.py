"""The DeepSeek-OCR-2 checkpoint builder, config parser and torch module have the real hub layout, checked
without weights (the torch module is built on the meta device)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.model_config import DeepseekOCR2Config
from common.models import family_of_config, get_family
from scripts import ckpt_deepseek_ocr2

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "deepseek-ocr-2"
V1_CONFIG = REFERENCE.parent / "deepseek-ocr" / "config.json"


def _manifest() -> dict[str, tuple[int, ...]]:
    return {name: tuple(shape) for name, shape, _ in json.loads((REFERENCE / "manifest_full.json").read_text())}


def test_full_plan_equals_the_real_manifest() -> None:
    cfg = DeepseekOCR2Config.from_dict(ckpt_deepseek_ocr2.config_dict("full"))
    plan = dict(ckpt_deepseek_ocr2.tensor_plan(cfg))
    real = _manifest()
    assert len(real) == 2707
    assert plan == real, (sorted(set(real) - set(plan))[:10], sorted(set(plan) - set(real))[:10])


def test_full_config_reads_the_official_sizes() -> None:
    cfg = DeepseekOCR2Config.from_file(REFERENCE / "config.json")
    enc = cfg.encoder
    assert (enc.hidden_size, enc.num_hidden_layers, enc.num_attention_heads, enc.num_key_value_heads,
            enc.intermediate_size, enc.rope_theta, enc.rms_norm_eps) == (896, 24, 14, 2, 4864, 1e6, 1e-6)
    assert cfg.sam.downsample_channels == (512, 896)  # config.json's 1024 is stale
    assert cfg.sam.mlp_ratio == 4 and cfg.language.num_hidden_layers == 12


def test_tiny_config_shrinks_the_encoder_through_width() -> None:
    tiny = ckpt_deepseek_ocr2.config_dict("tiny")
    real = json.loads((REFERENCE / "config.json").read_text())
    assert set(tiny) == set(real) and set(tiny["vision_config"]["width"]) == set(real["vision_config"]["width"])
    cfg = DeepseekOCR2Config.from_dict(tiny)
    assert (cfg.encoder.num_hidden_layers, cfg.encoder.num_key_value_heads) == (2, 2)
    assert cfg.sam.downsample_channels[-1] == cfg.encoder.hidden_size == cfg.projector_input_dim


def test_the_family_is_told_apart_from_deepseek_ocr() -> None:
    assert family_of_config(json.loads((REFERENCE / "config.json").read_text())) is get_family("deepseek-ocr-2")
    assert family_of_config(json.loads(V1_CONFIG.read_text())) is get_family("deepseek-ocr")


def test_torch_module_names_and_shapes_equal_the_manifest() -> None:
    torch = pytest.importorskip("torch")
    from torch_ocr import deepseek_ocr2 as tm

    cfg = DeepseekOCR2Config.from_file(REFERENCE / "config.json")
    with torch.device("meta"):
        model = tm.DeepseekOCR2ForCausalLM(cfg)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = dict(_manifest())
    # The per-expert tensors are stacked by `sanitize`: compare the stacked names instead.
    for name in [n for n in expected if ".mlp.experts." in n]:
        del expected[name]
    lm = cfg.language
    for i in range(lm.num_hidden_layers):
        if lm.is_moe_layer(i):
            expected[f"model.layers.{i}.mlp.experts.gate_up_proj"] = (
                lm.n_routed_experts, 2 * lm.moe_intermediate_size, lm.hidden_size)
            expected[f"model.layers.{i}.mlp.experts.down_proj"] = (
                lm.n_routed_experts, lm.hidden_size, lm.moe_intermediate_size)
    assert ours == expected
