"""Shared fixtures: tiny real-layout checkpoints, built once and cached between runs."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT / "tests" / "data" / "reference"
CACHE = Path(os.environ.get("DEEPSEEK_OCR_TEST_CACHE", ROOT / ".cache" / "test-checkpoints"))


def _build_cached(model: str, builder_file: str, size: str = "tiny", seed: int = 0) -> Path:
    """Build a checkpoint once per content hash of its builder, so an edited builder rebuilds."""
    from scripts import make_checkpoint

    digest = hashlib.sha256((ROOT / "scripts" / builder_file).read_bytes()).hexdigest()[:12]
    out = CACHE / f"{model}-{size}-s{seed}-{digest}"
    if not (out / ".complete").exists():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_checkpoint.BUILDERS[model](tmp, size=size, seed=seed, dtype="float32")
        (tmp / ".complete").write_text("ok")
        try:
            tmp.rename(out)
        except OSError:  # another test process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def deepseek_tiny() -> Path:
    """Directory of a tiny DeepSeek-OCR snapshot (real names, real tokenizer, random float32 weights)."""
    return _build_cached("deepseek-ocr", "ckpt_deepseek_ocr.py")


@pytest.fixture(scope="session")
def paddle_tiny() -> Path:
    """Directory of a tiny PaddleOCR-VL snapshot (real names, stand-in tokenizer with real special ids)."""
    return _build_cached("paddleocr-vl", "ckpt_paddleocr_vl.py")


@pytest.fixture(scope="session")
def paddle15_tiny() -> Path:
    """Directory of a tiny PaddleOCR-VL 1.5 snapshot (v1's with the 1.5 preprocessor config and template)."""
    return _build_cached("paddleocr-vl-1.5", "ckpt_paddleocr_vl_1_5.py")


@pytest.fixture(scope="session")
def glm_tiny() -> Path:
    """Directory of a tiny GLM-OCR snapshot (real names, stand-in tokenizer with real special ids)."""
    return _build_cached("glm-ocr", "ckpt_glm_ocr.py")


@pytest.fixture(scope="session")
def deepseek2_tiny() -> Path:
    """Directory of a tiny DeepSeek-OCR-2 snapshot (real names and config structure, DeepSeek-OCR's tokenizer)."""
    return _build_cached("deepseek-ocr-2", "ckpt_deepseek_ocr2.py")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """Name the shuffled order's seed even under `-q` (which hides pytest-randomly's header line), so a failure
    that depends on order can be repeated."""
    if config.pluginmanager.hasplugin("randomly") and hasattr(config.option, "randomly_seed"):
        terminalreporter.write_line(f"test order: --randomly-seed={config.option.randomly_seed} repeats it")
