"""The installed CLI on the MLX backend (CPU), both models: the same JSON answer shape as torch, same ids."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

pytest.importorskip("mlx.core")

CLI = shutil.which("deepseek-ocr-cli") or str(Path(sys.executable).with_name("deepseek-ocr-cli"))
PAGE = Path(__file__).resolve().parents[1] / "data" / "page.png"


def _json(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "config.toml").touch()  # --config must name an existing file
    done = subprocess.run([CLI, *args, "--device", "cpu", "--dtype", "float32", "--format", "json",
                           "--max-new-tokens", "4", "--config", str(tmp_path / "config.toml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("model", ["deepseek-ocr", "paddleocr-vl"])
def test_mlx_matches_torch_through_the_cli(tmp_path: Path, model: str, deepseek_tiny: Path,
                                           paddle_tiny: Path) -> None:
    folder = deepseek_tiny if model == "deepseek-ocr" else paddle_tiny
    extra = ["--mode", "tiny"] if model == "deepseek-ocr" else []
    common = ["--model", model, "--model-dir", str(folder), "--image", str(PAGE), *extra]
    mlx = _json(tmp_path, *common, "--backend", "mlx")
    torch = _json(tmp_path, *common, "--backend", "torch")
    assert (mlx["backend"], mlx["device"], mlx["dtype"]) == ("mlx", "cpu", "float32")
    assert mlx["token_ids"] == torch["token_ids"] and mlx["prompt_tokens"] == torch["prompt_tokens"]
    assert set(mlx["timings_ms"]) >= {"vision.compute_embeddings", "decode.prefill", "decode.generate"}
