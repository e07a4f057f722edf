"""Quantization options through the pipeline: MLX quantizes at load time, torch refuses clearly."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_settings
from common.errors import UserError
from common.pipeline import Pipeline, Request


def _settings(tmp_path: Path, model_dir: Path, **flags):
    (tmp_path / "config.toml").touch()  # an empty config.toml: the built-in defaults
    return load_settings(tmp_path / "config.toml", {"model_dir": str(model_dir), "mode": "tiny",
                                                    "max_new_tokens": 3, **flags})


def test_torch_refuses_quantize(tmp_path: Path, deepseek_tiny: Path) -> None:
    pipeline = Pipeline(_settings(tmp_path, deepseek_tiny, backend="torch", device="cpu", quantize=8))
    with pytest.raises(UserError, match="MLX backend"):
        pipeline.load()


def test_mlx_quantizes_at_load_time_through_the_pipeline(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    import mlx.nn as nn

    settings = _settings(tmp_path, deepseek_tiny, backend="mlx", device="cpu", quantize=8,
                         quantize_group_size=32)
    pipeline = Pipeline(settings)
    result = pipeline.run(Request(prompt="Hello"))
    assert result.backend == "mlx" and result.completion_tokens == 3
    quantized = [m for _, m in pipeline.load().model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized, "no layer was quantized"


def test_torch_refuses_an_mlx_snapshot(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    from mlx_ocr.quantize import convert

    out = tmp_path / "q8"
    convert(deepseek_tiny, out, bits=8, group_size=32, dtype="float32")
    pipeline = Pipeline(_settings(tmp_path, out, backend="torch", device="cpu"))
    with pytest.raises(UserError, match="--backend mlx"):
        pipeline.load()


def test_convert_refuses_a_non_empty_output_before_any_work(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    from mlx_ocr.quantize import convert

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        convert(deepseek_tiny, out, bits=4, group_size=32)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_converted_snapshot_loads_as_a_plain_model_dir(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    from mlx_ocr.quantize import convert

    out = tmp_path / "q8"
    convert(deepseek_tiny, out, bits=8, group_size=32, dtype="float32")
    pipeline = Pipeline(_settings(tmp_path, out, backend="mlx", device="cpu", dtype="float32"))
    load_time = Pipeline(_settings(tmp_path, deepseek_tiny, backend="mlx", device="cpu", dtype="float32",
                                   quantize=8, quantize_group_size=32))
    converted = pipeline.run(Request(prompt="Hello"))
    quantized = load_time.run(Request(prompt="Hello"))
    assert converted.token_ids == quantized.token_ids
