"""`deepseek-ocr-cli convert` and `--quantize` through the installed console script (torch and MLX on the CPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") leaves this module out

CLI = shutil.which("deepseek-ocr-cli") or str(Path(sys.executable).with_name("deepseek-ocr-cli"))


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    (tmp_path / "config.toml").touch()  # --config must name an existing file
    return subprocess.run([CLI, *args, "--config", str(tmp_path / "config.toml")], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_convert_then_run_the_snapshot(tmp_path: Path, deepseek_tiny: Path, backend: str) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    out = tmp_path / "q8"
    # float32 on both sides: the load-time run below quantizes float32 weights, so must the conversion.
    done = _run(["convert", "--quantize", "8", "--group-size", "32", "--model-dir", str(deepseek_tiny),
                 "--output", str(out), "--backend", backend, "--dtype", "float32"], tmp_path)
    assert done.returncode == 0, done.stderr
    marker = json.loads((out / "config.json").read_text())["quantization"]
    assert "8-bit" in done.stderr and f"--backend {backend}" in done.stderr
    assert marker["bits"] == 8 and marker["format"] == backend
    run = ["--model-dir", str(out), "--backend", backend, "--device", "cpu", "--dtype", "float32",
           "--prompt", "Hello", "--max-new-tokens", "3", "--format", "json"]
    converted = _run(run, tmp_path)
    assert converted.returncode == 0, converted.stderr
    load_time = _run(["--model-dir", str(deepseek_tiny), "--backend", backend, "--device", "cpu", "--dtype",
                      "float32", "--quantize", "8", "--quantize-group-size", "32", "--prompt", "Hello",
                      "--max-new-tokens", "3", "--format", "json"], tmp_path)
    assert load_time.returncode == 0, load_time.stderr
    assert json.loads(converted.stdout)["token_ids"] == json.loads(load_time.stdout)["token_ids"]


def test_convert_user_errors_exit_2(tmp_path: Path, deepseek_tiny: Path) -> None:
    missing = _run(["convert", "--model-dir", str(deepseek_tiny)], tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: convert needs --quantize")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    refused = _run(["convert", "--quantize", "4", "--model-dir", str(deepseek_tiny), "--output", str(busy)],
                   tmp_path)
    assert refused.returncode == 2 and "refusing to overwrite" in refused.stderr
    assert (busy / "x").read_text() == "keep"
    bits = _run(["convert", "--quantize", "3", "--model-dir", str(deepseek_tiny), "--output", str(tmp_path / "o")],
                tmp_path)
    assert bits.returncode == 2 and "4 or 8" in bits.stderr


def test_a_snapshot_on_the_other_backend_is_a_one_line_user_error(tmp_path: Path, deepseek_tiny: Path) -> None:
    pytest.importorskip("mlx.core")
    out = tmp_path / "q4"
    done = _run(["convert", "--quantize", "4", "--group-size", "32", "--model-dir", str(deepseek_tiny),
                 "--output", str(out), "--backend", "torch"], tmp_path)
    assert done.returncode == 0, done.stderr
    refused = _run(["--model-dir", str(out), "--backend", "mlx", "--device", "cpu", "--prompt", "Hi",
                    "--max-new-tokens", "1"], tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "torch-quantized snapshot; load it with --backend torch" in refused.stderr
