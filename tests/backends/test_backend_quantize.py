"""Quantization options through the pipeline: both backends quantize at load time and load their own converted
snapshots; each refuses the other's snapshot with one line naming the backend that loads it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_settings
from common.errors import UserError
from common.pipeline import Pipeline, Request
from torch_ocr import quantize as tq


def _settings(tmp_path: Path, model_dir: Path, **flags):
    (tmp_path / "config.toml").touch()  # an empty config.toml: the built-in defaults
    return load_settings(tmp_path / "config.toml", {"model_dir": str(model_dir), "mode": "tiny",
                                                    "max_new_tokens": 3, **flags})


FORCED = Request(prompt="Hello", overrides={"ignore_eos": True})
# Vision towers of each model (module-path prefixes): their linears must stay float.
TOWERS = {"deepseek": ("model.sam_model.", "model.vision_model.", "model.projector."),
          "paddle": ("visual.", "mlp_AR.")}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["deepseek", "paddle"])
def test_torch_quantizes_the_decoder_at_load_time_through_the_pipeline(tmp_path: Path, request: pytest.FixtureRequest,
                                                                       kind: str, bits: int) -> None:
    snapshot = request.getfixturevalue(f"{kind}_tiny")
    pipeline = Pipeline(_settings(tmp_path, snapshot, backend="torch", device="cpu", quantize=bits,
                                  quantize_group_size=32))
    result = pipeline.run(FORCED)
    assert result.backend == "torch" and result.completion_tokens == 3
    model = pipeline.load().model
    quantized = [p for p, m in model.named_modules() if isinstance(m, (tq.QuantizedLinear, tq.QuantizedExperts))]
    assert "lm_head" in quantized and any(".self_attn.q_proj" in p for p in quantized)
    decoder_float = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and not p.startswith(TOWERS[kind])]
    assert not decoder_float, f"decoder linears left float: {decoder_float}"
    tower = [m for p, m in model.named_modules() if p.startswith(TOWERS[kind]) and isinstance(m, torch.nn.Linear)]
    assert tower and all(m.weight.dtype == torch.float32 for m in tower), "the vision towers stay float"


@pytest.mark.slow
def test_torch_converted_snapshot_gives_the_load_time_tokens(tmp_path: Path, deepseek_tiny: Path) -> None:
    out = tmp_path / "q4"
    tq.convert(deepseek_tiny, out, bits=4, group_size=32, dtype="float32")
    converted = Pipeline(_settings(tmp_path, out, backend="torch", device="cpu", dtype="float32",
                                   max_new_tokens=8)).run(FORCED)
    load_time = Pipeline(_settings(tmp_path, deepseek_tiny, backend="torch", device="cpu", dtype="float32",
                                   quantize=4, quantize_group_size=32, max_new_tokens=8)).run(FORCED)
    assert converted.token_ids == load_time.token_ids and len(converted.token_ids) == 8


def test_mlx_refuses_a_torch_snapshot(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    out = tmp_path / "q8"
    tq.convert(deepseek_tiny, out, bits=8, group_size=32, dtype="float32")
    pipeline = Pipeline(_settings(tmp_path, out, backend="mlx", device="cpu"))
    with pytest.raises(UserError, match="torch-quantized snapshot; load it with --backend torch") as error:
        pipeline.load()
    assert "\n" not in str(error.value)


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
    with pytest.raises(UserError, match="MLX-quantized snapshot; load it with --backend mlx") as error:
        pipeline.load()
    assert "\n" not in str(error.value)


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
