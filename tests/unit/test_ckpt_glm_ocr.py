"""The GLM-OCR snapshot builder writes the real layout, and our torch module has exactly the real names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from common.model_config import GlmOcrConfig
from scripts import ckpt_glm_ocr as ckpt

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "glm-ocr"
MTP = "model.language_model.layers.16."


def _manifest() -> list[tuple[str, tuple[int, ...]]]:
    return sorted((name, tuple(shape)) for name, shape, _ in json.loads((REFERENCE / "manifest_full.json").read_text()))


def test_full_plan_equals_real_manifest() -> None:
    assert ckpt.full_plan_from_reference() == _manifest()
    assert sum(1 for name, _ in _manifest() if name.startswith(MTP)) == 16


def test_full_config_is_the_real_one_apart_from_dtype() -> None:
    assert ckpt.make_config("full", "bfloat16") == json.loads((REFERENCE / "config.json").read_text())


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_module_names_and_shapes_equal_manifest_without_mtp(backend: str) -> None:
    config = GlmOcrConfig.from_file(REFERENCE / "config.json")
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from torch_ocr import glm_ocr as model_file

        with torch.device("meta"):
            model = model_file.GlmOCR(config)
        ours = sorted((name, tuple(t.shape)) for name, t in model.state_dict().items())
    else:
        pytest.importorskip("mlx.core")
        from mlx.utils import tree_flatten

        from mlx_ocr import glm_ocr as model_file

        model = model_file.GlmOCR(config)  # MLX initialises lazily: nothing is allocated
        ours = sorted((name, tuple(t.shape)) for name, t in tree_flatten(model.parameters()))
    skip = model_file.mtp_skipper(config.text.num_hidden_layers)
    expected = [(n, s) for n, s in _manifest() if not skip(n)]
    if backend == "mlx":  # MLX convolutions keep channels last
        expected = [(n, model_file.mlx_shape(n, s)) for n, s in expected]
    assert ours == sorted(expected)
    assert all(skip(n) == n.startswith(MTP) for n, _ in _manifest())


def test_tiny_snapshot_files_and_tensors(glm_tiny: Path) -> None:
    for name in ("config.json", "preprocessor_config.json", "generation_config.json", "chat_template.jinja",
                 "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (glm_tiny / name).is_file(), name
    raw = json.loads((glm_tiny / "config.json").read_text())
    real = json.loads((REFERENCE / "config.json").read_text())
    assert set(raw) == set(real) and set(raw["text_config"]) == set(real["text_config"])
    config = GlmOcrConfig.from_file(glm_tiny / "config.json")
    assert config.text.vocab_size == 59392 and sum(config.text.mrope_section) * 2 == config.text.head_dim
    with safe_open(str(glm_tiny / "model.safetensors"), framework="pt") as f:
        stored = sorted((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
    assert stored == ckpt.tensor_plan(raw)
    assert any(n.startswith("model.language_model.layers.2.eh_proj") for n, _ in stored)
