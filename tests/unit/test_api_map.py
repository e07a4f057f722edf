"""`OCR.map` (common/api.py): many images, each its own answer, in input order, errors raised or yielded in place."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from common.api import OCR
from common.errors import UserError

FAST = {"backend": "torch", "device": "cpu", "dtype": "float32"}


@pytest.fixture()
def ocr(deepseek_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OCR:
    for key, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "xdg-config"), ("XDG_CACHE_HOME", "xdg-cache")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "c.toml"
    config.touch()
    return OCR("deepseek-ocr", model_dir=deepseek_tiny, config=config, mode="tiny", max_new_tokens=3, **FAST)


def _pages() -> list[Image.Image]:
    return [Image.new("RGB", (64 + 16 * i, 48), (255 - 60 * i, 255, 255)) for i in range(3)]


@pytest.mark.slow  # four model runs: ~7 s on two cores
def test_map_equals_one_call_per_image_in_order(ocr: OCR) -> None:
    pages = _pages()
    one_by_one = [ocr(page, ignore_eos=True).token_ids for page in pages]
    mapped = ocr.map(iter(pages), batch_size=2, ignore_eos=True)
    assert not isinstance(mapped, list)  # a generator: results come as they finish
    assert [r.token_ids for r in mapped] == one_by_one


def test_a_failing_input_raises_in_its_place_or_is_yielded(ocr: OCR, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    good = _pages()[0]
    results = ocr.map([good, bad, good], batch_size=2)
    assert next(results).finish_reason in ("stop", "length")
    with pytest.raises(UserError, match="not in a supported image format"):
        next(results)
    kinds = [type(r).__name__ for r in ocr.map([good, bad, good], batch_size=2, return_errors=True)]
    assert kinds == ["Result", "ImageError", "Result"]


def test_map_checks_options_before_it_returns(ocr: OCR) -> None:
    with pytest.raises(UserError, match="batch_size"):
        ocr.map([], batch_size=0)
    with pytest.raises(UserError, match="PaddleOCR-VL"):
        ocr.map([], task="table")
